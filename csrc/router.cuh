// router.cuh: the MoE router, norm to routing weights in one kernel (one block per token).
//
// CPU oracle: crates/dgemma-cpu/src/ops/moe.rs (route), with ops/norm.rs (rms_norm_row),
// ops/linear.rs (dot), ops/softmax.rs (softmax_row) and ops/topk.rs (topk_torch_cpu).
// Model-spec 3.4.
//
//   x       = h[t]                                              bf16 row of HIDDEN
//   ms      = (sum_c x_c * x_c) / HIDDEN                        fp32, sequential in c (as the CPU)
//   inv     = (ms + eps)^-0.5                                   see below
//   r_c     = bf16( bf16( bf16(x_c * inv) * scale_c ) * root )  root = hidden^-0.5 from the host
//   logit_e = bf16( dot(r, proj[e]) )                           fp32, the CPU's 8-lane order
//   m       = max_e logit_e                                     NaN ignored (f32::max / fmaxf)
//   p_e     = exp(logit_e - m) * (1 / sum)                      sum in softmax_row's 16-lane order
//   e_0..e_{K-1} = topk(p)                                      torch's CPU topk order, ties too
//   s       = ((p[e_0] + p[e_1]) + ...)                         fp32, slot order
//   experts[t, j] = e_j;  weights[t, j] = (p[e_j] / s) * per_expert_scale[e_j]
//
// Every step above is the CPU's float32 operation in the CPU's order, so the routing is meant to
// be bit-identical to `route`, not merely close: a flipped bf16 rounding of one logit can move a
// token to another expert, and the CPU topk exists precisely so that ties break as torch's do.
// That costs some parallelism, deliberately (the router is a small share of a layer):
// * the sum of squares is one thread's sequential loop over the row (Rust's `.sum()`);
// * each logit is computed by 8 threads, thread i summing products 8j + i in order (the CPU's
//   `dot` accumulators acc[i]), combined ((a0+a4)+(a1+a5)) + ((a2+a6)+(a3+a7)), then + the
//   sequential tail (HIDDEN % 8 products);
// * the softmax denominator is one thread's 16-lane sum; the top-k is one thread running the
//   libstdc++ algorithms (std::nth_element's introselect, insertion sort, heap select) that
//   torch's CPU kernel runs, on (value, index) pairs in shared memory.
// Products and sums use mul()/add() (never contracted into FMAs). The remaining differences:
// inv is computed as float(1 / sqrt(double(ms + eps))), the correctly rounded value, where the CPU
// calls glibc's powf(x, -0.5) (which agrees in all but ~0.06% of inputs; a 1-ulp difference of
// inv then flips a bf16 rounding of r only rarely); and the GPU's expf is within 2 ulp of glibc's
// (the emulator uses glibc's), so on a GPU the weights agree to a few float32 ulps, and the
// expert order could only differ between probabilities a few ulps apart whose logits differ.
//
// NaN: a row with NaN (or an overflowing sum of squares) gives NaN logits and NaN
// probabilities; the top-k then orders them exactly as the CPU's comparator does (NaN counts as
// largest, NaNs tie) and the weights are NaN.
#pragma once
#include "common.cuh"

