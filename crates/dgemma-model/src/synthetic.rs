//! Random but complete DiffusionGemma checkpoints for tests and benchmarks.
//!
//! [`write_synthetic_checkpoint`] writes `config.json` (real checkpoint layout), optionally
//! `generation_config.json`, and the weights as `model.safetensors` or as shards plus
//! `model.safetensors.index.json`. Values come from a seeded generator keyed by the tensor name,
//! so they do not depend on sharding or write order and [`synthetic_values`] can regenerate any
//! tensor to check a round trip. Tensors are generated and written one at a time.
//!
//! Value ranges (chosen to keep activations of a forward pass in a sane range):
//! linear / expert weights U(-a, a) with a = sqrt(3 / fan_in) (unit-variance outputs),
//! embeddings U(-1, 1), norm scales and router scales 1 + U(-0.1, 0.1), decoder `layer_scalar`
//! U(0.5, 1) and the encoder copy drawn independently (so a backend that mixes them up shows).
//!
//! With [`SyntheticSpec::fp8_experts`] the experts are written as a compressed-tensors
//! "FP8-dynamic" checkpoint writes them (the layout of `RedHatAI/diffusiongemma-26B-A4B-it-FP8-dynamic`):
//! per-expert Linears `experts.{e}.{gate,up,down}_proj.weight` (`F8_E4M3 [out, in]`) with
//! `.weight_scale` (`F32 [out, 1]`), quantised per output row from the fused tensors' values
//! (so the codes and scales equal what [`crate::quant::Fp8Experts::quantize`] makes of the
//! float checkpoint with the same seed), and config.json gets a `quantization_config`.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use serde_json::{json, Map, Value};

use crate::checkpoint::{CONFIG_FILE, GENERATION_CONFIG_FILE, INDEX_FILE, SINGLE_FILE};
use crate::config::{
    BidirectionalAttention, ConfigSchema, LayerKind, ModelConfig, RopeSpec, TextConfig,
};
use crate::error::{Error, Result};
use crate::generation::GenerationConfig;
use crate::quant::Fp8Experts;
use crate::tensor::{DType, TensorRef};
use crate::weights::{expected_tensors, names};

/// What to write.
#[derive(Clone, Debug, PartialEq)]
pub struct SyntheticSpec {
    pub text: TextConfig,
    /// dtype of every tensor.
    pub dtype: DType,
    pub seed: u64,
    /// 1 (or 0): one `model.safetensors`; n > 1: n shards plus an index.
    pub shards: usize,
    pub canvas_length: usize,
    /// Top-level `eos_token_id`.
    pub eos_token_ids: Vec<u32>,
    /// When false, an `lm_head.weight` is written too.
    pub tie_word_embeddings: bool,
    /// How config.json spells the full-layer attention shape.
    pub schema: ConfigSchema,
    /// Write `generation_config.json` (transformers' defaults, `max_new_tokens` 256).
    pub write_generation_config: bool,
    /// Also write the weights of a tiny vision tower (see [`vision_config_json`]), which the
    /// text model must ignore. config.json always carries that tiny `vision_config`, so
    /// transformers builds a small vision tower when it loads the checkpoint.
    pub extra_tensors: bool,
    /// Write the experts as compressed-tensors FP8 per-expert Linears (see the module docs).
    pub fp8_experts: bool,
}

impl SyntheticSpec {
    /// A small text config with both layer kinds: 3 layers (sliding, sliding, full), hidden 64,
    /// 4 query heads, sliding KV 2 x 16, full KV 1 x 32, 8 experts top-2, vocab 512.
    pub fn tiny_text_config() -> TextConfig {
        TextConfig {
            vocab_size: 512,
            hidden_size: 64,
            intermediate_size: 96,
            num_hidden_layers: 3,
            num_attention_heads: 4,
            num_key_value_heads: 2,
            head_dim: 16,
            global_head_dim: 32,
            num_global_key_value_heads: 1,
            num_experts: 8,
            top_k_experts: 2,
            moe_intermediate_size: 32,
            sliding_window: 16,
            max_position_embeddings: 4096,
            self_conditioning_size: 96,
            rms_norm_eps: 1e-6,
            layer_types: vec![LayerKind::Sliding, LayerKind::Sliding, LayerKind::Full],
            rope_sliding: RopeSpec::SLIDING_DEFAULT,
            rope_full: RopeSpec::FULL_DEFAULT,
            final_logit_softcapping: Some(30.0),
            pad_token_id: 0,
            bos_token_id: 2,
            eos_token_ids: vec![1],
            attention_k_eq_v: true,
            use_bidirectional_attention: BidirectionalAttention::Vision,
        }
    }

