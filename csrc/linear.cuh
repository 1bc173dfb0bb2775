// linear.cuh: the dense projection y = x W^T (every nn.Linear of the model).
//
// CPU oracle: crates/dgemma-cpu/src/ops/linear.rs (linear). Model-spec 3.2-3.5.
//
//   y[r, n] = bf16( sum_k x[r, k] * W[n, k] )      W in PyTorch layout [N, K], fp32 accumulation
//
// One rounding, at the store (torch's bf16 GEMM: fp32 accumulate, bf16 output). The sum order
// differs from the CPU's 8-lane dot product, so results agree to a bf16 ulp, not bitwise.
//
// Algorithm (a correct GEMV-style kernel, not a tensor-core GEMM; issue #4 brings wgmma on sm_90a
// and mma.sync on sm_120 behind the arch guards): one warp per output column n and ROWS input
// rows. Lanes stride over K (coalesced loads of the weight row and the input rows), each weight
// element is loaded once and used for ROWS rows, and a warp-shuffle sum finishes each dot product.
// Grid: (ceil(N / WARPS), ceil(rows / ROWS)), WARPS warps per block. No shared memory and no block
// barrier, so a warp past N simply returns.
#pragma once
#include "common.cuh"

namespace dgemma {

template <int N, int K, int ROWS, int WARPS>
__device__ __forceinline__ void linear(const bf16* x, const bf16* w, bf16* y, int rows)
{
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int col = blockIdx.x * WARPS + warp;
    const int r0 = blockIdx.y * ROWS;
    if (col >= N || r0 >= rows) return;
    const int nrows = min(ROWS, rows - r0);
    const bf16* wr = w + (size_t)col * K;
    const bf16* xr = x + (size_t)r0 * K;

    float acc[ROWS];
#pragma unroll
    for (int r = 0; r < ROWS; ++r) acc[r] = 0.0f;
    for (int kk = lane; kk < K; kk += 32) {
        const float wv = f32(wr[kk]);
#pragma unroll
        for (int r = 0; r < ROWS; ++r)
            if (r < nrows) acc[r] = fmaf(f32(xr[(size_t)r * K + kk]), wv, acc[r]);
    }
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
        const float s = warp_sum(acc[r]);
        if (lane == 0 && r < nrows) y[(size_t)(r0 + r) * N + col] = to_bf16(s);
    }
}

} // namespace dgemma
