// soft_embedding.cuh: the decoder's self-conditioning input, softmax(bf16(P)) @ E, as three
// kernels: the probabilities, a split-K tensor-core GEMM, and a deterministic reduction.
//
// CPU oracle: crates/dgemma-cpu/src/model.rs (soft_embeddings, after ops/softmax.rs softmax_row).
// Model-spec 3.7.
//
//   x      = the bf16 LM-head output of the previous step [rows, VOCAB] (or, on the host-sampled
//            path, the host's bf16 self-conditioning logits with cap = 0 and params = null)
//   P      = softcap(x) / T                          common.cuh processed_logit (T from params)
//   pr[v]  = bf16( exp(f32(bf16(P[v])) - m) * inv )   m, inv = sc_stats[row] (row_softmax.cuh),
//                                                     exactly the CPU's softmax_row + bf16 store
//   out[c, h] = bf16( bf16( sum_v pr[c, v] * E[v, h] ) * scale )
//
// E [VOCAB, HIDDEN] bf16 (the embedding table, row-major), scale = bf16(sqrt(hidden)) passed as a
// float, fp32 accumulation. Rounding points: pr once (bit-identical to the CPU's given the same P
// and statistics), the sum once, then the product with the scale. The CPU skips probabilities
// that are exactly 0; for a finite table that adds nothing here either (0 * e = 0).
//
// The three launches (ops.rs plan_soft_embedding), for C <= 256 canvas rows, V = 262144 and
// H = 2816 (the 26B model):
//
//  1. soft_embedding_probs: pr [C, V] bf16 into a scratch buffer, 8 entries per thread (16-byte
//     loads of x, 16-byte stores). Reads 134 MB, writes 134 MB; ~55 SIMT instructions per entry
//     on the device path (two IEEE divisions, tanhf, expf: 3 MUFU.RCP, 2 MUFU.EX2 and a bf16
//     conversion in the sm_90a SASS), 3.7 G thread-instructions in all: ~0.12 ms on an H100
//     (issue-bound; the traffic alone is 0.09 ms).
//  2. soft_embedding (split-K GEMM on mma.sync, csrc/mma.cuh): partials[s, c, h] = fp32 sum of
//     pr[c, v] E[v, h] over split s of the vocabulary. Block tile BM x BN (256 x 128: every row
//     of a canvas) stepping through its split in BK = 32 slices; 8 warps of 64 x 64 (4 x 8 mma
//     fragments, 128 fp32 accumulators per thread). Grid (H / BN, ceil(C / BM), SPLITS) =
//     22 x 1 x 6 = 132 blocks, one wave of an H100's 132 SMs (one 256-thread block per SM:
//     the accumulators take most of the register file).
//        E is read from HBM exactly once per canvas (1.48 GB: every block covers all rows for its
//     (column tile, split)); pr is read by the 22 column tiles of its split, which run at the
//     same time, so it comes from L2 after the first (134 MB from HBM). 2 C V H = 378 GFLOP.
//     L2 -> SM traffic 2 V C H (1/BN + 1/BM) bytes = 4.4 GB; partials 6 x 2.9 MB = 17 MB.
//  3. soft_embedding_reduce: out = bf16(bf16(sum_s partials[s]) * scale), s ascending (fixed
//     order, no atomics): reads 17 MB, writes 1.4 MB.
//
// Why a probabilities pass rather than computing pr while staging the GEMM's A tile (no scratch
// buffer): pr costs ~55 issue slots per entry, and a block recomputes it for every column tile
// it does not cover. With fp32 accumulators in registers a block holds at most ~32K of them
// (BM x BN <= 256 x 128), so reading E at most twice (BM >= 128) means BN <= 256 and >= 11
// recomputations: 11 x 67M entries x 55 instructions = 1.4 ms of issue slots, more than the
// whole tensor-core GEMM (0.6 - 0.8 ms at 500 - 650 TFLOP/s of mma.sync). Computing pr once costs
// 0.12 ms and a [C, V] bf16 scratch (134 MB, one canvas: soft embeddings run per sequence).
//
// Predicted H100 time: probs 0.12 ms + GEMM ~0.75 ms (tensor-bound at ~500 TFLOP/s; L2 traffic
// 4.4 GB at ~5.5 TB/s is 0.8 ms, overlapping) + reduce 0.01 ms: ~0.9 ms, against the 0.45 ms
// floor of reading E once, 0.57 ms for 378 GFLOP at the 660 TFLOP/s mma.sync ceiling, and the
// ~7 ms of the SIMT kernel this replaces (E read 16 times). On sm_90a the GEMM is
// soft_embedding_wgmma (below): the same traffic with the wgmma rate (989 TFLOP/s dense peak);
// predicted ~0.5-0.6 ms, then bound by E's 0.45 ms read and the L2 traffic, not the tensor cores
// (a prediction: nothing here has run on a GPU).
//
// Numerics of the split-K order: each output's sum runs through the tensor core per k16 step
// (its own internal order on the GPU; k ascending in the emulator), ascending k16 steps within a
// split, then the SPLITS partial sums added in ascending split order. That is another fp32 order
// than the CPU's (rayon blocks of v), with shorter rounding chains (V / SPLITS, then SPLITS), so
// the results agree to a bf16 ulp or so, not bitwise. No atomics and no dependence on other rows
// (an mma output is the dot product of its own A row): a row's result does not depend on which
// other rows are in the call, and repeated runs give the same bits.
#pragma once
#include "common.cuh"
#include "mma.cuh"
#include "wgmma_gemm.cuh"