    /// [`SyntheticSpec::tiny_text_config`] in one bf16 file, canvas 16, seed 0.
    pub fn tiny() -> SyntheticSpec {
        SyntheticSpec {
            text: SyntheticSpec::tiny_text_config(),
            dtype: DType::BF16,
            seed: 0,
            shards: 1,
            canvas_length: 16,
            eos_token_ids: vec![1, 106, 50],
            tie_word_embeddings: true,
            schema: ConfigSchema::PerLayerConfig,
            write_generation_config: true,
            extra_tensors: true,
            fp8_experts: false,
        }
    }

    /// The `ModelConfig` that the written config.json parses to.
    pub fn model_config(&self) -> ModelConfig {
        ModelConfig {
            text: self.text.clone(),
            canvas_length: self.canvas_length,
            eos_token_ids: self.eos_token_ids.clone(),
            tie_word_embeddings: self.tie_word_embeddings,
            boi_token_id: None,
            eoi_token_id: None,
            image_token_id: None,
        }
    }

    /// The generation config written when `write_generation_config` is set.
    pub fn generation_config(&self) -> GenerationConfig {
        let mut g = GenerationConfig::defaults_for(&self.model_config());
        g.max_new_tokens = Some(GenerationConfig::DEFAULT_MAX_NEW_TOKENS);
        g
    }

    /// Names and shapes of every tensor written, in write order.
    pub fn tensor_list(&self) -> Vec<(String, Vec<usize>)> {
        let mut list = self.tensor_list_float();
        if self.fp8_experts {
            list = list
                .into_iter()
                .flat_map(|(name, shape)| match fp8_split(&name) {
                    Some(parts) => {
                        let (e, n, k) = (shape[0], shape[1], shape[2]);
                        let rows = n / parts.len();
                        let layer = name.rsplit_once('.').unwrap().0;
                        let mut v = Vec::new();
                        for ex in 0..e {
                            for part in parts {
                                let w = format!("{layer}.{ex}.{part}.weight");
                                v.push((names::scale_of(&w), vec![rows, 1]));
                                v.push((w, vec![rows, k]));
                            }
                        }
                        v
                    }
                    None => vec![(name, shape)],
                })
                .collect();
        }
        if self.extra_tensors {
            list.extend(vision_tensors(self.text.hidden_size));
        }
        list
    }

    /// The float layout's text tensors (fused experts), whatever `fp8_experts` says.
    fn tensor_list_float(&self) -> Vec<(String, Vec<usize>)> {
        expected_tensors(&self.text, self.tie_word_embeddings)
    }

    /// The dtype tensor `name` is written in.
    pub fn tensor_dtype(&self, name: &str) -> DType {
        if self.fp8_experts && fp8_part(name).is_some() {
            if name.ends_with("_scale") {
                DType::F32
            } else {
                DType::F8E4M3
            }
        } else {
            self.dtype
        }
    }

    fn tensor_bytes(&self, name: &str, shape: &[usize]) -> u64 {
        shape.iter().product::<usize>() as u64 * self.tensor_dtype(name).size() as u64
    }

    /// Bytes of all tensor data.
    pub fn data_bytes(&self) -> u64 {
        self.tensor_list().iter().map(|(n, s)| self.tensor_bytes(n, s)).sum()
    }

