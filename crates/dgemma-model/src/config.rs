//! `config.json` of a DiffusionGemma checkpoint (transformers `DiffusionGemmaConfig` with a
//! nested `DiffusionGemmaTextConfig`).
//!
//! Both schemas transformers has written are accepted:
//!
//! * **per_layer_config** (transformers 5.23 `save_pretrained`): the global `head_dim` /
//!   `num_key_value_heads` are the sliding-layer values, and `per_layer_config` maps zero-padded
//!   layer indices (`"05"`, `"11"`, ...) to overrides (`{"head_dim": 512, "num_key_value_heads": 2}`)
//!   for the full-attention layers. Keys may also be layer-type names (`"full_attention"`),
//!   which apply to every layer of that type. An override equal to the global value is dropped
//!   by transformers, so a layer without an entry uses the global values.
//! * **flat fields**: `global_head_dim` and `num_global_key_value_heads` give the full-layer
//!   values (what the conversion script passes to the constructor). If both schemas are present,
//!   `per_layer_config` wins, as in transformers (`__post_init__` pops the flat fields).
//!
//! Fields that shape tensors are required; the rest take transformers' defaults. A few
//! behaviours of transformers are reproduced on purpose: a missing `layer_types` is derived as
//! five sliding layers then one full layer, repeated; the last layer is forced to full attention;
//! `use_bidirectional_attention: "all"` halves the sliding window (`w // 2 + 1`);
//! `final_logit_softcapping` defaults to 30.0 (transformers does not serialise it).

use std::path::Path;

use serde_json::{json, Map, Value};

use crate::error::{Error, Result};
use crate::json::{self, describe, Obj};

/// Attention kind of one layer (`layer_types` entry).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LayerKind {
    /// `sliding_attention`: local window, `head_dim`, `num_key_value_heads`, separate V.
    Sliding,
    /// `full_attention`: global, `global_head_dim`, `num_global_key_value_heads`, V = K.
    Full,
}

impl LayerKind {
    /// The name transformers uses in `layer_types` and `rope_parameters`.
    pub fn name(self) -> &'static str {
        match self {
            LayerKind::Sliding => "sliding_attention",
            LayerKind::Full => "full_attention",
        }
    }

    /// Parses a `layer_types` entry (`"attention"` is transformers' legacy name for full).
    pub fn from_name(name: &str) -> Option<LayerKind> {
        match name {
            "sliding_attention" => Some(LayerKind::Sliding),
            "full_attention" | "attention" => Some(LayerKind::Full),
            _ => None,
        }
    }
}

/// RoPE variant (`rope_parameters.<layer type>.rope_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RopeKind {
    /// `default`: every pair rotates, `inv_freq[j] = 1 / theta^(2j / head_dim)`.
    Default,
    /// `proportional`: the first `int(partial * head_dim // 2)` pairs rotate with exponent
    /// denominator `head_dim`; the remaining pairs have `inv_freq = 0` (no rotation).
    Proportional,
}

impl RopeKind {
    pub fn name(self) -> &'static str {
        match self {
            RopeKind::Default => "default",
            RopeKind::Proportional => "proportional",
        }
    }
}

/// Which torch CPU kernel computed `theta ** exponent` when transformers built `inv_freq`.
///
/// torch's vectorised pow (AVX2 / AVX-512) is SLEEF's `powf_u10`, which is not correctly
/// rounded; elements past the last full double-vector block use the scalar `std::pow`
/// (glibc `powf`). transformers computes `inv_freq` on the CPU at model init, so on x86 the
/// values depend on the CPU capability torch dispatches to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum TorchCpuKernel {
    /// AVX-512 (blocks of 32 floats): the default of torch on current x86 servers.
    #[default]
    Avx512,
    /// AVX2 (blocks of 16 floats).
    Avx2,
    /// `ATEN_CPU_CAPABILITY=default`: scalar `std::pow` for every element.
    Scalar,
}

impl TorchCpuKernel {
    fn block(self) -> usize {
        match self {
            TorchCpuKernel::Avx512 => 32,
            TorchCpuKernel::Avx2 => 16,
            TorchCpuKernel::Scalar => usize::MAX,
        }
    }
}

/// RoPE parameters of one layer type.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RopeSpec {
    pub kind: RopeKind,
    pub theta: f64,
    pub partial_rotary_factor: f64,
}

impl RopeSpec {
    /// transformers' default for sliding layers: `{rope_type: default, rope_theta: 10000}`.
    pub const SLIDING_DEFAULT: RopeSpec = RopeSpec {
        kind: RopeKind::Default,
        theta: 10_000.0,
        partial_rotary_factor: 1.0,
    };
    /// transformers' default for full layers: proportional, theta 1e6, factor 0.25.
    pub const FULL_DEFAULT: RopeSpec = RopeSpec {
        kind: RopeKind::Proportional,
        theta: 1_000_000.0,
        partial_rotary_factor: 0.25,
    };

