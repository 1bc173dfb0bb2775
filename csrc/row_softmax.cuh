// row_softmax.cuh: vocabulary-wide row reductions of the sampler and the self-conditioning input.
//
// 1. row_softmax_entropy_argmax: one denoising step's statistics per canvas position.
//    CPU oracles: dgemma-sampler's schedule.rs (apply_temperature: one IEEE division per logit)
//    and entropy.rs (argmax, entropy; torch.distributions.Categorical(logits=P).entropy()).
//    Model-spec 4.2. Per row of VOCAB fp32 logits (already soft-capped):
//
//      P      = logits / T                                 fp32 division (bit-identical), T read
//                                                           from the sampler params buffer
//                                                           (word SAMPLER_P_TEMPERATURE), so one
//                                                           recorded graph serves every step
//      argmax = first index of max(P)                       (bit-identical; -1 if the row holds
//                                                            NaN or +inf, or is all -inf)
//      m      = max(P);  lse = log(sum(exp(P - m))) + m
//      m2     = m - lse; s2  = sum(exp((P - lse) - m2))
//      H      = -sum( max(P - lse, -FLT_MAX) * (exp((P - lse) - m2) / s2) )
//
//    which is the sampler's entropy_checked step for step. Sums are block tree sums here and
//    pairwise sums on the CPU, and expf/logf differ from the host libm by an ulp or two, so H
//    agrees to ~1e-6 relative, not bitwise. Optional outputs: `processed` (P, fp32) and
//    `processed_bf16` (bf16(P): the next step's self-conditioning logits); pass null to skip.
//    `processed` must not alias `logits` (P is recomputed from `logits` in every pass).
//
// 2. row_softmax: probs = bf16(softmax(float32(x))) per row of VOCAB bf16 values, the decoder's
//    self-conditioning softmax. CPU oracle: dgemma-cpu ops/softmax.rs (softmax_row: exp(x - max),
//    then times 1/sum) followed by the bf16 rounding in model.rs (soft_embeddings).
//
// Algorithm (both): one block per row, threads stride over the row (coalesced), block-wide
// max/argmax and sums through warp shuffles and 32 floats of shared memory; the row is re-read
// for every pass (4 passes for the entropy kernel, 3 for the softmax). Correct and simple; the
// single-pass online (max, sum, weighted-sum) version and split rows belong to issue #4.
#pragma once
#include "common.cuh"

namespace dgemma {

template <int VOCAB, int THREADS>
__device__ __forceinline__ void row_softmax_entropy_argmax(const float* logits, const unsigned int* params, float* processed,
                                                           bf16* processed_bf16, int* argmax, float* entropy,
                                                           int rows)
{
    __shared__ float vs[32];
    __shared__ int is[32];
    __shared__ float scratch[32];
    const int row = blockIdx.x;
    if (row >= rows) return;
    const size_t base = (size_t)row * VOCAB;
    const float* l = logits + base;
    const float temperature = __uint_as_float(params[SAMPLER_P_TEMPERATURE]);

    // Pass 1: P, its maximum and first argmax, and whether the row is valid.
    float best = -f32_inf();
    int best_i = 0x7fffffff;
    int bad = 0;
    for (int i = threadIdx.x; i < VOCAB; i += THREADS) {
        const float p = fdiv(l[i], temperature);
        if (processed) processed[base + i] = p;
        if (processed_bf16) processed_bf16[base + i] = to_bf16(p);
        bad |= (p != p) || (p == f32_inf());
        if (p > best) { best = p; best_i = i; } // i ascends, so the first maximum wins
    }
    block_argmax<THREADS>(best, best_i, vs, is);
    const int any_bad = __syncthreads_or(bad);
    if (any_bad || best == -f32_inf()) {
        if (threadIdx.x == 0) { argmax[row] = -1; entropy[row] = f32_nan(); }
        return;
    }
    const float m = best;

    // Pass 2: lse = log(sum(exp(P - m))) + m.
    float s = 0.0f;
    for (int i = threadIdx.x; i < VOCAB; i += THREADS) s += expf(fdiv(l[i], temperature) - m);
    const float lse = logf(block_sum<THREADS>(s, scratch)) + m;

    // Pass 3: s2 = sum(exp(ln - m2)), ln = P - lse, m2 = max(ln) = m - lse.
    const float m2 = m - lse;
    float s2 = 0.0f;
    for (int i = threadIdx.x; i < VOCAB; i += THREADS) s2 += expf((fdiv(l[i], temperature) - lse) - m2);
    s2 = block_sum<THREADS>(s2, scratch);

    // Pass 4: H = -sum(clamp(ln, -FLT_MAX) * exp(ln - m2) / s2).
    float h = 0.0f;
    for (int i = threadIdx.x; i < VOCAB; i += THREADS) {
        const float ln = fdiv(l[i], temperature) - lse;
        const float p = fdiv(expf(ln - m2), s2);
        h += mul(fmaxf(ln, -3.402823466e38f), p);
    }
    h = block_sum<THREADS>(h, scratch);
    if (threadIdx.x == 0) {
        argmax[row] = best_i;
        entropy[row] = -h;
    }
}

template <int VOCAB, int THREADS>
__device__ __forceinline__ void row_softmax(const bf16* logits, bf16* probs, int rows)
{
    __shared__ float scratch[32];
    const int row = blockIdx.x;
    if (row >= rows) return;
    const size_t base = (size_t)row * VOCAB;
    const bf16* x = logits + base;

    float m = -f32_inf();
    for (int i = threadIdx.x; i < VOCAB; i += THREADS) m = fmaxf(m, f32(x[i]));
    m = block_max<THREADS>(m, scratch);

    float s = 0.0f;
    for (int i = threadIdx.x; i < VOCAB; i += THREADS) s += expf(f32(x[i]) - m);
    const float inv = 1.0f / block_sum<THREADS>(s, scratch);

    for (int i = threadIdx.x; i < VOCAB; i += THREADS) probs[base + i] = to_bf16(mul(expf(f32(x[i]) - m), inv));
}

} // namespace dgemma