    fn validate(&self) -> Result<()> {
        self.model_config()
            .validate()
            .map_err(|m| Error::InvalidArgument(format!("synthetic spec: {m}")))?;
        let n = self.tensor_list().len();
        if self.shards > n {
            return Err(Error::InvalidArgument(format!(
                "synthetic spec: {} shards for only {n} tensors",
                self.shards
            )));
        }
        Ok(())
    }
}

/// The `vision_config` written into config.json: a one-layer Gemma 4 vision tower of width 8.
pub fn vision_config_json() -> Value {
    json!({
        "default_output_length": 4,
        "head_dim": 4,
        "hidden_size": 8,
        "intermediate_size": 16,
        "model_type": "gemma4_vision",
        "num_attention_heads": 2,
        "num_hidden_layers": 1,
        "num_key_value_heads": 2,
        "patch_size": 2,
        "pooling_kernel_size": 1,
        "position_embedding_size": 16
    })
}

/// Names and shapes of the tiny vision tower's tensors (as transformers 5.23 names them).
fn vision_tensors(text_hidden: usize) -> Vec<(String, Vec<usize>)> {
    let vt = "model.encoder.vision_tower";
    let l = format!("{vt}.encoder.layers.0");
    let mut v = vec![
        (
            format!("{vt}.patch_embedder.position_embedding_table"),
            vec![2, 16, 8],
        ),
        (
            format!("{vt}.patch_embedder.input_proj.weight"),
            vec![8, 12],
        ),
    ];
    for p in ["q_proj", "k_proj", "v_proj", "o_proj"] {
        v.push((format!("{l}.self_attn.{p}.linear.weight"), vec![8, 8]));
    }
    v.push((format!("{l}.self_attn.q_norm.weight"), vec![4]));
    v.push((format!("{l}.self_attn.k_norm.weight"), vec![4]));
    v.push((format!("{l}.mlp.gate_proj.linear.weight"), vec![16, 8]));
    v.push((format!("{l}.mlp.up_proj.linear.weight"), vec![16, 8]));
    v.push((format!("{l}.mlp.down_proj.linear.weight"), vec![8, 16]));
    for n in [
        "input_layernorm",
        "post_attention_layernorm",
        "pre_feedforward_layernorm",
        "post_feedforward_layernorm",
    ] {
        v.push((format!("{l}.{n}.weight"), vec![8]));
    }
    v.push((
        "model.encoder.embed_vision.embedding_projection.weight".into(),
        vec![text_hidden, 8],
    ));
    v
}

