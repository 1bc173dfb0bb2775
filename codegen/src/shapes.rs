//! Model shapes and the heuristics table that maps a shape to the kernels it needs.
//!
//! [`specs_for_model`] is the single place that decides which kernels exist and with which tile
//! parameters. build.rs compiles [`supported_specs`] (every shape in [`SUPPORTED_MODELS`]) into
//! the fatbin; the runtime asks the same function which spec to launch for a given op, so the
//! two can not disagree.

use crate::spec::{
    Arch, Attention, Embedding, GemmFuse, GroupedGemm, GumbelSample, KernelSpec, Linear, MaskKind, MoeCombine, MoeSort,
    Op, RmsNorm, Rope, ReadBandwidth, Router, RowSoftmaxEntropyArgmax, SamplerCanvas, SoftEmbedding,
};

/// Attention shape of one layer type.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct LayerAttention {
    pub head_dim: u32,
    pub kv_heads: u32,
    /// Rotating RoPE pairs (`head_dim / 2` for default RoPE; `int(partial * head_dim // 2)` for
    /// proportional RoPE).
    pub rotary_pairs: u32,
}

/// The shapes of a DiffusionGemma text tower that kernels are specialised on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ModelShape {
    pub vocab: u32,
    pub hidden: u32,
    /// Query heads (both layer types).
    pub heads: u32,
    pub sliding: LayerAttention,
    pub full: LayerAttention,
    pub experts: u32,
    pub top_k: u32,
    /// Per-expert GeGLU width (`moe_intermediate_size`).
    pub moe_width: u32,
    /// Dense ("shared expert") GeGLU width (`intermediate_size`).
    pub dense_width: u32,
    /// Self-conditioning MLP width (`self_conditioning_size`, else `intermediate_size`).
    pub self_cond_width: u32,
}

impl ModelShape {
    /// `google/diffusiongemma-26B-A4B-it` (model-spec 1.2).
    pub const DIFFUSION_GEMMA_26B_A4B: ModelShape = ModelShape {
        vocab: 262_144,
        hidden: 2816,
        heads: 16,
        sliding: LayerAttention { head_dim: 256, kv_heads: 8, rotary_pairs: 128 },
        // Proportional RoPE, partial_rotary_factor 0.25: int(0.25 * 512 // 2) = 64 pairs.
        full: LayerAttention { head_dim: 512, kv_heads: 2, rotary_pairs: 64 },
        experts: 128,
        top_k: 8,
        moe_width: 704,
        dense_width: 2112,
        self_cond_width: 2112,
    };

    /// `reference/models/tiny-default`, the bundled random model (vocab 512, hidden 64, 8 heads,
    /// sliding 4 kv x 16, full 1 kv x 32 with factor 0.25, 8 experts top-2, widths 32 / 96).
    /// `dgemma-cuda`'s `reference_models_are_covered` test fails if a reference config needs a
    /// kernel that no shape here provides.
    pub const TINY: ModelShape = ModelShape {
        vocab: 512,
        hidden: 64,
        heads: 8,
        sliding: LayerAttention { head_dim: 16, kv_heads: 4, rotary_pairs: 8 },
        full: LayerAttention { head_dim: 32, kv_heads: 1, rotary_pairs: 4 },
        experts: 8,
        top_k: 2,
        moe_width: 32,
        dense_width: 96,
        self_cond_width: 96,
    };

    /// `reference/models/tiny-sharded-f32`: odd widths (hidden 48, head dims 24 / 64), 6 experts
    /// top-3. Its weights are float32; the CUDA backend runs them as bf16.
    pub const TINY_SHARDED: ModelShape = ModelShape {
        vocab: 320,
        hidden: 48,
        heads: 4,
        sliding: LayerAttention { head_dim: 24, kv_heads: 4, rotary_pairs: 12 },
        full: LayerAttention { head_dim: 64, kv_heads: 1, rotary_pairs: 8 },
        experts: 6,
        top_k: 3,
        moe_width: 24,
        dense_width: 80,
        self_cond_width: 80,
    };
}

