//! The text weights of DiffusionGemma, looked up by name and validated (presence, shape, float
//! dtype) before any compute. Names follow model-spec section 2: everything under
//! `model.decoder.*`, the encoder's own `layer_scalar` buffers under
//! `model.encoder.language_model.layers.{i}.layer_scalar`, and `lm_head.weight` (absent when
//! tied to `model.decoder.embed_tokens.weight`). Other tensors (vision tower) are ignored.

use crate::checkpoint::Checkpoint;
use crate::config::{LayerKind, LayerSpec, TextConfig};
use crate::error::{Error, Result};
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
    pub experts_gate_up: TensorRef,
    /// `[E, H, M]`
    pub experts_down: TensorRef,
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

impl Loader<'_> {
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
    /// Looks up and validates every text tensor of the checkpoint. All problems are reported
    /// together (one error, or [`Error::Many`]).
    pub fn load(ck: &Checkpoint) -> Result<ModelWeights> {
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
                if *suffix == "layer_scalar" {
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
            let (experts_gate_up, experts_down) = (next(), next());

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