/// SplitMix64.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [-1, 1).
    fn symmetric(&mut self) -> f32 {
        ((self.next_u64() >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
}

fn name_seed(seed: u64, name: &str) -> u64 {
    // FNV-1a over the name, mixed with the seed.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ seed.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    for b in name.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// The values of tensor `name` (shape `shape`) as written, already rounded to `spec.dtype`.
pub fn synthetic_values(spec: &SyntheticSpec, name: &str, shape: &[usize]) -> Vec<f32> {
    let numel: usize = shape.iter().product();
    let mut rng = Rng(name_seed(spec.seed, name));
    let is_scale = name.ends_with("norm.weight")
        || name.contains("layernorm")
        || name.ends_with("router.scale")
        || name.ends_with("per_expert_scale");
    let (center, half_width) = if name.ends_with("layer_scalar") {
        (0.75f32, 0.25f32)
    } else if is_scale {
        (1.0, 0.1)
    } else if name.ends_with("embed_tokens.weight") {
        (0.0, 1.0)
    } else {
        let fan_in = *shape.last().unwrap_or(&1) as f32;
        (0.0, (3.0 / fan_in.max(1.0)).sqrt())
    };
    (0..numel)
        .map(|_| spec.dtype.round(center + half_width * rng.symmetric()))
        .collect()
}

/// The per-expert parts a fused expert tensor is split into (`...experts.gate_up_proj`: gate
/// then up; `...experts.down_proj`: down), `None` for other names.
fn fp8_split(name: &str) -> Option<&'static [&'static str]> {
    if name.ends_with(".experts.gate_up_proj") {
        Some(&["gate_proj", "up_proj"])
    } else if name.ends_with(".experts.down_proj") {
        Some(&["down_proj"])
    } else {
        None
    }
}

/// For a per-expert FP8 tensor name `<layer>.experts.{e}.{part}.weight[_scale]`: the fused
/// tensor's name, the expert, and the part's index among the fused tensor's parts.
fn fp8_part(name: &str) -> Option<(String, usize, usize)> {
    let base = name.strip_suffix(".weight_scale").or_else(|| name.strip_suffix(".weight"))?;
    let (rest, part) = base.rsplit_once('.')?;
    let (layer, expert) = rest.rsplit_once('.')?;
    let expert: usize = expert.parse().ok()?;
    let layer = layer.strip_suffix(".experts")?;
    let (fused, index) = match part {
        "gate_proj" => ("gate_up_proj", 0),
        "up_proj" => ("gate_up_proj", 1),
        "down_proj" => ("down_proj", 0),
        _ => return None,
    };
    Some((format!("{layer}.experts.{fused}"), expert, index))
}

/// The fused expert tensor last quantised for a per-expert FP8 layout (tensors are written in
/// order, so each fused tensor is generated and quantised once).
#[derive(Default)]
struct Fp8Cache {
    fused: Option<(String, Fp8Experts)>,
}

impl Fp8Cache {
    /// The bytes of per-expert tensor `name`: its rows' e4m3 codes, or their float32 scales.
    fn bytes(&mut self, spec: &SyntheticSpec, name: &str) -> Result<Vec<u8>> {
        let (fused, expert, index) = fp8_part(name).expect("an FP8 expert part");
        if self.fused.as_ref().is_none_or(|(n, _)| *n != fused) {
            let shape = spec
                .tensor_list_float()
                .into_iter()
                .find(|(n, _)| *n == fused)
                .map(|(_, s)| s)
                .expect("the fused tensor of an FP8 part");
            let values = synthetic_values(spec, &fused, &shape);
            let t = TensorRef::from_f32(fused.clone(), spec.dtype, shape, &values)?;
            self.fused = Some((fused.clone(), Fp8Experts::quantize(&t)?));
        }
        let q = &self.fused.as_ref().unwrap().1;
        let parts = fp8_split(&fused).unwrap().len();
        let [_, n, _] = q.shape;
        let rows = n / parts;
        let row0 = expert * n + index * rows;
        let mut out = Vec::new();
        for r in row0..row0 + rows {
            if name.ends_with("_scale") {
                out.extend_from_slice(&q.scales[r].to_le_bytes());
            } else {
                out.extend_from_slice(q.row_codes(r));
            }
        }
        Ok(out)
    }
}

/// The `quantization_config` of a compressed-tensors FP8-dynamic checkpoint (weights: float 8-bit,
/// symmetric, per channel; activations: dynamic per token), with the usual ignore list.
fn quantization_config_json() -> Value {
    json!({
        "quant_method": "compressed-tensors",
        "format": "float-quantized",
        "quantization_status": "compressed",
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": {"num_bits": 8, "type": "float", "strategy": "channel", "symmetric": true, "dynamic": false},
                "input_activations": {"num_bits": 8, "type": "float", "strategy": "token", "symmetric": true, "dynamic": true}
            }
        },
        "ignore": ["lm_head", "re:.*embed.*", "re:.*router.*", "re:.*vision_tower.*", "re:.*self_conditioning.*"]
    })
}

fn write_json(path: &Path, value: &Value) -> Result<()> {
    let text = serde_json::to_string_pretty(value).expect("JSON values always serialise");
    std::fs::write(path, text + "\n").map_err(|e| Error::io(path, e))
}

