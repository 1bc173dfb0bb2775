// soft_embedding.cuh: the decoder's self-conditioning input, softmax(bf16(P)) @ E (a skinny
// GEMM with the softmax fused into its operand load).
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
// float, fp32 accumulation. pr is recomputed on the fly from x while staging (so no [rows, VOCAB]
// probability buffer exists); every element of pr is bit-identical to the CPU's given the same P
// and statistics. Rounding points: the sum is rounded once, then the product with the scale. The
// sum runs in ascending v per output element (fused multiply-adds); the CPU splits v into rayon
// blocks and adds their partial sums, so the results agree to a bf16 ulp or so, not bitwise. The
// CPU skips probabilities that are exactly 0; for a finite table that adds nothing here either
// (fmaf(0, e, acc) == acc).
//
// Algorithm (correct and simple, not a tensor-core GEMM; issue #4): one block per (group of ROWS
// canvas rows, tile of 2 * THREADS hidden columns), each thread owning two adjacent columns (one
// 4-byte load of E per vocabulary entry, coalesced across the warp) and 2 * ROWS accumulators.
// The block walks the vocabulary in steps of VT entries: it computes pr[rows, v0 .. v0 + VT) into
// shared memory as fp32 (coalesced along v), then every thread streams VT rows of E through its
// accumulators. E is therefore read ceil(rows / ROWS) times in all, and pr computed once per
// column tile. Grid: (ceil(rows / ROWS), ceil(HIDDEN / (2 * THREADS))). The table must be 4-byte
// aligned (the plan checks) and HIDDEN even (the spec checks).
#pragma once
#include "common.cuh"

namespace dgemma {

template <int HIDDEN, int VOCAB, int ROWS, int THREADS>
__device__ __forceinline__ void soft_embedding(const bf16* logits, float cap, const unsigned int* params,
                                               const float* sc_stats, const bf16* table, bf16* out, float scale,
                                               int rows)
{
    static_assert(HIDDEN % 2 == 0, "two columns per thread");
    constexpr int VT = 32; // vocabulary entries staged per step
    alignas(16) __shared__ float ps[VT][ROWS];
    const int r0 = blockIdx.x * ROWS;
    if (r0 >= rows) return; // whole block leaves together
    const int nrows = min(ROWS, rows - r0);
    const int col = (blockIdx.y * THREADS + threadIdx.x) * 2;
    const bool active = col < HIDDEN; // inactive threads still stage and reach every barrier
    const float t = sampler_temperature(params);

    float acc0[ROWS], acc1[ROWS];
#pragma unroll
    for (int i = 0; i < ROWS; ++i) acc0[i] = acc1[i] = 0.0f;

    for (int v0 = 0; v0 < VOCAB; v0 += VT) {
        const int nv = min(VT, VOCAB - v0);
        for (int k = threadIdx.x; k < ROWS * VT; k += THREADS) {
            const int i = k / VT, j = k % VT;
            float pr = 0.0f;
            if (i < nrows && j < nv) {
                const float* st = sc_stats + 2 * (r0 + i);
                const float p = round_bf16(processed_logit(logits[(size_t)(r0 + i) * VOCAB + v0 + j], cap, t));
                pr = round_bf16(mul(expf(p - st[0]), st[1]));
            }
            ps[j][i] = pr;
        }
        __syncthreads();
        if (active) {
            const bf16* e = table + (size_t)v0 * HIDDEN + col;
#pragma unroll 4
            for (int j = 0; j < nv; ++j) {
                // E[v, col] in the low half, E[v, col + 1] in the high half (little endian).
                const unsigned int pair = *reinterpret_cast<const unsigned int*>(e + (size_t)j * HIDDEN);
                const float e0 = __int_as_float((int)(pair << 16));
                const float e1 = __int_as_float((int)(pair & 0xffff0000u));
#pragma unroll
                for (int i = 0; i < ROWS; ++i) {
                    acc0[i] = fmaf(ps[j][i], e0, acc0[i]);
                    acc1[i] = fmaf(ps[j][i], e1, acc1[i]);
                }
            }
        }
        __syncthreads(); // before the next step overwrites ps
    }
    if (!active) return;
#pragma unroll
    for (int i = 0; i < ROWS; ++i) {
        if (i >= nrows) break;
        bf16* o = out + (size_t)(r0 + i) * HIDDEN + col;
        o[0] = to_bf16(mul(round_bf16(acc0[i]), scale));
        o[1] = to_bf16(mul(round_bf16(acc1[i]), scale));
    }
}

} // namespace dgemma
