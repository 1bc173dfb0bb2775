//! Typed kernel specifications.
//!
//! A [`KernelSpec`] names one compiled kernel completely: the op family and its compile-time
//! shape ([`Op`]), the storage dtype ([`Dtype`]) and the architectures it is built for
//! ([`Target`]). [`KernelSpec::kernel_name`] encodes every one of those parameters, so two
//! different specs never share a symbol, and [`KernelSpec::block_threads`] is the block size
//! the kernel is compiled for (`__launch_bounds__`) and must be launched with.

use std::fmt::Write as _;

/// Storage dtype of activations and weights. Arithmetic is always float32; values are rounded
/// to the storage dtype exactly where the CPU reference (`dgemma-cpu`, bf16 mode) rounds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Dtype {
    /// bfloat16 in memory, float32 math.
    Bf16,
}

impl Dtype {
    /// Name fragment (`bf16`).
    pub fn suffix(self) -> &'static str {
        match self {
            Dtype::Bf16 => "bf16",
        }
    }
}

/// A GPU architecture the fatbin carries machine code for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Arch {
    /// Hopper (H100/H200), with the arch-specific features (wgmma, setmaxnreg, TMA multicast).
    Sm90a,
    /// Consumer Blackwell (RTX 50xx); also the arch of the embedded compute_120 PTX.
    Sm120,
}

impl Arch {
    pub const ALL: [Arch; 2] = [Arch::Sm90a, Arch::Sm120];

    /// Name fragment (`sm90a`, `sm120`).
    pub fn suffix(self) -> &'static str {
        match self {
            Arch::Sm90a => "sm90a",
            Arch::Sm120 => "sm120",
        }
    }

    /// nvcc's spelling (`sm_90a`, `sm_120`).
    pub fn nvcc_name(self) -> &'static str {
        match self {
            Arch::Sm90a => "sm_90a",
            Arch::Sm120 => "sm_120",
        }
    }

    /// The preprocessor flag (defined to 1 in `csrc/common.cuh` while compiling for this arch)
    /// that guards an arch-specific kernel body.
    pub fn guard_macro(self) -> &'static str {
        match self {
            Arch::Sm90a => "DGEMMA_ARCH_SM90A",
            Arch::Sm120 => "DGEMMA_ARCH_SM120",
        }
    }

    /// The arch whose code a device of this compute capability runs: 9.0 (H100/H200) loads the
    /// sm_90a cubin, 12.x loads the sm_120 cubin (12.0) or JIT-compiles the compute_120 PTX.
    pub fn from_compute_capability(major: i32, minor: i32) -> Option<Arch> {
        match (major, minor) {
            (9, 0) => Some(Arch::Sm90a),
            (12, _) => Some(Arch::Sm120),
            _ => None,
        }
    }
}

/// Which architectures a kernel has a real body on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Target {
    /// Plain CUDA that compiles for every arch in the fatbin (and the compute_120 PTX).
    Portable,
    /// Uses (or will use) instructions of one arch only. The symbol exists in every image of the
    /// fatbin, but on other archs its body is a trap; the runtime only launches it on a device
    /// of this arch. The name carries the arch suffix.
    Only(Arch),
}

impl Target {
    /// True if a device running `arch` code may launch this kernel.
    pub fn runs_on(self, arch: Arch) -> bool {
        match self {
            Target::Portable => true,
            Target::Only(a) => a == arch,
        }
    }
}

/// RMSNorm over rows of `width`, with optional fusions of the neighbouring element-wise ops
/// of a DiffusionGemma layer (model-spec 3.2):
///
/// ```text
/// in  = fuse_input_add ? round(x + x_add) : x
/// y   = round(in * rsqrt(mean(in^2) + eps) * (has_scale ? w : 1))
/// y   = fuse_residual_add ? round(out + y) : y        (out is the residual, updated in place)
/// y   = fuse_layer_scalar ? round(y * layer_scalar) : y
/// out = y
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RmsNorm {
    pub width: u32,
    pub has_scale: bool,
    pub fuse_input_add: bool,
    pub fuse_residual_add: bool,
    pub fuse_layer_scalar: bool,
}

/// Table-driven rotary embedding (rotate_half / NeoX pairs `j`, `j + head_dim/2`), in place on
/// `[tokens, heads, head_dim]`. Only the first `rotary_pairs` pairs rotate (proportional RoPE
/// on full layers); the cos/sin tables are `[positions, rotary_pairs]` bf16, built on the host
/// from the checkpoint's `inv_freq` (so the GPU never re-derives theta powers).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Rope {
    pub head_dim: u32,
    pub rotary_pairs: u32,
}

/// `out[t] = round(E[ids[t]] * scale)` for rows of `hidden`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Embedding {
    pub hidden: u32,
}

/// Per row of `vocab` bf16 LM-head outputs: `P = softcap(x) / T`, first argmax of P, entropy of
/// `Categorical(logits=P)` (the sampler's formula), and the softmax statistics of `bf16(P)`
/// (max, 1 / sum: the next step's self-conditioning probabilities, see [`SoftEmbedding`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RowSoftmaxEntropyArgmax {
    pub vocab: u32,
}

/// Attention mask of the [`Attention`] kernel; positions are absolute (`q_pos0 + i`,
/// `k_pos0 + j`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum MaskKind {
    /// Encoder, full layers: key visible iff `kp <= qp`.
    Causal,
    /// Encoder, sliding layers: visible iff `kp <= qp && qp - kp < window` (window at run time).
    CausalSliding,
    /// Decoder: every key passed in is visible.
    Bidirectional,
}

impl MaskKind {
    pub fn suffix(self) -> &'static str {
        match self {
            MaskKind::Causal => "causal",
            MaskKind::CausalSliding => "sliding",
            MaskKind::Bidirectional => "bidir",
        }
    }
}

/// Scaled (scale 1.0) dot-product attention with GQA, `q: [S, q_heads, D]`, `out: [S, q_heads, D]`,
/// over a ring of `kv_rows` logical rows (position p in row p % kv_rows) of
/// `k, v: [rows, kv_heads, D]`: logical row r is row r, or, paged (an i32 page table into a shared
/// pool of pages), row `page_table[r / page] * page + r % page`. On tensor cores
/// (`csrc/attention.cuh`, mma.sync m16n8k16; two passes over the keys for the exact row max).
/// The `q_heads / kv_heads` query heads of a kv head are packed into the rows
/// (`S * q_heads / kv_heads` rows per kv head). Tile parameters: a block owns `block_m` packed rows
/// of one kv head and scans the keys in tiles of `block_n`; Q and K stream through shared memory
/// in `block_k`-wide head-dim chunks; its `warps_m x warps_n` warps each own a
/// `(block_m / warps_m) x (block_n / warps_n)` sub-tile of the scores and a
/// `(block_m / warps_m) x (head_dim / warps_n)` sub-tile of the output. With `wgmma` (sm_90a
/// only) S = Q K^T runs on wgmma m64n32k16 instead, a warpgroup (4 row warps) per 32 keys, from
/// Q / K chunks in wgmma's core-matrix layout in dynamic shared memory, and from head_dim 128
/// P V too (m64n64k16, V as an N-major operand); smaller heads keep P V on mma.sync.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Attention {
    pub head_dim: u32,
    pub q_heads: u32,
    pub kv_heads: u32,
    pub mask: MaskKind,
    pub block_m: u32,
    pub block_n: u32,
    pub block_k: u32,
    pub warps_m: u32,
    pub warps_n: u32,
    pub wgmma: bool,
}

impl Attention {
    /// Query heads per kv head (the packed rows of one query).
    pub fn group(&self) -> u32 {
        self.q_heads / self.kv_heads.max(1)
    }

    /// Bytes of static shared memory (`csrc/attention.cuh`): two Q + K chunk buffers of
    /// `(block_m + block_n) x (block_k + 8)` bf16, or (reusing them) two 16-key V slices of
    /// `head_dim + 8` (`+ 16` when head_dim is an odd multiple of 8) bf16 per key, whichever is
    /// larger; the P tile `block_m x (block_n + 8)` bf16; two fp32 row statistics, one per block
    /// row and one per block row and warp column.
    /// With wgmma, only the row statistics (and a 16-byte placeholder) are static: the staged
    /// tiles and P are [`Attention::dynamic_shared_bytes`].
    pub fn shared_bytes(&self) -> u64 {
        let stats = 4 * self.block_m as u64 * (1 + self.warps_n as u64);
        if self.wgmma {
            16 + stats
        } else {
            self.tile_bytes() + stats
        }
    }

    /// Bytes of dynamic shared memory: with wgmma the staged tiles and P (as [`Attention::shared_bytes`]
    /// describes, the Q + K chunks unpadded in wgmma's core-matrix layout); 0 otherwise.
    pub fn dynamic_shared_bytes(&self) -> u64 {
        if self.wgmma {
            self.tile_bytes()
        } else {
            0
        }
    }

