// grouped_gemm.cuh: the MoE expert GEMMs, over routed (token, slot) pairs.
//
// CPU oracle: crates/dgemma-cpu/src/ops/moe.rs (experts_forward) with ops/linear.rs and
// ops/activation.rs. Model-spec 3.4 (transformers' default grouped_mm path).
//
// Routing input (what the router produces, dgemma-cpu `Routing`): experts[t * top_k + j] is the
// expert of token t's slot j and weights[t * top_k + j] its fp32 weight (already renormalised
// and multiplied by per_expert_scale). Expert weights are one tensor [num_experts, N, K].
//
// grouped_gemm_geglu (gate_up projection + GeGLU), N = 2 * moe_width, gate rows first:
//   g = bf16(x[t] . W[e][c]);  u = bf16(x[t] . W[e][N/2 + c])          fp32 dot, bf16 store
//   out[pair, c] = bf16( bf16(gelu_tanh(g)) * u )                       c < N/2
// grouped_gemm_combine (down projection + routing-weighted sum), N = hidden, K = moe_width:
//   y_j = bf16(act[t * top_k + j] . W[e_j][c])
//   out[t, c] = bf16( ((0 + y_0 * w_0) + y_1 * w_1) + ... )             fp32, slot order, like the CPU
// The element-wise steps are exact IEEE ops (bit-identical to the CPU given the same dots); the
// dot products differ from the CPU's only in summation order. An expert id outside
// [0, num_experts) writes NaN.
//
// Algorithm (correct, not fast: no grouping by expert, no weight reuse across tokens; issue #4
// sorts pairs by expert and runs tensor-core tiles): one warp per output column of one pair
// (geglu) or one token (combine); lanes stride over K, a warp-shuffle sum finishes each dot.
// Grid: geglu (tokens * top_k, ceil(N/2 / WARPS)); combine (tokens, ceil(N / WARPS)).
#pragma once
#include "common.cuh"

namespace dgemma {

// Dot product of two K-vectors by one warp; every lane gets the sum.
template <int K>
__device__ __forceinline__ float warp_dot(const bf16* a, const bf16* b)
{
    const int lane = threadIdx.x & 31;
    float acc = 0.0f;
    for (int kk = lane; kk < K; kk += 32) acc = fmaf(f32(a[kk]), f32(b[kk]), acc);
    return warp_sum(acc);
}

template <int N, int K, int WARPS>
__device__ __forceinline__ void grouped_gemm_geglu(const bf16* x, const int* experts, const bf16* w, bf16* out,
                                                   int tokens, int top_k, int num_experts)
{
    static_assert(N % 2 == 0, "gate rows then up rows");
    constexpr int HALF = N / 2;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int pair = blockIdx.x;
    const int col = blockIdx.y * WARPS + warp;
    if (pair >= tokens * top_k || col >= HALF) return;
    bf16* o = out + (size_t)pair * HALF + col;
    const int e = experts[pair];
    if (e < 0 || e >= num_experts) {
        if (lane == 0) *o = bf16_nan();
        return;
    }
    const bf16* xr = x + (size_t)(pair / top_k) * K;
    const float g = round_bf16(warp_dot<K>(xr, w + ((size_t)e * N + col) * K));
    const float u = round_bf16(warp_dot<K>(xr, w + ((size_t)e * N + HALF + col) * K));
    if (lane == 0) *o = to_bf16(mul(round_bf16(gelu_tanh(g)), u));
}

template <int N, int K, int WARPS>
__device__ __forceinline__ void grouped_gemm_combine(const bf16* act, const int* experts, const float* weights,
                                                     const bf16* w, bf16* out, int tokens, int top_k,
                                                     int num_experts)
{
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int t = blockIdx.x;
    const int col = blockIdx.y * WARPS + warp;
    if (t >= tokens || col >= N) return;
    float total = 0.0f;
    bool bad = false;
    for (int j = 0; j < top_k; ++j) {
        const int pair = t * top_k + j;
        const int e = experts[pair];
        if (e < 0 || e >= num_experts) { bad = true; continue; } // uniform across the warp
        const float y = round_bf16(warp_dot<K>(act + (size_t)pair * K, w + ((size_t)e * N + col) * K));
        total = add(total, mul(y, weights[pair]));
    }
    if (lane == 0) out[(size_t)t * N + col] = bad ? bf16_nan() : to_bf16(total);
}

} // namespace dgemma
