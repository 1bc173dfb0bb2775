//! The text weights of DiffusionGemma, looked up by name and validated (presence, shape, float
//! dtype) before any compute. Names follow model-spec section 2: everything under
//! `model.decoder.*`, the encoder's own `layer_scalar` buffers under
//! `model.encoder.language_model.layers.{i}.layer_scalar`, and `lm_head.weight` (absent when
//! tied to `model.decoder.embed_tokens.weight`). Other tensors (vision tower) are ignored.
//!
//! The MoE experts are [`ExpertTensor`]s: the checkpoint's float tensors, or FP8 codes with
//! per-row scales ([`crate::quant`]), either quantised at load ([`Quant::Fp8`]) or read from a
//! compressed-tensors FP8 checkpoint (per-expert `experts.{e}.{gate,up,down}_proj.weight` +
//! `.weight_scale`). Any other FP8 Linear weight of such a checkpoint (attention, dense MLP) is
//! dequantised to bf16 at load (`<name>.weight_scale` beside it), so after loading every
//! [`TensorRef`] of a [`ModelWeights`] is float and only the experts may be FP8.

use std::sync::Arc;

use crate::checkpoint::Checkpoint;
use crate::config::{LayerKind, LayerSpec, TextConfig};
use crate::error::{Error, Result};
use crate::quant::{dequantize_to_bf16, read_scales, ExpertTensor, Fp8Block, Fp8Experts, Quant};
use crate::tensor::TensorRef;

/// Weights of one decoder layer (shared with the encoder except `layer_scalar`).
#[derive(Clone, Debug)]
pub struct LayerWeights {
    pub spec: LayerSpec,
    /// `[num_heads * head_dim, H]`
    pub q_proj: TensorRef,
    /// `[num_kv_heads * head_dim, H]`
    pub k_proj: TensorRef,
    /// `[num_kv_heads * head_dim, H]` on sliding layers; `None` on full layers (V = K).
    pub v_proj: Option<TensorRef>,
    /// `[H, num_heads * head_dim]`
    pub o_proj: TensorRef,
    /// `[head_dim]`
    pub q_norm: TensorRef,
    /// `[head_dim]`
    pub k_norm: TensorRef,
    /// `[H]` each.
    pub input_layernorm: TensorRef,
    pub post_attention_layernorm: TensorRef,
    pub pre_feedforward_layernorm: TensorRef,
    pub post_feedforward_layernorm_1: TensorRef,
    pub pre_feedforward_layernorm_2: TensorRef,
    pub post_feedforward_layernorm_2: TensorRef,
    pub post_feedforward_layernorm: TensorRef,
    /// Dense GeGLU: `[I, H]`, `[I, H]`, `[H, I]`.
    pub mlp_gate: TensorRef,
    pub mlp_up: TensorRef,
    pub mlp_down: TensorRef,
    /// `[E, H]`
    pub router_proj: TensorRef,
    /// `[H]`
    pub router_scale: TensorRef,
    /// `[E]`
    pub router_per_expert_scale: TensorRef,
    /// `[E, 2M, H]`: rows `0..M` of expert e are gate, `M..2M` up.
    pub experts_gate_up: ExpertTensor,
    /// `[E, H, M]`
    pub experts_down: ExpertTensor,
    /// Decoder (denoiser) copy of the layer scalar.
    pub layer_scalar: f32,
    /// Encoder copy of the layer scalar.
    pub encoder_layer_scalar: f32,
}

/// All text weights of the model.
#[derive(Clone, Debug)]
pub struct ModelWeights {
    /// `[V, H]`, also the encoder embedding and (when tied) the lm_head.
    pub embed_tokens: TensorRef,
    /// `[H]`, final RMSNorm (encoder and decoder).
    pub final_norm: TensorRef,
    /// `[V, H]`, `None` when tied to `embed_tokens`.
    pub lm_head: Option<TensorRef>,
    /// Self-conditioning MLP: pre-norm `[H]`, gate/up `[S, H]`, down `[H, S]`.
    pub sc_pre_norm: TensorRef,
    pub sc_gate: TensorRef,
    pub sc_up: TensorRef,
    pub sc_down: TensorRef,
    pub layers: Vec<LayerWeights>,
}