/// Writes one safetensors file holding `tensors` (generated on the fly).
fn write_safetensors(
    path: &Path,
    spec: &SyntheticSpec,
    tensors: &[(String, Vec<usize>)],
) -> Result<u64> {
    let mut header = Map::new();
    header.insert("__metadata__".into(), json!({"format": "pt"}));
    let mut offset = 0u64;
    for (name, shape) in tensors {
        let bytes = spec.tensor_bytes(name, shape);
        header.insert(
            name.clone(),
            json!({"dtype": spec.tensor_dtype(name).name(), "shape": shape, "data_offsets": [offset, offset + bytes]}),
        );
        offset += bytes;
    }
    let mut header_bytes =
        serde_json::to_vec(&Value::Object(header)).expect("JSON values always serialise");
    while !header_bytes.len().is_multiple_of(8) {
        header_bytes.push(b' ');
    }
    let io = |e| Error::io(path, e);
    let mut w = BufWriter::with_capacity(1 << 20, File::create(path).map_err(io)?);
    w.write_all(&(header_bytes.len() as u64).to_le_bytes())
        .map_err(io)?;
    w.write_all(&header_bytes).map_err(io)?;
    let mut buf = Vec::new();
    let mut fp8 = Fp8Cache::default();
    for (name, shape) in tensors {
        buf.clear();
        if spec.tensor_dtype(name) != spec.dtype {
            buf = fp8.bytes(spec, name)?;
        } else {
            for v in synthetic_values(spec, name, shape) {
                spec.dtype.push_le_bytes(v, &mut buf);
            }
        }
        w.write_all(&buf).map_err(io)?;
    }
    w.flush().map_err(io)?;
    Ok(offset)
}

/// Writes a complete random checkpoint into `dir` (created if needed).
pub fn write_synthetic_checkpoint(dir: impl AsRef<Path>, spec: &SyntheticSpec) -> Result<()> {
    let dir = dir.as_ref();
    spec.validate()?;
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let mut config = spec.model_config().to_json(spec.schema);
    config["vision_config"] = vision_config_json();
    if spec.fp8_experts {
        config["quantization_config"] = quantization_config_json();
    }
    write_json(&dir.join(CONFIG_FILE), &config)?;
    if spec.write_generation_config {
        write_json(
            &dir.join(GENERATION_CONFIG_FILE),
            &spec.generation_config().to_json(),
        )?;
    }
    let tensors = spec.tensor_list();
    let shards = spec.shards.max(1);
    if shards == 1 {
        write_safetensors(&dir.join(SINGLE_FILE), spec, &tensors)?;
        return Ok(());
    }
    // Contiguous groups of roughly equal byte size, none empty.
    let sizes: Vec<u64> = tensors.iter().map(|(n, s)| spec.tensor_bytes(n, s)).collect();
    let total: u64 = sizes.iter().sum();
    let mut groups: Vec<Vec<(String, Vec<usize>)>> = vec![Vec::new()];
    let mut acc = 0u64;
    for (i, t) in tensors.iter().enumerate() {
        let remaining_tensors = tensors.len() - i;
        let remaining_groups = shards - groups.len();
        let last = groups.last().unwrap();
        let full = acc >= total * groups.len() as u64 / shards as u64;
        if !last.is_empty()
            && remaining_groups > 0
            && (full || remaining_tensors <= remaining_groups)
        {
            groups.push(Vec::new());
        }
        groups.last_mut().unwrap().push(t.clone());
        acc += sizes[i];
    }
    let n = groups.len();
    let mut weight_map = BTreeMap::new();
    let mut written = 0u64;
    for (k, group) in groups.iter().enumerate() {
        let file = format!("model-{:05}-of-{:05}.safetensors", k + 1, n);
        written += write_safetensors(&dir.join(&file), spec, group)?;
        for (name, _) in group {
            weight_map.insert(name.clone(), json!(file));
        }
    }
    let index = json!({"metadata": {"total_size": written}, "weight_map": weight_map});
    write_json(&dir.join(INDEX_FILE), &index)
}

/// The paths [`write_synthetic_checkpoint`] writes for `spec`, for tests that corrupt a file.
pub fn synthetic_files(dir: impl AsRef<Path>, spec: &SyntheticSpec) -> Vec<PathBuf> {
    let dir = dir.as_ref();
    let shards = spec.shards.max(1);
    if shards == 1 {
        vec![dir.join(SINGLE_FILE)]
    } else {
        (1..=shards)
            .map(|k| dir.join(format!("model-{k:05}-of-{shards:05}.safetensors")))
            .collect()
    }
}