    /// Number of rotating pairs for a head of `head_dim` (the nonzero prefix of `inv_freq`).
    pub fn rotary_pairs(&self, head_dim: usize) -> usize {
        match self.kind {
            RopeKind::Default => head_dim / 2,
            // Python: int(rope_proportion * head_dim // 2), in float64.
            RopeKind::Proportional => {
                let x = (self.partial_rotary_factor * head_dim as f64 / 2.0).floor();
                (x.max(0.0) as usize).min(head_dim / 2)
            }
        }
    }

    /// `head_dim / 2` inverse frequencies, bit-identical to the float32 buffer transformers
    /// builds on an x86 CPU with AVX-512 (see [`RopeSpec::inv_freq_for`]).
    pub fn inv_freq(&self, head_dim: usize) -> Vec<f32> {
        self.inv_freq_for(head_dim, TorchCpuKernel::Avx512)
    }

    /// `inv_freq` as torch computes it with the given CPU kernel:
    /// `exponent = float32(arange(0, 2n, 2)) / head_dim` (float32 division),
    /// `inv = 1 / float32(theta) ** exponent` (float32 pow, float32 reciprocal), followed for
    /// proportional RoPE by `head_dim/2 - n` zeros.
    pub fn inv_freq_for(&self, head_dim: usize, kernel: TorchCpuKernel) -> Vec<f32> {
        let half = head_dim / 2;
        let n = self.rotary_pairs(head_dim);
        let base = self.theta as f32;
        let dim = head_dim as f32;
        let vector_end = if kernel.block() == usize::MAX {
            0
        } else {
            n / kernel.block() * kernel.block()
        };
        let mut out = Vec::with_capacity(half);
        for i in 0..n {
            let exponent = (2 * i) as f32 / dim;
            let p = if i < vector_end {
                crate::sleef::powf_u10(base, exponent)
            } else {
                base.powf(exponent)
            };
            out.push(1.0f32 / p);
        }
        out.resize(half, 0.0);
        out
    }
}

/// `use_bidirectional_attention` of the text config.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum BidirectionalAttention {
    /// Absent / null: the encoder is causal.
    #[default]
    None,
    /// `"vision"`: image tokens attend bidirectionally inside an image; text is causal.
    Vision,
    /// `"all"`: the encoder is bidirectional; transformers halves the sliding window.
    All,
}

impl BidirectionalAttention {
    pub fn name(self) -> Option<&'static str> {
        match self {
            BidirectionalAttention::None => None,
            BidirectionalAttention::Vision => Some("vision"),
            BidirectionalAttention::All => Some("all"),
        }
    }
}

/// How [`TextConfig::to_json`] writes the full-layer attention shape.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum ConfigSchema {
    /// `per_layer_config` with zero-padded layer-index keys (transformers 5.23 `save_pretrained`).
    #[default]
    PerLayerConfig,
    /// `global_head_dim` + `num_global_key_value_heads` fields.
    GlobalFields,
}

/// The text model (`text_config`), normalised.
#[derive(Clone, Debug, PartialEq)]
pub struct TextConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    /// Width of the dense GeGLU MLP of every layer.
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    /// Query heads (all layers).
    pub num_attention_heads: usize,
    /// KV heads of sliding layers.
    pub num_key_value_heads: usize,
    /// Head dim of sliding layers.
    pub head_dim: usize,
    /// Head dim of full-attention layers.
    pub global_head_dim: usize,
    /// KV heads of full-attention layers.
    pub num_global_key_value_heads: usize,
    pub num_experts: usize,
    pub top_k_experts: usize,
    /// Per-expert GeGLU width.
    pub moe_intermediate_size: usize,
    /// Effective sliding window (already halved when `use_bidirectional_attention == All`).
    pub sliding_window: usize,
    pub max_position_embeddings: usize,
    /// Width of the self-conditioning MLP (`self_conditioning_size`, else `intermediate_size`).
    pub self_conditioning_size: usize,
    pub rms_norm_eps: f64,
    pub layer_types: Vec<LayerKind>,
    pub rope_sliding: RopeSpec,
    pub rope_full: RopeSpec,
    /// `None` = no final softcap (only if config.json says `null`).
    pub final_logit_softcapping: Option<f64>,
    pub pad_token_id: u32,
    pub bos_token_id: u32,
    pub eos_token_ids: Vec<u32>,
    /// Full-attention layers have no v_proj and use K as V (always true for DiffusionGemma).
    pub attention_k_eq_v: bool,
    pub use_bidirectional_attention: BidirectionalAttention,
}

/// Attention shape of one layer, from [`TextConfig::layer`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LayerSpec {
    pub kind: LayerKind,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    /// `Some(window)` on sliding layers.
    pub sliding_window: Option<usize>,
    /// V is K (no v_proj): full layers.
    pub k_eq_v: bool,
    pub rope: RopeSpec,
}

impl LayerSpec {
    /// Rows of q_proj (`num_heads * head_dim`).
    pub fn q_dim(&self) -> usize {
        self.num_heads * self.head_dim
    }

