//! Which compiled kernel runs each op of a model: the heuristics table of `dgemma-codegen`
//! ([`dgemma_codegen::shapes`]) applied to this model's shapes, resolved once against the
//! executor's kernel image. A model whose shapes have no compiled kernel is refused here, before
//! any weight is uploaded, with the name of the missing kernel.

use dgemma_cuda::codegen::shapes::{
    attention_spec_for, grouped_gemm_spec, grouped_gemm_spec_for, gumbel_sample_spec, linear_spec_for, moe_combine_spec, moe_sort_spec, rmsnorm_spec,
    router_spec, sampler_canvas_spec, soft_embedding_specs_for,
};
use dgemma_cuda::codegen::{
    Embedding, GemmFuse, KernelSpec, LayerAttention, MaskKind, ModelShape, Op, Rope,
    RowSoftmaxEntropyArgmax, WeightFormat, SUPPORTED_MODELS,
};
use dgemma_cuda::Executor;
use dgemma_model::config::{LayerSpec, TextConfig};

use crate::error::{backend_error, Result};
use crate::weights::ExpertRegion;

/// The kernel shape of a text config.
pub fn model_shape(cfg: &TextConfig) -> ModelShape {
    let layer = |head_dim: usize, kv_heads: usize, rope: &dgemma_model::RopeSpec| LayerAttention {
        head_dim: head_dim as u32,
        kv_heads: kv_heads as u32,
        rotary_pairs: rope.rotary_pairs(head_dim) as u32,
    };
    ModelShape {
        vocab: cfg.vocab_size as u32,
        hidden: cfg.hidden_size as u32,
        heads: cfg.num_attention_heads as u32,
        sliding: layer(cfg.head_dim, cfg.num_key_value_heads, &cfg.rope_sliding),
        full: layer(cfg.global_head_dim, cfg.num_global_key_value_heads, &cfg.rope_full),
        experts: cfg.num_experts as u32,
        top_k: cfg.top_k_experts as u32,
        moe_width: cfg.moe_intermediate_size as u32,
        dense_width: cfg.intermediate_size as u32,
        self_cond_width: cfg.self_conditioning_size as u32,
    }
}

/// Kernels of one attention layer type.
#[derive(Clone, Copy, Debug)]
pub struct AttentionKernels {
    pub q_proj: KernelSpec,
    pub kv_proj: KernelSpec,
    pub o_proj: KernelSpec,
    /// q_norm / k_norm (per head, with scale).
    pub head_norm: KernelSpec,
    /// v_norm (per head, no scale).
    pub value_norm: KernelSpec,
    pub rope: KernelSpec,
    /// Causal (full layers) or causal-sliding (sliding layers).
    pub encoder: KernelSpec,
    pub decoder: KernelSpec,
}

/// Every kernel a forward pass of the model launches.
#[derive(Clone, Copy, Debug)]
pub struct Kernels {
    /// `round(norm(x) * w)`: input/pre-feedforward norms, post_feedforward_layernorm_1/_2, final norm.
    pub norm: KernelSpec,
    /// `h = round(h + round(norm(x) * w))`: post-attention norm and residual.
    pub norm_residual: KernelSpec,
    /// `h = round(round(h + round(norm(round(d + e)) * w)) * layer_scalar)`: the layer's end.
    pub norm_layer_end: KernelSpec,
    /// `round(norm(x))`: the decoder's input norm without self-conditioning.
    pub norm_plain: KernelSpec,
    /// `round(norm(round(x + s)))`: the decoder's input norm after self-conditioning.
    pub norm_plain_add: KernelSpec,
    pub embedding: KernelSpec,
    pub geglu: KernelSpec,
    pub softcap: KernelSpec,
    /// The self-conditioning soft embedding's split-K GEMM; `ops::plan_soft_embedding` plans the
    /// probabilities and reduction kernels around it (all three are checked here).
    pub soft_embedding: KernelSpec,
    pub router: KernelSpec,
    pub dense_up: KernelSpec,
    pub dense_down: KernelSpec,
    pub sc_up: KernelSpec,
    pub sc_down: KernelSpec,
    pub lm_head: KernelSpec,
    /// The MoE block after the router: the routing sort (pairs grouped by expert), the expert
    /// gate_up + GeGLU and down GEMMs over the grouped pairs, the routing-weighted combine.
    pub moe_sort: KernelSpec,
    pub experts_gate_up: KernelSpec,
    pub experts_down: KernelSpec,
    /// The same on FP8 (e4m3 + per-row scale) expert weights.
    pub experts_gate_up_fp8: KernelSpec,
    pub experts_down_fp8: KernelSpec,
    pub moe_combine: KernelSpec,
    pub sliding: AttentionKernels,
    pub full: AttentionKernels,
    /// The device sampler: per-row P, bf16(P), argmax and entropy; the categorical draw; the
    /// per-canvas acceptance, renoise and stopping.
    pub row_stats: KernelSpec,
    pub gumbel: KernelSpec,
    pub sampler_canvas: KernelSpec,
}

