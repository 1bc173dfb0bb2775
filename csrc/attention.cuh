// attention.cuh: scaled-dot-product attention with GQA and DiffusionGemma's masks.
//
// CPU oracle: crates/dgemma-cpu/src/ops/attention.rs (attention). Model-spec 3.3, 3.6, 3.7.
//
// Shapes: q [q_len, Q_HEADS, HEAD_DIM], out like q; k and v [kv_rows, KV_HEADS, HEAD_DIM], a ring
// of kv_rows rows (the whole cache of a layer) holding the key at absolute position p in row
// p % kv_rows. The kernel reads kv_len <= kv_rows keys: key j (absolute position k_pos0 + j) from
// row (k_pos0 + j) % kv_rows. A cache that keeps every position is the ring with kv_rows >= every
// position (p % kv_rows == p); a contiguous buffer of exactly the kv_len keys is kv_rows = kv_len
// with k_pos0 a multiple of kv_len (e.g. 0).
// Query head h reads kv head h / (Q_HEADS / KV_HEADS). Scale 1.0 (q and k are RMS-normalised
// upstream), no logit softcap. Positions are absolute: query i sits at q_pos0 + i, key j at
// k_pos0 + j, and key j is visible to query i when
//   Causal:        kp <= qp                       (encoder, full layers)
//   CausalSliding: kp <= qp && qp - kp < window   (encoder, sliding layers)
//   Bidirectional: always                          (decoder; the caller passes exactly the keys
//                                                   the layer may see: cache tail + canvas)
// Visible keys always form one contiguous range [j0, j1), which is all the kernel scans.
//
// Rounding points (the CPU's bf16 mode, which mirrors torch's CPU flash-attention for bf16):
//   s_j   = q . k_j                  fp32 dot product (warp tree sum here, 8 lanes on the CPU)
//   m     = max_j s_j                over visible keys
//   e_j   = exp(s_j - m)             fp32; denom = sum_j e_j in ascending j (same order as CPU)
//   p_j   = bf16(e_j)                the unnormalised probability is rounded before P.V
//   acc   = sum_j p_j * v_j          fp32, ascending j (same order as the CPU; fused multiply-add)
//   out   = bf16(acc * (1 / denom))
//   no visible key: out = 0 (the CPU fills zeros)
//
// Algorithm (simple and exact to the CPU's two-pass formulation, not fast; issue #4 replaces it
// with a flash-style tiled kernel): one block per (query row, head). The query row is staged in
// shared memory. Pass 1: each warp scores keys (lanes split HEAD_DIM, warp-shuffle sum) and the
// block reduces the maximum. Pass 2, per tile of KEY_TILE keys: warps score the tile into shared
// memory, thread 0 turns the scores into e_j / p_j and extends the denominator in key order, then
// every thread accumulates p_j * v_j for its ceil(HEAD_DIM / THREADS) output dims (coalesced V
// reads). Scores are computed twice (pass 1 and 2) with identical code, so m is exact.
#pragma once
#include "common.cuh"

namespace dgemma {

enum class Mask { Causal, CausalSliding, Bidirectional };

template <int HEAD_DIM, int Q_HEADS, int KV_HEADS, Mask MASK, int KEY_TILE, int THREADS>
__device__ __forceinline__ void attention(const bf16* q, const bf16* k, const bf16* v, bf16* out, int q_len,
                                          int kv_len, int kv_rows, int q_pos0, int k_pos0, int window)
{
    static_assert(Q_HEADS % KV_HEADS == 0, "GQA needs Q_HEADS to be a multiple of KV_HEADS");
    static_assert(THREADS % 32 == 0, "whole warps");
    constexpr int GROUP = Q_HEADS / KV_HEADS;
    constexpr int WARPS = THREADS / 32;
    constexpr int DPT = (HEAD_DIM + THREADS - 1) / THREADS; // output dims per thread

    __shared__ float q_s[HEAD_DIM];
    __shared__ float p_s[KEY_TILE];
    __shared__ float scratch[32];
    __shared__ float denom_s;

    const int i = blockIdx.x, h = blockIdx.y;
    if (i >= q_len) return;
    const int kvh = h / GROUP;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    bf16* o = out + ((size_t)i * Q_HEADS + h) * HEAD_DIM;

    // Visible keys: [j0, j1).
    const int qp = q_pos0 + i;
    int j0 = 0, j1 = kv_len;
    if (MASK != Mask::Bidirectional) {
        j1 = min(kv_len, qp - k_pos0 + 1); // kp <= qp
        if (MASK == Mask::CausalSliding) j0 = max(0, qp - window + 1 - k_pos0); // qp - kp < window
    }
    if (j1 <= j0) {
        for (int d = threadIdx.x; d < HEAD_DIM; d += THREADS) o[d] = to_bf16(0.0f);
        return;
    }

    const bf16* qrow = q + ((size_t)i * Q_HEADS + h) * HEAD_DIM;
    for (int d = threadIdx.x; d < HEAD_DIM; d += THREADS) q_s[d] = f32(qrow[d]);
    __syncthreads();

    // Ring row of key j (absolute position k_pos0 + j).
    auto row = [&](int j) -> size_t { return (size_t)((k_pos0 + j) % kv_rows); };

    // Score of key j, computed by one whole warp; every lane gets it.
    auto score = [&](int j) -> float {
        const bf16* krow = k + (row(j) * KV_HEADS + kvh) * HEAD_DIM;
        float acc = 0.0f;
        for (int d = lane; d < HEAD_DIM; d += 32) acc = fmaf(q_s[d], f32(krow[d]), acc);
        return warp_sum(acc);
    };

    // Pass 1: the maximum score.
    float m = -f32_inf();
    for (int j = j0 + warp; j < j1; j += WARPS) m = fmaxf(m, score(j));
    m = block_max<THREADS>(m, scratch);

    // Pass 2: probabilities, denominator and P.V, one key tile at a time.
    float acc[DPT];
#pragma unroll
    for (int u = 0; u < DPT; ++u) acc[u] = 0.0f;
    float denom = 0.0f; // only thread 0's copy is used
    for (int t0 = j0; t0 < j1; t0 += KEY_TILE) {
        const int n = min(KEY_TILE, j1 - t0);
        for (int jj = warp; jj < n; jj += WARPS) {
            const float s = score(t0 + jj);
            if (lane == 0) p_s[jj] = s;
        }
        __syncthreads();
        if (threadIdx.x == 0) {
            for (int jj = 0; jj < n; ++jj) {
                const float e = expf(p_s[jj] - m);
                denom += e;
                p_s[jj] = round_bf16(e);
            }
        }
        __syncthreads();
        for (int jj = 0; jj < n; ++jj) {
            const float p = p_s[jj];
            const bf16* vrow = v + (row(t0 + jj) * KV_HEADS + kvh) * HEAD_DIM;
#pragma unroll
            for (int u = 0; u < DPT; ++u) {
                const int d = threadIdx.x + u * THREADS;
                if (d < HEAD_DIM) acc[u] = fmaf(p, f32(vrow[d]), acc[u]);
            }
        }
        __syncthreads(); // p_s is rewritten by the next tile
    }
    if (threadIdx.x == 0) denom_s = denom;
    __syncthreads();
    const float inv = 1.0f / denom_s;
#pragma unroll
    for (int u = 0; u < DPT; ++u) {
        const int d = threadIdx.x + u * THREADS;
        if (d < HEAD_DIM) o[d] = to_bf16(mul(acc[u], inv));
    }
}

} // namespace dgemma