namespace dgemma {

// pr for one bf16 logit, before its bf16 rounding (the caller rounds once, to nearest even).
__device__ __forceinline__ float sc_probability(bf16 x, float cap, float t, float m, float inv)
{
    const float p = round_bf16(processed_logit(x, cap, t));
    return mul(expf(p - m), inv);
}

// Launch 1: probs[r, v] = pr[r, v] for r < rows, v < VOCAB. Grid-stride over 8-entry chunks
// (VOCAB % 8 == 0: a chunk never straddles two rows); logits and probs 16-byte aligned.
template <int VOCAB, int THREADS>
__device__ __forceinline__ void soft_embedding_probs(const bf16* __restrict__ logits, float cap,
                                                     const unsigned int* params, const float* __restrict__ sc_stats,
                                                     bf16* __restrict__ probs, int rows)
{
    static_assert(VOCAB % 8 == 0, "16-byte chunks of a row");
    constexpr long long CHUNKS_PER_ROW = VOCAB / 8;
    const long long chunks = (long long)rows * CHUNKS_PER_ROW;
    const float t = sampler_temperature(params);
    for (long long c = (long long)blockIdx.x * THREADS + threadIdx.x; c < chunks; c += (long long)gridDim.x * THREADS) {
        const int row = (int)(c / CHUNKS_PER_ROW);
        const float m = sc_stats[2 * row], inv = sc_stats[2 * row + 1];
        const uint4 in = reinterpret_cast<const uint4*>(logits)[c];
        const bf16* x = reinterpret_cast<const bf16*>(&in);
        uint4 o;
        __nv_bfloat162* pr = reinterpret_cast<__nv_bfloat162*>(&o);
#pragma unroll
        for (int j = 0; j < 4; ++j)
            pr[j] = __floats2bfloat162_rn(sc_probability(x[2 * j], cap, t, m, inv),
                                          sc_probability(x[2 * j + 1], cap, t, m, inv));
        reinterpret_cast<uint4*>(probs)[c] = o;
    }
}

// Launch 2: partials[split, r, h] = sum over split `split` of the vocabulary of pr[r, v] E[v, h]
// (fp32), blockIdx = (column tile, row tile, split). Split s covers k tiles
// [s * KT / SPLITS, (s + 1) * KT / SPLITS) of the KT = ceil(VOCAB / BK) tiles (at least one each:
// SPLITS <= KT, spec.rs checks).
//   * K loop as in linear.cuh: the pr [BM, BK] and E [BK, BN] slices are staged through shared
//     memory, double-buffered with a register prefetch (one __syncthreads per slice) and requested
//     into L2 four slices ahead (Stage::prefetch_l2); rows >= rows,
//     k >= VOCAB and columns >= HIDDEN are staged as zeros. The slices are stored unpadded and
//     swizzled (mma.cuh Swizzle): 2 x (BM + BN) x BK x 2 bytes = 48 KiB for 256 x 128 x 32, the
//     whole static shared memory a block may have (padded rows would not fit two buffers).
//   * Fragments: A by ldmatrix from the pr slice, B by ldmatrix.trans from the E slice (E's k
//     pairs are a row apart in memory; the transposed load pairs them). Fragments wholly past
//     `rows` or HIDDEN, and k16 steps wholly past VOCAB, are skipped (warp-uniform tests).
//   * Epilogue: each lane stores its accumulators (fp32) for rows < rows and columns < HIDDEN.
// Requirements (ops.rs): probs and table 16-byte aligned, VOCAB and HIDDEN multiples of 8.
template <int HIDDEN, int VOCAB, int SPLITS, int BM, int BN, int BK, int WM, int WN>
__device__ __forceinline__ void soft_embedding(const bf16* __restrict__ probs, const bf16* __restrict__ table,
                                               float* __restrict__ partials, int rows)
{
    constexpr int WARPS_M = BM / WM, WARPS_N = BN / WN, THREADS = 32 * WARPS_M * WARPS_N;
    constexpr int MF = WM / 16, NF = WN / 8; // A fragments and n8 accumulator columns per warp
    constexpr int KT = (VOCAB + BK - 1) / BK;
    constexpr int A_TILE = BM * BK, STAGE = BM * BK + BK * BN; // elements
    static_assert(BM % WM == 0 && BN % WN == 0 && WM % 16 == 0 && WN % 16 == 0, "warp tiling");
    static_assert(BK % 16 == 0 && VOCAB % 8 == 0 && HIDDEN % 8 == 0, "slice and chunk shapes");
    static_assert(SPLITS >= 1 && SPLITS <= KT, "every split has a k tile");

    __shared__ uint4 smem_raw[2 * STAGE / 8];
    bf16* const smem = reinterpret_cast<bf16*>(smem_raw);

    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, t = lane & 3;
    const int col0 = blockIdx.x * BN, row0 = blockIdx.y * BM, split = blockIdx.z;
    const int wrow = (warp / WARPS_N) * WM, wcol = (warp % WARPS_N) * WN; // warp tile in the block
    const int kt0 = (int)((long long)split * KT / SPLITS), kt1 = (int)((long long)(split + 1) * KT / SPLITS);

    FragC acc[MF][NF];
#pragma unroll
    for (int i = 0; i < MF; ++i)
#pragma unroll
        for (int j = 0; j < NF; ++j) zero(acc[i][j]);

    Stage<BM, BK, THREADS> as; // pr [BM rows, BK vocabulary entries]
    Stage<BK, BN, THREADS> es; // E [BK vocabulary entries, BN hidden columns]
    // Slices are requested into L2 PREFETCH slices ahead of their fetch: the register prefetch
    // alone leaves one slice of compute (~0.6 us on an H100) to cover an HBM miss.
    constexpr int PREFETCH = 4;
    for (int kt = kt0 + 1; kt < kt0 + PREFETCH && kt < kt1; ++kt) {
        as.prefetch_l2(probs, VOCAB, row0, rows, kt * BK, VOCAB);
        es.prefetch_l2(table, HIDDEN, kt * BK, VOCAB, col0, HIDDEN);
    }
    as.fetch(probs, VOCAB, row0, rows, kt0 * BK, VOCAB);
    es.fetch(table, HIDDEN, kt0 * BK, VOCAB, col0, HIDDEN);
    as.store_swizzled(smem);
    es.store_swizzled(smem + A_TILE);
    __syncthreads();

    for (int kt = kt0; kt < kt1; ++kt) {
        const bool more = kt + 1 < kt1;
        if (kt + PREFETCH < kt1) {
            as.prefetch_l2(probs, VOCAB, row0, rows, (kt + PREFETCH) * BK, VOCAB);
            es.prefetch_l2(table, HIDDEN, (kt + PREFETCH) * BK, VOCAB, col0, HIDDEN);
        }
        if (more) {
            as.fetch(probs, VOCAB, row0, rows, (kt + 1) * BK, VOCAB);
            es.fetch(table, HIDDEN, (kt + 1) * BK, VOCAB, col0, HIDDEN);
        }
        const bf16* const sa = smem + ((kt - kt0) & 1) * STAGE;
        const bf16* const se = sa + A_TILE;
#pragma unroll
        for (int kk = 0; kk < BK; kk += 16) {
            if (VOCAB % BK != 0 && kt * BK + kk >= VOCAB) break; // a k16 step wholly past V (zeros)
            FragA a[MF];
#pragma unroll
            for (int i = 0; i < MF; ++i)
                if (row0 + wrow + 16 * i < rows) a[i] = load_frag_a_sw<BK>(sa, wrow + 16 * i, kk);
#pragma unroll
            for (int j = 0; j < NF; j += 2) {
                if (col0 + wcol + 8 * j >= HIDDEN) continue; // the pair is wholly past H
                FragB b0, b1;
                load_frag_b_pair_trans<BN>(b0, b1, se, kk, wcol + 8 * j);
#pragma unroll
                for (int i = 0; i < MF; ++i) {
                    if (row0 + wrow + 16 * i >= rows) continue;
                    mma_bf16_16816(acc[i][j], a[i], b0);
                    mma_bf16_16816(acc[i][j + 1], a[i], b1);
                }
            }
        }
        if (more) {
            bf16* const next = smem + ((kt + 1 - kt0) & 1) * STAGE;
            as.store_swizzled(next);
            es.store_swizzled(next + A_TILE);
            __syncthreads();
        }
    }

    float* const part = partials + (size_t)split * rows * HIDDEN;
#pragma unroll
    for (int i = 0; i < MF; ++i)
#pragma unroll
        for (int j = 0; j < NF; ++j) {
            const int c = col0 + wcol + 8 * j + 2 * t;
            if (c >= HIDDEN) continue; // HIDDEN even: c + 1 < HIDDEN too
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const int r = row0 + wrow + 16 * i + g + 8 * h;
                if (r < rows) {
                    float* const p = part + (size_t)r * HIDDEN + c;
                    p[0] = acc[i][j].r[2 * h];
                    p[1] = acc[i][j].r[2 * h + 1];
                }
            }
        }
}