    /// Rows of k_proj / v_proj (`num_kv_heads * head_dim`).
    pub fn kv_dim(&self) -> usize {
        self.num_kv_heads * self.head_dim
    }

    /// Query heads per KV head.
    pub fn gqa_group(&self) -> usize {
        self.num_heads / self.num_kv_heads
    }

    /// RoPE inverse frequencies for this layer (`head_dim / 2` entries).
    pub fn inv_freq(&self) -> Vec<f32> {
        self.rope.inv_freq(self.head_dim)
    }
}

/// The whole `config.json`.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelConfig {
    pub text: TextConfig,
    /// Block size C (`canvas_length`, default 256).
    pub canvas_length: usize,
    /// Top-level `eos_token_id` (int or list), else the text config's.
    pub eos_token_ids: Vec<u32>,
    /// lm_head = embedding (default true).
    pub tie_word_embeddings: bool,
    pub boi_token_id: Option<u32>,
    pub eoi_token_id: Option<u32>,
    pub image_token_id: Option<u32>,
}

/// Text-config fields that shape tensors; a missing one is an error.
const REQUIRED_TEXT_FIELDS: [&str; 10] = [
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "intermediate_size",
    "num_experts",
    "top_k_experts",
    "moe_intermediate_size",
];

impl ModelConfig {
    /// Reads and validates `config.json`.
    pub fn from_file(path: impl AsRef<Path>) -> Result<ModelConfig> {
        let path = path.as_ref();
        let value = json::read_file(path)?;
        ModelConfig::from_value(&value, path)
    }

    /// Parses config JSON text; errors name the file as `config.json`.
    pub fn from_json_str(text: &str) -> Result<ModelConfig> {
        ModelConfig::from_json_str_named(text, Path::new("config.json"))
    }

    /// Parses config JSON text; errors name `file`.
    pub fn from_json_str_named(text: &str, file: &Path) -> Result<ModelConfig> {
        let value = json::parse(text, file)?;
        ModelConfig::from_value(&value, file)
    }

    /// Parses an already-parsed JSON value.
    pub fn from_value(value: &Value, file: &Path) -> Result<ModelConfig> {
        let top = Obj::new(file, "", value)?;
        if let Some(mt) = top.opt_str("model_type")? {
            if mt != "diffusion_gemma" && mt != "diffusion_gemma_text" {
                return Err(top.err(
                    "model_type",
                    format!("`{mt}` is not a DiffusionGemma config (expected `diffusion_gemma`)"),
                ));
            }
        }
        // A bare text config (model_type diffusion_gemma_text, or text fields at the top level)
        // is accepted too.
        let text_obj = match top.opt_obj("text_config")? {
            Some(t) => t,
            None if top.has("hidden_size") => top.clone(),
            None => return Err(top.missing("text_config")),
        };
        let text = TextConfig::from_obj(&text_obj)?;

        let canvas_length = top.opt_usize("canvas_length")?.unwrap_or(256);
        if canvas_length == 0 {
            return Err(top.err("canvas_length", "must be positive"));
        }
        let eos_token_ids = if std::ptr::eq(text_obj.map, top.map) {
            text.eos_token_ids.clone()
        } else {
            top.opt_id_list("eos_token_id")?
                .unwrap_or_else(|| text.eos_token_ids.clone())
        };
        for &id in &eos_token_ids {
            if id as usize >= text.vocab_size {
                return Err(top.err(
                    "eos_token_id",
                    format!(
                        "token id {id} is outside the vocabulary (vocab_size {})",
                        text.vocab_size
                    ),
                ));
            }
        }
        let tie_word_embeddings = top.opt_bool("tie_word_embeddings")?.unwrap_or(true);
        Ok(ModelConfig {
            canvas_length,
            eos_token_ids,
            tie_word_embeddings,
            boi_token_id: top.opt_u32("boi_token_id")?,
            eoi_token_id: top.opt_u32("eoi_token_id")?,
            image_token_id: top.opt_u32("image_token_id")?,
            text,
        })
    }

    /// A `config.json` in the real checkpoint's layout (`DiffusionGemmaConfig`).
    pub fn to_json(&self, schema: ConfigSchema) -> Value {
        let mut m = Map::new();
        m.insert(
            "architectures".into(),
            json!(["DiffusionGemmaForBlockDiffusion"]),
        );
        if let Some(v) = self.boi_token_id {
            m.insert("boi_token_id".into(), json!(v));
        }
        m.insert("canvas_length".into(), json!(self.canvas_length));
        if let Some(v) = self.eoi_token_id {
            m.insert("eoi_token_id".into(), json!(v));
        }
        m.insert("eos_token_id".into(), json!(self.eos_token_ids));
        if let Some(v) = self.image_token_id {
            m.insert("image_token_id".into(), json!(v));
        }
        m.insert("initializer_range".into(), json!(0.02));
        m.insert("model_type".into(), json!("diffusion_gemma"));
        m.insert("text_config".into(), self.text.to_json(schema));
        m.insert(
            "tie_word_embeddings".into(),
            json!(self.tie_word_embeddings),
        );
        m.insert("transformers_version".into(), json!("5.23.0"));
        Value::Object(m)
    }