    /// The staged Q + K chunks (or V slices) and the P tile, in bytes.
    fn tile_bytes(&self) -> u64 {
        let (bm, bn, bk, d) = (self.block_m as u64, self.block_n as u64, self.block_k as u64, self.head_dim as u64);
        let ldv = if d % 16 == 0 { d + 8 } else { d + 16 };
        let chunk_row = if self.wgmma { bk } else { bk + 8 };
        let staged = (2 * (bm + bn) * chunk_row).max(2 * 16 * ldv);
        2 * (staged + bm * (bn + 8))
    }
}

/// `y[rows, n] = round(x[rows, k] @ W[n, k]^T)` (nn.Linear, PyTorch weight layout), a tensor-core
/// GEMM. Tile parameters: each block computes a `block_m x block_n` tile of y, stepping through k
/// in `block_k`-wide slices staged in shared memory; `engine` says how.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Linear {
    pub n: u32,
    pub k: u32,
    pub block_m: u32,
    pub block_n: u32,
    pub block_k: u32,
    pub engine: LinearEngine,
}

/// How a [`Linear`] multiplies.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum LinearEngine {
    /// mma.sync m16n8k16 (`csrc/linear.cuh`, every arch): two register-prefetched buffers of
    /// static shared memory; each warp owns a `warp_m x warp_n` sub-tile, so a block has
    /// `(block_m / warp_m) * (block_n / warp_n)` warps.
    Mma { warp_m: u32, warp_n: u32 },
    /// wgmma m64n64k16 (`csrc/linear_wgmma.cuh` on `csrc/wgmma_gemm.cuh`, sm_90a only): `stages`
    /// cp.async buffers of dynamic shared memory; one warpgroup per 64 columns of the tile, each
    /// over all `block_m` rows (`block_m / 64` m64 tiles).
    Wgmma { stages: u32 },
}

impl LinearEngine {
    /// Dynamic shared memory of a `block_m x block_n` tile stepping through k in `block_k`
    /// slices: wgmma's `stages` buffers of both bf16 slices, unpadded; none for mma.sync.
    pub fn dynamic_shared_bytes(self, block_m: u32, block_n: u32, block_k: u32) -> u64 {
        match self {
            LinearEngine::Mma { .. } => 0,
            LinearEngine::Wgmma { stages } => stages as u64 * (block_m + block_n) as u64 * block_k as u64 * 2,
        }
    }
}

impl Linear {
    /// Bytes of static shared memory: for mma.sync two buffers of an x and a W slice, rows padded
    /// to `block_k + 8` elements (`csrc/linear.cuh`); wgmma has none.
    pub fn shared_bytes(&self) -> u64 {
        match self.engine {
            LinearEngine::Mma { .. } => 2 * (self.block_m + self.block_n) as u64 * (self.block_k + 8) as u64 * 2,
            LinearEngine::Wgmma { .. } => 0,
        }
    }

    /// Bytes of dynamic shared memory: for wgmma `stages` buffers of the x and W slices,
    /// unpadded bf16 (`csrc/wgmma_gemm.cuh`); 0 for mma.sync.
    pub fn dynamic_shared_bytes(&self) -> u64 {
        self.engine.dynamic_shared_bytes(self.block_m, self.block_n, self.block_k)
    }
}

/// Epilogue of a [`GroupedGemm`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum GemmFuse {
    /// Expert gate_up projection (`n` = 2 x moe width, gate rows first) followed by GeGLU:
    /// writes `round(round(gelu(round(g))) * round(u))`, `n / 2` columns per (token, slot).
    Geglu,
    /// Expert down projection: `y[pair] = round(act[pair] W[e]^T)`, `n` columns per pair; the
    /// routing-weighted sum over the slots is [`MoeCombine`].
    Down,
}

impl GemmFuse {
    pub fn suffix(self) -> &'static str {
        match self {
            GemmFuse::Geglu => "geglu",
            GemmFuse::Down => "down",
        }
    }
}

/// Storage format of the expert weights of a [`GroupedGemm`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum WeightFormat {
    /// bf16 weights (the checkpoint's).
    Bf16,
    /// FP8 E4M3 codes with one fp32 scale per output row (`csrc/fp8.cuh`): weight-only FP8, each
    /// weight dequantised to `bf16(f32(code) * scale)` while it is staged in shared memory. The
    /// kernel takes a `w_scale [E * n]` argument after `w`.
    E4m3,
}

impl WeightFormat {
    /// Name fragment: empty for bf16 (the activations' dtype names it already), `_e4m3`.
    pub fn suffix(self) -> &'static str {
        match self {
            WeightFormat::Bf16 => "",
            WeightFormat::E4m3 => "_e4m3",
        }
    }

    /// Bytes per weight in memory.
    pub fn bytes(self) -> u32 {
        match self {
            WeightFormat::Bf16 => 2,
            WeightFormat::E4m3 => 1,
        }
    }
}

/// How a [`GroupedGemm`] computes its dot products.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum GemmEngine {
    /// SIMT fp32 FMAs in the CPU's 8-lane dot order (`csrc/grouped_gemm.cuh`), bit-identical to
    /// the CPU: the reference path. Each thread owns a 4 x 2 register tile (4 pairs x 2 weight
    /// rows: for GeGLU the gate and up rows of one column) of 8-lane dots, so a block has
    /// `(rows / 4) * (weight rows / 2)` threads.
    Simt,
    /// Tensor cores (`csrc/grouped_gemm_mma.cuh`, mma.sync m16n8k16 bf16 -> fp32; only the fp32
    /// summation order differs from the CPU). k streams through shared memory in `block_k`-wide
    /// slices (double-buffered); `warps` warps sit side by side along the block's columns, each
    /// owning all `rows` pair rows and `cols / warps` output columns (for GeGLU their gate and
    /// their up rows).
    Mma { block_k: u32, warps: u32 },
    /// Hopper's warpgroup tensor cores (`csrc/grouped_gemm_wgmma.cuh`, wgmma m64n64k16 bf16 ->
    /// fp32 from shared memory; sm_90a only): the same numerics as [`GemmEngine::Mma`],
    /// e4m3 weights dequantised to bf16 in shared memory. k streams through `stages`
    /// shared-memory buffers of `block_k`-wide slices filled by cp.async (dynamic shared memory);
    /// one warpgroup per 64 weight rows of the tile, `rows` a multiple of 64 (m64 tiles of pairs).
    Wgmma { block_k: u32, stages: u32 },
}

/// MoE expert GEMM over the routed (token, slot) pairs grouped by expert ([`MoeSort`]'s output),
/// expert weights `W[e]: [n, k]`. Tile parameters: a block computes `cols` output columns for
/// chunks of `rows` pairs of one expert, so each weight element read serves `rows` pairs; the
/// grid is (experts + 1, output columns / `cols`) for every engine. `engine` says how the block
/// computes (SIMT in the CPU's order, or tensor cores) and carries its own tile parameters.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct GroupedGemm {
    pub n: u32,
    pub k: u32,
    pub fuse: GemmFuse,
    pub rows: u32,
    pub cols: u32,
    /// How the expert weights are stored (bf16, or e4m3 codes with per-row scales).
    pub weights: WeightFormat,
    pub engine: GemmEngine,
}

impl GroupedGemm {
    /// Weight rows of one column tile: the gate and the up rows for GeGLU.
    pub fn weight_rows(&self) -> u32 {
        match self.fuse {
            GemmFuse::Geglu => 2 * self.cols,
            GemmFuse::Down => self.cols,
        }
    }

    /// Output columns of the whole output row: `n / 2` for GeGLU, `n` otherwise.
    pub fn out_cols(&self) -> u32 {
        match self.fuse {
            GemmFuse::Geglu => self.n / 2,
            GemmFuse::Down => self.n,
        }
    }

    /// Bytes of static shared memory. SIMT (`csrc/grouped_gemm.cuh`): the fp32 input and weight
    /// slices of one k step (64 wide, 32 for k < 64), rows padded by 4 floats, two ints per pair
    /// slot, and for e4m3 weights one fp32 scale per weight row. Tensor cores
    /// (`csrc/grouped_gemm_mma.cuh`): two buffers of the input and weight slices, bf16 rows padded
    /// to `block_k + 8`, and two ints per pair slot (e4m3 scales stay in registers).
    pub fn shared_bytes(&self) -> u64 {
        match self.engine {
            GemmEngine::Simt => {
                let kt: u64 = if self.k >= 64 { 64 } else { 32 };
                let scales = match self.weights {
                    WeightFormat::Bf16 => 4,
                    WeightFormat::E4m3 => 4 * self.weight_rows() as u64,
                };
                (self.rows + self.weight_rows()) as u64 * (kt + 4) * 4 + 8 * self.rows as u64 + scales
            }
            GemmEngine::Mma { block_k, .. } => {
                2 * (self.rows + self.weight_rows()) as u64 * (block_k as u64 + 8) * 2 + 8 * self.rows as u64
            }
            GemmEngine::Wgmma { .. } => 0,
        }
    }

