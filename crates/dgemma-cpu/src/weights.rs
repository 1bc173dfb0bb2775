//! The checkpoint's tensors as the CPU operators read them.
//!
//! Large matrices stay in the memory-mapped checkpoint and are widened one row at a time
//! ([`TensorMatrix`]); vectors (norm scales, router scales) are widened once at load. In bf16
//! mode every weight value is rounded to bf16, as `from_pretrained(dtype=torch.bfloat16)` does
//! for a checkpoint stored in another dtype (a no-op for bf16 checkpoints).
//!
//! FP8 experts ([`dgemma_model::Quant::Fp8`], or a compressed-tensors FP8 checkpoint) are read
//! as their dequantised values, `f32(e4m3) * scale` per row ([`Fp8Matrix`]), then rounded like
//! any other weight (to bf16 in bf16 mode): what transformers' bf16 model computes when it holds
//! the dequantised weights, and the reference the GPU's FP8 kernels are checked against.

use crate::ops::linear::Matrix;
use crate::ops::moe::ExpertBank;
use crate::precision::{round_slice, Precision};
use dgemma_model::config::{LayerSpec, TextConfig};
use dgemma_model::quant::{ExpertTensor, Fp8Experts};
use dgemma_model::tensor::TensorRef;
use dgemma_model::weights::ModelWeights;
use std::sync::Arc;

/// Rows `row0 .. row0 + rows` of a tensor seen as a `[rows, cols]` matrix (a 2-D weight, or
/// one expert's slice of a 3-D expert tensor).
pub struct TensorMatrix {
    tensor: TensorRef,
    row0: usize,
    rows: usize,
    cols: usize,
    precision: Precision,
}

impl TensorMatrix {
    /// The whole tensor, flattened to `[shape[0] * .. * shape[n-2], shape[n-1]]`.
    pub fn new(tensor: &TensorRef, precision: Precision) -> TensorMatrix {
        let cols = *tensor.shape.last().expect("weight tensor has a shape");
        let rows = tensor.shape.iter().rev().skip(1).product();
        TensorMatrix { tensor: tensor.clone(), row0: 0, rows, cols, precision }
    }

    /// Slice `index` along dim 0 of a 3-D tensor `[E, rows, cols]`.
    pub fn slice0(tensor: &TensorRef, index: usize, precision: Precision) -> TensorMatrix {
        let (rows, cols) = (tensor.shape[1], tensor.shape[2]);
        TensorMatrix { tensor: tensor.clone(), row0: index * rows, rows, cols, precision }
    }
}

impl Matrix for TensorMatrix {
    fn rows(&self) -> usize {
        self.rows
    }
    fn cols(&self) -> usize {
        self.cols
    }
    fn read_row(&self, r: usize, out: &mut [f32]) {
        debug_assert!(r < self.rows);
        self.tensor.read_f32((self.row0 + r) * self.cols, out);
        round_slice(out, self.precision);
    }
}

/// Expert `e`'s rows `[rows, cols]` of an FP8 expert tensor, dequantised on read.
pub struct Fp8Matrix {
    experts: Arc<Fp8Experts>,
    row0: usize,
    rows: usize,
    cols: usize,
    precision: Precision,
}

impl Fp8Matrix {
    /// Expert `index` of `experts` (`[E, rows, cols]`).
    pub fn slice0(experts: &Arc<Fp8Experts>, index: usize, precision: Precision) -> Fp8Matrix {
        let [_, rows, cols] = experts.shape;
        Fp8Matrix { experts: experts.clone(), row0: index * rows, rows, cols, precision }
    }
}

impl Matrix for Fp8Matrix {
    fn rows(&self) -> usize {
        self.rows
    }
    fn cols(&self) -> usize {
        self.cols
    }
    fn read_row(&self, r: usize, out: &mut [f32]) {
        debug_assert!(r < self.rows);
        self.experts.dequantize_row(self.row0 + r, out);
        round_slice(out, self.precision);
    }
}

/// One expert's matrix of an [`ExpertTensor`].
pub enum ExpertMatrix {
    Float(TensorMatrix),
    Fp8(Fp8Matrix),
}

impl ExpertMatrix {
    /// Expert `index` of `t`.
    pub fn slice0(t: &ExpertTensor, index: usize, precision: Precision) -> ExpertMatrix {
        match t {
            ExpertTensor::Float(t) => ExpertMatrix::Float(TensorMatrix::slice0(t, index, precision)),
            ExpertTensor::Fp8(f) => ExpertMatrix::Fp8(Fp8Matrix::slice0(f, index, precision)),
        }
    }

    fn matrix(&self) -> &dyn Matrix {
        match self {
            ExpertMatrix::Float(m) => m,
            ExpertMatrix::Fp8(m) => m,
        }
    }
}

/// A weight vector widened to f32 (and rounded to bf16 in bf16 mode).
fn vector(t: &TensorRef, precision: Precision) -> Vec<f32> {
    let mut v = t.to_f32_vec();
    round_slice(&mut v, precision);
    v
}

