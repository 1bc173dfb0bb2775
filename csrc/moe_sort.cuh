// moe_sort.cuh: the MoE routing sort. Groups the routed (token, slot) pairs by expert, on the
// device, so that the expert GEMMs (grouped_gemm.cuh) read each expert's weights once per tile
// of its pairs instead of once per pair.
//
// CPU oracle: the pair lists of crates/dgemma-cpu/src/ops/moe.rs (experts_forward):
// `pairs(e) = (0..tokens * top_k).filter(|i| experts[i] == e)`, ascending pair index, experts in
// ascending order. The tests check the result exactly.
//
// Input: experts[p], p < pairs (= tokens * top_k; the router's output, pair p = token p / top_k,
// slot p % top_k). Key of a pair: its expert e if 0 <= e < EXPERTS, else EXPERTS (the "invalid"
// bucket: the GEMMs write NaN for those pairs, the contract of an out-of-range expert id).
// Outputs:
//   offsets[e]   = number of pairs with a key < e, e = 0..=EXPERTS (exclusive prefix sum of the
//                  per-expert counts; offsets[EXPERTS] = number of valid pairs, so the invalid
//                  bucket is sorted[offsets[EXPERTS] .. pairs])
//   sorted[i]    = the pair indices grouped by key, ascending pair index within a key (a stable
//                  counting sort: the result is a pure function of `experts`, no atomics)
//
// Algorithm: one block of THREADS threads. The pairs are cut into THREADS contiguous slices,
// thread s owning slice s. hist[key][s] (shared memory, KEYS x THREADS ints) counts slice s's
// pairs of each key: every counter has one writer, so no atomics are needed and the order is
// deterministic. An exclusive scan of hist in (key, slice) order turns each counter into the
// first output index of that slice's pairs of that key: a key's pairs of slice 0 come first,
// then those of slice 1, ..., which, with each thread walking its slice in order, is ascending
// pair order. Scan: each thread sums a contiguous run of KEYS counters, a Hillis-Steele scan over
// the THREADS run sums (shared memory), then each thread rewrites its run. Finally every thread
// walks its slice again and scatters each pair to hist[key][s]++.
//
// Cost: two passes of ceil(pairs / THREADS) pairs per thread plus the (KEYS x THREADS)-counter
// scan: for the 26B model (128 experts, 64 threads) and a 256-token canvas (2048 pairs), 32 pairs
// per thread. Limit: pairs <= MOE_SORT_MAX_PAIRS (65536), checked by the plan function
// (dgemma-cuda ops.rs plan_moe_sort): beyond it the serial walk of one slice (1024 pairs)
// dominates and the sort should be split over blocks. Shared memory: 4 * KEYS * THREADS bytes
// (at most 40 KiB, codegen's MoeSort::validate).
#pragma once
#include "common.cuh"

namespace dgemma {

constexpr int MOE_SORT_MAX_PAIRS = 65536;

// The bucket of expert id e: e itself, or EXPERTS for an id outside [0, EXPERTS).
template <int EXPERTS>
__device__ __forceinline__ int moe_sort_key(int e)
{
    return (unsigned)e < (unsigned)EXPERTS ? e : EXPERTS;
}

template <int EXPERTS, int THREADS>
__device__ __forceinline__ void moe_sort(const int* experts, int* offsets, int* sorted, int pairs)
{
    static_assert(THREADS % 32 == 0 && THREADS >= 32, "whole warps");
    constexpr int KEYS = EXPERTS + 1; // bucket EXPERTS: invalid expert ids
    __shared__ int hist[KEYS * THREADS]; // hist[key * THREADS + slice]
    __shared__ int part[THREADS];        // the run sums, then their exclusive prefix sums
    const int s = threadIdx.x;
    const int chunk = (pairs + THREADS - 1) / THREADS;
    const int begin = min(s * chunk, pairs), end = min(begin + chunk, pairs);

    // 1. Per-slice counts.
    for (int i = s; i < KEYS * THREADS; i += THREADS) hist[i] = 0;
    __syncthreads();
    for (int p = begin; p < end; ++p) hist[moe_sort_key<EXPERTS>(experts[p]) * THREADS + s] += 1;
    __syncthreads();

    // 2. Exclusive scan of hist in (key, slice) order: thread s owns counters [s * KEYS, (s + 1) * KEYS).
    int run = 0;
#pragma unroll 8
    for (int i = 0; i < KEYS; ++i) run += hist[s * KEYS + i];
    part[s] = run;
    __syncthreads();
    for (int d = 1; d < THREADS; d <<= 1) { // Hillis-Steele: part[s] = sum of part[0..=s]
        const int v = s >= d ? part[s - d] : 0;
        __syncthreads();
        part[s] += v;
        __syncthreads();
    }
    int base = part[s] - run; // exclusive
#pragma unroll 8
    for (int i = 0; i < KEYS; ++i) {
        const int c = hist[s * KEYS + i];
        hist[s * KEYS + i] = base;
        base += c;
    }
    __syncthreads();
    for (int key = s; key < KEYS; key += THREADS) offsets[key] = hist[key * THREADS]; // slice 0's start
    __syncthreads(); // slice 0's counters move on below

    // 3. Stable scatter: each slice walks its pairs in order.
    for (int p = begin; p < end; ++p) {
        int& at = hist[moe_sort_key<EXPERTS>(experts[p]) * THREADS + s];
        sorted[at] = p;
        at += 1;
    }
}

} // namespace dgemma