    /// Full consistency check (also run by the parsers).
    pub fn validate(&self) -> std::result::Result<(), String> {
        self.text.validate()?;
        if self.canvas_length == 0 {
            return Err("canvas_length must be positive".into());
        }
        if let Some(&id) = self
            .eos_token_ids
            .iter()
            .find(|&&id| id as usize >= self.text.vocab_size)
        {
            return Err(format!(
                "eos token id {id} is outside the vocabulary (vocab_size {})",
                self.text.vocab_size
            ));
        }
        Ok(())
    }
}

impl TextConfig {
    /// Attention shape of layer `i`. Panics if `i >= num_hidden_layers`.
    pub fn layer(&self, i: usize) -> LayerSpec {
        assert!(
            i < self.num_hidden_layers,
            "layer index {i} out of range (num_hidden_layers {})",
            self.num_hidden_layers
        );
        match self.layer_types[i] {
            LayerKind::Sliding => LayerSpec {
                kind: LayerKind::Sliding,
                num_heads: self.num_attention_heads,
                num_kv_heads: self.num_key_value_heads,
                head_dim: self.head_dim,
                sliding_window: Some(self.sliding_window),
                k_eq_v: false,
                rope: self.rope_sliding,
            },
            LayerKind::Full => LayerSpec {
                kind: LayerKind::Full,
                num_heads: self.num_attention_heads,
                num_kv_heads: self.num_global_key_value_heads,
                head_dim: self.global_head_dim,
                sliding_window: None,
                k_eq_v: self.attention_k_eq_v,
                rope: self.rope_full,
            },
        }
    }

