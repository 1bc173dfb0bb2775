// row_softmax.cuh: the vocabulary-wide row statistics of a denoising step, read straight from the
// LM head's bf16 output (no [C, V] fp32 logits, processed logits or probabilities are ever
// written: the vocab-wide state of a canvas is its bf16 logits alone).
//
// row_softmax_entropy_argmax: per canvas row of VOCAB bf16 LM-head outputs x,
//
//      P      = softcap(x) / T                            common.cuh processed_logit: cap <= 0 = no
//                                                          cap; T from the sampler params buffer
//                                                          (word SAMPLER_P_TEMPERATURE; null = 1),
//                                                          so one recorded graph serves every step
//      argmax = first index of max(P)                      (-1 if the row holds NaN or +inf, or is
//                                                           all -inf)
//      m      = max(P);  lse = log(sum(exp(P - m))) + m
//      m2     = m - lse; s2  = sum(exp((P - lse) - m2))
//      H      = -sum( max(P - lse, -FLT_MAX) * (exp((P - lse) - m2) / s2) )
//      sc     = softmax statistics of bf16(P), the next step's self-conditioning input
//               (model-spec 3.7: pr = bf16(softmax(float32(sc_logits)))):
//               sc_stats[row] = { m_sc = max(f32(bf16(P))) = f32(bf16(m)) (rounding is monotonic),
//                                 1 / sum(exp(f32(bf16(P)) - m_sc)) }
//
//    CPU oracles: dgemma-sampler's schedule.rs (apply_temperature: one IEEE division per logit),
//    entropy.rs (argmax; entropy: torch.distributions.Categorical(logits=P).entropy()), and
//    dgemma-cpu ops/softmax.rs (softmax_row: exp(x - max), then times 1/sum) for the sc
//    statistics, which soft_embedding.cuh turns into pr exactly as the CPU does. Model-spec 4.2.
//    Sums are block tree sums here and pairwise sums on the CPU, and expf/logf/tanhf differ from
//    the host libm by an ulp or two, so H agrees to ~1e-6 relative, not bitwise; the argmax is
//    exact for the same P. A bad row writes NaN statistics (and argmax -1), which the sampler
//    reports and the soft embedding propagates.
//    Every output pointer may be null (skipped): the host's self-conditioning path needs only
//    `sc_stats`.
//
// Algorithm: one block per row, threads stride over the row (coalesced 2-byte loads), block-wide
// max/argmax and sums through warp shuffles and 32 floats of shared memory; P is recomputed from
// x in each of the 4 passes (the row is 512 KB of bf16 for the real vocabulary, L2-resident
// between passes). A single online pass belongs to the fused LM head of issue #4.
#pragma once
#include "common.cuh"

namespace dgemma {

template <int VOCAB, int THREADS>
__device__ __forceinline__ void row_softmax_entropy_argmax(const bf16* logits, float cap, const unsigned int* params,
                                                           int* argmax, float* entropy, float* sc_stats, int rows)
{
    __shared__ float vs[32];
    __shared__ int is[32];
    __shared__ float scratch[32];
    const int row = blockIdx.x;
    if (row >= rows) return;
    const bf16* x = logits + (size_t)row * VOCAB;
    const float t = sampler_temperature(params);

    // Pass 1: P, its maximum and first argmax, and whether the row is valid.
    float best = -f32_inf();
    int best_i = 0x7fffffff;
    int bad = 0;
    for (int i = threadIdx.x; i < VOCAB; i += THREADS) {
        const float p = processed_logit(x[i], cap, t);
        bad |= (p != p) || (p == f32_inf());
        if (p > best) { best = p; best_i = i; } // i ascends, so the first maximum wins
    }
    block_argmax<THREADS>(best, best_i, vs, is);
    const int any_bad = __syncthreads_or(bad);
    if (any_bad || best == -f32_inf()) {
        if (threadIdx.x == 0) {
            if (argmax) argmax[row] = -1;
            if (entropy) entropy[row] = f32_nan();
            if (sc_stats) sc_stats[2 * row] = sc_stats[2 * row + 1] = f32_nan();
        }
        return;
    }
    const float m = best;
    const float m_sc = round_bf16(m);

    // Pass 2: lse = log(sum(exp(P - m))) + m, and the self-conditioning denominator.
    float s = 0.0f, s_sc = 0.0f;
    for (int i = threadIdx.x; i < VOCAB; i += THREADS) {
        const float p = processed_logit(x[i], cap, t);
        s += expf(p - m);
        s_sc += expf(round_bf16(p) - m_sc);
    }
    const float lse = logf(block_sum<THREADS>(s, scratch)) + m;
    const float inv_sc = 1.0f / block_sum<THREADS>(s_sc, scratch);
    if (argmax == nullptr && entropy == nullptr) {
        if (threadIdx.x == 0 && sc_stats) { sc_stats[2 * row] = m_sc; sc_stats[2 * row + 1] = inv_sc; }
        return; // uniform across the block
    }

    // Pass 3: s2 = sum(exp(ln - m2)), ln = P - lse, m2 = max(ln) = m - lse.
    const float m2 = m - lse;
    float s2 = 0.0f;
    for (int i = threadIdx.x; i < VOCAB; i += THREADS) s2 += expf((processed_logit(x[i], cap, t) - lse) - m2);
    s2 = block_sum<THREADS>(s2, scratch);

    // Pass 4: H = -sum(clamp(ln, -FLT_MAX) * exp(ln - m2) / s2).
    float h = 0.0f;
    for (int i = threadIdx.x; i < VOCAB; i += THREADS) {
        const float ln = processed_logit(x[i], cap, t) - lse;
        const float p = fdiv(expf(ln - m2), s2);
        h += mul(fmaxf(ln, -3.402823466e38f), p);
    }
    h = block_sum<THREADS>(h, scratch);
    if (threadIdx.x == 0) {
        if (argmax) argmax[row] = best_i;
        if (entropy) entropy[row] = -h;
        if (sc_stats) { sc_stats[2 * row] = m_sc; sc_stats[2 * row + 1] = inv_sc; }
    }
}

} // namespace dgemma