namespace dgemma {

// (value, index) pair of the top-k, and torch's comparator `a > b` with NaN largest.
struct TopkPair {
    float v;
    int i;
};

__device__ __forceinline__ bool topk_gt(const TopkPair& x, const TopkPair& y)
{
    return (x.v != x.v && y.v == y.v) || x.v > y.v;
}

__device__ __forceinline__ void topk_swap(TopkPair* q, int a, int b)
{
    const TopkPair t = q[a];
    q[a] = q[b];
    q[b] = t;
}

// libstdc++ std::__insertion_sort (with std::__unguarded_linear_insert) on q[first, last).
__device__ inline void topk_insertion_sort(TopkPair* q, int first, int last)
{
    for (int i = first + 1; i < last; ++i) {
        const TopkPair val = q[i];
        if (topk_gt(val, q[first])) {
            for (int j = i; j > first; --j) q[j] = q[j - 1]; // std::move_backward
            q[first] = val;
        } else {
            int j = i;
            while (topk_gt(val, q[j - 1])) {
                q[j] = q[j - 1];
                --j;
            }
            q[j] = val;
        }
    }
}

// libstdc++ std::__adjust_heap followed by std::__push_heap, on the heap q[first, first + len).
__device__ inline void topk_adjust_heap(TopkPair* q, int first, int hole, int len, TopkPair value)
{
    const int top = hole;
    int child = hole;
    while (child < (len - 1) / 2) {
        child = 2 * (child + 1);
        if (topk_gt(q[first + child], q[first + child - 1])) child--;
        q[first + hole] = q[first + child];
        hole = child;
    }
    if (len % 2 == 0 && child == (len - 2) / 2) {
        child = 2 * (child + 1);
        q[first + hole] = q[first + child - 1];
        hole = child - 1;
    }
    int parent = (hole - 1) / 2;
    while (hole > top && topk_gt(q[first + parent], value)) {
        q[first + hole] = q[first + parent];
        hole = parent;
        parent = (hole - 1) / 2;
    }
    q[first + hole] = value;
}

// libstdc++ std::__heap_select(first, middle, last).
__device__ inline void topk_heap_select(TopkPair* q, int first, int middle, int last)
{
    const int len = middle - first;
    if (len >= 2) { // std::__make_heap
        for (int parent = (len - 2) / 2;; --parent) {
            topk_adjust_heap(q, first, parent, len, q[first + parent]);
            if (parent == 0) break;
        }
    }
    for (int i = middle; i < last; ++i) {
        if (topk_gt(q[i], q[first])) { // std::__pop_heap(first, middle, i)
            const TopkPair value = q[i];
            q[i] = q[first];
            topk_adjust_heap(q, first, 0, len, value);
        }
    }
}

// libstdc++ std::__move_median_to_first + std::__unguarded_partition; returns the cut.
__device__ inline int topk_partition_pivot(TopkPair* q, int first, int last)
{
    const int mid = first + (last - first) / 2;
    const int a = first + 1, b = mid, c = last - 1;
    int median;
    if (topk_gt(q[a], q[b])) {
        if (topk_gt(q[b], q[c])) median = b;
        else if (topk_gt(q[a], q[c])) median = c;
        else median = a;
    } else if (topk_gt(q[a], q[c])) median = a;
    else if (topk_gt(q[b], q[c])) median = c;
    else median = b;
    topk_swap(q, first, median);
    const int pivot = first;
    int lo = first + 1, hi = last;
    for (;;) {
        while (topk_gt(q[lo], q[pivot])) lo++;
        hi--;
        while (topk_gt(q[pivot], q[hi])) hi--;
        if (lo >= hi) return lo;
        topk_swap(q, lo, hi);
        lo++;
    }
}

// libstdc++ std::__introselect(q, q + nth, q + n) with depth limit 2 * floor(log2(n)).
__device__ inline void topk_nth_element(TopkPair* q, int n, int nth)
{
    int first = 0, last = n;
    if (first == last || nth == last) return;
    int lg = 0;
    while ((n >> (lg + 1)) != 0) lg++;
    int depth = 2 * lg;
    while (last - first > 3) {
        if (depth == 0) {
            topk_heap_select(q, first, nth + 1, last);
            topk_swap(q, first, nth);
            return;
        }
        depth--;
        const int cut = topk_partition_pivot(q, first, last);
        if (cut <= nth) first = cut;
        else last = cut;
    }
    topk_insertion_sort(q, first, last);
}

// torch.topk(largest=True, sorted=True) on the CPU, as dgemma-cpu's topk_torch_cpu: q[0, k)
// holds the result afterwards. For k * 64 <= n torch runs std::partial_sort, which the CPU
// oracle replaces by a sort with lower indices first among equals (no router shape gets there);
// the same order is produced here by selection.
__device__ inline void topk_torch_cpu(TopkPair* q, int n, int k)
{
    if (k * 64 <= n) {
        for (int j = 0; j < k; ++j) {
            int best = j;
            for (int i = j + 1; i < n; ++i) {
                const bool before = topk_gt(q[i], q[best]) || (!topk_gt(q[best], q[i]) && q[i].i < q[best].i);
                if (before) best = i;
            }
            topk_swap(q, j, best);
        }
    } else {
        topk_nth_element(q, n, k - 1);
        topk_insertion_sort(q, 0, k - 1);
    }
}

template <int HIDDEN, int EXPERTS, int TOP_K, int THREADS>
__device__ __forceinline__ void router(const bf16* h, const bf16* scale, const bf16* proj,
                                       const bf16* per_expert_scale, int* experts, float* weights, float eps,
                                       float root, int tokens)
{
    static_assert(THREADS % 32 == 0, "whole warps");
    static_assert(TOP_K >= 1 && TOP_K <= EXPERTS, "top_k in 1..=experts");
    constexpr int MAIN = HIDDEN / 8 * 8; // the CPU dot's 8-lane part; the rest is its tail
    constexpr int GROUPS = THREADS / 8;  // experts whose logits are computed at once
    constexpr int LANES = 16;            // softmax_row's lanes
    __shared__ float r[HIDDEN];
    __shared__ float p[EXPERTS]; // logits, then exp(logit - m), then probabilities
    __shared__ TopkPair q[EXPERTS];
    __shared__ float inv_s, m_s, inv_sum_s;
    const int t = blockIdx.x;
    if (t >= tokens) return; // whole block leaves together
    const bf16* x = h + (size_t)t * HIDDEN;

    // 1. RMSNorm without scale (rms_norm_row), then the router's scale and root.
    for (int c = threadIdx.x; c < HIDDEN; c += THREADS) r[c] = f32(x[c]);
    __syncthreads();
    if (threadIdx.x == 0) {
        float ss = 0.0f;
        for (int c = 0; c < HIDDEN; ++c) ss = add(ss, mul(r[c], r[c]));
        const float mean_sq = fdiv(ss, (float)HIDDEN);
        inv_s = (float)(1.0 / sqrt((double)add(mean_sq, eps)));
    }
    __syncthreads();
    const float inv = inv_s;
    for (int c = threadIdx.x; c < HIDDEN; c += THREADS) {
        const float n = round_bf16(mul(r[c], inv));
        r[c] = round_bf16(mul(round_bf16(mul(n, f32(scale[c]))), root));
    }
    __syncthreads();

    // 2. logits: 8 threads per expert in the CPU dot's order. The loop bound is uniform, so the
    // shuffles see every lane of the warp.
    const int li = threadIdx.x & 7;
    for (int e0 = 0; e0 < EXPERTS; e0 += GROUPS) {
        const int e = e0 + (int)(threadIdx.x >> 3);
        const bf16* w = proj + (size_t)(e < EXPERTS ? e : 0) * HIDDEN;
        float a = 0.0f;
        if (e < EXPERTS)
            for (int c = li; c < MAIN; c += 8) a = add(a, mul(r[c], f32(w[c])));
        a = add(a, __shfl_xor_sync(0xffffffffu, a, 4)); // a_i + a_{i+4}
        a = add(a, __shfl_xor_sync(0xffffffffu, a, 1)); // (a0+a4) + (a1+a5), (a2+a6) + (a3+a7)
        a = add(a, __shfl_xor_sync(0xffffffffu, a, 2)); // the two halves
        if (li == 0 && e < EXPERTS) {
            float tail = 0.0f;
            for (int c = MAIN; c < HIDDEN; ++c) tail = add(tail, mul(r[c], f32(w[c])));
            p[e] = round_bf16(add(a, tail));
        }
    }
    __syncthreads();

    // 3. softmax_row: max, exponentials, the 16-lane sum, times 1/sum.
    if (threadIdx.x == 0) {
        float m = -f32_inf();
        for (int e = 0; e < EXPERTS; ++e) m = fmaxf(m, p[e]);
        m_s = m;
    }
    __syncthreads();
    const float m = m_s;
    for (int e = threadIdx.x; e < EXPERTS; e += THREADS) p[e] = expf(p[e] - m);
    __syncthreads();
    if (threadIdx.x == 0) {
        float lanes[LANES];
        for (int l = 0; l < LANES; ++l) lanes[l] = 0.0f;
        constexpr int WHOLE = EXPERTS / LANES * LANES;
        for (int e = 0; e < WHOLE; ++e) lanes[e % LANES] = add(lanes[e % LANES], p[e]);
        for (int width = LANES / 2; width >= 1; width /= 2)
            for (int l = 0; l < width; ++l) lanes[l] = add(lanes[l], lanes[l + width]);
        float sum = lanes[0];
        for (int e = WHOLE; e < EXPERTS; ++e) sum = add(sum, p[e]);
        inv_sum_s = fdiv(1.0f, sum);
    }
    __syncthreads();
    const float inv_sum = inv_sum_s;
    for (int e = threadIdx.x; e < EXPERTS; e += THREADS) {
        p[e] = mul(p[e], inv_sum);
        q[e] = TopkPair{p[e], e};
    }
    __syncthreads();

    // 4. top-k, renormalisation and the per-expert scale (one thread: k is small).
    if (threadIdx.x == 0) {
        topk_torch_cpu(q, EXPERTS, TOP_K);
        float s = 0.0f;
        for (int j = 0; j < TOP_K; ++j) s = add(s, q[j].v);
        for (int j = 0; j < TOP_K; ++j) {
            const int e = q[j].i;
            experts[(size_t)t * TOP_K + j] = e;
            weights[(size_t)t * TOP_K + j] = mul(fdiv(q[j].v, s), f32(per_expert_scale[e]));
        }
    }
}

} // namespace dgemma