/// The shapes whose kernels are compiled into the fatbin.
pub const SUPPORTED_MODELS: &[(&str, ModelShape)] = &[
    ("diffusiongemma-26B-A4B", ModelShape::DIFFUSION_GEMMA_26B_A4B),
    ("tiny-default", ModelShape::TINY),
    ("tiny-sharded-f32", ModelShape::TINY_SHARDED),
];

/// Attention tile parameters: 64 keys scored per shared-memory tile; 128 threads (2-4 output
/// dims each) for the large heads, 64 for tiny ones.
pub fn attention_spec(head_dim: u32, q_heads: u32, kv_heads: u32, mask: MaskKind) -> KernelSpec {
    let threads = if head_dim >= 128 { 128 } else { 64 };
    KernelSpec::portable(Op::Attention(Attention { head_dim, q_heads, kv_heads, mask, key_tile: 64, threads }))
}

/// The row count [`linear_spec`] sizes its tiles for: one 256-token canvas, the decoder's pass,
/// which runs up to 48 times per canvas (a prompt's prefill runs once).
pub const LINEAR_TUNED_ROWS: u32 = 256;

/// Blocks [`linear_spec`] wants at [`LINEAR_TUNED_ROWS`] rows: two per SM of an H100 (132 SMs),
/// about one and a half per SM of an RTX 5090 (170).
pub const LINEAR_MIN_BLOCKS: u32 = 256;

/// Block tiles of the tensor-core linear (`block_m x block_n`), largest first. Every one is
/// split into 32 x 32 warp tiles (2 x 4 mma fragments per warp, 32 fp32 accumulators per
/// thread) and steps through k in 32-wide slices (two k16 mma steps; two buffers of
/// `(block_m + block_n) x 40` bf16: 30 KiB for the largest tile).
const LINEAR_TILES: [(u32, u32); 3] = [(64, 128), (64, 64), (32, 64)];

/// Dense projection `y = x W^T`, `W: [n, k]`: the tensor-core GEMM of `csrc/linear.cuh`
/// (mma.sync m16n8k16, so Portable: one kernel for sm_90a and sm_120).
///
/// At a canvas' 256 rows a projection does 256 MACs per weight it reads (256 flop per byte,
/// about an H100's bf16 ridge point), so neither the bandwidth nor the tensor cores are kept
/// busy unless every SM has work: the tile is the largest of [`LINEAR_TILES`] that gives at
/// least [`LINEAR_MIN_BLOCKS`] blocks at [`LINEAR_TUNED_ROWS`] rows, else the smallest. The 26B LM head (n = 262144) and the full layers' q_proj (8192) get 64 x 128 (the
/// fewest re-reads of x per weight byte); q_proj (4096) 64 x 64; o_proj, the MLPs and k/v
/// (1024..2816) 32 x 64. A 4096-token prefill has 16x more row tiles, so it fills the GPU with
/// any of them. The tiny test models all get 32 x 64.
pub fn linear_spec(n: u32, k: u32) -> KernelSpec {
    let blocks = |(bm, bn): (u32, u32)| LINEAR_TUNED_ROWS.div_ceil(bm) * n.div_ceil(bn);
    let (block_m, block_n) = LINEAR_TILES
        .into_iter()
        .find(|&t| blocks(t) >= LINEAR_MIN_BLOCKS)
        .unwrap_or(LINEAR_TILES[LINEAR_TILES.len() - 1]);
    KernelSpec::portable(Op::Linear(Linear { n, k, block_m, block_n, block_k: 32, warp_m: 32, warp_n: 32 }))
}