    /// Bytes of dynamic shared memory (the launch's `sharedMemBytes`): for wgmma
    /// (`csrc/grouped_gemm_wgmma.cuh`), `stages` buffers of the input slice (bf16) and the
    /// weight slice (as stored: bf16 or e4m3 codes), `rows x block_k` and `weight rows x block_k`
    /// unpadded, for e4m3 two bf16 buffers of the dequantised weight slices and the weight rows'
    /// fp32 scales, then two ints per pair slot; 0 for the other engines (static shared memory
    /// only).
    pub fn dynamic_shared_bytes(&self) -> u64 {
        match self.engine {
            GemmEngine::Wgmma { block_k, stages } => {
                let (bk, wrows) = (block_k as u64, self.weight_rows() as u64);
                let stage = self.rows as u64 * bk * 2 + wrows * bk * self.weights.bytes() as u64;
                let operand = match self.weights {
                    WeightFormat::Bf16 => 0,
                    WeightFormat::E4m3 => 2 * wrows * bk * 2 + 4 * wrows,
                };
                stages as u64 * stage + operand + 8 * self.rows as u64
            }
            _ => 0,
        }
    }
}

/// The most dynamic shared memory one block may use on sm_90a and sm_120 (227 KiB on an H100;
/// an RTX 5090 allows 99 KiB, so kernels above that are sm_90a-only).
pub const MAX_DYNAMIC_SHARED_BYTES: u64 = 227 * 1024;

/// The MoE routing sort (`csrc/moe_sort.cuh`), one block: from the router's `experts[pairs]`,
/// `offsets[experts + 1]` (exclusive prefix sum of the per-expert pair counts) and the pair
/// indices grouped by expert, ascending within an expert, ids outside `0..experts` last. The
/// block's threads each count and scatter one contiguous slice of the pairs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MoeSort {
    pub experts: u32,
}

impl MoeSort {
    /// Static shared memory budget of the per-slice histogram (`4 * (experts + 1) * threads`).
    pub const HIST_BYTES: u64 = 40 * 1024;
}

/// The routing-weighted sum of the experts' outputs (`csrc/grouped_gemm.cuh`, moe_combine):
/// `out[t, c] = round(((0 + y_0 w_0) + y_1 w_1) + ...)` over the top-k slots in order, float32,
/// `y [tokens * top_k, hidden]` bf16; NaN for a token with an expert id outside the bank.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MoeCombine {
    pub hidden: u32,
}

/// The MoE router, one token per block (model-spec 3.4; `dgemma-cpu` `ops::moe::route`):
///
/// ```text
/// r       = bf16(bf16(bf16(rmsnorm_noscale(h)) * scale) * root)     root = hidden^-0.5 (host)
/// logit_e = bf16(r . proj[e])                                        fp32, the CPU's dot order
/// p       = softmax(logits)                                          fp32, softmax_row's order
/// experts = top_k(p)                                                 torch's CPU order, ties too
/// w_j     = p[e_j] / sum_j p[e_j] * per_expert_scale[e_j]            fp32
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Router {
    pub hidden: u32,
    pub experts: u32,
    pub top_k: u32,
}

/// The decoder's self-conditioning input (model-spec 3.7; `dgemma-cpu` `model::soft_embeddings`),
/// `out[c, h] = bf16(bf16(sum_v pr[c, v] * E[v, h]) * scale)` with `pr = bf16(softmax(bf16(P)))`,
/// runs as three kernels (`csrc/soft_embedding.cuh`; `dgemma_cuda::ops::plan_soft_embedding`
/// plans all three from this spec): [`SoftEmbeddingProbs`] writes pr, this split-K tensor-core
/// GEMM writes fp32 partial sums, and [`SoftEmbeddingReduce`] adds them in a fixed order.
///
/// The GEMM: `partials[s, c, h] = sum_{v in split s} pr[c, v] * E[v, h]` (fp32), E
/// `[vocab, hidden]` bf16 row-major. Tile parameters: each block computes a `block_m x block_n`
/// tile for one of `splits` contiguous ranges of the vocabulary (whole `block_k` slices), staged
/// through shared memory; `engine` says how: mma.sync with warp tiles (`csrc/soft_embedding.cuh`,
/// every arch), or wgmma with E as an N-major B operand (`soft_embedding_wgmma`, sm_90a only;
/// the [`LinearEngine`] variants mean the same here as for a [`Linear`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SoftEmbedding {
    pub hidden: u32,
    pub vocab: u32,
    pub block_m: u32,
    pub block_n: u32,
    pub block_k: u32,
    pub engine: LinearEngine,
    pub splits: u32,
}

impl SoftEmbedding {
    /// Bytes of static shared memory: for mma.sync two buffers of a pr slice `[block_m, block_k]`
    /// and an E slice `[block_k, block_n]`, unpadded (swizzled) bf16; wgmma has none.
    pub fn shared_bytes(&self) -> u64 {
        match self.engine {
            LinearEngine::Mma { .. } => 2 * (self.block_m as u64 + self.block_n as u64) * self.block_k as u64 * 2,
            LinearEngine::Wgmma { .. } => 0,
        }
    }

    /// Bytes of dynamic shared memory: for wgmma `stages` buffers of the pr and E slices
    /// (`csrc/wgmma_gemm.cuh`); 0 for mma.sync.
    pub fn dynamic_shared_bytes(&self) -> u64 {
        self.engine.dynamic_shared_bytes(self.block_m, self.block_n, self.block_k)
    }

    /// The vocabulary slices (`ceil(vocab / block_k)`); split s covers slices
    /// `[s * k_tiles / splits, (s + 1) * k_tiles / splits)`.
    pub fn k_tiles(&self) -> u32 {
        self.vocab.div_ceil(self.block_k.max(1))
    }

    /// The kernel that writes this GEMM's A operand, pr.
    pub fn probs_spec(&self) -> KernelSpec {
        KernelSpec::portable(Op::SoftEmbeddingProbs(SoftEmbeddingProbs { vocab: self.vocab }))
    }

    /// The kernel that reduces this GEMM's partial sums.
    pub fn reduce_spec(&self) -> KernelSpec {
        KernelSpec::portable(Op::SoftEmbeddingReduce(SoftEmbeddingReduce { hidden: self.hidden, splits: self.splits }))
    }
}

/// The soft embedding's probabilities: `probs[c, v] = bf16(exp(f32(bf16(P[c, v])) - m_c) * inv_c)`
/// from the bf16 LM-head output (`P = softcap(x) / T`) and the row pass's softmax statistics
/// `(m, inv)` (see [`RowSoftmaxEntropyArgmax`]), exactly the CPU's softmax_row and bf16 store.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SoftEmbeddingProbs {
    pub vocab: u32,
}

/// The soft embedding's reduction: `out[c, h] = bf16(bf16(sum_s partials[s, c, h]) * scale)`,
/// the `splits` partial sums of a [`SoftEmbedding`] added in ascending order (fp32).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SoftEmbeddingReduce {
    pub hidden: u32,
    pub splits: u32,
}

/// The sampler's categorical draw on the device (one block per canvas row): over the processed
/// logits `P = softcap(x) / T` recomputed from the bf16 LM-head output `x [rows, vocab]`, `sampled[r] = argmax_v (P[r, v] + g(seed, block,
/// step, r, v))` with first-index ties, bit for bit `dgemma_sampler::SeededNoise::sample`; -1 for
/// a row holding NaN / +inf or only -inf (the CPU's error). Seed, block and step are read from the
/// sampler params buffer in device memory (`csrc/sampler.cuh`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct GumbelSample {
    pub vocab: u32,
}

/// The rest of a denoising step's sampler on the device, one block for the whole canvas:
/// renoise draws, the entropy-bound acceptance mask (`accept_mask_on`, TorchDevice::Cuda), the
/// next canvas, and the stable-and-confident stopping rule with its argmax history kept in
/// device memory. `max_canvas` is the largest canvas length the kernel handles (compile-time:
/// one position per thread); the actual canvas length is a run-time argument `<= max_canvas`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SamplerCanvas {
    pub max_canvas: u32,
}

/// The HBM read-bandwidth probe (no model op: the floor every memory-bound figure is measured
/// against). Each thread reads 16-byte vectors of `src` with a grid-stride loop, `unroll`
/// independent loads in flight per iteration, and folds them (XOR) into one word that it writes
/// only if it equals a run-time sentinel that real data never produces, so the reads can not be
/// optimised away and nothing is written in a timed run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ReadBandwidth {
    pub threads: u32,
    pub unroll: u32,
}

/// An op family and its compile-time parameters.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Op {
    RmsNorm(RmsNorm),
    Rope(Rope),
    Embedding(Embedding),
    /// `out = round(round(gelu_tanh(gate)) * up)`, element-wise over `[rows, width]` (run time).
    Geglu,
    /// `out_f32 = cap * tanh(bf16 logits / cap)` (cap at run time).
    Softcap,
    RowSoftmaxEntropyArgmax(RowSoftmaxEntropyArgmax),
    Attention(Attention),
    Linear(Linear),
    GroupedGemm(GroupedGemm),
    MoeSort(MoeSort),
    MoeCombine(MoeCombine),
    Router(Router),
    SoftEmbedding(SoftEmbedding),
    SoftEmbeddingProbs(SoftEmbeddingProbs),
    SoftEmbeddingReduce(SoftEmbeddingReduce),
    GumbelSample(GumbelSample),
    SamplerCanvas(SamplerCanvas),
    ReadBandwidth(ReadBandwidth),
}