/// Tensor names used by the checkpoint.
pub mod names {
    pub const EMBED_TOKENS: &str = "model.decoder.embed_tokens.weight";
    pub const FINAL_NORM: &str = "model.decoder.norm.weight";
    pub const LM_HEAD: &str = "lm_head.weight";
    pub const SC_PRE_NORM: &str = "model.decoder.self_conditioning.pre_norm.weight";
    pub const SC_GATE: &str = "model.decoder.self_conditioning.gate_proj.weight";
    pub const SC_UP: &str = "model.decoder.self_conditioning.up_proj.weight";
    pub const SC_DOWN: &str = "model.decoder.self_conditioning.down_proj.weight";

    /// `model.decoder.layers.{i}.{suffix}`
    pub fn layer(i: usize, suffix: &str) -> String {
        format!("model.decoder.layers.{i}.{suffix}")
    }

    /// `model.encoder.language_model.layers.{i}.layer_scalar`
    pub fn encoder_layer_scalar(i: usize) -> String {
        format!("model.encoder.language_model.layers.{i}.layer_scalar")
    }

    /// The scale tensor of an FP8 weight: `<name>_scale` (`...weight` -> `...weight_scale`,
    /// compressed-tensors; `...gate_up_proj` -> `...gate_up_proj_scale` for a fused tensor).
    pub fn scale_of(weight: &str) -> String {
        format!("{weight}_scale")
    }

    /// `model.decoder.layers.{i}.experts.{e}.{proj}.weight` (compressed-tensors' per-expert
    /// Linears; `proj` is `gate_proj`, `up_proj` or `down_proj`).
    pub fn expert_linear(i: usize, e: usize, proj: &str) -> String {
        layer(i, &format!("experts.{e}.{proj}.weight"))
    }
}

/// Every tensor name and expected shape, in checkpoint terms; `None` entries are optional.
pub fn expected_tensors(text: &TextConfig, tie_word_embeddings: bool) -> Vec<(String, Vec<usize>)> {
    let h = text.hidden_size;
    let v = text.vocab_size;
    let s = text.self_conditioning_size;
    let mut out = vec![
        (names::EMBED_TOKENS.to_string(), vec![v, h]),
        (names::FINAL_NORM.to_string(), vec![h]),
        (names::SC_PRE_NORM.to_string(), vec![h]),
        (names::SC_GATE.to_string(), vec![s, h]),
        (names::SC_UP.to_string(), vec![s, h]),
        (names::SC_DOWN.to_string(), vec![h, s]),
    ];
    if !tie_word_embeddings {
        out.push((names::LM_HEAD.to_string(), vec![v, h]));
    }
    for i in 0..text.num_hidden_layers {
        for (suffix, shape) in layer_shapes(text, i) {
            out.push((names::layer(i, suffix), shape));
        }
        out.push((names::encoder_layer_scalar(i), vec![1]));
    }
    out
}

/// `(suffix, shape)` of every tensor of decoder layer `i` (v_proj only on sliding layers).
fn layer_shapes(text: &TextConfig, i: usize) -> Vec<(&'static str, Vec<usize>)> {
    let spec = text.layer(i);
    let h = text.hidden_size;
    let inter = text.intermediate_size;
    let e = text.num_experts;
    let m = text.moe_intermediate_size;
    let mut v = vec![
        ("self_attn.q_proj.weight", vec![spec.q_dim(), h]),
        ("self_attn.k_proj.weight", vec![spec.kv_dim(), h]),
    ];
    if !spec.k_eq_v {
        v.push(("self_attn.v_proj.weight", vec![spec.kv_dim(), h]));
    }
    v.extend([
        ("self_attn.o_proj.weight", vec![h, spec.q_dim()]),
        ("self_attn.q_norm.weight", vec![spec.head_dim]),
        ("self_attn.k_norm.weight", vec![spec.head_dim]),
        ("input_layernorm.weight", vec![h]),
        ("post_attention_layernorm.weight", vec![h]),
        ("pre_feedforward_layernorm.weight", vec![h]),
        ("post_feedforward_layernorm_1.weight", vec![h]),
        ("pre_feedforward_layernorm_2.weight", vec![h]),
        ("post_feedforward_layernorm_2.weight", vec![h]),
        ("post_feedforward_layernorm.weight", vec![h]),
        ("mlp.gate_proj.weight", vec![inter, h]),
        ("mlp.up_proj.weight", vec![inter, h]),
        ("mlp.down_proj.weight", vec![h, inter]),
        ("router.proj.weight", vec![e, h]),
        ("router.scale", vec![h]),
        ("router.per_expert_scale", vec![e]),
        ("experts.gate_up_proj", vec![e, 2 * m, h]),
        ("experts.down_proj", vec![e, h, m]),
        ("layer_scalar", vec![1]),
    ]);
    v
}