/// Expert GEMM for `arch` (SIMT, `csrc/grouped_gemm.cuh`) over the pairs [`moe_sort_spec`]
/// grouped by expert.
///
/// `rows = 32` pairs per chunk: a 256-token canvas routes 2048 pairs to the 26B model's 128
/// experts (16 per expert on average), a 512-token prefill chunk 32, so most experts' pairs fit
/// one chunk and their weights are read once per layer; a hot expert re-reads its column tile
/// (from L2, mostly) once per further 32 pairs, and a partial chunk skips its empty 8-pair
/// groups' FMAs. `cols`: 32 GeGLU columns (64 weight rows: the gate and up rows) or 64 down
/// columns, so both blocks have 256 threads with a 4 x 2 register tile of 8-lane dots each
/// (the CPU's summation order: 6 shared-memory loads of 16 bytes per 32 FMAs) and 26 KiB of
/// shared memory; the grid is (128 experts and the invalid bucket) x 22 (gate_up, 704 / 32) or
/// x 44 (down, 2816 / 64) tiles.
pub fn grouped_gemm_spec(n: u32, k: u32, fuse: GemmFuse, arch: Arch) -> KernelSpec {
    let cols = match fuse {
        GemmFuse::Geglu => 32,
        GemmFuse::Down => 64,
    };
    KernelSpec::for_arch(Op::GroupedGemm(GroupedGemm { n, k, fuse, rows: 32, cols }), arch)
}

/// The routing sort of the MoE block (one block; `csrc/moe_sort.cuh`).
pub fn moe_sort_spec(experts: u32) -> KernelSpec {
    KernelSpec::portable(Op::MoeSort(MoeSort { experts }))
}

/// The routing-weighted sum of the expert outputs (`csrc/grouped_gemm.cuh`, moe_combine).
pub fn moe_combine_spec(hidden: u32) -> KernelSpec {
    KernelSpec::portable(Op::MoeCombine(MoeCombine { hidden }))
}

/// The MoE router (norm, projection, softmax, top-k, weights; one block per token).
pub fn router_spec(hidden: u32, experts: u32, top_k: u32) -> KernelSpec {
    KernelSpec::portable(Op::Router(Router { hidden, experts, top_k }))
}

/// The self-conditioning soft embedding `probs [C, vocab] @ E [vocab, hidden]`. Each block
/// covers `rows_per_block` canvas rows, so the table is streamed `ceil(C / rows_per_block)`
/// times: 16 rows for a real vocabulary (16 passes over the 1.5 GB table for a 256-token
/// canvas, and 16 x 11 column tiles = 176 blocks to fill an H100's 132 SMs), 8 for the tiny
/// test models.
pub fn soft_embedding_spec(hidden: u32, vocab: u32) -> KernelSpec {
    let rows_per_block = if vocab >= 65_536 { 16 } else { 8 };
    KernelSpec::portable(Op::SoftEmbedding(SoftEmbedding { hidden, vocab, rows_per_block }))
}

/// The largest canvas (`canvas_length`, HF's default and the 26B checkpoint's 256) the device
/// sampler handles. [`ModelShape`] does not carry the canvas length, so every shape gets the same
/// [`sampler_canvas_spec`]; the tiny models' canvases (16 and 8) run on it with idle threads.
pub const SAMPLER_MAX_CANVAS: u32 = 256;

/// The Gumbel-max categorical draw over the processed logits (one block per canvas row).
pub fn gumbel_sample_spec(vocab: u32) -> KernelSpec {
    KernelSpec::portable(Op::GumbelSample(GumbelSample { vocab }))
}

/// The per-canvas sampler step (renoise, acceptance, next canvas, stopping): one block.
pub fn sampler_canvas_spec() -> KernelSpec {
    KernelSpec::portable(Op::SamplerCanvas(SamplerCanvas { max_canvas: SAMPLER_MAX_CANVAS }))
}

/// The HBM read-bandwidth probe (the floor of memory-bound figures; no model op): 256 threads,
/// four independent 16-byte loads in flight per thread and iteration. Shape-independent, so
/// [`supported_specs`] carries it once whatever the models.
pub fn read_bandwidth_spec() -> KernelSpec {
    KernelSpec::portable(Op::ReadBandwidth(ReadBandwidth { threads: 256, unroll: 4 }))
}

