// linear.cuh: the dense projection y = x W^T (every nn.Linear of the model), on tensor cores.
//
// CPU oracle: crates/dgemma-cpu/src/ops/linear.rs (linear). Model-spec 3.2-3.5.
//
//   y[r, n] = bf16( sum_k x[r, k] * W[n, k] )      W in PyTorch layout [N, K], fp32 accumulation
//
// One rounding, at the store (torch's bf16 GEMM: fp32 accumulate, bf16 output). The products are
// exact in fp32 and only the order of the fp32 sum differs from the CPU's 8-lane dot product, so
// results agree to a bf16 ulp, not bitwise.
//
// Algorithm: a tiled mma.sync GEMM (csrc/mma.cuh, m16n8k16 bf16 -> f32; sm_80+, so Portable).
//   * Block tile BM x BN of y: blockIdx.x = row tile, blockIdx.y = column tile. Row tiles vary
//     fastest, so the blocks that share a tile of W run together and W (the big operand: the
//     26B LM head is 1.5 GB) streams from HBM about once, whatever the number of row tiles; x
//     (a few MB at most) is re-read from L2.
//   * K loop over BK-wide slices: x[BM, BK] and W[BN, BK] are staged through shared memory,
//     double-buffered with a register prefetch: while the warps multiply slice kt out of one
//     buffer, every thread already holds its 16-byte chunks of slice kt + 1 in registers and
//     writes them to the other buffer afterwards; one __syncthreads per slice. Rows >= rows,
//     columns >= N and k >= K are staged as zeros, so any row count and any N, K work (K a
//     multiple of 8 and N even, which spec.rs validates) and the padding adds exact zeros.
//   * Warps form a (BM / WM) x (BN / WN) grid; each owns a WM x WN sub-tile: (WM / 16) x (WN / 8)
//     mma fragments, fp32 accumulators in registers. Fragments wholly past `rows` or N, and
//     k16 steps wholly past K, are skipped (warp-uniform tests: small row counts and the tiny
//     test models do not pay for padding).
//   * Epilogue: each lane rounds its accumulator pairs (C[g][2t], C[g][2t+1]) to bf16 and stores
//     them as one 32-bit word, masked by rows and N.
// Shared memory rows are BK + 8 elements long: the 32-bit fragment loads of a warp (8 rows x 4
// consecutive words) then hit 32 distinct banks, and every row start stays 16-byte aligned for
// the staging stores.
//
// Requirements (checked by ops.rs plan_linear): x and W 16-byte aligned (16-byte chunk loads of
// rows of K elements), y 4-byte aligned (paired stores).
#pragma once
#include "common.cuh"
#include "mma.cuh"

namespace dgemma {

template <int N, int K, int BM, int BN, int BK, int WM, int WN>
__device__ __forceinline__ void linear(const bf16* __restrict__ x, const bf16* __restrict__ w, bf16* __restrict__ y,
                                       int rows)
{
    constexpr int WARPS_M = BM / WM, WARPS_N = BN / WN, THREADS = 32 * WARPS_M * WARPS_N;
    constexpr int MF = WM / 16, NF = WN / 8; // fragments per warp
    constexpr int LDS = BK + 8;              // shared-memory row length (elements)
    constexpr int KT = (K + BK - 1) / BK;    // K slices
    constexpr int STAGE = (BM + BN) * LDS;   // one buffer: the x tile, then the W tile
    static_assert(BM % WM == 0 && BN % WN == 0 && WM % 16 == 0 && WN % 8 == 0, "warp tiling");
    static_assert(BK % 16 == 0 && K % 8 == 0 && N % 2 == 0, "slice and chunk shapes");

    __shared__ uint4 smem_raw[2 * STAGE / 8];
    bf16* const smem = reinterpret_cast<bf16*>(smem_raw);

    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, t = lane & 3;
    const int row0 = blockIdx.x * BM, col0 = blockIdx.y * BN;
    const int wrow = (warp / WARPS_N) * WM, wcol = (warp % WARPS_N) * WN; // warp tile in the block

    FragC acc[MF][NF];
#pragma unroll
    for (int i = 0; i < MF; ++i)
#pragma unroll
        for (int j = 0; j < NF; ++j) zero(acc[i][j]);

    Stage<BM, BK, THREADS> xs;
    Stage<BN, BK, THREADS> ws;
    xs.fetch(x, K, row0, rows, 0, K);
    ws.fetch(w, K, col0, N, 0, K);
    xs.store(smem, LDS);
    ws.store(smem + BM * LDS, LDS);
    __syncthreads();

    for (int kt = 0; kt < KT; ++kt) {
        if (kt + 1 < KT) {
            xs.fetch(x, K, row0, rows, (kt + 1) * BK, K);
            ws.fetch(w, K, col0, N, (kt + 1) * BK, K);
        }
        const bf16* const sx = smem + (kt & 1) * STAGE + wrow * LDS;
        const bf16* const sw = smem + (kt & 1) * STAGE + (BM + wcol) * LDS;
#pragma unroll
        for (int kk = 0; kk < BK; kk += 16) {
            if (kt * BK + kk >= K) break; // a k16 step wholly past K (zeros)
            FragB b[NF];
#pragma unroll
            for (int j = 0; j < NF; ++j)
                if (col0 + wcol + 8 * j < N) b[j] = load_frag_b(sw + 8 * j * LDS + kk, LDS);
#pragma unroll
            for (int i = 0; i < MF; ++i) {
                if (row0 + wrow + 16 * i >= rows) continue;
                const FragA a = load_frag_a(sx + 16 * i * LDS + kk, LDS);
#pragma unroll
                for (int j = 0; j < NF; ++j)
                    if (col0 + wcol + 8 * j < N) mma_bf16_16816(acc[i][j], a, b[j]);
            }
        }
        if (kt + 1 < KT) {
            bf16* const next = smem + ((kt + 1) & 1) * STAGE;
            xs.store(next, LDS);
            ws.store(next + BM * LDS, LDS);
            __syncthreads();
        }
    }

#pragma unroll
    for (int i = 0; i < MF; ++i)
#pragma unroll
        for (int j = 0; j < NF; ++j) {
            const int c = col0 + wcol + 8 * j + 2 * t;
            if (c >= N) continue; // N even: c + 1 < N too
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const int r = row0 + wrow + 16 * i + g + 8 * h;
                if (r < rows) store_bf16_pair(y + (size_t)r * N + c, acc[i][j].r[2 * h], acc[i][j].r[2 * h + 1]);
            }
        }
}

} // namespace dgemma