    /// Every layer's spec in order.
    pub fn layers(&self) -> impl Iterator<Item = LayerSpec> + '_ {
        (0..self.num_hidden_layers).map(move |i| self.layer(i))
    }

    /// Indices of the full-attention layers.
    pub fn full_layers(&self) -> Vec<usize> {
        (0..self.num_hidden_layers)
            .filter(|&i| self.layer_types[i] == LayerKind::Full)
            .collect()
    }

    /// transformers' default `layer_types`: `(i + 1) % 6 != 0` is sliding.
    pub fn default_layer_types(num_hidden_layers: usize) -> Vec<LayerKind> {
        (0..num_hidden_layers)
            .map(|i| {
                if (i + 1) % 6 != 0 {
                    LayerKind::Sliding
                } else {
                    LayerKind::Full
                }
            })
            .collect()
    }

    /// Consistency checks: positive sizes, layer_types length, GQA divisibility, top-k, RoPE.
    pub fn validate(&self) -> std::result::Result<(), String> {
        let positive = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_key_value_heads),
            ("head_dim", self.head_dim),
            ("global_head_dim", self.global_head_dim),
            (
                "num_global_key_value_heads",
                self.num_global_key_value_heads,
            ),
            ("num_experts", self.num_experts),
            ("top_k_experts", self.top_k_experts),
            ("moe_intermediate_size", self.moe_intermediate_size),
            ("sliding_window", self.sliding_window),
            ("max_position_embeddings", self.max_position_embeddings),
            ("self_conditioning_size", self.self_conditioning_size),
        ];
        for (name, v) in positive {
            if v == 0 {
                return Err(format!("`{name}` must be positive, got 0"));
            }
        }
        if self.layer_types.len() != self.num_hidden_layers {
            return Err(format!(
                "`layer_types` has {} entries but num_hidden_layers is {}",
                self.layer_types.len(),
                self.num_hidden_layers
            ));
        }
        if !self
            .num_attention_heads
            .is_multiple_of(self.num_key_value_heads)
        {
            return Err(format!(
                "num_attention_heads ({}) is not divisible by num_key_value_heads ({})",
                self.num_attention_heads, self.num_key_value_heads
            ));
        }
        if !self
            .num_attention_heads
            .is_multiple_of(self.num_global_key_value_heads)
        {
            return Err(format!(
                "num_attention_heads ({}) is not divisible by the full-attention layers' num_key_value_heads ({})",
                self.num_attention_heads, self.num_global_key_value_heads
            ));
        }
        if !self.head_dim.is_multiple_of(2) || !self.global_head_dim.is_multiple_of(2) {
            return Err(format!(
                "head dims must be even for RoPE (head_dim {}, full-layer head_dim {})",
                self.head_dim, self.global_head_dim
            ));
        }
        if self.top_k_experts > self.num_experts {
            return Err(format!(
                "top_k_experts ({}) is larger than num_experts ({})",
                self.top_k_experts, self.num_experts
            ));
        }
        if !(self.rms_norm_eps.is_finite() && self.rms_norm_eps > 0.0) {
            return Err(format!(
                "rms_norm_eps must be a positive number, got {}",
                self.rms_norm_eps
            ));
        }
        if let Some(c) = self.final_logit_softcapping {
            if !(c.is_finite() && c > 0.0) {
                return Err(format!("final_logit_softcapping must be positive, got {c}"));
            }
        }
        if !self.attention_k_eq_v {
            return Err("attention_k_eq_v = false is not supported: DiffusionGemma's full-attention layers always use K as V".into());
        }
        for (kind, rope) in [
            (LayerKind::Sliding, &self.rope_sliding),
            (LayerKind::Full, &self.rope_full),
        ] {
            validate_rope(rope).map_err(|m| format!("rope_parameters.{}: {m}", kind.name()))?;
        }
        for (name, id) in [
            ("pad_token_id", self.pad_token_id),
            ("bos_token_id", self.bos_token_id),
        ] {
            if id as usize >= self.vocab_size {
                return Err(format!(
                    "{name} {id} is outside the vocabulary (vocab_size {})",
                    self.vocab_size
                ));
            }
        }
        if let Some(&id) = self
            .eos_token_ids
            .iter()
            .find(|&&id| id as usize >= self.vocab_size)
        {
            return Err(format!(
                "eos_token_id {id} is outside the vocabulary (vocab_size {})",
                self.vocab_size
            ));
        }
        Ok(())
    }

    fn from_obj(t: &Obj<'_>) -> Result<TextConfig> {
        let file = t.file;
        for key in REQUIRED_TEXT_FIELDS {
            if !t.has(key) {
                return Err(t.missing(key));
            }
        }
        let vocab_size = t.req_usize("vocab_size")?;
        let hidden_size = t.req_usize("hidden_size")?;
        let intermediate_size = t.req_usize("intermediate_size")?;
        let num_hidden_layers = t.req_usize("num_hidden_layers")?;
        let num_attention_heads = t.req_usize("num_attention_heads")?;
        let num_key_value_heads = t.req_usize("num_key_value_heads")?;
        let head_dim = t.req_usize("head_dim")?;
        let num_experts = t.req_usize("num_experts")?;
        let top_k_experts = t.req_usize("top_k_experts")?;
        let moe_intermediate_size = t.req_usize("moe_intermediate_size")?;

        if let Some(act) = t.opt_str("hidden_activation")? {
            if act != "gelu_pytorch_tanh" {
                return Err(t.err(
                    "hidden_activation",
                    format!("`{act}` is not supported (DiffusionGemma uses gelu_pytorch_tanh)"),
                ));
            }
        }
        if t.opt_bool("attention_bias")?.unwrap_or(false) {
            return Err(t.err(
                "attention_bias",
                "true is not supported (DiffusionGemma's projections have no bias)",
            ));
        }
        if let Some(v) = t.opt_u64("hidden_size_per_layer_input")? {
            if v != 0 {
                return Err(t.err(
                    "hidden_size_per_layer_input",
                    "per-layer embeddings are not supported",
                ));
            }
        }
        if let Some(false) = t.opt_bool("enable_moe_block")? {
            return Err(t.err(
                "enable_moe_block",
                "false is not supported (every DiffusionGemma layer has the MoE block)",
            ));
        }

        // --- layer types ---
        let mut layer_types = match t.get("layer_types") {
            None => TextConfig::default_layer_types(num_hidden_layers),
            Some(Value::Array(items)) => {
                let mut out = Vec::with_capacity(items.len());
                for (i, item) in items.iter().enumerate() {
                    let kind = item.as_str().and_then(LayerKind::from_name).ok_or_else(|| {
                        t.err(
                            "layer_types",
                            format!(
                                "entry {i} is {}; expected \"sliding_attention\" or \"full_attention\"",
                                describe(item)
                            ),
                        )
                    })?;
                    out.push(kind);
                }
                out
            }
            Some(v) => {
                return Err(t.err(
                    "layer_types",
                    format!("expected a list of layer types, got {}", describe(v)),
                ))
            }
        };
        if layer_types.len() != num_hidden_layers {
            return Err(t.err(
                "layer_types",
                format!(
                    "has {} entries but num_hidden_layers is {num_hidden_layers}",
                    layer_types.len()
                ),
            ));
        }
        // transformers forces the last layer to full attention (with a warning).
        if let Some(last) = layer_types.last_mut() {
            *last = LayerKind::Full;
        }

        // --- full-layer attention shape: per_layer_config or flat fields ---
        let (global_head_dim, num_global_key_value_heads) =
            full_layer_shape(t, &layer_types, head_dim, num_key_value_heads)?;

        // --- scalars with defaults ---
        let bidi = match t.opt_str("use_bidirectional_attention")? {
            None => BidirectionalAttention::None,
            Some("vision") => BidirectionalAttention::Vision,
            Some("all") => BidirectionalAttention::All,
            Some(other) => {
                return Err(t.err(
                    "use_bidirectional_attention",
                    format!("`{other}` is not one of \"vision\", \"all\" or null"),
                ))
            }
        };
        let mut sliding_window = t.opt_usize("sliding_window")?.unwrap_or(512);
        if bidi == BidirectionalAttention::All {
            sliding_window = sliding_window / 2 + 1;
        }
        let final_logit_softcapping = match t.map.get("final_logit_softcapping") {
            None => Some(30.0),
            Some(Value::Null) => None,
            Some(_) => t.opt_f64("final_logit_softcapping")?,
        };
        let (rope_sliding, rope_full) = parse_rope(t, &layer_types)?;

        let text = TextConfig {
            vocab_size,
            hidden_size,
            intermediate_size,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            global_head_dim,
            num_global_key_value_heads,
            num_experts,
            top_k_experts,
            moe_intermediate_size,
            sliding_window,
            max_position_embeddings: t.opt_usize("max_position_embeddings")?.unwrap_or(131_072),
            self_conditioning_size: t
                .opt_usize("self_conditioning_size")?
                .unwrap_or(intermediate_size),
            rms_norm_eps: t.opt_f64("rms_norm_eps")?.unwrap_or(1e-6),
            layer_types,
            rope_sliding,
            rope_full,
            final_logit_softcapping,
            pad_token_id: t.opt_u32("pad_token_id")?.unwrap_or(0),
            bos_token_id: t.opt_u32("bos_token_id")?.unwrap_or(2),
            eos_token_ids: t.opt_id_list("eos_token_id")?.unwrap_or_else(|| vec![1]),
            attention_k_eq_v: t.opt_bool("attention_k_eq_v")?.unwrap_or(true),
            use_bidirectional_attention: bidi,
        };
        text.validate().map_err(|msg| {
            let prefix = t.prefix.trim_end_matches('.');
            if prefix.is_empty() {
                Error::config(file, msg)
            } else {
                Error::config(file, format!("{prefix}: {msg}"))
            }
        })?;
        Ok(text)
    }

    /// The `text_config` object as transformers writes it.
    pub fn to_json(&self, schema: ConfigSchema) -> Value {
        let mut m = Map::new();
        m.insert("attention_bias".into(), json!(false));
        m.insert("attention_dropout".into(), json!(0.0));
        m.insert("bos_token_id".into(), json!(self.bos_token_id));
        m.insert(
            "eos_token_id".into(),
            if self.eos_token_ids.len() == 1 {
                json!(self.eos_token_ids[0])
            } else {
                json!(self.eos_token_ids)
            },
        );
        if self.final_logit_softcapping != Some(30.0) {
            m.insert(
                "final_logit_softcapping".into(),
                json!(self.final_logit_softcapping),
            );
        }
        m.insert("head_dim".into(), json!(self.head_dim));
        m.insert("hidden_activation".into(), json!("gelu_pytorch_tanh"));
        m.insert("hidden_size".into(), json!(self.hidden_size));
        m.insert("initializer_range".into(), json!(0.02));
        m.insert("intermediate_size".into(), json!(self.intermediate_size));
        m.insert(
            "layer_types".into(),
            json!(self
                .layer_types
                .iter()
                .map(|k| k.name())
                .collect::<Vec<_>>()),
        );
        m.insert(
            "max_position_embeddings".into(),
            json!(self.max_position_embeddings),
        );
        m.insert("model_type".into(), json!("diffusion_gemma_text"));
        m.insert(
            "moe_intermediate_size".into(),
            json!(self.moe_intermediate_size),
        );
        m.insert(
            "num_attention_heads".into(),
            json!(self.num_attention_heads),
        );
        m.insert("num_experts".into(), json!(self.num_experts));
        m.insert("num_hidden_layers".into(), json!(self.num_hidden_layers));
        m.insert(
            "num_key_value_heads".into(),
            json!(self.num_key_value_heads),
        );
        m.insert("pad_token_id".into(), json!(self.pad_token_id));
        match schema {
            ConfigSchema::PerLayerConfig => {
                let mut overrides = Map::new();
                if self.global_head_dim != self.head_dim {
                    overrides.insert("head_dim".into(), json!(self.global_head_dim));
                }
                if self.num_global_key_value_heads != self.num_key_value_heads {
                    overrides.insert(
                        "num_key_value_heads".into(),
                        json!(self.num_global_key_value_heads),
                    );
                }
                let mut plc = Map::new();
                if !overrides.is_empty() {
                    let full = self.full_layers();
                    let width = full.iter().max().map_or(1, |m| m.to_string().len());
                    for i in full {
                        plc.insert(format!("{i:0width$}"), Value::Object(overrides.clone()));
                    }
                }
                m.insert("per_layer_config".into(), Value::Object(plc));
            }
            ConfigSchema::GlobalFields => {
                m.insert("global_head_dim".into(), json!(self.global_head_dim));
                m.insert(
                    "num_global_key_value_heads".into(),
                    json!(self.num_global_key_value_heads),
                );
            }
        }
        m.insert("rms_norm_eps".into(), json!(self.rms_norm_eps));
        let rope = |r: &RopeSpec| {
            let mut e = Map::new();
            if r.partial_rotary_factor != 1.0 {
                e.insert(
                    "partial_rotary_factor".into(),
                    json!(r.partial_rotary_factor),
                );
            }
            e.insert("rope_theta".into(), json!(r.theta));
            e.insert("rope_type".into(), json!(r.kind.name()));
            Value::Object(e)
        };
        m.insert(
            "rope_parameters".into(),
            json!({"full_attention": rope(&self.rope_full), "sliding_attention": rope(&self.rope_sliding)}),
        );
        if self.self_conditioning_size != self.intermediate_size {
            m.insert(
                "self_conditioning_size".into(),
                json!(self.self_conditioning_size),
            );
        }
        // transformers serialises the window it was given, not the halved one.
        let window = if self.use_bidirectional_attention == BidirectionalAttention::All {
            (self.sliding_window - 1) * 2
        } else {
            self.sliding_window
        };
        m.insert("sliding_window".into(), json!(window));
        m.insert("tie_word_embeddings".into(), json!(true));
        m.insert("top_k_experts".into(), json!(self.top_k_experts));
        m.insert(
            "use_bidirectional_attention".into(),
            json!(self.use_bidirectional_attention.name()),
        );
        m.insert("vocab_size".into(), json!(self.vocab_size));
        Value::Object(m)
    }
}