/// An RMSNorm spec.
pub fn rmsnorm_spec(
    width: u32,
    has_scale: bool,
    input_add: bool,
    residual_add: bool,
    layer_scalar: bool,
) -> KernelSpec {
    KernelSpec::portable(Op::RmsNorm(RmsNorm {
        width,
        has_scale,
        fuse_input_add: input_add,
        fuse_residual_add: residual_add,
        fuse_layer_scalar: layer_scalar,
    }))
}

/// Every kernel a model of this shape needs, sorted by kernel name, without duplicates.
///
/// The grouped (MoE) GEMMs are arch-specific (one spec per [`Arch`]): they are where the sm_90a
/// (wgmma/TMA) and sm_120 code paths will diverge (issue #4). Everything else, the dense
/// tensor-core linear included (mma.sync runs on both), is portable.
pub fn specs_for_model(shape: &ModelShape) -> Vec<KernelSpec> {
    let s = shape;
    let h = s.hidden;
    let mut v = vec![
        // input_layernorm, pre_feedforward_layernorm(_2), post_feedforward_layernorm_1/_2,
        // self_conditioning.pre_norm, the final norm.
        rmsnorm_spec(h, true, false, false, false),
        // post_attention_layernorm, then the residual add.
        rmsnorm_spec(h, true, false, true, false),
        // post_feedforward_layernorm(d + e), the residual add, the layer scalar.
        rmsnorm_spec(h, true, true, true, true),
        // The decoder's input norm (no scale), without and with the self-conditioning signal
        // added first.
        rmsnorm_spec(h, false, false, false, false),
        rmsnorm_spec(h, false, true, false, false),
        KernelSpec::portable(Op::Embedding(Embedding { hidden: h })),
        KernelSpec::portable(Op::Geglu),
        KernelSpec::portable(Op::Softcap),
        KernelSpec::portable(Op::RowSoftmaxEntropyArgmax(RowSoftmaxEntropyArgmax { vocab: s.vocab })),
        router_spec(h, s.experts, s.top_k),
        moe_sort_spec(s.experts),
        moe_combine_spec(h),
        soft_embedding_spec(h, s.vocab),
        gumbel_sample_spec(s.vocab),
        sampler_canvas_spec(),
    ];
    for (layer, encoder_mask) in [(s.sliding, MaskKind::CausalSliding), (s.full, MaskKind::Causal)] {
        let d = layer.head_dim;
        // q_norm / k_norm (per head, scaled) and v_norm (per head, no scale).
        v.push(rmsnorm_spec(d, true, false, false, false));
        v.push(rmsnorm_spec(d, false, false, false, false));
        v.push(KernelSpec::portable(Op::Rope(Rope { head_dim: d, rotary_pairs: layer.rotary_pairs })));
        v.push(attention_spec(d, s.heads, layer.kv_heads, encoder_mask));
        v.push(attention_spec(d, s.heads, layer.kv_heads, MaskKind::Bidirectional));
        v.push(linear_spec(s.heads * d, h)); // q_proj
        v.push(linear_spec(layer.kv_heads * d, h)); // k_proj (and v_proj)
        v.push(linear_spec(h, s.heads * d)); // o_proj
    }
    for width in [s.dense_width, s.self_cond_width] {
        v.push(linear_spec(width, h)); // gate_proj, up_proj
        v.push(linear_spec(h, width)); // down_proj
    }
    v.push(linear_spec(s.vocab, h)); // lm_head (tied embedding)
    for arch in Arch::ALL {
        v.push(grouped_gemm_spec(2 * s.moe_width, h, GemmFuse::Geglu, arch));
        v.push(grouped_gemm_spec(h, s.moe_width, GemmFuse::Down, arch));
    }
    sort_dedup(v)
}