/// Looks tensors up and records every problem instead of stopping at the first.
struct Loader<'a> {
    ck: &'a Checkpoint,
    errors: Vec<Error>,
}

/// Which fused expert tensor.
#[derive(Clone, Copy, PartialEq, Eq)]
enum ExpertKind {
    /// `experts.gate_up_proj [E, 2M, H]` (per expert: `gate_proj` then `up_proj`, `[M, H]` each).
    GateUp,
    /// `experts.down_proj [E, H, M]` (per expert: `down_proj [H, M]`).
    Down,
}

impl ExpertKind {
    fn fused(self) -> &'static str {
        match self {
            ExpertKind::GateUp => "experts.gate_up_proj",
            ExpertKind::Down => "experts.down_proj",
        }
    }

    /// The per-expert Linears making up one expert's rows, in row order.
    fn parts(self) -> &'static [&'static str] {
        match self {
            ExpertKind::GateUp => &["gate_proj", "up_proj"],
            ExpertKind::Down => &["down_proj"],
        }
    }
}

impl Loader<'_> {
    fn push(&mut self, t: &TensorRef, msg: String) {
        self.errors.push(Error::Tensor { name: t.name.clone(), file: t.file.clone(), msg });
    }

    /// The scale tensor of FP8 weight `t` (`<name>_scale`), or an error recorded.
    fn scale_for(&mut self, t: &TensorRef) -> Option<TensorRef> {
        let scale = names::scale_of(&t.name);
        let found = self.ck.tensor(&scale);
        if found.is_none() {
            self.push(t, format!("has dtype F8_E4M3 but the checkpoint has no scale tensor {scale} beside it"));
        }
        found
    }

    fn get(&mut self, name: &str, shape: &[usize], why: &str) -> Option<TensorRef> {
        match self.ck.tensor(name) {
            Some(t) => {
                if t.shape != shape {
                    self.errors.push(Error::Tensor {
                        name: name.to_string(),
                        file: t.file.clone(),
                        msg: format!("has shape {:?}, expected {:?} ({why})", t.shape, shape),
                    });
                    None
                } else if t.dtype.is_fp8() {
                    // An FP8 Linear of a compressed-tensors checkpoint outside the experts: run
                    // in bf16, dequantised once here.
                    let scale = self.scale_for(&t)?;
                    match dequantize_to_bf16(&t, &scale) {
                        Ok(d) => Some(d),
                        Err(e) => {
                            self.errors.push(e);
                            None
                        }
                    }
                } else {
                    Some(t)
                }
            }
            None => {
                if let Some(info) = self.ck.non_float_tensor(name) {
                    self.errors.push(Error::Tensor {
                        name: name.to_string(),
                        file: info.file.clone(),
                        msg: format!(
                            "has dtype {}, expected a float dtype (F32, F16 or BF16)",
                            info.dtype
                        ),
                    });
                } else {
                    self.errors.push(Error::MissingTensor {
                        name: name.to_string(),
                        dir: self.ck.dir().to_path_buf(),
                        why: why.to_string(),
                    });
                }
                None
            }
        }
    }

    /// One fused expert tensor of layer `i`, `[E, N, K]`, as `quant` wants it: the fused float
    /// tensor (quantised at load for [`Quant::Fp8`]), a fused e4m3 tensor with its scales, or
    /// compressed-tensors' per-expert FP8 Linears.
    fn experts(&mut self, i: usize, kind: ExpertKind, shape: [usize; 3], quant: Quant, why: &str) -> Option<ExpertTensor> {
        let fused = names::layer(i, kind.fused());
        let [e, n, k] = shape;
        if let Some(t) = self.ck.tensor(&fused) {
            if t.shape != shape {
                self.push(&t, format!("has shape {:?}, expected {:?} ({why})", t.shape, shape));
                return None;
            }
            if t.dtype.is_fp8() {
                let scale = self.scale_for(&t)?;
                let built = read_scales(&scale, e * n).and_then(|scales| {
                    let codes = t.clone().reshaped(vec![e * n, k]);
                    Fp8Experts::new(fused.clone(), shape, scales, vec![Fp8Block { row0: 0, codes }])
                });
                return self.keep(built.map(|f| ExpertTensor::Fp8(Arc::new(f))));
            }
            return match quant {
                Quant::None => Some(ExpertTensor::Float(t)),
                Quant::Fp8 => self.keep(Fp8Experts::quantize(&t).map(|f| ExpertTensor::Fp8(Arc::new(f)))),
            };
        }
        let first = names::expert_linear(i, 0, kind.parts()[0]);
        if !self.ck.contains(&first) {
            if let Some(info) = self.ck.non_float_tensor(&fused) {
                self.errors.push(Error::Tensor {
                    name: fused.clone(),
                    file: info.file.clone(),
                    msg: format!("has dtype {}, expected F32, F16, BF16 or F8_E4M3", info.dtype),
                });
            } else {
                self.errors.push(Error::MissingTensor {
                    name: fused.clone(),
                    dir: self.ck.dir().to_path_buf(),
                    why: format!("{why}; nor does the checkpoint hold per-expert FP8 Linears such as {first}"),
                });
            }
            return None;
        }
        // compressed-tensors: per expert, the parts' rows in order (gate then up).
        let part_rows = n / kind.parts().len();
        let mut scales = Vec::with_capacity(e * n);
        let mut blocks = Vec::with_capacity(e * kind.parts().len());
        let errors_before = self.errors.len();
        for ex in 0..e {
            for part in kind.parts() {
                let name = names::expert_linear(i, ex, part);
                let Some(t) = self.ck.tensor(&name) else {
                    self.errors.push(Error::MissingTensor {
                        name,
                        dir: self.ck.dir().to_path_buf(),
                        why: format!("{why}: per-expert {part} of expert {ex} (the checkpoint splits the experts)"),
                    });
                    continue;
                };
                if t.shape != [part_rows, k] || !t.dtype.is_fp8() {
                    self.push(
                        &t,
                        format!(
                            "has dtype {} and shape {:?}, expected F8_E4M3 [{part_rows}, {k}] (a per-expert FP8 Linear, {why})",
                            t.dtype, t.shape
                        ),
                    );
                    continue;
                }
                let Some(scale) = self.scale_for(&t) else { continue };
                match read_scales(&scale, part_rows) {
                    Ok(s) => scales.extend(s),
                    Err(err) => {
                        self.errors.push(err);
                        continue;
                    }
                }
                blocks.push(Fp8Block { row0: blocks.len() * part_rows, codes: t });
            }
        }
        if self.errors.len() > errors_before {
            return None;
        }
        self.keep(Fp8Experts::new(fused, shape, scales, blocks).map(|f| ExpertTensor::Fp8(Arc::new(f))))
    }

    fn keep<T>(&mut self, r: Result<T>) -> Option<T> {
        match r {
            Ok(v) => Some(v),
            Err(e) => {
                self.errors.push(e);
                None
            }
        }
    }

    fn scalar(&mut self, name: &str, why: &str) -> Option<f32> {
        let t = self.get(name, &[1], why)?;
        match t.scalar_f32() {
            Ok(v) if v.is_finite() => Some(v),
            Ok(v) => {
                self.errors.push(Error::Tensor {
                    name: name.to_string(),
                    file: t.file.clone(),
                    msg: format!("has value {v}, which is not finite"),
                });
                None
            }
            Err(e) => {
                self.errors.push(e);
                None
            }
        }
    }
}

