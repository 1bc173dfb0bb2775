//! Model shapes and the heuristics table that maps a shape to the kernels it needs.
//!
//! [`specs_for_model`] is the single place that decides which kernels exist and with which tile
//! parameters. build.rs compiles [`supported_specs`] (every shape in [`SUPPORTED_MODELS`]) into
//! the fatbin; the runtime asks the same function which spec to launch for a given op, so the
//! two can not disagree.

use crate::spec::{
    Arch, Attention, Embedding, GemmEngine, GemmFuse, GroupedGemm, GumbelSample, KernelSpec, Linear, LinearEngine, MaskKind,
    MoeCombine, MoeSort,
    Op, RmsNorm, Rope, ReadBandwidth, Router, RowSoftmaxEntropyArgmax, SamplerCanvas, SoftEmbedding, WeightFormat,
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

/// Attention tile parameters (`csrc/attention.cuh`, mma.sync; Portable). Every head dim gets
/// blocks of 64 GQA-packed query rows scanning 64-key tiles:
///
/// * 64 rows: the block's fp32 output tile is 64 x head_dim, 128 KiB of registers at the full
///   layers' 512 (half an SM's register file: 256 threads x 128), the most that leaves room for
///   the scores and the staging; and every K/V byte a block stages serves 64 rows (8 queries of
///   a full layer's 8-head group, 32 of a sliding layer's 2-head group).
/// * head_dim >= 128 (the 26B model: 256 sliding, 512 full): 2 x 4 warps (256 threads), each
///   owning 32 rows x 16 keys of S and 32 rows x head_dim / 4 of O (2 x 16 fragments, 128 fp32
///   registers, at 512). Q and K stream in 64-wide head-dim chunks, two buffers of 128 x 72 bf16
///   (36 KiB; the two 16-key V slices reuse them: 33 KiB at 512), plus the 9 KiB P tile: 46 KiB
///   of the 48 KiB of static shared memory.
/// * smaller heads (the tiny test models: 16, 24, 32, 64): 4 x 1 warps (128 threads), each
///   owning 16 rows x all 64 keys and the whole head (24 is a multiple of 8 but not of 16, so
///   one warp column); one head-dim chunk, the head rounded up to 16.
pub fn attention_spec(head_dim: u32, q_heads: u32, kv_heads: u32, mask: MaskKind) -> KernelSpec {
    let (block_k, warps_m, warps_n) = if head_dim >= 128 { (64, 2, 4) } else { (head_dim.next_multiple_of(16), 4, 1) };
    KernelSpec::portable(Op::Attention(Attention {
        head_dim,
        q_heads,
        kv_heads,
        mask,
        block_m: 64,
        block_n: 64,
        block_k,
        warps_m,
        warps_n,
        wgmma: false,
    }))
}

/// Whether sm_90a launches the wgmma attention ([`attention_spec_for`]); off, the mma.sync one
/// (both are compiled and tested).
pub const ATTENTION_WGMMA: bool = true;

/// The attention a device of `arch` launches: on sm_90a (while [`ATTENTION_WGMMA`] is on) the
/// wgmma variant where the head has whole 16-dim halves for its two warp columns
/// ([`attention_wgmma_spec`]), else the portable mma.sync one ([`attention_spec`]).
pub fn attention_spec_for(head_dim: u32, q_heads: u32, kv_heads: u32, mask: MaskKind, arch: Arch) -> KernelSpec {
    match attention_wgmma_spec(head_dim, q_heads, kv_heads, mask) {
        Some(spec) if ATTENTION_WGMMA && arch == Arch::Sm90a => spec,
        _ => attention_spec(head_dim, q_heads, kv_heads, mask),
    }
}

/// The sm_90a attention (`csrc/attention.cuh` with WGMMA): the same 64-row blocks and 64-key
/// tiles as [`attention_spec`], but S = Q K^T on wgmma m64n32k16 (and P V on m64n64k16 from
/// head_dim 128), so 4 x 2 warps (a warpgroup of
/// 4 row warps per 32 keys: each warp 16 rows x 32 keys of S, 16 rows x head_dim / 2 of O, the
/// same 128 fp32 output registers at 512 as the mma.sync 2 x 4). Q and K stream in 64-wide
/// head-dim chunks (the head rounded up to 16 when smaller), unpadded in wgmma's core-matrix
/// layout (2 x 128 x 64 bf16, which the two V slices reuse: 32.5 KiB at 512) plus the 9 KiB P
/// tile, 41.5 KiB of dynamic shared memory. `None`
/// where head_dim is not a multiple of 16 (two warp columns of whole n8 fragments; the tiny
/// models' 24).
pub fn attention_wgmma_spec(head_dim: u32, q_heads: u32, kv_heads: u32, mask: MaskKind) -> Option<KernelSpec> {
    if head_dim % 16 != 0 {
        return None;
    }
    let Op::Attention(tiles) = attention_spec(head_dim, q_heads, kv_heads, mask).op else { unreachable!() };
    let a = Attention { warps_m: 4, warps_n: 2, wgmma: true, ..tiles };
    Some(KernelSpec::for_arch(Op::Attention(a), Arch::Sm90a))
}

/// Blocks an attention launch should have: one per SM of an H100 (132). The 26B model's tiles
/// take 46 KiB of shared memory and 256 threads of 237-246 registers at head_dim 512 (167-180 at
/// 256; ptxas, sm_90a / sm_120), so an SM holds one such block. A pass whose (row tiles x kv heads) blocks are fewer splits its key
/// range ([`attention_splits`]): a 256-token canvas has 256 x 8 / 64 = 32 row tiles per kv head
/// on the full layers (2 kv heads) and 256 x 2 / 64 = 8 on the sliding ones (8 kv heads), 64
/// blocks either way, so the decoder's attention runs as 2 splits of 64.
pub const ATTENTION_SLOTS: usize = 132;

/// The fewest keys a split's share may hold: two 64-key tiles, so that the work of a split
/// (6 x head_dim flop per row and key) stays large beside the fp32 partial accumulators it
/// writes and the combine reads back (8 x head_dim bytes per row).
pub const ATTENTION_MIN_SPLIT_KEYS: usize = 128;

/// How many shares the key range of an attention of `q_len` queries over `kv_len` keys is split
/// into (flash-decoding; `csrc/attention.cuh`): 1 when its blocks fill [`ATTENTION_SLOTS`], else
/// the most splits whose blocks still fit one wave of them, at most one per
/// [`ATTENTION_MIN_SPLIT_KEYS`] keys. A function of the shape only, so a sequence's attention
/// gives the same bits whatever else shares the pass.
///
/// Only the decoder's (bidirectional) passes split: their shape is the canvas's whatever the
/// schedule, while an encoder pass's shape depends on the prefill chunking, and the split
/// changes the fp32 summation order, so splitting one would make a chunked prefill differ from
/// a whole one in the last bits. An encoder pass with few blocks (a ragged last prefill chunk, a
/// canvas commit) runs once per prompt or canvas, against up to 48 decoder passes per canvas.
pub fn attention_splits(a: &Attention, q_len: usize, kv_len: usize) -> usize {
    if a.mask != MaskKind::Bidirectional {
        return 1;
    }
    let rows = q_len * a.group() as usize;
    let blocks = rows.div_ceil(a.block_m.max(1) as usize) * a.kv_heads as usize;
    if blocks == 0 || blocks >= ATTENTION_SLOTS {
        return 1;
    }
    (ATTENTION_SLOTS / blocks).min(kv_len / ATTENTION_MIN_SPLIT_KEYS).max(1)
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
pub const LINEAR_TILES: [(u32, u32); 3] = [(64, 128), (64, 64), (32, 64)];

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
    KernelSpec::portable(Op::Linear(Linear { n, k, block_m, block_n, block_k: 32, engine: LINEAR_MMA_WARP_TILE }))
}

/// The mma.sync linear's warp tile: 32 x 32 (2 x 4 fragments, 32 fp32 accumulators per thread).
const LINEAR_MMA_WARP_TILE: LinearEngine = LinearEngine::Mma { warp_m: 32, warp_n: 32 };

/// Whether sm_90a launches the wgmma linear ([`linear_spec_for`]); off, the mma.sync one (both
/// are compiled and tested).
pub const LINEAR_WGMMA: bool = true;

/// Block tiles of the wgmma linear (`block_m x block_n`, stages), largest first: two m64 tiles
/// by two warpgroups of 64 columns (64 fp32 accumulators per thread, 3 stages of 32 KiB), one by
/// two (4 stages of 24 KiB), one by one (4 of 16 KiB). All step through k in 64-wide slices and
/// fit two blocks per SM of an H100.
pub const LINEAR_WGMMA_TILES: [(u32, u32, u32); 3] = [(128, 128, 3), (64, 128, 4), (64, 64, 4)];

/// The dense projection a device of `arch` launches: on sm_90a (while [`LINEAR_WGMMA`] is on) the
/// wgmma GEMM ([`linear_wgmma_spec`]), elsewhere the portable mma.sync one ([`linear_spec`]).
pub fn linear_spec_for(n: u32, k: u32, arch: Arch) -> KernelSpec {
    if LINEAR_WGMMA && arch == Arch::Sm90a {
        linear_wgmma_spec(n, k)
    } else {
        linear_spec(n, k)
    }
}

/// Dense projection `y = x W^T` on sm_90a's wgmma (`csrc/linear_wgmma.cuh`): the tile is the
/// largest of [`LINEAR_WGMMA_TILES`] giving at least [`LINEAR_MIN_BLOCKS`] blocks at
/// [`LINEAR_TUNED_ROWS`] rows, else the smallest: the 26B LM head gets 128 x 128 (4096 blocks:
/// each weight byte serves 128 rows from shared memory), the full layers' q_proj (8192)
/// 64 x 128, the rest 64 x 64 (q_proj 4096: 256 blocks; o_proj, the MLPs and k/v: 128-176,
/// under one per SM-pair, because a wgmma tile is at least 64 x 64).
pub fn linear_wgmma_spec(n: u32, k: u32) -> KernelSpec {
    let blocks = |(bm, bn, _): (u32, u32, u32)| LINEAR_TUNED_ROWS.div_ceil(bm) * n.div_ceil(bn);
    let (block_m, block_n, stages) = LINEAR_WGMMA_TILES
        .into_iter()
        .find(|&t| blocks(t) >= LINEAR_MIN_BLOCKS)
        .unwrap_or(LINEAR_WGMMA_TILES[LINEAR_WGMMA_TILES.len() - 1]);
    let engine = LinearEngine::Wgmma { stages };
    KernelSpec::for_arch(Op::Linear(Linear { n, k, block_m, block_n, block_k: 64, engine }), Arch::Sm90a)
}

/// Expert GEMM for `arch` over the pairs [`moe_sort_spec`] grouped by expert, bf16 weights: the
/// kernel the backend launches ([`grouped_gemm_spec_for`]).
pub fn grouped_gemm_spec(n: u32, k: u32, fuse: GemmFuse, arch: Arch) -> KernelSpec {
    grouped_gemm_spec_for(n, k, fuse, WeightFormat::Bf16, arch)
}

/// Whether the backend launches the tensor-core expert GEMMs ([`grouped_gemm_mma_spec_for`])
/// rather than the SIMT ones ([`grouped_gemm_simt_spec_for`]); both are compiled for every shape
/// and tested against the CPU kernel by kernel.
///
/// On: the SIMT kernels sum in the CPU's 8-lane order (bit-identical dots, the reference path),
/// but a 256-token canvas is ~730 GFLOP of expert math per step, 16 canvases 16 times that, far
/// past what fp32 FMAs deliver. The tensor-core kernels only sum in another order: whole-model
/// logits stay as close to the float32 run as the CPU's bf16 run is (the emulated backend's
/// `assert_bf16_drift`: within 4% on five long-context prompts) and every GPU-versus-GPU
/// bit-identity test holds. Turning this off selects the SIMT kernels everywhere
/// ([`grouped_gemm_spec_for`], hence `dgemma-gpu`'s `Kernels::resolve`).
pub const GROUPED_GEMM_TENSOR_CORES: bool = true;

/// The tensor-core tiles of the expert GEMMs ([`GemmEngine::Mma`], `csrc/grouped_gemm_mma.cuh`):
/// chunks of 64 pairs, 32-wide k slices, 8 warps side by side along the columns.
pub const GROUPED_MMA_ROWS: u32 = 64;
pub const GROUPED_MMA_BLOCK_K: u32 = 32;
pub const GROUPED_MMA_WARPS: u32 = 8;

/// Output columns of a tensor-core expert GEMM's block: 64 for GeGLU (128 weight rows: each warp
/// one n8 fragment of gate rows and the matching up rows), 128 for the down projection (each warp
/// two n8 fragments). Both tiles are 128 weight rows, so both kernels stage the same
/// (64 + 128) x 40 bf16 slices (two buffers: 30 KiB of the 48 KiB of static shared memory; a
/// 64-wide k slice would not fit) and keep 32 fp32 accumulators per thread.
pub fn grouped_mma_cols(fuse: GemmFuse) -> u32 {
    match fuse {
        GemmFuse::Geglu => 64,
        GemmFuse::Down => 128,
    }
}

/// [`grouped_gemm_spec`] for expert weights stored as `weights`: the kernel the backend launches,
/// [`grouped_gemm_mma_spec_for`] or [`grouped_gemm_simt_spec_for`] as
/// [`GROUPED_GEMM_TENSOR_CORES`] says.
///
/// The heuristics: sm_90a takes the wgmma kernel ([`grouped_gemm_wgmma_spec_for`], while
/// [`GROUPED_GEMM_WGMMA`] is on), sm_120 the mma.sync kernel.
pub fn grouped_gemm_spec_for(n: u32, k: u32, fuse: GemmFuse, weights: WeightFormat, arch: Arch) -> KernelSpec {
    if !GROUPED_GEMM_TENSOR_CORES {
        grouped_gemm_simt_spec_for(n, k, fuse, weights, arch)
    } else if GROUPED_GEMM_WGMMA && arch == Arch::Sm90a {
        grouped_gemm_wgmma_spec_for(n, k, fuse, weights)
    } else {
        grouped_gemm_mma_spec_for(n, k, fuse, weights, arch)
    }
}

/// Whether sm_90a launches the wgmma expert GEMMs ([`grouped_gemm_spec_for`]); off, it launches
/// the mma.sync ones (both are compiled and tested).
pub const GROUPED_GEMM_WGMMA: bool = true;

/// The wgmma tiles of the expert GEMMs ([`GemmEngine::Wgmma`], `csrc/grouped_gemm_wgmma.cuh`):
/// chunks of 128 pairs (two m64 tiles; the second issues no wgmma while a chunk has at most 64
/// pairs, as every expert of a one-canvas step has on average), 64-wide k slices, 3 stages.
pub const GROUPED_WGMMA_ROWS: u32 = 128;
pub const GROUPED_WGMMA_BLOCK_K: u32 = 64;
pub const GROUPED_WGMMA_STAGES: u32 = 3;

/// The wgmma expert GEMM for sm_90a (`csrc/grouped_gemm_wgmma.cuh`): the column tiles of
/// [`grouped_mma_cols`] (128 weight rows: two warpgroups of 64, 256 threads), 128-pair chunks,
/// 3 stages of 64-wide slices filled by cp.async: (128 + 128) x 64 bf16 = 32 KiB per stage,
/// 97 KiB of dynamic shared memory with the pair lists, two blocks per SM (e4m3 weights: 24 KiB
/// stages and two 16 KiB buffers of dequantised slices, 105 KiB).
///
/// Against the mma.sync kernel (same tiles but 64-pair chunks, 32-wide slices, one slice in
/// flight through registers): three times the weight bytes in flight per block (two 16 KiB
/// slices), no register round trip for the staging, and the 16 canvases' ~256 pairs per expert
/// read each weight tile twice instead of four times.
pub fn grouped_gemm_wgmma_spec_for(n: u32, k: u32, fuse: GemmFuse, weights: WeightFormat) -> KernelSpec {
    let engine = GemmEngine::Wgmma { block_k: GROUPED_WGMMA_BLOCK_K, stages: GROUPED_WGMMA_STAGES };
    let g = GroupedGemm {
        n,
        k,
        fuse,
        rows: GROUPED_WGMMA_ROWS,
        cols: grouped_mma_cols(fuse),
        weights,
        engine,
    };
    KernelSpec::for_arch(Op::GroupedGemm(g), Arch::Sm90a)
}

/// The tensor-core expert GEMM (`csrc/grouped_gemm_mma.cuh`, mma.sync m16n8k16 with fp32
/// accumulation) for expert weights stored as `weights` (e4m3 codes are dequantised to bf16 while
/// they are staged: the same tiles, half the bytes read).
///
/// `rows = 64` pairs per chunk: a 256-token canvas routes 2048 pairs to the 26B model's 128
/// experts (16 per expert on average, skewed), so nearly every expert's pairs fit one chunk and
/// its weights stream from HBM once per layer (m16 fragments past the chunk's pairs skip their
/// mma, so a 16-pair expert costs a quarter of a full chunk's tensor work); at 16 canvases (about
/// 256 pairs per expert) a block re-streams its weight tile about 4 times per layer, not 16: 64
/// multiply-adds per weight element read. `cols` ([`grouped_mma_cols`]): 64 GeGLU columns or 128
/// down columns, 128 weight rows either way; the grid is (128 experts and the invalid bucket) x 11
/// (gate_up, 704 / 64) or x 22 (down, 2816 / 128) tiles, 1419 and 2838 blocks of 256 threads.
/// The tiny test models get the same tiles (one column tile, most warps without live columns).
pub fn grouped_gemm_mma_spec_for(n: u32, k: u32, fuse: GemmFuse, weights: WeightFormat, arch: Arch) -> KernelSpec {
    let engine = GemmEngine::Mma { block_k: GROUPED_MMA_BLOCK_K, warps: GROUPED_MMA_WARPS };
    let g = GroupedGemm { n, k, fuse, rows: GROUPED_MMA_ROWS, cols: grouped_mma_cols(fuse), weights, engine };
    KernelSpec::for_arch(Op::GroupedGemm(g), arch)
}

/// The SIMT expert GEMM (`csrc/grouped_gemm.cuh`): the dot products in the CPU's 8-lane order, so
/// bit-identical to the CPU backend; compiled for every shape as the reference path (and the
/// backend's kernel while [`GROUPED_GEMM_TENSOR_CORES`] is off).
///
/// `rows = 32` pairs per chunk: most experts' pairs at a canvas fit one chunk; a hot expert
/// re-reads its column tile (from L2, mostly) once per further 32 pairs, and a partial chunk
/// skips its empty 8-pair groups' FMAs. `cols`: 32 GeGLU columns (64 weight rows: the gate and up
/// rows) or 64 down columns, so both blocks have 256 threads with a 4 x 2 register tile of 8-lane
/// dots each (the CPU's summation order: 6 shared-memory loads of 16 bytes per 32 FMAs) and
/// 26 KiB of shared memory (plus 256 bytes of row scales for e4m3 weights).
pub fn grouped_gemm_simt_spec_for(n: u32, k: u32, fuse: GemmFuse, weights: WeightFormat, arch: Arch) -> KernelSpec {
    let cols = match fuse {
        GemmFuse::Geglu => 32,
        GemmFuse::Down => 64,
    };
    let g = GroupedGemm { n, k, fuse, rows: 32, cols, weights, engine: GemmEngine::Simt };
    KernelSpec::for_arch(Op::GroupedGemm(g), arch)
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

/// Blocks the soft embedding's split-K GEMM aims for at a canvas: one wave of an H100's 132 SMs
/// (its 256 x 128 tile keeps 128 fp32 accumulators per thread, so one 256-thread block fits an SM).
pub const SOFT_EMBEDDING_TARGET_BLOCKS: u32 = 132;

/// The self-conditioning soft embedding `pr [C, vocab] @ E [vocab, hidden]` (`csrc/soft_embedding.cuh`):
/// the split-K tensor-core GEMM's spec; [`SoftEmbedding::probs_spec`] and
/// [`SoftEmbedding::reduce_spec`] name the kernels that run before and after it.
///
/// Tiles: 256 x 128 blocks, so one block covers every row of a 256-token canvas and the 1.5 GB
/// table is read from HBM once per canvas (a 128-row tile would read it twice); 32-wide vocabulary
/// slices (two 24 KiB buffers of unpadded, swizzled pr and E slices fill the 48 KiB of static
/// shared memory); 64 x 64 warp tiles (8 warps, 4 x 8 mma fragments each). Splits: the vocabulary
/// is cut into as many ranges as make [`SOFT_EMBEDDING_TARGET_BLOCKS`] blocks with the column
/// tiles (26B: 22 column tiles x 6 splits = 132; the fp32 partial sums of one canvas are 17 MB),
/// but at least 3 slices per split, so every block runs its prefetch pipeline: the tiny test
/// models (one column tile) get 5 (vocab 512: 16 slices, splits of 3 and 4) and 3 (vocab 320:
/// 10 slices, 3 and 4), which the emulator tests run, the same code as the 26B kernel's.
pub fn soft_embedding_spec(hidden: u32, vocab: u32) -> KernelSpec {
    let (block_m, block_n, block_k) = (256, 128, 32);
    let k_tiles = vocab.div_ceil(block_k);
    let splits = (SOFT_EMBEDDING_TARGET_BLOCKS / hidden.div_ceil(block_n).max(1)).clamp(1, (k_tiles / 3).max(1));
    KernelSpec::portable(Op::SoftEmbedding(SoftEmbedding {
        hidden,
        vocab,
        block_m,
        block_n,
        block_k,
        engine: LinearEngine::Mma { warp_m: 64, warp_n: 64 },
        splits,
    }))
}

/// Whether sm_90a launches the wgmma soft embedding ([`soft_embedding_spec_for`]); off, the
/// mma.sync one (both are compiled and tested).
pub const SOFT_EMBEDDING_WGMMA: bool = true;

/// The soft embedding GEMM on sm_90a's wgmma (`csrc/soft_embedding.cuh`, soft_embedding_wgmma):
/// the same 256 x 128 block tiles (every canvas row; two warpgroups of 64 hidden columns, each
/// with four m64 tiles: 128 fp32 accumulators per thread) and the same splits as
/// [`soft_embedding_spec`], 64-wide vocabulary slices through 3 cp.async stages (48 KiB each:
/// 144 KiB, one block per SM), E read as an N-major B operand straight from its [V, H] rows.
pub fn soft_embedding_wgmma_spec(hidden: u32, vocab: u32) -> KernelSpec {
    let Op::SoftEmbedding(mma) = soft_embedding_spec(hidden, vocab).op else { unreachable!() };
    let block_k = 64;
    // The same vocabulary ranges in 64-wide slices: at most a third of the slices per split.
    let splits = mma.splits.clamp(1, (vocab.div_ceil(block_k) / 3).max(1));
    let e = SoftEmbedding { block_k, engine: LinearEngine::Wgmma { stages: 3 }, splits, ..mma };
    KernelSpec::for_arch(Op::SoftEmbedding(e), Arch::Sm90a)
}

/// The soft embedding GEMM a device of `arch` launches: wgmma on sm_90a (while
/// [`SOFT_EMBEDDING_WGMMA`] is on), else the portable mma.sync one.
pub fn soft_embedding_spec_for(hidden: u32, vocab: u32, arch: Arch) -> KernelSpec {
    if SOFT_EMBEDDING_WGMMA && arch == Arch::Sm90a {
        soft_embedding_wgmma_spec(hidden, vocab)
    } else {
        soft_embedding_spec(hidden, vocab)
    }
}

/// The soft embedding's three kernels in launch order: probabilities, GEMM, reduction, for a
/// device of `arch`.
pub fn soft_embedding_specs_for(hidden: u32, vocab: u32, arch: Arch) -> [KernelSpec; 3] {
    let gemm = soft_embedding_spec_for(hidden, vocab, arch);
    let Op::SoftEmbedding(e) = gemm.op else { unreachable!("soft_embedding_spec_for returns a SoftEmbedding") };
    [e.probs_spec(), gemm, e.reduce_spec()]
}

/// [`soft_embedding_specs_for`] with the portable mma.sync GEMM.
pub fn soft_embedding_specs(hidden: u32, vocab: u32) -> [KernelSpec; 3] {
    soft_embedding_specs_for(hidden, vocab, Arch::Sm120)
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
/// The grouped (MoE) GEMMs are arch-specific (one spec per [`Arch`]), each in three engines: the
/// mma.sync kernel ([`grouped_gemm_mma_spec_for`], both archs), the SIMT reference kernel
/// ([`grouped_gemm_simt_spec_for`]) and, sm_90a only, the wgmma one
/// ([`grouped_gemm_wgmma_spec_for`]). The linears, the attentions and the soft embedding come as
/// a portable mma.sync kernel and an sm_90a wgmma one. The `*_spec_for(.., arch)` functions are
/// the heuristics the backend launches by ([`grouped_gemm_spec_for`], [`linear_spec_for`],
/// [`attention_spec_for`], [`soft_embedding_specs_for`]); every kernel listed here is compiled
/// and tested. Everything else is portable.
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
        gumbel_sample_spec(s.vocab),
        sampler_canvas_spec(),
    ];
    for (layer, encoder_mask) in [(s.sliding, MaskKind::CausalSliding), (s.full, MaskKind::Causal)] {
        let d = layer.head_dim;
        // q_norm / k_norm (per head, scaled) and v_norm (per head, no scale).
        v.push(rmsnorm_spec(d, true, false, false, false));
        v.push(rmsnorm_spec(d, false, false, false, false));
        v.push(KernelSpec::portable(Op::Rope(Rope { head_dim: d, rotary_pairs: layer.rotary_pairs })));
        for mask in [encoder_mask, MaskKind::Bidirectional] {
            v.push(attention_spec(d, s.heads, layer.kv_heads, mask));
            v.extend(attention_wgmma_spec(d, s.heads, layer.kv_heads, mask));
        }
        for spec_for in [linear_spec, linear_wgmma_spec] {
            v.push(spec_for(s.heads * d, h)); // q_proj
            v.push(spec_for(layer.kv_heads * d, h)); // k_proj (and v_proj)
            v.push(spec_for(h, s.heads * d)); // o_proj
        }
    }
    for width in [s.dense_width, s.self_cond_width] {
        for spec_for in [linear_spec, linear_wgmma_spec] {
            v.push(spec_for(width, h)); // gate_proj, up_proj
            v.push(spec_for(h, width)); // down_proj
        }
    }
    v.push(linear_spec(s.vocab, h)); // lm_head (tied embedding)
    v.push(linear_wgmma_spec(s.vocab, h));
    v.extend(soft_embedding_specs(h, s.vocab));
    v.extend(soft_embedding_specs_for(h, s.vocab, Arch::Sm90a));
    for arch in Arch::ALL {
        for weights in [WeightFormat::Bf16, WeightFormat::E4m3] {
            for spec_for in [grouped_gemm_mma_spec_for, grouped_gemm_simt_spec_for] {
                v.push(spec_for(2 * s.moe_width, h, GemmFuse::Geglu, weights, arch));
                v.push(spec_for(h, s.moe_width, GemmFuse::Down, weights, arch));
            }
        }
    }
    for weights in [WeightFormat::Bf16, WeightFormat::E4m3] {
        v.push(grouped_gemm_wgmma_spec_for(2 * s.moe_width, h, GemmFuse::Geglu, weights));
        v.push(grouped_gemm_wgmma_spec_for(h, s.moe_width, GemmFuse::Down, weights));
    }
    sort_dedup(v)
}

/// Linear kernels no model needs, compiled in so the kernel tests (emulator and GPU) exercise the
/// tensor-core tile layer (`csrc/mma.cuh`) where the models' shapes do not: every model width is
/// a multiple of 16, so these take n = 26 (an n8 fragment with one live column pair) and 130 (a
/// last column tile of one pair), k = 24 and 72 (half a k16 step; a last slice of 8), each with
/// every block tile of [`LINEAR_TILES`] (the tiny models only select the smallest), and the
/// same shapes with every wgmma tile of [`LINEAR_WGMMA_TILES`] (k = 72: a second 64-wide slice
/// of 8; n = 130: a last column tile with one live warpgroup holding one live column pair).
pub fn linear_self_test_specs() -> Vec<KernelSpec> {
    let mut v = Vec::new();
    for (n, k) in [(26, 24), (130, 72)] {
        for (block_m, block_n) in LINEAR_TILES {
            let l = Linear { n, k, block_m, block_n, block_k: 32, engine: LINEAR_MMA_WARP_TILE };
            v.push(KernelSpec::portable(Op::Linear(l)));
        }
        for (block_m, block_n, stages) in LINEAR_WGMMA_TILES {
            let l = Linear { n, k, block_m, block_n, block_k: 64, engine: LinearEngine::Wgmma { stages } };
            v.push(KernelSpec::for_arch(Op::Linear(l), Arch::Sm90a));
        }
    }
    v
}

/// Soft embedding kernels no model needs, compiled in so the kernel tests (emulator and GPU) run
/// the split-K GEMM's paths that the tiny models' shapes do not reach and the 26B one reaches only
/// on a GPU: hidden 136 is two column tiles, the second with one live n8 fragment (half of an
/// ldmatrix pair past H); vocab 520 ends in a slice of 8 entries (half a k16 step, then a step
/// wholly past V); 5 splits of 3 or 4 of its 17 slices (the wgmma variant: 3 splits of its 9
/// 64-wide slices, the second column tile one warpgroup with one live column group).
pub fn soft_embedding_self_test_specs() -> Vec<KernelSpec> {
    let mut v = soft_embedding_specs(136, 520).to_vec();
    v.extend(soft_embedding_specs_for(136, 520, Arch::Sm90a));
    v
}

/// Tensor-core expert GEMMs no model needs, compiled in (both weight formats, both archs) so the
/// kernel tests run the paths the model shapes do not reach on the emulator: GeGLU n = 144 (72
/// output columns: a second column tile with one live warp) with k = 72 (three k slices, the last
/// 8 wide: half a k16 step, then a step wholly past k); down n = 136 (a second column tile whose
/// one live warp has one live n8 fragment of its ldmatrix pair) with k = 40.
pub fn grouped_gemm_self_test_specs() -> Vec<KernelSpec> {
    let mut v = Vec::new();
    for arch in Arch::ALL {
        for weights in [WeightFormat::Bf16, WeightFormat::E4m3] {
            v.push(grouped_gemm_mma_spec_for(144, 72, GemmFuse::Geglu, weights, arch));
            v.push(grouped_gemm_mma_spec_for(136, 40, GemmFuse::Down, weights, arch));
        }
    }
    // wgmma (sm_90a): a second column tile with one live warpgroup (GeGLU: 8 of its 32 columns;
    // down: 8 of its 64), a last k16 step half past k.
    for weights in [WeightFormat::Bf16, WeightFormat::E4m3] {
        v.push(grouped_gemm_wgmma_spec_for(144, 72, GemmFuse::Geglu, weights));
        v.push(grouped_gemm_wgmma_spec_for(136, 40, GemmFuse::Down, weights));
    }
    v
}

/// The union of [`specs_for_model`] over [`SUPPORTED_MODELS`], plus the model-independent
/// [`read_bandwidth_spec`], [`linear_self_test_specs`], [`soft_embedding_self_test_specs`] and
/// [`grouped_gemm_self_test_specs`]: what build.rs compiles.
pub fn supported_specs() -> Vec<KernelSpec> {
    let mut v: Vec<KernelSpec> = SUPPORTED_MODELS.iter().flat_map(|(_, s)| specs_for_model(s)).collect();
    v.push(read_bandwidth_spec());
    v.extend(linear_self_test_specs());
    v.extend(soft_embedding_self_test_specs());
    v.extend(grouped_gemm_self_test_specs());
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
            "attention_d256_q16_kv8_sliding_t64x64x64_w2x4_bf16",
            "attention_d512_q16_kv2_bidir_t64x64x64_w2x4_bf16",
            "linear_n262144_k2816_t64x128x32_w32x32_bf16",
            "linear_n2816_k8192_t32x64x32_w32x32_bf16",
            "grouped_gemm_n1408_k2816_geglu_r32_c32_bf16_sm90a",
            "grouped_gemm_n2816_k704_down_r32_c64_bf16_sm120",
            "grouped_gemm_n1408_k2816_geglu_mma_t64x64x32_w8_bf16_sm90a",
            "grouped_gemm_n1408_k2816_geglu_mma_t64x64x32_w8_e4m3_bf16_sm120",
            "grouped_gemm_n2816_k704_down_mma_t64x128x32_w8_bf16_sm90a",
            "grouped_gemm_n2816_k704_down_mma_t64x128x32_w8_e4m3_bf16_sm120",
            "moe_sort_e128_bf16",
            "moe_combine_h2816_bf16",
            "router_h2816_e128_k8_bf16",
            "soft_embedding_probs_v262144_bf16",
            "soft_embedding_h2816_v262144_t256x128x32_w64x64_s6_bf16",
            "soft_embedding_reduce_h2816_s6_bf16",
            "gumbel_sample_v262144_bf16",
            "sampler_canvas_c256_bf16",
        ] {
            assert!(names.iter().any(|n| n == want), "missing {want}");
        }
    }

    #[test]
    fn gemm_families_exist_for_both_archs() {
        for spec in supported_specs() {
            if let Op::GroupedGemm(g) = spec.op {
                let Target::Only(arch) = spec.target else { panic!("{} is portable", spec.kernel_name()) };
                if matches!(g.engine, GemmEngine::Wgmma { .. }) {
                    assert_eq!(arch, Arch::Sm90a, "{}", spec.kernel_name()); // wgmma is Hopper's
                    continue;
                }
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
                let smallest = match l.engine {
                    LinearEngine::Mma { .. } => LINEAR_TILES[LINEAR_TILES.len() - 1],
                    LinearEngine::Wgmma { .. } => {
                        let (bm, bn, _) = LINEAR_WGMMA_TILES[LINEAR_WGMMA_TILES.len() - 1];
                        (bm, bn)
                    }
                };
                assert!(
                    blocks >= LINEAR_MIN_BLOCKS || (l.block_m, l.block_n) == smallest,
                    "{}",
                    spec.kernel_name()
                );
            }
        }
        // wgmma (sm_90a): the LM head 128 x 128, the full q_proj 64 x 128, the rest 64 x 64; every
        // tile validates and fits two blocks per SM.
        let wg_tile = |n: u32, k: u32| {
            let spec = linear_spec_for(n, k, Arch::Sm90a);
            spec.validate().unwrap();
            assert!(2 * (spec.dynamic_shared_bytes() as u64 + 1024) <= 228 * 1024, "{}", spec.kernel_name());
            let Op::Linear(l) = spec.op else { unreachable!() };
            assert_eq!(matches!(l.engine, LinearEngine::Wgmma { .. }), LINEAR_WGMMA);
            (l.block_m, l.block_n)
        };
        if LINEAR_WGMMA {
            assert_eq!(wg_tile(262_144, 2816), (128, 128));
            assert_eq!(wg_tile(8192, 2816), (64, 128));
            assert_eq!(wg_tile(4096, 2816), (64, 64));
            assert_eq!(wg_tile(2816, 2112), (64, 64));
        }
        assert_eq!(linear_spec_for(2816, 2112, Arch::Sm120), linear_spec(2816, 2112));
        for spec in linear_self_test_specs() {
            assert!(supported_specs().contains(&spec), "{}", spec.kernel_name());
            spec.validate().unwrap();
        }
    }

    #[test]
    fn attention_tiles_fit_and_split_the_decoder_full_layers() {
        for spec in supported_specs() {
            if let Op::Attention(a) = spec.op {
                let want = if a.wgmma { Target::Only(Arch::Sm90a) } else { Target::Portable };
                assert_eq!(spec.target, want, "{}", spec.kernel_name());
                assert!(a.shared_bytes() <= 48 * 1024, "{}", spec.kernel_name());
                spec.validate().unwrap();
            }
        }
        // sm_90a runs wgmma on the 26B shapes, sm_120 mma.sync.
        let s = ModelShape::DIFFUSION_GEMMA_26B_A4B;
        for l in [s.sliding, s.full] {
            let on = |arch| match attention_spec_for(l.head_dim, s.heads, l.kv_heads, MaskKind::Bidirectional, arch).op {
                Op::Attention(a) => a.wgmma,
                _ => unreachable!(),
            };
            assert_eq!((on(Arch::Sm90a), on(Arch::Sm120)), (ATTENTION_WGMMA, false));
        }
        let s = ModelShape::DIFFUSION_GEMMA_26B_A4B;
        let attn = |l: LayerAttention, mask| match attention_spec(l.head_dim, s.heads, l.kv_heads, mask).op {
            Op::Attention(a) => a,
            _ => unreachable!(),
        };
        let (full, sliding) = (attn(s.full, MaskKind::Bidirectional), attn(s.sliding, MaskKind::Bidirectional));
        // Decoder: 64 blocks on both layer types (256 x 8 / 64 x 2 kv heads, 256 x 2 / 64 x 8), so
        // 2 splits at any real context; a 512-token prefill chunk fills the GPU without splitting.
        assert_eq!(attention_splits(&full, 256, 4096 + 256), 2);
        assert_eq!(attention_splits(&full, 256, 32_768 + 256), 2);
        assert_eq!(attention_splits(&full, 256, 200), 1); // too few keys to share
        assert_eq!(attention_splits(&sliding, 256, 1023 + 256), 2);
        assert_eq!(attention_splits(&attn(s.sliding, MaskKind::CausalSliding), 512, 1023 + 512), 1);
        // A canvas commit (an encoder pass of 256 tokens) has 64 blocks too, but never splits.
        assert_eq!(attention_splits(&attn(s.full, MaskKind::Causal), 256, 4096 + 256), 1);
        assert_eq!(attention_splits(&attn(s.sliding, MaskKind::CausalSliding), 256, 1023 + 256), 1);
        assert_eq!(attention_splits(&attn(s.full, MaskKind::Causal), 512, 4096 + 512), 1);
        // One query (8 packed rows): 2 blocks, as many splits as fit a wave and the keys allow.
        assert_eq!(attention_splits(&full, 1, 8192), 64);
        assert_eq!(attention_splits(&full, 1, 300), 2);
        assert_eq!(attention_splits(&full, 0, 300), 1);
    }

    #[test]
    fn router_and_soft_embedding_for_every_shape() {
        for (name, shape) in SUPPORTED_MODELS {
            let specs = specs_for_model(shape);
            let router = Op::Router(Router { hidden: shape.hidden, experts: shape.experts, top_k: shape.top_k });
            assert!(specs.iter().any(|s| s.op == router), "{name}: no router");
            for spec in soft_embedding_specs(shape.hidden, shape.vocab) {
                assert!(specs.contains(&spec), "{name}: no {}", spec.kernel_name());
                spec.validate().unwrap();
            }
            let Op::SoftEmbedding(e) = soft_embedding_spec(shape.hidden, shape.vocab).op else { unreachable!() };
            assert!(e.splits >= 2 && e.k_tiles() >= 3 * e.splits, "{name}: {e:?}");
        }
        // 26B: one block per SM of an H100, every row of a canvas in one tile.
        let Op::SoftEmbedding(big) = soft_embedding_spec(2816, 262_144).op else { unreachable!() };
        assert_eq!((big.block_m, big.block_n, big.block_k, big.splits), (256, 128, 32, 6));
        assert_eq!(2816u32.div_ceil(big.block_n) * big.splits, SOFT_EMBEDDING_TARGET_BLOCKS);
        // The self-test shape: two column tiles, a ragged last slice, ragged splits.
        for spec in soft_embedding_self_test_specs() {
            assert!(supported_specs().contains(&spec), "{}", spec.kernel_name());
            if let Op::SoftEmbedding(e) = spec.op {
                let want = match e.engine {
                    LinearEngine::Mma { .. } => (2, 8, 17, 5),
                    LinearEngine::Wgmma { .. } => (2, 8, 9, 3),
                };
                assert_eq!((e.hidden.div_ceil(e.block_n), e.vocab % e.block_k, e.k_tiles(), e.splits), want);
            }
        }
    }

    #[test]
    fn moe_kernels_for_every_shape() {
        for (name, shape) in SUPPORTED_MODELS {
            let specs = specs_for_model(shape);
            assert!(specs.contains(&moe_sort_spec(shape.experts)), "{name}: no routing sort");
            assert!(specs.contains(&moe_combine_spec(shape.hidden)), "{name}: no combine");
            for arch in Arch::ALL {
                for weights in [WeightFormat::Bf16, WeightFormat::E4m3] {
                    for (spec_for, tensor_cores) in
                        [(grouped_gemm_mma_spec_for as fn(_, _, _, _, _) -> _, true), (grouped_gemm_simt_spec_for, false)]
                    {
                        let up = spec_for(2 * shape.moe_width, shape.hidden, GemmFuse::Geglu, weights, arch);
                        let down = spec_for(shape.hidden, shape.moe_width, GemmFuse::Down, weights, arch);
                        assert!(specs.contains(&up) && specs.contains(&down), "{name}: no {arch:?} {weights:?} expert GEMMs");
                        for s in [up, down] {
                            s.validate().unwrap();
                            assert_eq!(s.block_threads(), 256, "{}", s.kernel_name());
                            let Op::GroupedGemm(g) = s.op else { unreachable!() };
                            assert_eq!(matches!(g.engine, GemmEngine::Mma { .. }), tensor_cores, "{}", s.kernel_name());
                            assert!(g.shared_bytes() <= 48 * 1024, "{}", s.kernel_name());
                        }
                    }
                }
            }
            // The backend's kernel: the engine GROUPED_GEMM_TENSOR_CORES says.
            let Op::GroupedGemm(g) = grouped_gemm_spec(2 * shape.moe_width, shape.hidden, GemmFuse::Geglu, Arch::Sm90a).op
            else {
                unreachable!()
            };
            assert_eq!(matches!(g.engine, GemmEngine::Wgmma { .. }), GROUPED_GEMM_TENSOR_CORES && GROUPED_GEMM_WGMMA, "{name}");
            assert_eq!(g.weights, WeightFormat::Bf16, "{name}");
            for weights in [WeightFormat::Bf16, WeightFormat::E4m3] {
                // sm_120: mma.sync; sm_90a: wgmma, for both formats.
                let down = grouped_gemm_spec_for(shape.hidden, shape.moe_width, GemmFuse::Down, weights, Arch::Sm120);
                let Op::GroupedGemm(g) = down.op else { unreachable!() };
                assert_eq!(matches!(g.engine, GemmEngine::Mma { .. }), GROUPED_GEMM_TENSOR_CORES, "{name}");
                for spec in [
                    grouped_gemm_wgmma_spec_for(2 * shape.moe_width, shape.hidden, GemmFuse::Geglu, weights),
                    grouped_gemm_wgmma_spec_for(shape.hidden, shape.moe_width, GemmFuse::Down, weights),
                ] {
                    assert!(specs.contains(&spec), "{name}: no {}", spec.kernel_name());
                    spec.validate().unwrap();
                    assert_eq!(spec.block_threads(), 256, "{}", spec.kernel_name());
                }
            }
        }
        // 26B wgmma: 97 KiB (bf16) and 105 KiB (e4m3) of dynamic shared memory, so two blocks fit
        // an H100 SM's 228 KiB (each block also takes 1 KiB the system reserves).
        let e4m3_bytes = 3 * (128 * 64 * 2 + 128 * 64) + 2 * 128 * 64 * 2 + 4 * 128 + 8 * 128;
        for (weights, bytes) in [(WeightFormat::Bf16, 3 * (128 + 128) * 64 * 2 + 8 * 128), (WeightFormat::E4m3, e4m3_bytes)] {
            let Op::GroupedGemm(g) = grouped_gemm_wgmma_spec_for(1408, 2816, GemmFuse::Geglu, weights).op else {
                unreachable!()
            };
            assert_eq!(g.dynamic_shared_bytes(), bytes);
            assert!(2 * (g.dynamic_shared_bytes() + 1024) <= 228 * 1024);
        }
        // 26B: 64-pair chunks, 11 gate_up and 22 down column tiles of 128 weight rows, 30.5 KiB.
        let s = ModelShape::DIFFUSION_GEMMA_26B_A4B;
        for (fuse, n, k, tiles) in [(GemmFuse::Geglu, 2 * s.moe_width, s.hidden, 11), (GemmFuse::Down, s.hidden, s.moe_width, 22)] {
            let Op::GroupedGemm(g) = grouped_gemm_mma_spec_for(n, k, fuse, WeightFormat::E4m3, Arch::Sm120).op else {
                unreachable!()
            };
            assert_eq!((g.rows, g.weight_rows(), g.out_cols().div_ceil(g.cols)), (64, 128, tiles), "{fuse:?}");
            assert_eq!(g.shared_bytes(), 2 * (64 + 128) * 40 * 2 + 8 * 64);
        }
        // The self-test shapes: a second column tile with one live warp, ragged k slices.
        for spec in grouped_gemm_self_test_specs() {
            assert!(supported_specs().contains(&spec), "{}", spec.kernel_name());
            spec.validate().unwrap();
            let Op::GroupedGemm(g) = spec.op else { unreachable!() };
            assert_eq!(g.out_cols().div_ceil(g.cols), 2, "{}", spec.kernel_name());
            assert_eq!(g.k % 16, 8, "{}", spec.kernel_name());
            assert_eq!(g.k % GROUPED_MMA_BLOCK_K, 8, "{}", spec.kernel_name());
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