// Launch 2 on sm_90a's wgmma (codegen's SoftEmbedding with LinearEngine::Wgmma,
// shapes.rs soft_embedding_spec_for): the same partials, from the shared wgmma mainloop
// (wgmma_gemm.cuh) with pr as X (its rows row0.., K = the vocabulary, this split's range of
// whole BK slices) and E as an MN-major weight tile (W_MN: E's rows are K, its hidden columns
// the weight rows; 16-byte chunks of 8 columns copied straight from E into wgmma's MN-major core
// matrices, imm-trans-b = 1). Block tile BM x BN: BN / 64 warpgroups of 64 columns, each over
// all BM rows (BM / 64 m64 tiles: 128 accumulators per thread at 256 x 128). Grid and split
// ranges as the mma.sync kernel's (with BK = 64: KT = V / 64 slices); the fp32 order is the
// tensor cores' within a slice, slices ascending, splits added by launch 3.
template <int HIDDEN, int VOCAB, int SPLITS, int BM, int BN, int BK, int STAGES>
__device__ __forceinline__ void soft_embedding_wgmma(const bf16* __restrict__ probs, const bf16* __restrict__ table,
                                                     float* __restrict__ partials, int rows)
{
    using Gemm = WgmmaGemm<VOCAB, BM, BN, BK, STAGES, WeightBf16, true>;
    constexpr int KT = (VOCAB + BK - 1) / BK;
    static_assert(HIDDEN % 8 == 0 && VOCAB % 8 == 0, "16-byte chunks of E's and pr's rows");
    static_assert(SPLITS >= 1 && SPLITS <= KT, "every split has a k slice");

    unsigned char* const smem = dynamic_smem();
    const int wg = threadIdx.x / 128;
    const int col0 = blockIdx.x * BN, row0 = blockIdx.y * BM, split = blockIdx.z;
    const int kt0 = (int)((long long)split * KT / SPLITS), kt1 = (int)((long long)(split + 1) * KT / SPLITS);
    const int live = min(BM, rows - row0);

    Gemm gemm;
    gemm.bind_weights(smem, [&](int j) { return col0 + j < HIDDEN ? col0 + j : -1; }, HIDDEN, nullptr);
    const bool wg_live = col0 + 64 * wg < HIDDEN; // warpgroup-uniform
    float acc[Gemm::MT][32];
    gemm.run(
        smem, probs, [&](int r) { return r < live ? (row0 + r) * VOCAB : -1; }, table, live, wg_live, acc, kt0 * BK,
        min(kt1 * BK, VOCAB), HIDDEN);
    if (!wg_live) return;
    float* const part = partials + (size_t)split * rows * HIDDEN;
    Gemm::for_each_pair(acc, live, [&](int r, int c, float v0, float v1) {
        if (col0 + c < HIDDEN) { // HIDDEN even: c + 1 < HIDDEN too
            float* const p = part + (size_t)(row0 + r) * HIDDEN + col0 + c;
            p[0] = v0;
            p[1] = v1;
        }
    });
}

// Launch 3: out[r, h] = bf16(bf16(sum_s partials[s, r, h]) * scale), the partial sums added in
// ascending s, two adjacent columns per thread (grid-stride; out 4-byte aligned).
template <int HIDDEN, int SPLITS, int THREADS>
__device__ __forceinline__ void soft_embedding_reduce(const float* __restrict__ partials, bf16* __restrict__ out,
                                                      float scale, int rows)
{
    static_assert(HIDDEN % 2 == 0, "column pairs");
    const long long pairs = (long long)rows * (HIDDEN / 2);
    const size_t plane = (size_t)rows * HIDDEN;
    for (long long i = (long long)blockIdx.x * THREADS + threadIdx.x; i < pairs; i += (long long)gridDim.x * THREADS) {
        const float* p = partials + 2 * i;
        float s0 = p[0], s1 = p[1];
#pragma unroll
        for (int s = 1; s < SPLITS; ++s) {
            s0 = add(s0, p[s * plane]);
            s1 = add(s1, p[s * plane + 1]);
        }
        store_bf16_pair(out + 2 * i, mul(round_bf16(s0), scale), mul(round_bf16(s1), scale));
    }
}

} // namespace dgemma