fn validate_rope(r: &RopeSpec) -> std::result::Result<(), String> {
    if !(r.theta.is_finite() && r.theta > 0.0) {
        return Err(format!(
            "rope_theta must be a positive number, got {}",
            r.theta
        ));
    }
    if !(r.partial_rotary_factor > 0.0 && r.partial_rotary_factor <= 1.0) {
        return Err(format!(
            "partial_rotary_factor must be in (0, 1], got {}",
            r.partial_rotary_factor
        ));
    }
    if r.kind == RopeKind::Default && r.partial_rotary_factor != 1.0 {
        return Err(format!(
            "rope_type default with partial_rotary_factor {} is not supported (transformers would build a cos/sin table narrower than the head)",
            r.partial_rotary_factor
        ));
    }
    Ok(())
}

/// Resolves the full-attention layers' (head_dim, num_key_value_heads).
fn full_layer_shape(
    t: &Obj<'_>,
    layer_types: &[LayerKind],
    head_dim: usize,
    num_kv: usize,
) -> Result<(usize, usize)> {
    let n = layer_types.len();
    let mut dims: Vec<(usize, usize)> = vec![(head_dim, num_kv); n];
    match t.get("per_layer_config") {
        Some(Value::Object(plc)) => {
            // Layer-type keys first, then index keys (more specific wins).
            let mut keyed: Vec<(bool, &String, &Value)> = Vec::new();
            for (key, overrides) in plc {
                let is_type = LayerKind::from_name(key.trim()).is_some();
                keyed.push((!is_type, key, overrides));
            }
            keyed.sort_by_key(|(is_index, _, _)| *is_index);
            for (is_index, key, overrides) in keyed {
                let field = format!("per_layer_config.{key}");
                let targets: Vec<usize> = if is_index {
                    let idx = parse_layer_index(key).ok_or_else(|| {
                        t.err(&field, "key is neither a layer index nor a layer type (sliding_attention / full_attention)")
                    })?;
                    if idx >= n {
                        return Err(t.err(
                            &field,
                            format!("layer index {idx} is out of range (num_hidden_layers {n})"),
                        ));
                    }
                    vec![idx]
                } else {
                    let kind = LayerKind::from_name(key.trim()).unwrap();
                    (0..n).filter(|&i| layer_types[i] == kind).collect()
                };
                let ov = Obj::new(t.file, format!("{}{field}.", t.prefix), overrides)?;
                let mut hd = None;
                let mut kv = None;
                for (attr, val) in ov.map {
                    match attr.as_str() {
                        "head_dim" => hd = ov.opt_usize("head_dim")?,
                        "num_key_value_heads" => kv = ov.opt_usize("num_key_value_heads")?,
                        "skip" => {
                            if val.as_array().is_some_and(|a| !a.is_empty()) {
                                return Err(ov.err("skip", "skipping sub-layers is not supported"));
                            }
                        }
                        other => {
                            // transformers drops overrides equal to the global value.
                            if t.map.get(other) != Some(val) {
                                return Err(ov.err(
                                    other,
                                    format!("per-layer overrides of `{other}` are not supported (only head_dim and num_key_value_heads)"),
                                ));
                            }
                        }
                    }
                }
                for i in targets {
                    if let Some(h) = hd {
                        dims[i].0 = h;
                    }
                    if let Some(k) = kv {
                        dims[i].1 = k;
                    }
                }
            }
        }
        Some(v) => {
            return Err(t.err(
                "per_layer_config",
                format!("expected an object, got {}", describe(v)),
            ));
        }
        None => {
            let ghd = match t.opt_usize("global_head_dim")? {
                Some(v) => v,
                None => {
                    return Err(Error::config(
                        t.file,
                        format!(
                            "missing required field `{}` (or `{}`): the full-attention layers' head_dim is not given",
                            t.field("global_head_dim"),
                            t.field("per_layer_config")
                        ),
                    ))
                }
            };
            let gkv = t.opt_usize("num_global_key_value_heads")?.unwrap_or(num_kv);
            for (i, kind) in layer_types.iter().enumerate() {
                if *kind == LayerKind::Full {
                    dims[i] = (ghd, gkv);
                }
            }
        }
    }
    // Normalise: sliding layers must keep the global shape, full layers must all agree.
    let mut full: Option<(usize, usize, usize)> = None;
    for (i, kind) in layer_types.iter().enumerate() {
        let (hd, kv) = dims[i];
        match kind {
            LayerKind::Sliding => {
                if (hd, kv) != (head_dim, num_kv) {
                    return Err(t.err(
                        "per_layer_config",
                        format!(
                            "layer {i} (sliding_attention) has head_dim {hd} / num_key_value_heads {kv}, but sliding layers must use the global head_dim {head_dim} / num_key_value_heads {num_kv}"
                        ),
                    ));
                }
            }
            LayerKind::Full => match full {
                None => full = Some((i, hd, kv)),
                Some((j, hd0, kv0)) => {
                    if (hd, kv) != (hd0, kv0) {
                        return Err(t.err(
                            "per_layer_config",
                            format!(
                                "full-attention layers differ: layer {j} has head_dim {hd0} / num_key_value_heads {kv0}, layer {i} has {hd} / {kv}; heterogeneous full layers are not supported"
                            ),
                        ));
                    }
                }
            },
        }
    }
    let (_, hd, kv) = full.expect("the last layer is always full attention");
    Ok((hd, kv))
}