/// One layer's weights.
pub struct CpuLayer {
    pub spec: LayerSpec,
    pub inv_freq: Vec<f32>,
    pub q_proj: TensorMatrix,
    pub k_proj: TensorMatrix,
    pub v_proj: Option<TensorMatrix>,
    pub o_proj: TensorMatrix,
    pub q_norm: Vec<f32>,
    pub k_norm: Vec<f32>,
    pub input_layernorm: Vec<f32>,
    pub post_attention_layernorm: Vec<f32>,
    pub pre_feedforward_layernorm: Vec<f32>,
    pub post_feedforward_layernorm_1: Vec<f32>,
    pub pre_feedforward_layernorm_2: Vec<f32>,
    pub post_feedforward_layernorm_2: Vec<f32>,
    pub post_feedforward_layernorm: Vec<f32>,
    pub mlp_gate: TensorMatrix,
    pub mlp_up: TensorMatrix,
    pub mlp_down: TensorMatrix,
    pub router_proj: TensorMatrix,
    pub router_scale: Vec<f32>,
    pub router_per_expert_scale: Vec<f32>,
    pub experts: Experts,
    /// Decoder-side `layer_scalar` and the encoder's own copy, rounded like the activations.
    pub layer_scalar: f32,
    pub encoder_layer_scalar: f32,
}

/// Per-expert views of the fused `gate_up_proj` `[E, 2I, H]` and `down_proj` `[E, H, I]`.
pub struct Experts {
    pub gate_up: Vec<ExpertMatrix>,
    pub down: Vec<ExpertMatrix>,
}

impl ExpertBank for Experts {
    fn num_experts(&self) -> usize {
        self.gate_up.len()
    }
    fn gate_up(&self, e: usize) -> &dyn Matrix {
        self.gate_up[e].matrix()
    }
    fn down(&self, e: usize) -> &dyn Matrix {
        self.down[e].matrix()
    }
}

/// The whole text model.
pub struct CpuWeights {
    pub config: TextConfig,
    pub precision: Precision,
    /// `[V, H]`: the embedding, the tied LM head and the self-conditioning soft-embedding matrix.
    pub embed: TensorMatrix,
    /// The LM head when the checkpoint stores an untied one.
    pub lm_head: Option<TensorMatrix>,
    /// `sqrt(hidden)` in the activation dtype (53.0 in bf16 for hidden 2816).
    pub embed_scale: f32,
    pub final_norm: Vec<f32>,
    pub sc_pre_norm: Vec<f32>,
    pub sc_gate: TensorMatrix,
    pub sc_up: TensorMatrix,
    pub sc_down: TensorMatrix,
    pub layers: Vec<CpuLayer>,
}

impl CpuWeights {
    pub fn new(config: &TextConfig, w: &ModelWeights, precision: Precision) -> CpuWeights {
        let m = |t: &TensorRef| TensorMatrix::new(t, precision);
        let v = |t: &TensorRef| vector(t, precision);
        let r = |x: f32| crate::precision::round(x, precision);
        let layers = w
            .layers
            .iter()
            .enumerate()
            .map(|(i, l)| {
                let spec = config.layer(i);
                let n_exp = l.experts_gate_up.shape()[0];
                CpuLayer {
                    inv_freq: spec.rope.inv_freq(spec.head_dim),
                    spec,
                    q_proj: m(&l.q_proj),
                    k_proj: m(&l.k_proj),
                    v_proj: l.v_proj.as_ref().map(m),
                    o_proj: m(&l.o_proj),
                    q_norm: v(&l.q_norm),
                    k_norm: v(&l.k_norm),
                    input_layernorm: v(&l.input_layernorm),
                    post_attention_layernorm: v(&l.post_attention_layernorm),
                    pre_feedforward_layernorm: v(&l.pre_feedforward_layernorm),
                    post_feedforward_layernorm_1: v(&l.post_feedforward_layernorm_1),
                    pre_feedforward_layernorm_2: v(&l.pre_feedforward_layernorm_2),
                    post_feedforward_layernorm_2: v(&l.post_feedforward_layernorm_2),
                    post_feedforward_layernorm: v(&l.post_feedforward_layernorm),
                    mlp_gate: m(&l.mlp_gate),
                    mlp_up: m(&l.mlp_up),
                    mlp_down: m(&l.mlp_down),
                    router_proj: m(&l.router_proj),
                    router_scale: v(&l.router_scale),
                    router_per_expert_scale: v(&l.router_per_expert_scale),
                    experts: Experts {
                        gate_up: (0..n_exp).map(|e| ExpertMatrix::slice0(&l.experts_gate_up, e, precision)).collect(),
                        down: (0..n_exp).map(|e| ExpertMatrix::slice0(&l.experts_down, e, precision)).collect(),
                    },
                    layer_scalar: r(l.layer_scalar),
                    encoder_layer_scalar: r(l.encoder_layer_scalar),
                }
            })
            .collect();
        CpuWeights {
            config: config.clone(),
            precision,
            embed: m(&w.embed_tokens),
            lm_head: w.lm_head.as_ref().map(m),
            embed_scale: r((config.hidden_size as f64).sqrt() as f32),
            final_norm: v(&w.final_norm),
            sc_pre_norm: v(&w.sc_pre_norm),
            sc_gate: m(&w.sc_gate),
            sc_up: m(&w.sc_up),
            sc_down: m(&w.sc_down),
            layers,
        }
    }

    /// The matrix the final hidden state is projected with.
    pub fn head(&self) -> &TensorMatrix {
        self.lm_head.as_ref().unwrap_or(&self.embed)
    }
}