/// Linear kernels no model needs, compiled in so the kernel tests (emulator and GPU) exercise the
/// tensor-core tile layer (`csrc/mma.cuh`) where the models' shapes do not: every model width is
/// a multiple of 16, so these take n = 26 (an n8 fragment with one live column pair) and 130 (a
/// last column tile of one pair), k = 24 and 72 (half a k16 step; a last slice of 8), each with
/// every block tile of [`LINEAR_TILES`] (the tiny models only select the smallest).
pub fn linear_self_test_specs() -> Vec<KernelSpec> {
    let mut v = Vec::new();
    for (n, k) in [(26, 24), (130, 72)] {
        for (block_m, block_n) in LINEAR_TILES {
            let l = Linear { n, k, block_m, block_n, block_k: 32, warp_m: 32, warp_n: 32 };
            v.push(KernelSpec::portable(Op::Linear(l)));
        }
    }
    v
}

/// The union of [`specs_for_model`] over [`SUPPORTED_MODELS`], plus the model-independent
/// [`read_bandwidth_spec`] and [`linear_self_test_specs`]: what build.rs compiles.
pub fn supported_specs() -> Vec<KernelSpec> {
    let mut v: Vec<KernelSpec> = SUPPORTED_MODELS.iter().flat_map(|(_, s)| specs_for_model(s)).collect();
    v.push(read_bandwidth_spec());
    v.extend(linear_self_test_specs());
    sort_dedup(v)
}