/// The op families, in the order the heuristics table lists them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Family {
    RmsNorm,
    Rope,
    Embedding,
    Geglu,
    Softcap,
    RowSoftmaxEntropyArgmax,
    Attention,
    Linear,
    GroupedGemm,
    MoeSort,
    MoeCombine,
    Router,
    SoftEmbedding,
    SoftEmbeddingProbs,
    SoftEmbeddingReduce,
    GumbelSample,
    SamplerCanvas,
    ReadBandwidth,
}

impl Family {
    pub const ALL: [Family; 18] = [
        Family::RmsNorm,
        Family::Rope,
        Family::Embedding,
        Family::Geglu,
        Family::Softcap,
        Family::RowSoftmaxEntropyArgmax,
        Family::Attention,
        Family::Linear,
        Family::GroupedGemm,
        Family::MoeSort,
        Family::MoeCombine,
        Family::Router,
        Family::SoftEmbedding,
        Family::SoftEmbeddingProbs,
        Family::SoftEmbeddingReduce,
        Family::GumbelSample,
        Family::SamplerCanvas,
        Family::ReadBandwidth,
    ];

    /// The hand-written template under `csrc/` that implements the family.
    pub fn header(self) -> &'static str {
        match self {
            Family::RmsNorm => "rmsnorm.cuh",
            Family::Rope => "rope.cuh",
            Family::Embedding => "embedding.cuh",
            Family::Geglu => "geglu.cuh",
            Family::Softcap => "softcap.cuh",
            Family::RowSoftmaxEntropyArgmax => "row_softmax.cuh",
            Family::Attention => "attention.cuh",
            Family::Linear => "linear.cuh",
            Family::GroupedGemm | Family::MoeCombine => "grouped_gemm.cuh",
            Family::MoeSort => "moe_sort.cuh",
            Family::Router => "router.cuh",
            Family::SoftEmbedding | Family::SoftEmbeddingProbs | Family::SoftEmbeddingReduce => "soft_embedding.cuh",
            Family::GumbelSample | Family::SamplerCanvas => "sampler.cuh",
            Family::ReadBandwidth => "bandwidth.cuh",
        }
    }
}

/// One kernel to compile.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KernelSpec {
    pub op: Op,
    pub dtype: Dtype,
    pub target: Target,
}

fn next_pow2_clamped(x: u32, lo: u32, hi: u32) -> u32 {
    x.max(1).next_power_of_two().clamp(lo, hi)
}

impl KernelSpec {
    /// A bf16 kernel that compiles for every arch.
    pub fn portable(op: Op) -> KernelSpec {
        KernelSpec { op, dtype: Dtype::Bf16, target: Target::Portable }
    }

    /// A bf16 kernel specific to `arch`.
    pub fn for_arch(op: Op, arch: Arch) -> KernelSpec {
        KernelSpec { op, dtype: Dtype::Bf16, target: Target::Only(arch) }
    }

    pub fn family(&self) -> Family {
        match self.op {
            Op::RmsNorm(_) => Family::RmsNorm,
            Op::Rope(_) => Family::Rope,
            Op::Embedding(_) => Family::Embedding,
            Op::Geglu => Family::Geglu,
            Op::Softcap => Family::Softcap,
            Op::RowSoftmaxEntropyArgmax(_) => Family::RowSoftmaxEntropyArgmax,
            Op::Attention(_) => Family::Attention,
            Op::Linear(_) => Family::Linear,
            Op::GroupedGemm(_) => Family::GroupedGemm,
            Op::MoeSort(_) => Family::MoeSort,
            Op::MoeCombine(_) => Family::MoeCombine,
            Op::Router(_) => Family::Router,
            Op::SoftEmbedding(_) => Family::SoftEmbedding,
            Op::SoftEmbeddingProbs(_) => Family::SoftEmbeddingProbs,
            Op::SoftEmbeddingReduce(_) => Family::SoftEmbeddingReduce,
            Op::GumbelSample(_) => Family::GumbelSample,
            Op::SamplerCanvas(_) => Family::SamplerCanvas,
            Op::ReadBandwidth(_) => Family::ReadBandwidth,
        }
    }