impl Kernels {
    /// The gate_up + GeGLU grouped GEMM for expert weights held as `w` (bf16 or FP8).
    pub fn experts_gate_up_for(&self, w: &ExpertRegion) -> &KernelSpec {
        if w.is_fp8() { &self.experts_gate_up_fp8 } else { &self.experts_gate_up }
    }

    /// The down grouped GEMM for expert weights held as `w` (bf16 or FP8).
    pub fn experts_down_for(&self, w: &ExpertRegion) -> &KernelSpec {
        if w.is_fp8() { &self.experts_down_fp8 } else { &self.experts_down }
    }

    /// Resolves every kernel of `cfg` against `exec`'s image (refusing a model whose shapes were
    /// not compiled in).
    pub fn resolve(cfg: &TextConfig, exec: &dyn Executor) -> Result<Kernels> {
        let s = model_shape(cfg);
        let arch = exec.arch();
        let check = |spec: KernelSpec| -> Result<KernelSpec> {
            if exec.has_kernel(&spec) {
                return Ok(spec);
            }
            let known: Vec<&str> = SUPPORTED_MODELS.iter().map(|(n, _)| *n).collect();
            Err(backend_error(format!(
                "no compiled kernel `{}` for this model's shapes (the kernel image covers {}; add the shape to \
                 SUPPORTED_MODELS in codegen/src/shapes.rs and rebuild)",
                spec.kernel_name(),
                known.join(", ")
            )))
        };
        let portable = |op: Op| check(KernelSpec::portable(op));
        let h = s.hidden;
        let attention = |l: LayerAttention, encoder_mask: MaskKind| -> Result<AttentionKernels> {
            let d = l.head_dim;
            Ok(AttentionKernels {
                q_proj: check(linear_spec_for(s.heads * d, h, arch))?,
                kv_proj: check(linear_spec_for(l.kv_heads * d, h, arch))?,
                o_proj: check(linear_spec_for(h, s.heads * d, arch))?,
                head_norm: check(rmsnorm_spec(d, true, false, false, false))?,
                value_norm: check(rmsnorm_spec(d, false, false, false, false))?,
                rope: portable(Op::Rope(Rope { head_dim: d, rotary_pairs: l.rotary_pairs }))?,
                encoder: check(attention_spec_for(d, s.heads, l.kv_heads, encoder_mask, arch))?,
                decoder: check(attention_spec_for(d, s.heads, l.kv_heads, MaskKind::Bidirectional, arch))?,
            })
        };
        Ok(Kernels {
            norm: check(rmsnorm_spec(h, true, false, false, false))?,
            norm_residual: check(rmsnorm_spec(h, true, false, true, false))?,
            norm_layer_end: check(rmsnorm_spec(h, true, true, true, true))?,
            norm_plain: check(rmsnorm_spec(h, false, false, false, false))?,
            norm_plain_add: check(rmsnorm_spec(h, false, true, false, false))?,
            embedding: portable(Op::Embedding(Embedding { hidden: h }))?,
            geglu: portable(Op::Geglu)?,
            softcap: portable(Op::Softcap)?,
            soft_embedding: {
                let [probs, gemm, reduce] = soft_embedding_specs_for(h, s.vocab, arch);
                check(probs)?;
                check(reduce)?;
                check(gemm)?
            },
            router: check(router_spec(h, s.experts, s.top_k))?,
            dense_up: check(linear_spec_for(s.dense_width, h, arch))?,
            dense_down: check(linear_spec_for(h, s.dense_width, arch))?,
            sc_up: check(linear_spec_for(s.self_cond_width, h, arch))?,
            sc_down: check(linear_spec_for(h, s.self_cond_width, arch))?,
            lm_head: check(linear_spec_for(s.vocab, h, arch))?,
            moe_sort: check(moe_sort_spec(s.experts))?,
            experts_gate_up: check(grouped_gemm_spec(2 * s.moe_width, h, GemmFuse::Geglu, arch))?,
            experts_down: check(grouped_gemm_spec(h, s.moe_width, GemmFuse::Down, arch))?,
            experts_gate_up_fp8: check(grouped_gemm_spec_for(2 * s.moe_width, h, GemmFuse::Geglu, WeightFormat::E4m3, arch))?,
            experts_down_fp8: check(grouped_gemm_spec_for(h, s.moe_width, GemmFuse::Down, WeightFormat::E4m3, arch))?,
            moe_combine: check(moe_combine_spec(h))?,
            sliding: attention(s.sliding, MaskKind::CausalSliding)?,
            full: attention(s.full, MaskKind::Causal)?,
            row_stats: portable(Op::RowSoftmaxEntropyArgmax(RowSoftmaxEntropyArgmax { vocab: s.vocab }))?,
            gumbel: check(gumbel_sample_spec(s.vocab))?,
            sampler_canvas: check(sampler_canvas_spec())?,
        })
    }

    /// The attention kernels of a layer.
    pub fn attention(&self, layer: &LayerSpec) -> &AttentionKernels {
        match layer.kind {
            dgemma_model::LayerKind::Sliding => &self.sliding,
            dgemma_model::LayerKind::Full => &self.full,
        }
    }
}