fn sort_dedup(mut v: Vec<KernelSpec>) -> Vec<KernelSpec> {
    v.sort_by_cached_key(|s| (s.kernel_name(), *s));
    v.dedup();
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::Target;
    use std::collections::HashMap;

    #[test]
    fn names_are_unique_across_the_table() {
        let mut seen: HashMap<String, KernelSpec> = HashMap::new();
        for spec in supported_specs() {
            spec.validate().unwrap();
            if let Some(prev) = seen.insert(spec.kernel_name(), spec) {
                panic!("{} names both {prev:?} and {spec:?}", spec.kernel_name());
            }
        }
        assert!(seen.len() > 40, "suspiciously few kernels: {}", seen.len());
    }

    #[test]
    fn table_is_sorted_and_covers_each_model() {
        let all = supported_specs();
        let names: Vec<String> = all.iter().map(|s| s.kernel_name()).collect();
        let mut sorted = names.clone();
        sorted.sort();
        assert_eq!(names, sorted);
        for (_, shape) in SUPPORTED_MODELS {
            for spec in specs_for_model(shape) {
                assert!(all.contains(&spec));
            }
        }
    }

    #[test]
    fn big_model_kernels() {
        let names: Vec<String> =
            specs_for_model(&ModelShape::DIFFUSION_GEMMA_26B_A4B).iter().map(|s| s.kernel_name()).collect();
        for want in [
            "rmsnorm_w2816_scale_resadd_bf16",
            "rmsnorm_w2816_scale_inadd_resadd_lscalar_bf16",
            "rmsnorm_w512_noscale_bf16",
            "rope_d256_p128_bf16",
            "rope_d512_p64_bf16",
            "embedding_h2816_bf16",
            "row_softmax_entropy_argmax_v262144_bf16",
            "attention_d256_q16_kv8_sliding_kt64_t128_bf16",
            "attention_d512_q16_kv2_bidir_kt64_t128_bf16",
            "linear_n262144_k2816_t64x128x32_w32x32_bf16",
            "linear_n2816_k8192_t32x64x32_w32x32_bf16",
            "grouped_gemm_n1408_k2816_geglu_r32_c32_bf16_sm90a",
            "grouped_gemm_n2816_k704_down_r32_c64_bf16_sm120",
            "moe_sort_e128_bf16",
            "moe_combine_h2816_bf16",
            "router_h2816_e128_k8_bf16",
            "soft_embedding_h2816_v262144_r16_bf16",
            "gumbel_sample_v262144_bf16",
            "sampler_canvas_c256_bf16",
        ] {
            assert!(names.iter().any(|n| n == want), "missing {want}");
        }
    }

    #[test]
    fn gemm_families_exist_for_both_archs() {
        for spec in supported_specs() {
            if matches!(spec.op, Op::GroupedGemm(_)) {
                let Target::Only(arch) = spec.target else { panic!("{} is portable", spec.kernel_name()) };
                let other = if arch == Arch::Sm90a { Arch::Sm120 } else { Arch::Sm90a };
                let twin = KernelSpec { target: Target::Only(other), ..spec };
                assert!(supported_specs().contains(&twin), "{} has no {other:?} twin", spec.kernel_name());
            }
        }
    }

    #[test]
    fn linear_tiles_fill_the_gpu_at_a_canvas() {
        let tile = |n: u32, k: u32| {
            let Op::Linear(l) = linear_spec(n, k).op else { unreachable!() };
            assert_eq!(linear_spec(n, k).target, Target::Portable);
            (l.block_m, l.block_n)
        };
        assert_eq!(tile(262_144, 2816), (64, 128)); // the LM head
        assert_eq!(tile(8192, 2816), (64, 128));
        assert_eq!(tile(4096, 2816), (64, 64));
        assert_eq!(tile(2816, 4096), (32, 64));
        assert_eq!(tile(1024, 2816), (32, 64)); // too narrow for 256 blocks with any tile
        assert_eq!(tile(24, 48), (32, 64));
        for spec in SUPPORTED_MODELS.iter().flat_map(|(_, shape)| specs_for_model(shape)) {
            if let Op::Linear(l) = spec.op {
                let blocks = LINEAR_TUNED_ROWS.div_ceil(l.block_m) * l.n.div_ceil(l.block_n);
                let smallest = LINEAR_TILES[LINEAR_TILES.len() - 1];
                assert!(
                    blocks >= LINEAR_MIN_BLOCKS || (l.block_m, l.block_n) == smallest,
                    "{}",
                    spec.kernel_name()
                );
            }
        }
    }

    #[test]
    fn router_and_soft_embedding_for_every_shape() {
        for (name, shape) in SUPPORTED_MODELS {
            let specs = specs_for_model(shape);
            let router = Op::Router(Router { hidden: shape.hidden, experts: shape.experts, top_k: shape.top_k });
            assert!(specs.iter().any(|s| s.op == router), "{name}: no router");
            assert!(
                specs.iter().any(
                    |s| matches!(s.op, Op::SoftEmbedding(e) if e.hidden == shape.hidden && e.vocab == shape.vocab)
                ),
                "{name}: no soft embedding"
            );
        }
    }

    #[test]
    fn moe_kernels_for_every_shape() {
        for (name, shape) in SUPPORTED_MODELS {
            let specs = specs_for_model(shape);
            assert!(specs.contains(&moe_sort_spec(shape.experts)), "{name}: no routing sort");
            assert!(specs.contains(&moe_combine_spec(shape.hidden)), "{name}: no combine");
            for arch in Arch::ALL {
                let up = grouped_gemm_spec(2 * shape.moe_width, shape.hidden, GemmFuse::Geglu, arch);
                let down = grouped_gemm_spec(shape.hidden, shape.moe_width, GemmFuse::Down, arch);
                assert!(specs.contains(&up) && specs.contains(&down), "{name}: no {arch:?} expert GEMMs");
                for s in [up, down] {
                    s.validate().unwrap();
                    assert_eq!(s.block_threads(), 256, "{}", s.kernel_name());
                }
            }
        }
    }

    #[test]
    fn read_bandwidth_probe_is_always_compiled() {
        let probes: Vec<KernelSpec> =
            supported_specs().into_iter().filter(|s| matches!(s.op, Op::ReadBandwidth(_))).collect();
        assert_eq!(probes, [read_bandwidth_spec()]);
        assert_eq!(read_bandwidth_spec().target, crate::spec::Target::Portable);
    }

    #[test]
    fn device_sampler_for_every_shape() {
        for (name, shape) in SUPPORTED_MODELS {
            let specs = specs_for_model(shape);
            let gumbel = Op::GumbelSample(GumbelSample { vocab: shape.vocab });
            assert!(specs.iter().any(|s| s.op == gumbel), "{name}: no gumbel sample");
            assert!(
                specs.iter().any(|s| matches!(s.op, Op::SamplerCanvas(c) if c.max_canvas >= 256)),
                "{name}: no sampler canvas for a 256-position canvas"
            );
        }
    }
}
