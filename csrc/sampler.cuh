// sampler.cuh: the denoising step's sampler on the device, bit for bit dgemma-sampler's
// `step_core` with `SeededNoise` and `TorchDevice::Cuda`, as two kernels that read every value
// that changes between steps from a small params buffer in DEVICE memory, so that one captured
// CUDA graph serves every step (the host rewrites the params buffer, or a kernel bumps it).
//
// CPU oracles (crates/dgemma-sampler/src): rng.rs (philox4x32_10, ln_f32, gumbel_from_bits,
// gumbel_upper_bound, uniform_below), noise.rs (SeededNoise: the counter layout, gumbel_argmax,
// renoise), accept.rs (accept_mask_on), stopping.rs (StableAndConfident), step.rs (the order).
// Model-spec 4.
//
// Params buffer (`params`, 8 x 32-bit words, written by the host; ops.rs `SamplerParams`):
//   [0] seed, low 32 bits        Philox key k0          \  per request
//   [1] seed, high 32 bits       Philox key k1          /
//   [2] block index              counter word c2        \  per step
//   [3] step index within block  0 = first executed step (N - cur_step), < 2^24
//   [4] temperature (f32 bits)   read by row_softmax_entropy_argmax        /
//   [5] entropy_bound (f32 bits)            \
//   [6] confidence_threshold (f32 bits)      }  per request (settings)
//   [7] stability_threshold (u32)           /
// Compile-time: the vocabulary of gumbel_sample (VOCAB), the largest canvas of sampler_canvas
// (MAX_CANVAS). Run-time arguments (fixed per model, baked into a graph): rows / canvas, vocab.
//
// 1. gumbel_sample<VOCAB, THREADS> (one block per canvas row r, P = softcap(x[r]) / T recomputed
//    from the LM head's bf16 output x with common.cuh processed_logit, bit for bit the values the
//    row pass and the host sampler see): the categorical draw of SeededNoise::sample,
//
//      sampled[r] = argmax_v fl(P[v] + g_v),  first index among equal maxima,
//      g_v        = gumbel_from_bits(philox4x32_10([v >> 2, r, block, (2 << 24) | step], seed)[v & 3])
//
//    or -1 when the row holds NaN or +inf, or only -inf (the CPU's check_row error). Each thread
//    takes whole Philox groups (4 ids, one Philox call), keeps its own (best, first index), then
//    block_argmax (ties to the lower index). Bit-exact because every float operation is the
//    CPU's IEEE float32 operation in the CPU's order: __uint2float_rn for f32(w), and
//    __fadd_rn / __fsub_rn / __fmul_rn / __fdiv_rn (never contracted into FMAs) in ln_f32 (fdlibm
//    logf, re-implemented here from the same integer steps and constants) and in the Gumbel
//    transform; Philox is integer arithmetic (__umulhi). The CPU prunes ids with
//    fl(P + G_BOUND) < best or fl(P + gumbel_upper_bound(w)) < best (strictly below, so a pruned
//    id can neither win nor tie); this kernel prunes the same way against its thread's own best
//    (which is <= the row's best), so the answer is the plain first-index argmax over all ids,
//    which is also what the CPU returns (including the degenerate case where every sum is -inf:
//    index 0).
//
// 2. sampler_canvas<MAX_CANVAS, THREADS> (one block; one thread per canvas position p < canvas):
//      renoise[p] = uniform_below(w0, w1, vocab), w = philox4x32_10([0, p, block, (3 << 24) | step],
//                   seed); uniform_below = __umul64hi((w1 << 32) | w0, vocab)          (exact)
//      rank       = ascending entropy, ties by lower position (-0 == +0): rank_p counts the q with
//                   H[q] < H[p] or (H[q] == H[p] and q < p), so the permutation is accept.rs's sort
//      cum        = sequential float32 inclusive sum over the ranks (one thread, TorchDevice::Cuda)
//      accepted   = fl(cum_k - H_k) <= entropy_bound                 (HF's expression, per rank)
//      next[p]    = accepted[p] ? sampled[p] : renoise[p]
//      mean       = fl(fl(sum_p H[p]) * fl(1 / canvas)), the sum sequential in position order
//                   (StableAndConfident::mean_entropy)
//      stable     = stability_threshold == 0, or: step > 0, the argmax canvas equals the previous
//                   one, and the run of identical argmax canvases ending with the previous one is
//                   at least stability_threshold long (see below)
//      finished   = stable && mean < confidence_threshold
//    All of it is integer work or the CPU's float32 operations in the CPU's order (the cumsum
//    and the mean are one thread's sequential loops), so it is bit-exact.
//
//    Stability history in device memory (`history`, i32 [canvas + 1], owned by the kernel):
//    history[0..canvas] = the previous step's argmax canvas, history[canvas] = the length of the
//    run of identical consecutive argmax canvases that ends with it. HF's ring of the last K
//    canvases (-1-filled on a canvas's first step) is "all equal to the current one" exactly when
//    the previous canvas equals the current one and that run is >= K long (equality is
//    transitive), so one canvas and a counter reproduce it for every K, including K = 0 (always
//    stable) and K = 1 (two identical consecutive canvases). step == 0 plays StableAndConfident's
//    reset(): the history is ignored and restarted (the CPU resets once per block, and a block's
//    first executed step is always step 0), so a fresh, uninitialised history buffer is fine.
//    The history is updated on every step without an error (also for K = 0, where it is unused).
//
//    Status (`status`, 4 x 32-bit words, the only thing the host reads per step):
//      [0] finished (0 / 1)   [1] accepted count   [2] mean entropy (f32 bits)   [3] error bits:
//      1 = NaN entropy (accept_mask's NanEntropy), 2 = a sampled id outside 0..vocab (a -1 from
//      gumbel_sample: an invalid logits row), 4 = an argmax id outside 0..vocab (-1 from the row
//      pass), 8 = bad params (step >= 2^24, entropy_bound not finite and > 0, NaN
//      confidence_threshold, canvas outside 1..=MAX_CANVAS, vocab < 1).
//    With an error (the CPU would return Err): finished = 0, accepted count = 0, mask all 0,
//    next canvas = the renoise draw, and the history is left as it was (the CPU's update never
//    runs); the mean is still computed (NaN with a NaN entropy).
//    `next_canvas` may alias `sampled`; nothing else may alias.
#pragma once
#include "common.cuh"

