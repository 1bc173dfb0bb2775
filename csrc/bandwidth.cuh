// bandwidth.cuh: the HBM read-bandwidth probe (no model op).
//
// The floor of every memory-bound figure (crates/dgemma-gpu/src/bench.rs `read_bandwidth`,
// `floor.hbm_read_gbs`): how fast this device streams bytes it only reads. A device-to-device
// copy reads and writes, which is not what a weight-streaming step does.
//
//   for every thread t of the grid (stride S = gridDim.x * THREADS threads):
//       acc_t = XOR of the four 32-bit words of every 16-byte vector src[i], i = t, t + S, t + 2S, ...
//       if (acc_t == sentinel) out[0] = acc_t
//
// Each thread keeps UNROLL independent 16-byte loads in flight per iteration (then a tail loop),
// all coalesced across the warp. The fold makes every byte read live, and the conditional store
// keeps the compiler from dropping the loads; the caller picks a sentinel no thread's fold is
// expected to equal, so a timed run writes nothing. Threads that read nothing fold to 0, so the
// sentinel must not be 0 (ops.rs refuses it). The fold is order-independent, so the host can
// recompute every thread's value from the plan's grid (the kernel tests do, to check that each
// vector is read by the thread the grid-stride mapping assigns it and none past `vectors`).
//
// `src` must be 16-byte aligned (device allocations are; ops.rs checks views).
#pragma once
#include "common.cuh"

namespace dgemma {

template <int THREADS, int UNROLL>
__device__ __forceinline__ void read_bandwidth(const unsigned int* src, long long vectors, int sentinel,
                                               unsigned int* out)
{
    const uint4* __restrict__ v = reinterpret_cast<const uint4*>(src);
    const long long stride = (long long)gridDim.x * THREADS;
    long long i = (long long)blockIdx.x * THREADS + threadIdx.x;
    unsigned int acc = 0u;
    for (; i + (UNROLL - 1) * stride < vectors; i += UNROLL * stride) {
        uint4 r[UNROLL];
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) r[u] = v[i + u * stride];
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) acc ^= r[u].x ^ r[u].y ^ r[u].z ^ r[u].w;
    }
    for (; i < vectors; i += stride) {
        const uint4 r = v[i];
        acc ^= r.x ^ r.y ^ r.z ^ r.w;
    }
    if (acc == (unsigned int)sentinel) out[0] = acc;
}

} // namespace dgemma
