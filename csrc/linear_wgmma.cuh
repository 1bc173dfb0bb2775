// linear_wgmma.cuh: the dense projection y = x W^T on Hopper's warpgroup tensor cores (wgmma,
// sm_90a only): the kernel the backend launches on an H100 for every nn.Linear of the model
// (codegen/src/shapes.rs, linear_spec_for), the LM head first among them. Same contract and
// numerics as linear.cuh (the mma.sync GEMM, every arch):
//
//   y[r, n] = bf16( sum_k x[r, k] * W[n, k] )      W in PyTorch layout [N, K], fp32 accumulation
//
// one rounding at the store; only the order of the fp32 sum differs from the CPU's dot.
//
// CPU oracle: crates/dgemma-cpu/src/ops/linear.rs (linear). Model-spec 3.2-3.5.
//
// Algorithm. Block tile BM x BN of y: blockIdx.x = row tile (fastest, so the blocks sharing a
// weight tile run together and W streams from HBM about once), blockIdx.y = column tile. The
// block is BN / 64 warpgroups; warpgroup wg owns columns 64wg .. 64wg + 63 of the tile for all BM
// rows (BM / 64 m64 tiles). The mainloop is wgmma_gemm.cuh's (rows r0 .. of x as X, the tile's
// rows of W as the weight tile; the cp.async pipeline; rows past `rows` and columns past N never
// copied; k >= K zero-filled; the second m64 tile skipped while the block has at most 64 live
// rows). Epilogue: lane (g, t) of warp w holds rows 64m + 16w + g (+ 8) and columns 8j + 2t, + 1
// of its warpgroup's 64; it rounds each pair to bf16 and stores it as one 32-bit word, masked by
// rows and N.
//
// Tiles (linear_wgmma_spec): 128 x 128 (3 stages of 64-wide slices, 96 KiB), 64 x 128 and
// 64 x 64 (4 stages, 96 and 64 KiB), all BK = 64, two blocks per SM. The LM head at a canvas
// (256 rows) is 2 x 2048 blocks of 128 x 128: each weight byte read from HBM serves 128 rows
// from shared memory, 2 row tiles re-read it from L2.
//
// Requirements (ops.rs plan_linear): K % 8 == 0, N even, x and W 16-byte aligned, y 4-byte
// aligned, rows x K and N x K under 2^31 elements (32-bit offsets).
#pragma once
#include "common.cuh"
#include "mma.cuh"
#include "wgmma_gemm.cuh"

namespace dgemma {

template <int N, int K, int BM, int BN, int BK, int STAGES>
__device__ __forceinline__ void linear_wgmma(const bf16* __restrict__ x, const bf16* __restrict__ w,
                                             bf16* __restrict__ y, int rows)
{
    using Gemm = WgmmaGemm<K, BM, BN, BK, STAGES, WeightBf16>;
    static_assert(N % 2 == 0, "paired bf16 stores");

    unsigned char* const smem = dynamic_smem();
    const int wg = threadIdx.x / 128;
    const int row0 = blockIdx.x * BM, col0 = blockIdx.y * BN;
    const int live = min(BM, rows - row0); // the tile's rows

    Gemm gemm;
    gemm.bind_weights(smem, [&](int j) { return col0 + j < N ? col0 + j : -1; }, K, nullptr);
    const bool wg_live = col0 + 64 * wg < N; // warpgroup-uniform
    float acc[Gemm::MT][32];
    gemm.run(smem, x, [&](int r) { return r < live ? (row0 + r) * K : -1; }, w, live, wg_live, acc);
    if (!wg_live) return;
    Gemm::for_each_pair(acc, live, [&](int r, int c, float v0, float v1) {
        if (col0 + c < N) store_bf16_pair(y + (size_t)(row0 + r) * N + col0 + c, v0, v1); // N even
    });
}

} // namespace dgemma