/// Python `int(key)` for a layer index: optional whitespace, optional '+', ASCII digits.
fn parse_layer_index(key: &str) -> Option<usize> {
    let k = key.trim();
    let k = k.strip_prefix('+').unwrap_or(k);
    if k.is_empty()
        || !k.bytes().all(|b| b.is_ascii_digit() || b == b'_')
        || k.starts_with('_')
        || k.ends_with('_')
    {
        return None;
    }
    k.replace('_', "").parse().ok()
}

fn parse_rope(t: &Obj<'_>, layer_types: &[LayerKind]) -> Result<(RopeSpec, RopeSpec)> {
    let rp = match t.opt_obj("rope_parameters")? {
        None => return Ok((RopeSpec::SLIDING_DEFAULT, RopeSpec::FULL_DEFAULT)),
        Some(rp) => rp,
    };
    let has_type_keys = rp.map.keys().any(|k| LayerKind::from_name(k).is_some());
    if !has_type_keys && !rp.map.is_empty() {
        return Err(t.err(
            "rope_parameters",
            "must be nested by layer type ({\"sliding_attention\": {...}, \"full_attention\": {...}})",
        ));
    }
    let top_theta = t.opt_f64("rope_theta")?;
    let top_partial = t.opt_f64("partial_rotary_factor")?;
    let mut out = [RopeSpec::SLIDING_DEFAULT, RopeSpec::FULL_DEFAULT];
    for (slot, kind) in [LayerKind::Sliding, LayerKind::Full]
        .into_iter()
        .enumerate()
    {
        let used = layer_types.contains(&kind);
        let entry = match rp.opt_obj(kind.name())? {
            Some(e) => e,
            None if !used => continue,
            None => return Err(rp.missing(kind.name())),
        };
        let rope_type = match entry.opt_str("rope_type")? {
            Some(s) => s,
            None => entry.opt_str("type")?.unwrap_or("default"),
        };
        let rope_kind = match rope_type {
            "default" => RopeKind::Default,
            "proportional" => RopeKind::Proportional,
            other => {
                return Err(entry.err(
                    "rope_type",
                    format!(
                        "`{other}` is not supported (DiffusionGemma uses default and proportional)"
                    ),
                ))
            }
        };
        let theta = match entry.opt_f64("rope_theta")? {
            Some(v) => v,
            None => top_theta.ok_or_else(|| entry.missing("rope_theta"))?,
        };
        let partial = entry
            .opt_f64("partial_rotary_factor")?
            .or(top_partial)
            .unwrap_or(1.0);
        if rope_kind == RopeKind::Proportional {
            if let Some(f) = entry.opt_f64("factor")? {
                if f != 1.0 {
                    return Err(entry.err("factor", format!("{f} is not supported (only 1.0)")));
                }
            }
        }
        let spec = RopeSpec {
            kind: rope_kind,
            theta,
            partial_rotary_factor: partial,
        };
        validate_rope(&spec).map_err(|m| {
            Error::config(t.file, format!("field `{}`: {m}", rp.field(kind.name())))
        })?;
        out[slot] = spec;
    }
    Ok((out[0], out[1]))
}