    /// The hand-written template under `csrc/` the kernel instantiates: the family's
    /// ([`Family::header`]), except for the tensor-core grouped GEMMs (`grouped_gemm_mma.cuh`
    /// and `grouped_gemm_wgmma.cuh`, which include the family's `grouped_gemm.cuh`).
    pub fn header(&self) -> &'static str {
        match self.op {
            Op::GroupedGemm(GroupedGemm { engine: GemmEngine::Mma { .. }, .. }) => "grouped_gemm_mma.cuh",
            Op::GroupedGemm(GroupedGemm { engine: GemmEngine::Wgmma { .. }, .. }) => "grouped_gemm_wgmma.cuh",
            Op::Linear(Linear { engine: LinearEngine::Wgmma { .. }, .. }) => "linear_wgmma.cuh",
            _ => self.family().header(),
        }
    }

    /// The `extern "C"` symbol: family, every compile-time parameter, dtype, and the arch for
    /// arch-specific kernels. Example: `rmsnorm_w2816_scale_resadd_bf16`.
    pub fn kernel_name(&self) -> String {
        let mut s = String::new();
        match self.op {
            Op::RmsNorm(r) => {
                write!(s, "rmsnorm_w{}_{}", r.width, if r.has_scale { "scale" } else { "noscale" }).unwrap();
                if r.fuse_input_add {
                    s.push_str("_inadd");
                }
                if r.fuse_residual_add {
                    s.push_str("_resadd");
                }
                if r.fuse_layer_scalar {
                    s.push_str("_lscalar");
                }
            }
            Op::Rope(r) => write!(s, "rope_d{}_p{}", r.head_dim, r.rotary_pairs).unwrap(),
            Op::Embedding(e) => write!(s, "embedding_h{}", e.hidden).unwrap(),
            Op::Geglu => s.push_str("geglu"),
            Op::Softcap => s.push_str("softcap"),
            Op::RowSoftmaxEntropyArgmax(r) => write!(s, "row_softmax_entropy_argmax_v{}", r.vocab).unwrap(),
            Op::Attention(a) => write!(
                s,
                "attention_d{}_q{}_kv{}_{}_t{}x{}x{}_w{}x{}{}",
                a.head_dim,
                a.q_heads,
                a.kv_heads,
                a.mask.suffix(),
                a.block_m,
                a.block_n,
                a.block_k,
                a.warps_m,
                a.warps_n,
                if a.wgmma { "_wgmma" } else { "" }
            )
            .unwrap(),
            Op::Linear(l) => match l.engine {
                LinearEngine::Mma { warp_m, warp_n } => write!(
                    s,
                    "linear_n{}_k{}_t{}x{}x{}_w{warp_m}x{warp_n}",
                    l.n, l.k, l.block_m, l.block_n, l.block_k
                )
                .unwrap(),
                LinearEngine::Wgmma { stages } => write!(
                    s,
                    "linear_n{}_k{}_wgmma_t{}x{}x{}_s{stages}",
                    l.n, l.k, l.block_m, l.block_n, l.block_k
                )
                .unwrap(),
            },
            Op::GroupedGemm(g) => match g.engine {
                GemmEngine::Simt => write!(
                    s,
                    "grouped_gemm_n{}_k{}_{}_r{}_c{}{}",
                    g.n,
                    g.k,
                    g.fuse.suffix(),
                    g.rows,
                    g.cols,
                    g.weights.suffix()
                )
                .unwrap(),
                GemmEngine::Mma { .. } | GemmEngine::Wgmma { .. } => {
                    // The engine, its tile and its own parameter: w<warps> / s<stages>.
                    let (engine, block_k, last) = match g.engine {
                        GemmEngine::Mma { block_k, warps } => ("mma", block_k, format!("w{warps}")),
                        GemmEngine::Wgmma { block_k, stages } => ("wgmma", block_k, format!("s{stages}")),
                        GemmEngine::Simt => unreachable!(),
                    };
                    write!(
                        s,
                        "grouped_gemm_n{}_k{}_{}_{engine}_t{}x{}x{block_k}_{last}{}",
                        g.n,
                        g.k,
                        g.fuse.suffix(),
                        g.rows,
                        g.cols,
                        g.weights.suffix()
                    )
                    .unwrap()
                }
            },
            Op::MoeSort(m) => write!(s, "moe_sort_e{}", m.experts).unwrap(),
            Op::MoeCombine(m) => write!(s, "moe_combine_h{}", m.hidden).unwrap(),
            Op::Router(r) => write!(s, "router_h{}_e{}_k{}", r.hidden, r.experts, r.top_k).unwrap(),
            Op::SoftEmbedding(e) => {
                let engine = match e.engine {
                    LinearEngine::Mma { warp_m, warp_n } => format!("w{warp_m}x{warp_n}"),
                    LinearEngine::Wgmma { stages } => format!("wgmma{stages}"),
                };
                write!(
                    s,
                    "soft_embedding_h{}_v{}_t{}x{}x{}_{engine}_s{}",
                    e.hidden, e.vocab, e.block_m, e.block_n, e.block_k, e.splits
                )
                .unwrap()
            }
            Op::SoftEmbeddingProbs(p) => write!(s, "soft_embedding_probs_v{}", p.vocab).unwrap(),
            Op::SoftEmbeddingReduce(r) => write!(s, "soft_embedding_reduce_h{}_s{}", r.hidden, r.splits).unwrap(),
            Op::GumbelSample(g) => write!(s, "gumbel_sample_v{}", g.vocab).unwrap(),
            Op::SamplerCanvas(c) => write!(s, "sampler_canvas_c{}", c.max_canvas).unwrap(),
            Op::ReadBandwidth(r) => write!(s, "read_bandwidth_t{}_u{}", r.threads, r.unroll).unwrap(),
        }
        s.push('_');
        s.push_str(self.dtype.suffix());
        if let Target::Only(arch) = self.target {
            s.push('_');
            s.push_str(arch.suffix());
        }
        s
    }

    /// Bytes of dynamic shared memory the launcher passes (and raises the kernel's limit to);
    /// 0 for kernels with static shared memory only.
    pub fn dynamic_shared_bytes(&self) -> u32 {
        let bytes = match self.op {
            Op::GroupedGemm(g) => g.dynamic_shared_bytes(),
            Op::Linear(l) => l.dynamic_shared_bytes(),
            Op::Attention(a) => a.dynamic_shared_bytes(),
            Op::SoftEmbedding(e) => e.dynamic_shared_bytes(),
            _ => 0,
        };
        u32::try_from(bytes).expect("validate() keeps dynamic shared memory under 227 KiB")
    }

    /// Blocks per SM the kernel is tuned for, compiled in as `__launch_bounds__`' second
    /// argument (ptxas then keeps the registers within what that many blocks leave): two for the
    /// wgmma GEMMs, whose pipelines are sized for two blocks per SM (at most 128 registers per
    /// thread of 256); `None` for the rest.
    pub fn min_blocks_per_sm(&self) -> Option<u32> {
        match self.op {
            Op::GroupedGemm(GroupedGemm { engine: GemmEngine::Wgmma { .. }, .. }) => Some(2),
            Op::Linear(Linear { engine: LinearEngine::Wgmma { .. }, .. }) => Some(2),
            _ => None,
        }
    }

    /// Threads per block: compiled in as `__launch_bounds__` and used by the launcher.
    pub fn block_threads(&self) -> u32 {
        match self.op {
            // About 8 elements per thread, at least a warp, at most 256.
            Op::RmsNorm(r) => next_pow2_clamped(r.width.div_ceil(8), 32, 256),
            Op::Rope(_) => 128,
            Op::Embedding(e) => next_pow2_clamped(e.hidden.div_ceil(4), 32, 256),
            Op::Geglu | Op::Softcap => 256,
            Op::RowSoftmaxEntropyArgmax(r) => next_pow2_clamped(r.vocab / 8, 32, 1024),
            Op::Attention(a) => 32 * a.warps_m * a.warps_n,
            Op::Linear(l) => match l.engine {
                LinearEngine::Mma { warp_m, warp_n } => 32 * (l.block_m / warp_m.max(1)) * (l.block_n / warp_n.max(1)),
                // One warpgroup per 64 columns.
                LinearEngine::Wgmma { .. } => 128 * (l.block_n / 64),
            },
            Op::GroupedGemm(g) => match g.engine {
                // A 4 x 2 register tile (4 pairs x 2 weight rows) per thread.
                GemmEngine::Simt => (g.rows / 4) * (g.weight_rows() / 2),
                GemmEngine::Mma { warps, .. } => 32 * warps,
                // One warpgroup per 64 weight rows of the tile.
                GemmEngine::Wgmma { .. } => 128 * (g.weight_rows() / 64),
            },
            // One histogram slice per thread: as many as 40 KiB of counters allow, 32..=256.
            Op::MoeSort(m) => {
                let keys = m.experts as u64 + 1;
                let mut t = 256u32;
                while t > 32 && 4 * keys * t as u64 > MoeSort::HIST_BYTES {
                    t /= 2;
                }
                t
            }
            // One output column per thread.
            Op::MoeCombine(m) => next_pow2_clamped(m.hidden, 32, 256),
            // About 8 elements of the row per thread (loading and scaling it, as RMSNorm) and 8
            // threads per expert logit (the CPU dot's 8 accumulators).
            Op::Router(r) => next_pow2_clamped(r.hidden.div_ceil(8), 32, 256),
            Op::SoftEmbedding(e) => match e.engine {
                LinearEngine::Mma { warp_m, warp_n } => 32 * (e.block_m / warp_m.max(1)) * (e.block_n / warp_n.max(1)),
                LinearEngine::Wgmma { .. } => 128 * (e.block_n / 64),
            },
            // Grid-stride element-wise passes (8 vocabulary entries / 2 hidden columns per thread
            // and step).
            Op::SoftEmbeddingProbs(_) | Op::SoftEmbeddingReduce(_) => 256,
            // One Philox block (4 vocab ids) per thread and iteration, about 4 iterations each.
            Op::GumbelSample(g) => next_pow2_clamped(g.vocab.div_ceil(16), 32, 1024),
            // One canvas position per thread.
            Op::SamplerCanvas(c) => next_pow2_clamped(c.max_canvas, 32, 1024),
            Op::ReadBandwidth(r) => r.threads,
        }
    }

    /// The tile rules of the kernels on the wgmma mainloop (`csrc/wgmma_gemm.cuh`: the MoE, the
    /// linear and the soft embedding): sm_90a only, `block_m` whole m64 tiles, `block_n` whole
    /// 64-column warpgroup tiles, `block_k` whole k16 steps, at least 2 stages, the X slice whole
    /// 16-byte chunks per thread, within the dynamic shared memory limit.
    fn check_wgmma_tile(&self, block_m: u32, block_n: u32, block_k: u32, stages: u32, dynamic: u64) -> Result<(), String> {
        let fail = |why: &str| Err(format!("{}: {why}", self.kernel_name()));
        if self.target != Target::Only(Arch::Sm90a) {
            return fail("wgmma exists on sm_90a only");
        }
        let threads = self.block_threads();
        if block_m == 0
            || block_m % 64 != 0
            || block_n == 0
            || block_n % 64 != 0
            || block_k == 0
            || block_k % 16 != 0
            || stages < 2
            || (block_m * block_k / 8) % threads != 0
            || dynamic > MAX_DYNAMIC_SHARED_BYTES
        {
            return fail(
                "block_m must be whole m64 tiles, block_n whole 64-column warpgroup tiles, block_k whole k16 steps, \
                 at least 2 stages, the x slice whole 16-byte chunks per thread, within 227 KiB",
            );
        }
        Ok(())
    }

    /// Checks the parameters the templates rely on.
    pub fn validate(&self) -> Result<(), String> {
        let name = self.kernel_name();
        let fail = |why: &str| Err(format!("{name}: {why}"));
        let threads = self.block_threads();
        if threads == 0 || !threads.is_multiple_of(32) || threads > 1024 {
            return fail("block size must be a positive multiple of 32, at most 1024");
        }
        match self.op {
            Op::RmsNorm(r) if r.width == 0 => fail("width must be positive"),
            Op::Rope(r) if r.head_dim == 0 || r.head_dim % 2 != 0 => fail("head_dim must be even"),
            Op::Rope(r) if r.rotary_pairs == 0 || r.rotary_pairs > r.head_dim / 2 => {
                fail("rotary_pairs must be in 1..=head_dim/2")
            }
            Op::Embedding(e) if e.hidden == 0 => fail("hidden must be positive"),
            Op::RowSoftmaxEntropyArgmax(RowSoftmaxEntropyArgmax { vocab: 0 }) => fail("vocab must be positive"),
            Op::Attention(a) if a.head_dim == 0 || a.kv_heads == 0 || a.q_heads % a.kv_heads != 0 => {
                fail("q_heads must be a positive multiple of kv_heads and head_dim positive")
            }
            Op::Attention(a) if a.head_dim % 8 != 0 => fail("head_dim must be a multiple of 8 (16-byte row chunks)"),
            Op::Attention(a)
                if a.warps_m == 0
                    || a.warps_n == 0
                    || a.block_m == 0
                    || a.block_n == 0
                    || a.block_m % (16 * a.warps_m) != 0
                    || a.block_n % (16 * a.warps_n) != 0
                    || a.head_dim % (8 * a.warps_n) != 0
                    || a.block_k == 0
                    || a.block_k % 16 != 0 =>
            {
                fail(
                    "warp tiles must be whole m16 fragments of block_m rows, whole pairs of n8 fragments of \
                     block_n keys (ldmatrix.x4; so block_n is whole 16-key V slices too) and whole n8 fragments of \
                     head_dim, block_k a multiple of 16",
                )
            }
            Op::Attention(a) if a.shared_bytes() > 48 * 1024 => {
                fail("the staged tiles must fit 48 KiB of static shared memory")
            }
            Op::Attention(a) if a.wgmma && self.target != Target::Only(Arch::Sm90a) => fail("wgmma exists on sm_90a only"),
            Op::Attention(a)
                if a.wgmma
                    && (a.warps_m != 4
                        || a.block_m != 64
                        || a.block_n != 32 * a.warps_n
                        || a.dynamic_shared_bytes() > MAX_DYNAMIC_SHARED_BYTES) =>
            {
                fail("wgmma attention: 4 row warps over 64 rows (one warpgroup), 32 keys per warpgroup, <= 227 KiB")
            }
            Op::Linear(l) if l.n == 0 || l.k == 0 || l.k % 8 != 0 || l.n % 2 != 0 => {
                fail("k must be a positive multiple of 8 (16-byte row chunks) and n positive and even (paired stores)")
            }
            Op::Linear(Linear { block_m, block_n, block_k, engine: LinearEngine::Mma { warp_m, warp_n }, .. })
                if warp_m == 0
                    || warp_n == 0
                    || warp_m % 16 != 0
                    || warp_n % 8 != 0
                    || block_m % warp_m != 0
                    || block_n % warp_n != 0
                    || block_m == 0
                    || block_n == 0
                    || block_k == 0
                    || block_k % 16 != 0 =>
            {
                fail("warp tiles must be whole m16n8 fragments tiling the block tile, block_k a multiple of 16")
            }
            Op::Linear(l @ Linear { block_m, block_n, block_k, engine: LinearEngine::Wgmma { stages }, .. }) => {
                self.check_wgmma_tile(block_m, block_n, block_k, stages, l.dynamic_shared_bytes())
            }
            Op::Linear(l) if l.shared_bytes() > 48 * 1024 => {
                fail("the staged slices must fit 48 KiB of static shared memory")
            }
            Op::GroupedGemm(g) if g.n == 0 || g.k == 0 || g.k % 8 != 0 => {
                fail("n must be positive and k a positive multiple of 8 (16-byte loads)")
            }
            Op::GroupedGemm(g)
                if g.engine == GemmEngine::Simt && (g.rows == 0 || g.rows % 4 != 0 || g.cols == 0 || g.cols % 2 != 0) =>
            {
                fail("rows must be a positive multiple of 4 and cols positive and even (4 x 2 register tiles)")
            }
            Op::GroupedGemm(g) if g.engine != GemmEngine::Simt && g.out_cols() % 2 != 0 => {
                fail("the output rows must have an even number of columns (paired bf16 stores)")
            }
            Op::GroupedGemm(GroupedGemm { rows, cols, fuse, engine: GemmEngine::Mma { block_k, warps }, .. })
                if rows == 0
                    || rows % 16 != 0
                    || block_k == 0
                    || block_k % 16 != 0
                    || warps == 0
                    || cols == 0
                    || cols % warps != 0
                    || (cols / warps) % 8 != 0
                    || (if fuse == GemmFuse::Geglu { 2 * cols / warps } else { cols / warps }) % 16 != 0 =>
            {
                fail(
                    "rows must be whole m16 fragments, block_k whole k16 steps, and each warp's columns whole \
                     n8 fragments of whole ldmatrix pairs of weight rows",
                )
            }
            Op::GroupedGemm(g) if g.shared_bytes() > 48 * 1024 => {
                fail("the staged slices must fit 48 KiB of static shared memory")
            }
            // The row-range tile rules with the pairs as rows and the weight rows as columns (a
            // whole warpgroup tile each); the pair lists are in the dynamic shared memory too.
            Op::GroupedGemm(g @ GroupedGemm { rows, engine: GemmEngine::Wgmma { block_k, stages }, .. })
                if self.check_wgmma_tile(rows, g.weight_rows(), block_k, stages, g.dynamic_shared_bytes()).is_err() =>
            {
                self.check_wgmma_tile(rows, g.weight_rows(), block_k, stages, g.dynamic_shared_bytes())
            }
            Op::MoeSort(m) if m.experts == 0 => fail("experts must be positive"),
            Op::MoeSort(m) if 4 * (m.experts as u64 + 1) * self.block_threads() as u64 > MoeSort::HIST_BYTES => {
                fail("the per-slice histogram of 32 slices must fit 40 KiB of shared memory")
            }
            Op::MoeCombine(m) if m.hidden == 0 => fail("hidden must be positive"),
            Op::GroupedGemm(g) if g.fuse == GemmFuse::Geglu && g.n % 2 != 0 => {
                fail("a GeGLU grouped GEMM needs an even n (gate rows then up rows)")
            }
            Op::Router(r) if r.hidden == 0 || r.experts == 0 || r.top_k == 0 || r.top_k > r.experts => {
                fail("hidden and experts must be positive and top_k in 1..=experts")
            }
            // Static shared memory: the normalised row (fp32) and three words per expert.
            Op::Router(r) if 4 * r.hidden as u64 + 12 * r.experts as u64 > 40 * 1024 => {
                fail("the router's row and expert arrays must fit 40 KiB of shared memory")
            }
            Op::SoftEmbedding(e) if e.hidden == 0 || e.hidden % 8 != 0 || e.vocab == 0 || e.vocab % 8 != 0 => {
                fail("hidden and vocab must be positive multiples of 8 (16-byte row chunks of E and pr)")
            }
            Op::SoftEmbedding(SoftEmbedding { block_m, block_n, block_k, engine: LinearEngine::Mma { warp_m, warp_n }, .. })
                if warp_m == 0
                    || warp_n == 0
                    || warp_m % 16 != 0
                    || warp_n % 16 != 0
                    || block_m == 0
                    || block_n == 0
                    || block_m % warp_m != 0
                    || block_n % warp_n != 0
                    || block_k == 0
                    || block_k % 16 != 0 =>
            {
                fail("warp tiles must be whole m16 x (pairs of n8) fragments tiling the block, block_k a multiple of 16")
            }
            Op::SoftEmbedding(e)
                if matches!(e.engine, LinearEngine::Mma { .. })
                    && (!(e.block_k / 8).is_power_of_two() || !(e.block_n / 8).is_power_of_two()) =>
            {
                fail("the swizzled slices need block_k and block_n to be 8 times a power of two")
            }
            Op::SoftEmbedding(e @ SoftEmbedding { block_m, block_n, block_k, engine: LinearEngine::Wgmma { stages }, .. })
                if self.check_wgmma_tile(block_m, block_n, block_k, stages, e.dynamic_shared_bytes()).is_err() =>
            {
                self.check_wgmma_tile(block_m, block_n, block_k, stages, e.dynamic_shared_bytes())
            }
            Op::SoftEmbedding(e) if e.shared_bytes() > 48 * 1024 => {
                fail("the staged slices must fit 48 KiB of static shared memory")
            }
            Op::SoftEmbedding(e) if e.splits == 0 || e.splits > e.k_tiles() => {
                fail("splits must be in 1..=ceil(vocab / block_k) (every split has a slice)")
            }
            Op::SoftEmbeddingProbs(p) if p.vocab == 0 || p.vocab % 8 != 0 => {
                fail("vocab must be a positive multiple of 8 (16-byte chunks)")
            }
            Op::SoftEmbeddingReduce(r) if r.hidden == 0 || r.hidden % 2 != 0 || r.splits == 0 => {
                fail("hidden must be positive and even (column pairs), splits positive")
            }
            Op::GumbelSample(g) if g.vocab == 0 => fail("vocab must be positive"),
            Op::SamplerCanvas(c) if c.max_canvas == 0 || c.max_canvas > 1024 => {
                fail("max_canvas must be in 1..=1024 (one position per thread)")
            }
            Op::ReadBandwidth(r) if r.unroll == 0 || r.unroll > 16 => fail("unroll must be in 1..=16"),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn brief_example_name() {
        let spec = KernelSpec::portable(Op::RmsNorm(RmsNorm {
            width: 2816,
            has_scale: true,
            fuse_input_add: false,
            fuse_residual_add: true,
            fuse_layer_scalar: false,
        }));
        assert_eq!(spec.kernel_name(), "rmsnorm_w2816_scale_resadd_bf16");
        assert_eq!(spec.block_threads(), 256);
        spec.validate().unwrap();
    }

    #[test]
    fn arch_suffix_only_for_arch_specific_kernels() {
        let op = Op::Linear(Linear { n: 128, k: 64, block_m: 64, block_n: 128, block_k: 32, engine: LinearEngine::Mma { warp_m: 32, warp_n: 32 } });
        assert_eq!(KernelSpec::portable(op).kernel_name(), "linear_n128_k64_t64x128x32_w32x32_bf16");
        assert_eq!(KernelSpec::for_arch(op, Arch::Sm90a).kernel_name(), "linear_n128_k64_t64x128x32_w32x32_bf16_sm90a");
        assert_eq!(KernelSpec::for_arch(op, Arch::Sm120).kernel_name(), "linear_n128_k64_t64x128x32_w32x32_bf16_sm120");
        assert_eq!(KernelSpec::portable(op).block_threads(), 256);
    }

    #[test]
    fn linear_tiles_are_validated() {
        let mma = |warp_m, warp_n| LinearEngine::Mma { warp_m, warp_n };
        let ok = Linear { n: 24, k: 24, block_m: 64, block_n: 64, block_k: 32, engine: mma(32, 32) };
        KernelSpec::portable(Op::Linear(ok)).validate().unwrap();
        assert_eq!(KernelSpec::portable(Op::Linear(ok)).block_threads(), 128);
        let bad = [
            Linear { k: 20, ..ok },                        // k not a multiple of 8
            Linear { n: 25, ..ok },                        // odd n
            Linear { engine: mma(24, 32), block_m: 48, ..ok }, // not whole m16 fragments
            Linear { engine: mma(32, 12), block_n: 48, ..ok }, // not whole n8 fragments
            Linear { block_m: 48, ..ok },                  // warps do not tile the block
            Linear { block_k: 24, ..ok },                  // not whole k16 steps
            Linear { block_m: 128, block_n: 256, engine: mma(64, 64), ..ok }, // shared memory
        ];
        for l in bad {
            assert!(KernelSpec::portable(Op::Linear(l)).validate().is_err(), "{l:?}");
        }
        // wgmma: sm_90a only, whole m64 / warpgroup tiles, at least two stages, <= 227 KiB.
        let wg = Linear { block_m: 128, block_n: 128, block_k: 64, engine: LinearEngine::Wgmma { stages: 3 }, ..ok };
        let sm90 = |l| KernelSpec::for_arch(Op::Linear(l), Arch::Sm90a);
        sm90(wg).validate().unwrap();
        assert_eq!((sm90(wg).block_threads(), sm90(wg).dynamic_shared_bytes()), (256, 3 * 256 * 64 * 2));
        assert!(KernelSpec::portable(Op::Linear(wg)).validate().is_err());
        assert!(KernelSpec::for_arch(Op::Linear(wg), Arch::Sm120).validate().is_err());
        for l in [
            Linear { block_m: 96, ..wg },
            Linear { block_n: 96, ..wg },
            Linear { block_k: 24, ..wg },
            Linear { engine: LinearEngine::Wgmma { stages: 1 }, ..wg },
            Linear { engine: LinearEngine::Wgmma { stages: 8 }, ..wg }, // 256 KiB
        ] {
            assert!(sm90(l).validate().is_err(), "{l:?}");
        }
    }

    #[test]
    fn moe_names_and_blocks() {
        let up = GroupedGemm { n: 1408, k: 2816, fuse: GemmFuse::Geglu, rows: 32, cols: 32, weights: WeightFormat::Bf16, engine: GemmEngine::Simt };
        let fp8 = KernelSpec::for_arch(Op::GroupedGemm(GroupedGemm { weights: WeightFormat::E4m3, ..up }), Arch::Sm90a);
        assert_eq!(fp8.kernel_name(), "grouped_gemm_n1408_k2816_geglu_r32_c32_e4m3_bf16_sm90a");
        assert_eq!(fp8.block_threads(), 256);
        fp8.validate().unwrap();
        let up = KernelSpec::for_arch(Op::GroupedGemm(up), Arch::Sm90a);
        assert_eq!(up.kernel_name(), "grouped_gemm_n1408_k2816_geglu_r32_c32_bf16_sm90a");
        assert_eq!(up.block_threads(), 256); // 8 groups of 4 pairs x 32 groups of 2 weight rows
        up.validate().unwrap();
        let down = GroupedGemm { n: 2816, k: 704, fuse: GemmFuse::Down, rows: 32, cols: 64, weights: WeightFormat::Bf16, engine: GemmEngine::Simt };
        let down = KernelSpec::for_arch(Op::GroupedGemm(down), Arch::Sm120);
        assert_eq!(down.kernel_name(), "grouped_gemm_n2816_k704_down_r32_c64_bf16_sm120");
        assert_eq!(down.block_threads(), 256);
        down.validate().unwrap();
        let sort = KernelSpec::portable(Op::MoeSort(MoeSort { experts: 128 }));
        assert_eq!(sort.kernel_name(), "moe_sort_e128_bf16");
        assert_eq!(sort.block_threads(), 64); // 129 keys x 64 slices x 4 bytes = 33 KiB
        assert_eq!(sort.family().header(), "moe_sort.cuh");
        sort.validate().unwrap();
        assert_eq!(KernelSpec::portable(Op::MoeSort(MoeSort { experts: 6 })).block_threads(), 256);
        let combine = KernelSpec::portable(Op::MoeCombine(MoeCombine { hidden: 2816 }));
        assert_eq!(combine.kernel_name(), "moe_combine_h2816_bf16");
        assert_eq!(combine.block_threads(), 256);
        assert_eq!(combine.family().header(), "grouped_gemm.cuh");
        combine.validate().unwrap();
        // The tensor-core engine: its own name, block and template header.
        let mma = GemmEngine::Mma { block_k: 32, warps: 8 };
        let up = GroupedGemm { n: 1408, k: 2816, fuse: GemmFuse::Geglu, rows: 64, cols: 64, weights: WeightFormat::E4m3, engine: mma };
        let up = KernelSpec::for_arch(Op::GroupedGemm(up), Arch::Sm90a);
        assert_eq!(up.kernel_name(), "grouped_gemm_n1408_k2816_geglu_mma_t64x64x32_w8_e4m3_bf16_sm90a");
        assert_eq!(up.block_threads(), 256);
        assert_eq!(up.header(), "grouped_gemm_mma.cuh");
        assert_eq!(up.family().header(), "grouped_gemm.cuh");
        up.validate().unwrap();
        let down = GroupedGemm { n: 2816, k: 704, fuse: GemmFuse::Down, rows: 64, cols: 128, weights: WeightFormat::Bf16, engine: mma };
        assert_eq!(down.shared_bytes(), 2 * (64 + 128) * 40 * 2 + 8 * 64);
        let down = KernelSpec::for_arch(Op::GroupedGemm(down), Arch::Sm120);
        assert_eq!(down.kernel_name(), "grouped_gemm_n2816_k704_down_mma_t64x128x32_w8_bf16_sm120");
        down.validate().unwrap();
        let ok = GroupedGemm { n: 64, k: 64, fuse: GemmFuse::Geglu, rows: 64, cols: 64, weights: WeightFormat::Bf16, engine: mma };
        let bad = [
            GroupedGemm { rows: 40, ..ok },                                        // not whole m16 fragments
            GroupedGemm { engine: GemmEngine::Mma { block_k: 24, warps: 8 }, ..ok }, // not whole k16 steps
            GroupedGemm { cols: 32, ..ok },                                        // 4 columns per warp
            GroupedGemm { fuse: GemmFuse::Down, ..ok },                            // 8 weight rows per warp
            GroupedGemm { n: 66, ..ok },                                           // 33 output columns
            GroupedGemm { cols: 256, engine: GemmEngine::Mma { block_k: 64, warps: 8 }, ..ok }, // shared memory
        ];
        for g in bad {
            assert!(KernelSpec::portable(Op::GroupedGemm(g)).validate().is_err(), "{g:?}");
        }
        // wgmma: sm_90a only, whole m64 pair tiles and 64-row warpgroup tiles, k16 steps, >= 2
        // stages, within 227 KiB.
        let wg = GroupedGemm { rows: 128, engine: GemmEngine::Wgmma { block_k: 64, stages: 3 }, ..ok };
        let sm90 = |g| KernelSpec::for_arch(Op::GroupedGemm(g), Arch::Sm90a);
        sm90(wg).validate().unwrap();
        assert!(KernelSpec::for_arch(Op::GroupedGemm(wg), Arch::Sm120).validate().is_err());
        for g in [
            GroupedGemm { rows: 96, ..wg },
            GroupedGemm { cols: 16, ..wg }, // 32 weight rows: not a warpgroup tile
            GroupedGemm { engine: GemmEngine::Wgmma { block_k: 24, stages: 3 }, ..wg },
            GroupedGemm { engine: GemmEngine::Wgmma { block_k: 64, stages: 1 }, ..wg },
            GroupedGemm { engine: GemmEngine::Wgmma { block_k: 64, stages: 8 }, ..wg }, // 256 KiB
            GroupedGemm { n: 66, ..wg },                                                // 33 output columns
        ] {
            assert!(sm90(g).validate().is_err(), "{g:?}");
        }
    }

    #[test]
    fn router_and_soft_embedding_names_and_blocks() {
        let router = KernelSpec::portable(Op::Router(Router { hidden: 2816, experts: 128, top_k: 8 }));
        assert_eq!(router.kernel_name(), "router_h2816_e128_k8_bf16");
        assert_eq!(router.block_threads(), 256);
        router.validate().unwrap();
        let tiny = KernelSpec::portable(Op::Router(Router { hidden: 48, experts: 6, top_k: 3 }));
        assert_eq!(tiny.block_threads(), 32);
        tiny.validate().unwrap();
        let gemm = SoftEmbedding {
            hidden: 2816,
            vocab: 262_144,
            block_m: 256,
            block_n: 128,
            block_k: 32,
            engine: LinearEngine::Mma { warp_m: 64, warp_n: 64 },
            splits: 6,
        };
        let soft = KernelSpec::portable(Op::SoftEmbedding(gemm));
        assert_eq!(soft.kernel_name(), "soft_embedding_h2816_v262144_t256x128x32_w64x64_s6_bf16");
        assert_eq!(soft.block_threads(), 256);
        assert_eq!(gemm.shared_bytes(), 48 * 1024);
        soft.validate().unwrap();
        assert_eq!(gemm.probs_spec().kernel_name(), "soft_embedding_probs_v262144_bf16");
        assert_eq!(gemm.reduce_spec().kernel_name(), "soft_embedding_reduce_h2816_s6_bf16");
        for s in [gemm.probs_spec(), gemm.reduce_spec()] {
            assert_eq!(s.family().header(), "soft_embedding.cuh");
            assert_eq!(s.block_threads(), 256);
            s.validate().unwrap();
        }
        let bad = [
            SoftEmbedding { hidden: 60, ..gemm },                             // not whole 16-byte chunks
            SoftEmbedding { vocab: 262_140, ..gemm },                         // likewise
            SoftEmbedding { engine: LinearEngine::Mma { warp_m: 64, warp_n: 8 }, block_n: 16, ..gemm }, // not pairs of n8 fragments
            SoftEmbedding { block_m: 224, ..gemm },                           // warps do not tile the block
            SoftEmbedding { block_n: 192, ..gemm },                           // not a swizzle width
            SoftEmbedding { block_k: 64, ..gemm },                            // shared memory
            SoftEmbedding { splits: 0, ..gemm },                              // no split
            SoftEmbedding { vocab: 64, splits: 3, ..gemm },                   // an empty split
        ];
        for e in bad {
            assert!(KernelSpec::portable(Op::SoftEmbedding(e)).validate().is_err(), "{e:?}");
        }
    }

    #[test]
    fn sampler_names_and_blocks() {
        let g = KernelSpec::portable(Op::GumbelSample(GumbelSample { vocab: 262_144 }));
        assert_eq!(g.kernel_name(), "gumbel_sample_v262144_bf16");
        assert_eq!(g.block_threads(), 1024);
        g.validate().unwrap();
        assert_eq!(KernelSpec::portable(Op::GumbelSample(GumbelSample { vocab: 320 })).block_threads(), 32);
        let c = KernelSpec::portable(Op::SamplerCanvas(SamplerCanvas { max_canvas: 256 }));
        assert_eq!(c.kernel_name(), "sampler_canvas_c256_bf16");
        assert_eq!(c.block_threads(), 256);
        c.validate().unwrap();
        assert_eq!(KernelSpec::portable(Op::SamplerCanvas(SamplerCanvas { max_canvas: 16 })).block_threads(), 32);
    }

    #[test]
    fn read_bandwidth_name_and_block() {
        let r = KernelSpec::portable(Op::ReadBandwidth(ReadBandwidth { threads: 256, unroll: 4 }));
        assert_eq!(r.kernel_name(), "read_bandwidth_t256_u4_bf16");
        assert_eq!(r.block_threads(), 256);
        assert_eq!(r.family().header(), "bandwidth.cuh");
        r.validate().unwrap();
        for bad in [ReadBandwidth { threads: 48, unroll: 4 }, ReadBandwidth { threads: 256, unroll: 0 }] {
            assert!(KernelSpec::portable(Op::ReadBandwidth(bad)).validate().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn compute_capability_mapping() {
        assert_eq!(Arch::from_compute_capability(9, 0), Some(Arch::Sm90a));
        assert_eq!(Arch::from_compute_capability(12, 0), Some(Arch::Sm120));
        assert_eq!(Arch::from_compute_capability(8, 0), None);
        assert!(Target::Portable.runs_on(Arch::Sm120));
        assert!(!Target::Only(Arch::Sm90a).runs_on(Arch::Sm120));
    }

    const ATTN: Attention = Attention {
        head_dim: 16,
        q_heads: 8,
        kv_heads: 4,
        mask: MaskKind::Causal,
        block_m: 64,
        block_n: 64,
        block_k: 16,
        warps_m: 4,
        warps_n: 1,
        wgmma: false,
    };

    #[test]
    fn attention_name_block_and_shared_memory() {
        let spec = KernelSpec::portable(Op::Attention(ATTN));
        spec.validate().unwrap();
        assert_eq!(spec.kernel_name(), "attention_d16_q8_kv4_causal_t64x64x16_w4x1_bf16");
        assert_eq!(spec.block_threads(), 128);
        let big = Attention {
            head_dim: 512,
            q_heads: 16,
            kv_heads: 2,
            mask: MaskKind::Bidirectional,
            block_k: 64,
            warps_m: 2,
            warps_n: 4,
            ..ATTN
        };
        // Q + K chunks 2 x 128 x 72, P 64 x 72 (bf16); 64 x 5 floats.
        assert_eq!(big.shared_bytes(), 2 * (2 * 128 * 72 + 64 * 72) + 4 * 64 * 5);
        assert_eq!(big.group(), 8);
        KernelSpec::portable(Op::Attention(big)).validate().unwrap();
        // head_dim 24 (an odd multiple of 8): V rows of 40.
        let odd = Attention { head_dim: 24, block_k: 32, ..ATTN };
        assert_eq!(odd.shared_bytes(), 2 * (2 * 128 * 40 + 64 * 72) + 4 * 64 * 2);
        // wgmma (sm_90a): 4 x 2 warps; dynamic: the unpadded chunks 2 x 128 x 64 or the two V
        // slices 2 x 16 x 520 (larger), and P 64 x 72.
        let wg = Attention { warps_m: 4, warps_n: 2, wgmma: true, ..big };
        let spec = KernelSpec::for_arch(Op::Attention(wg), Arch::Sm90a);
        spec.validate().unwrap();
        assert_eq!(spec.kernel_name(), "attention_d512_q16_kv2_bidir_t64x64x64_w4x2_wgmma_bf16_sm90a");
        assert_eq!(spec.dynamic_shared_bytes(), 2 * (2 * 16 * 520 + 64 * 72));
        assert_eq!(wg.shared_bytes(), 16 + 4 * 64 * 3);
        assert!(KernelSpec::portable(Op::Attention(wg)).validate().is_err());
        for bad in [Attention { warps_m: 2, warps_n: 4, ..wg }, Attention { block_n: 128, ..wg }] {
            assert!(KernelSpec::for_arch(Op::Attention(bad), Arch::Sm90a).validate().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn validation_rejects_bad_shapes() {
        let bad = [
            Op::Rope(Rope { head_dim: 16, rotary_pairs: 9 }),
            Op::Attention(Attention { q_heads: 6, kv_heads: 4, ..ATTN }),
            Op::Attention(Attention { head_dim: 20, ..ATTN }),
            Op::Attention(Attention { block_m: 48, ..ATTN }),
            Op::Attention(Attention { block_n: 40, ..ATTN }),
            Op::Attention(Attention { warps_n: 4, ..ATTN }),
            Op::Attention(Attention { block_k: 24, ..ATTN }),
            Op::Attention(Attention { head_dim: 512, block_m: 128, block_n: 128, block_k: 64, ..ATTN }),
            Op::GroupedGemm(GroupedGemm { n: 63, k: 64, fuse: GemmFuse::Geglu, rows: 32, cols: 32, weights: WeightFormat::Bf16, engine: GemmEngine::Simt }),
            Op::GroupedGemm(GroupedGemm { n: 64, k: 60, fuse: GemmFuse::Down, rows: 32, cols: 64, weights: WeightFormat::Bf16, engine: GemmEngine::Simt }),
            Op::GroupedGemm(GroupedGemm { n: 64, k: 64, fuse: GemmFuse::Down, rows: 30, cols: 64, weights: WeightFormat::Bf16, engine: GemmEngine::Simt }),
            Op::GroupedGemm(GroupedGemm { n: 64, k: 64, fuse: GemmFuse::Down, rows: 32, cols: 5, weights: WeightFormat::Bf16, engine: GemmEngine::Simt }),
            Op::GroupedGemm(GroupedGemm { n: 64, k: 64, fuse: GemmFuse::Geglu, rows: 128, cols: 64, weights: WeightFormat::Bf16, engine: GemmEngine::Simt }),
            Op::MoeSort(MoeSort { experts: 0 }),
            Op::MoeSort(MoeSort { experts: 400 }),
            Op::MoeCombine(MoeCombine { hidden: 0 }),
            Op::Router(Router { hidden: 64, experts: 8, top_k: 9 }),
            Op::Router(Router { hidden: 64, experts: 8, top_k: 0 }),
            Op::Router(Router { hidden: 16384, experts: 128, top_k: 8 }),
            Op::SoftEmbeddingProbs(SoftEmbeddingProbs { vocab: 500 }),
            Op::SoftEmbeddingReduce(SoftEmbeddingReduce { hidden: 63, splits: 2 }),
            Op::SoftEmbeddingReduce(SoftEmbeddingReduce { hidden: 64, splits: 0 }),
            Op::GumbelSample(GumbelSample { vocab: 0 }),
            Op::SamplerCanvas(SamplerCanvas { max_canvas: 0 }),
            Op::SamplerCanvas(SamplerCanvas { max_canvas: 1025 }),
        ];
        for op in bad {
            assert!(KernelSpec::portable(op).validate().is_err(), "{op:?}");
        }
    }
}