impl ModelWeights {
    /// Looks up and validates every text tensor of the checkpoint, experts as stored
    /// ([`Quant::None`]). All problems are reported together (one error, or [`Error::Many`]).
    pub fn load(ck: &Checkpoint) -> Result<ModelWeights> {
        ModelWeights::load_with(ck, Quant::None)
    }

    /// [`ModelWeights::load`] with the experts held as `quant` says: [`Quant::Fp8`] quantises
    /// float experts per output row at load (on all cores; the codes are owned, about 23 GB for
    /// the 26B model). FP8 experts of a pre-quantised checkpoint are FP8 whatever `quant` is.
    pub fn load_with(ck: &Checkpoint, quant: Quant) -> Result<ModelWeights> {
        let cfg = ck.config();
        let text = &cfg.text;
        let h = text.hidden_size;
        let v = text.vocab_size;
        let s = text.self_conditioning_size;
        let mut l = Loader {
            ck,
            errors: Vec::new(),
        };

        let embed_tokens = l.get(
            names::EMBED_TOKENS,
            &[v, h],
            "token embedding [vocab_size, hidden_size]",
        );
        let final_norm = l.get(names::FINAL_NORM, &[h], "final norm [hidden_size]");
        let lm_head = if cfg.tie_word_embeddings {
            None
        } else {
            l.get(
                names::LM_HEAD,
                &[v, h],
                "untied lm_head [vocab_size, hidden_size], tie_word_embeddings is false",
            )
        };
        let sc = "self-conditioning MLP";
        let sc_pre_norm = l.get(names::SC_PRE_NORM, &[h], sc);
        let sc_gate = l.get(names::SC_GATE, &[s, h], sc);
        let sc_up = l.get(names::SC_UP, &[s, h], sc);
        let sc_down = l.get(names::SC_DOWN, &[h, s], sc);

        let mut layers = Vec::with_capacity(text.num_hidden_layers);
        for i in 0..text.num_hidden_layers {
            let spec = text.layer(i);
            let kind = match spec.kind {
                LayerKind::Sliding => "sliding_attention",
                LayerKind::Full => "full_attention",
            };
            let why = format!("{kind} layer {i}");
            let shapes = layer_shapes(text, i);
            let mut got: Vec<Option<TensorRef>> = Vec::with_capacity(shapes.len());
            for (suffix, shape) in &shapes {
                let name = names::layer(i, suffix);
                if *suffix == "layer_scalar" || suffix.starts_with("experts.") {
                    got.push(None);
                    continue;
                }
                if *suffix == "self_attn.v_proj.weight" {
                    let why = format!("{why} is a sliding_attention layer and needs a v_proj; only full_attention layers use K as V");
                    got.push(l.get(&name, shape, &why));
                    continue;
                }
                got.push(l.get(&name, shape, &why));
            }
            let layer_scalar = l.scalar(&names::layer(i, "layer_scalar"), &why);
            let encoder_layer_scalar = l.scalar(
                &names::encoder_layer_scalar(i),
                &format!("encoder copy of layer {i}'s layer_scalar"),
            );

            let mut it = got.into_iter();
            let mut next = || it.next().flatten();
            let q_proj = next();
            let k_proj = next();
            let v_proj = if spec.k_eq_v { None } else { next() };
            let v_missing = !spec.k_eq_v && v_proj.is_none();
            let (o_proj, q_norm, k_norm) = (next(), next(), next());
            let norms = [next(), next(), next(), next(), next(), next(), next()];
            let (mlp_gate, mlp_up, mlp_down) = (next(), next(), next());
            let (router_proj, router_scale, router_per_expert_scale) = (next(), next(), next());
            let e = text.num_experts;
            let (m, h) = (text.moe_intermediate_size, text.hidden_size);
            let experts_gate_up = l.experts(i, ExpertKind::GateUp, [e, 2 * m, h], quant, &why);
            let experts_down = l.experts(i, ExpertKind::Down, [e, h, m], quant, &why);

            if !l.errors.is_empty() || v_missing {
                continue;
            }
            let [n0, n1, n2, n3, n4, n5, n6] = norms;
            layers.push(LayerWeights {
                spec,
                q_proj: q_proj.unwrap(),
                k_proj: k_proj.unwrap(),
                v_proj,
                o_proj: o_proj.unwrap(),
                q_norm: q_norm.unwrap(),
                k_norm: k_norm.unwrap(),
                input_layernorm: n0.unwrap(),
                post_attention_layernorm: n1.unwrap(),
                pre_feedforward_layernorm: n2.unwrap(),
                post_feedforward_layernorm_1: n3.unwrap(),
                pre_feedforward_layernorm_2: n4.unwrap(),
                post_feedforward_layernorm_2: n5.unwrap(),
                post_feedforward_layernorm: n6.unwrap(),
                mlp_gate: mlp_gate.unwrap(),
                mlp_up: mlp_up.unwrap(),
                mlp_down: mlp_down.unwrap(),
                router_proj: router_proj.unwrap(),
                router_scale: router_scale.unwrap(),
                router_per_expert_scale: router_per_expert_scale.unwrap(),
                experts_gate_up: experts_gate_up.unwrap(),
                experts_down: experts_down.unwrap(),
                layer_scalar: layer_scalar.unwrap(),
                encoder_layer_scalar: encoder_layer_scalar.unwrap(),
            });
        }
        Error::from_list(l.errors)?;
        Ok(ModelWeights {
            embed_tokens: embed_tokens.unwrap(),
            final_norm: final_norm.unwrap(),
            lm_head,
            sc_pre_norm: sc_pre_norm.unwrap(),
            sc_gate: sc_gate.unwrap(),
            sc_up: sc_up.unwrap(),
            sc_down: sc_down.unwrap(),
            layers,
        })
    }

    /// The output projection: `lm_head` or, when tied, the embedding.
    pub fn lm_head(&self) -> &TensorRef {
        self.lm_head.as_ref().unwrap_or(&self.embed_tokens)
    }
}