namespace dgemma {

// Params words: SAMPLER_P_* in common.cuh (the row pass reads the temperature too).
// Status words and error bits.
constexpr int SAMPLER_S_FINISHED = 0;
constexpr int SAMPLER_S_ACCEPTED = 1;
constexpr int SAMPLER_S_MEAN_ENTROPY = 2;
constexpr int SAMPLER_S_ERROR = 3;
constexpr unsigned SAMPLER_ERR_NAN_ENTROPY = 1u;
constexpr unsigned SAMPLER_ERR_SAMPLE = 2u;
constexpr unsigned SAMPLER_ERR_ARGMAX = 4u;
constexpr unsigned SAMPLER_ERR_PARAMS = 8u;
// noise.rs: counter word c3 = (tag << 24) | step.
constexpr unsigned SAMPLER_TAG_SAMPLE = 2u;
constexpr unsigned SAMPLER_TAG_RENOISE = 3u;

__device__ __forceinline__ float sub(float a, float b) { return __fsub_rn(a, b); }

struct Philox4 {
    unsigned w[4];
};

// rng.rs philox4x32_10: Random123's Philox4x32 with 10 rounds.
__device__ __forceinline__ Philox4 philox4x32_10(unsigned c0, unsigned c1, unsigned c2, unsigned c3, unsigned k0,
                                                 unsigned k1)
{
#pragma unroll
    for (int round = 0; round < 10; ++round) {
        if (round > 0) {
            k0 += 0x9E3779B9u;
            k1 += 0xBB67AE85u;
        }
        const unsigned hi0 = __umulhi(0xD2511F53u, c0), lo0 = 0xD2511F53u * c0;
        const unsigned hi1 = __umulhi(0xCD9E8D57u, c2), lo1 = 0xCD9E8D57u * c2;
        const unsigned n0 = hi1 ^ c1 ^ k0, n2 = hi0 ^ c3 ^ k1;
        c0 = n0;
        c1 = lo1;
        c2 = n2;
        c3 = lo0;
    }
    Philox4 r;
    r.w[0] = c0;
    r.w[1] = c1;
    r.w[2] = c2;
    r.w[3] = c3;
    return r;
}

// rng.rs uniform_below: (x * n) >> 64 with x = (w1 << 32) | w0.
__device__ __forceinline__ unsigned uniform_below(unsigned w0, unsigned w1, unsigned n)
{
    const unsigned long long x = ((unsigned long long)w1 << 32) | (unsigned long long)w0;
    return (unsigned)__umul64hi(x, (unsigned long long)n);
}

// rng.rs ln_f32: fdlibm __ieee754_logf, the same constants and operation order, every float
// operation a separate IEEE float32 operation.
__device__ __forceinline__ float ln_f32(float x)
{
    const float LN2_HI = __int_as_float(0x3f317180);
    const float LN2_LO = __int_as_float(0x3717f7d1);
    const float TWO25 = __int_as_float(0x4c000000);
    const float LG1 = __int_as_float(0x3f2aaaab);
    const float LG2 = __int_as_float(0x3ecccccd);
    const float LG3 = __int_as_float(0x3e924925);
    const float LG4 = __int_as_float(0x3e638e29);
    const float LG5 = __int_as_float(0x3e3a3325);
    const float LG6 = __int_as_float(0x3e1cd04f);
    const float LG7 = __int_as_float(0x3e178897);
    const float ONE_THIRD = __int_as_float(0x3eaaaaab);

    int ix = __float_as_int(x);
    int k = 0;
    if (ix < 0x00800000) {
        if ((ix & 0x7fffffff) == 0) return -f32_inf();
        if (ix < 0) return f32_nan();
        k -= 25;
        x = mul(x, TWO25);
        ix = __float_as_int(x);
    }
    if (ix >= 0x7f800000) return add(x, x);
    k += (ix >> 23) - 127;
    ix &= 0x007fffff;
    const int i = (ix + (0x95f64 << 3)) & 0x00800000;
    x = __int_as_float(ix | (i ^ 0x3f800000));
    k += i >> 23;
    const float f = sub(x, 1.0f);
    if ((0x007fffff & (15 + ix)) < 16) {
        if (f == 0.0f) {
            if (k == 0) return 0.0f;
            const float dk = (float)k;
            return add(mul(dk, LN2_HI), mul(dk, LN2_LO));
        }
        const float r = mul(mul(f, f), sub(0.5f, mul(ONE_THIRD, f)));
        if (k == 0) return sub(f, r);
        const float dk = (float)k;
        return sub(mul(dk, LN2_HI), sub(sub(r, mul(dk, LN2_LO)), f));
    }
    const float s = fdiv(f, add(2.0f, f));
    const float dk = (float)k;
    const float z = mul(s, s);
    int ii = ix - (0x6147a << 3);
    const float w = mul(z, z);
    const int j = (0x6b851 << 3) - ix;
    const float t1 = mul(w, add(LG2, mul(w, add(LG4, mul(w, LG6)))));
    const float t2 = mul(z, add(LG1, mul(w, add(LG3, mul(w, add(LG5, mul(w, LG7)))))));
    ii |= j;
    const float r = add(t2, t1);
    if (ii > 0) {
        const float hfsq = mul(mul(0.5f, f), f);
        if (k == 0) return sub(f, sub(hfsq, mul(s, add(hfsq, r))));
        return sub(mul(dk, LN2_HI), sub(sub(hfsq, add(mul(s, add(hfsq, r)), mul(dk, LN2_LO))), f));
    }
    if (k == 0) return sub(f, mul(s, sub(f, r)));
    return sub(mul(dk, LN2_HI), sub(sub(mul(s, sub(f, r)), mul(dk, LN2_LO)), f));
}

// rng.rs gumbel_from_bits: g = -ln(-ln(1 - u)), u = (f32(w) + 0.5) * 2^-32, without the
// cancellation of 1 - u for small u.
__device__ __forceinline__ float gumbel_from_bits(unsigned w)
{
    const float u = mul(add(__uint2float_rn(w), 0.5f), __int_as_float(0x2f800000)); // 2^-32
    float l;
    if (u >= 0.5f) {
        l = ln_f32(sub(1.0f, u));
    } else {
        const float y = sub(1.0f, u);
        l = (y == 1.0f) ? -u : mul(fdiv(ln_f32(y), sub(y, 1.0f)), -u);
    }
    return -ln_f32(-l);
}

// rng.rs gumbel_upper_bound: (1 + clz(w)) * ln 2 + 1e-3 >= gumbel_from_bits(w) (checked
// exhaustively on the CPU; the same float operations here).
__device__ __forceinline__ float gumbel_upper_bound(unsigned w)
{
    return add(mul((float)(1 + __clz((int)w)), 0.693147180559945309f), 1e-3f);
}

template <int VOCAB, int THREADS>
__device__ __forceinline__ void gumbel_sample(const unsigned* params, const bf16* logits, float cap, int* sampled,
                                              int rows)
{
    __shared__ float vs[32];
    __shared__ int is[32];
    constexpr int GROUPS = (VOCAB + 3) / 4;
    const int row = blockIdx.x;
    if (row >= rows) return;
    const unsigned k0 = params[SAMPLER_P_SEED_LO], k1 = params[SAMPLER_P_SEED_HI];
    const unsigned blk = params[SAMPLER_P_BLOCK];
    const unsigned c3 = (SAMPLER_TAG_SAMPLE << 24) | params[SAMPLER_P_STEP];
    const bf16* p = logits + (size_t)row * VOCAB;
    const float t = sampler_temperature(params);
    // fl(P + g) <= fl(P + g_bound) for every g (noise.rs G_BOUND).
    const float g_bound = add(gumbel_from_bits(0u), 1.0f);

    float best = -f32_inf();
    int best_i = 0x7fffffff;
    int bad = 0, any_finite = 0;
    for (int g = threadIdx.x; g < GROUPS; g += THREADS) {
        const int v0 = 4 * g;
        float x[4];
        float gmax = -f32_inf();
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            x[j] = (VOCAB % 4 == 0 || v0 + j < VOCAB) ? processed_logit(p[v0 + j], cap, t) : -f32_inf();
            bad |= (x[j] != x[j]) || (x[j] == f32_inf());
            any_finite |= x[j] > -f32_inf();
            gmax = fmaxf(gmax, x[j]);
        }
        // Nobody in the group can reach this thread's best (strictly below: no tie either).
        if (add(gmax, g_bound) < best) continue;
        const Philox4 w = philox4x32_10((unsigned)g, (unsigned)row, blk, c3, k0, k1);
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const int v = v0 + j;
            if (VOCAB % 4 != 0 && v >= VOCAB) break;
            if (add(x[j], gumbel_upper_bound(w.w[j])) < best) continue;
            const float s = add(x[j], gumbel_from_bits(w.w[j]));
            if (s > best || (s == best && v < best_i)) {
                best = s;
                best_i = v;
            }
        }
    }
    block_argmax<THREADS>(best, best_i, vs, is);
    const int row_bad = __syncthreads_or(bad);
    const int row_has_finite = __syncthreads_or(any_finite);
    if (threadIdx.x == 0) sampled[row] = (row_bad || !row_has_finite) ? -1 : best_i;
}

template <int MAX_CANVAS, int THREADS>
__device__ __forceinline__ void sampler_canvas(const unsigned* params, const float* entropy, const int* sampled,
                                               const int* argmax, int* next_canvas, int* accepted, int* history,
                                               unsigned* status, int vocab, int canvas)
{
    static_assert(MAX_CANVAS <= THREADS, "one canvas position per thread");
    __shared__ float h_sh[MAX_CANVAS];
    __shared__ int order[MAX_CANVAS];
    __shared__ int mask_sh[MAX_CANVAS];
    if (blockIdx.x != 0) return;
    const int t = threadIdx.x;
    const int n = canvas < 0 ? 0 : (canvas > MAX_CANVAS ? MAX_CANVAS : canvas);
    const bool live = t < n;

    const unsigned k0 = params[SAMPLER_P_SEED_LO], k1 = params[SAMPLER_P_SEED_HI];
    const unsigned blk = params[SAMPLER_P_BLOCK];
    const unsigned step = params[SAMPLER_P_STEP];
    const float bound = __uint_as_float(params[SAMPLER_P_ENTROPY_BOUND]);
    const float confidence = __uint_as_float(params[SAMPLER_P_CONFIDENCE]);
    const unsigned stability = params[SAMPLER_P_STABILITY];
    const bool params_bad = step >= (1u << 24) || !(bound > 0.0f && bound < f32_inf()) ||
                            confidence != confidence || canvas < 1 || canvas > MAX_CANVAS || vocab < 1;

    float h = 0.0f;
    int s = 0, a = 0, nan_h = 0, bad_s = 0, bad_a = 0, differs = 0;
    if (live) {
        h = entropy[t];
        s = sampled[t];
        a = argmax[t];
        nan_h = h != h;
        bad_s = s < 0 || s >= vocab;
        bad_a = a < 0 || a >= vocab;
        differs = history[t] != a;
        h_sh[t] = h;
    }
    // Every read of the history happens before the barriers below; it is written after them.
    const int run_prev = n > 0 ? history[n] : 0;
    unsigned err = params_bad ? SAMPLER_ERR_PARAMS : 0u;
    if (__syncthreads_or(nan_h)) err |= SAMPLER_ERR_NAN_ENTROPY;
    if (__syncthreads_or(bad_s)) err |= SAMPLER_ERR_SAMPLE;
    if (__syncthreads_or(bad_a)) err |= SAMPLER_ERR_ARGMAX;
    const int any_diff = __syncthreads_or(differs);

    // Rank of position t: ascending entropy, ties by position (a permutation when no H is NaN).
    if (live && err == 0) {
        int r = 0;
        for (int q = 0; q < n; ++q) {
            const float hq = h_sh[q];
            r += (hq < h) || (hq == h && q < t);
        }
        order[r] = t;
    }
    __syncthreads();

    // One thread: the sequential float32 cumsum and mean, the stopping rule, the status.
    const bool same = step != 0 && !any_diff;
    if (t == 0) {
        unsigned count = 0;
        if (err == 0) {
            float cum = 0.0f;
            for (int k = 0; k < n; ++k) {
                const int pos = order[k];
                const float hk = h_sh[pos];
                cum = add(cum, hk);
                const int ok = sub(cum, hk) <= bound;
                mask_sh[pos] = ok;
                count += (unsigned)ok;
            }
        } else {
            for (int k = 0; k < n; ++k) mask_sh[k] = 0;
        }
        float sum = 0.0f;
        for (int k = 0; k < n; ++k) sum = add(sum, h_sh[k]);
        const float mean = mul(sum, fdiv(1.0f, (float)n));
        const bool stable = stability == 0u || (same && (unsigned)run_prev >= stability);
        const bool finished = err == 0 && stable && mean < confidence;
        if (err == 0 && n > 0) {
            const unsigned prev = (unsigned)run_prev;
            history[n] = same ? (int)(prev >= (1u << 30) ? prev : prev + 1u) : 1;
        }
        status[SAMPLER_S_FINISHED] = finished ? 1u : 0u;
        status[SAMPLER_S_ACCEPTED] = err == 0 ? count : 0u;
        status[SAMPLER_S_MEAN_ENTROPY] = __float_as_uint(mean);
        status[SAMPLER_S_ERROR] = err;
    }
    __syncthreads();

    if (live) {
        const Philox4 w = philox4x32_10(0u, (unsigned)t, blk, (SAMPLER_TAG_RENOISE << 24) | step, k0, k1);
        const int renoise = (int)uniform_below(w.w[0], w.w[1], (unsigned)(vocab < 1 ? 1 : vocab));
        const int ok = mask_sh[t];
        next_canvas[t] = ok ? s : renoise;
        accepted[t] = ok;
        if (err == 0) history[t] = a;
    }
}

} // namespace dgemma
