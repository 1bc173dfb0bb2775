// embedding.cuh: token embedding lookup with the Gemma scale.
//
// CPU oracle: crates/dgemma-cpu/src/model.rs (embed). Model-spec 3.1.
//
//   out[t, c] = bf16( E[ids[t], c] * scale )
//
// `scale` is bf16(sqrt(hidden)) (53.0 for hidden 2816), passed as a float holding a bf16 value;
// E is bf16, so the product is exact in fp32 and the single rounding matches the CPU bit for bit.
// One block per token, threads stride over the row. An id outside [0, vocab) fills the row with
// NaN instead of reading out of bounds.
#pragma once
#include "common.cuh"

namespace dgemma {

template <int HIDDEN, int THREADS>
__device__ __forceinline__ void embedding(const int* ids, const bf16* table, bf16* out, float scale, int tokens,
                                          int vocab)
{
    const int t = blockIdx.x;
    if (t >= tokens) return;
    bf16* o = out + (size_t)t * HIDDEN;
    const int id = ids[t];
    if (id < 0 || id >= vocab) {
        for (int c = threadIdx.x; c < HIDDEN; c += THREADS) o[c] = bf16_nan();
        return;
    }
    const bf16* e = table + (size_t)id * HIDDEN;
    for (int c = threadIdx.x; c < HIDDEN; c += THREADS) o[c] = to_bf16(mul(f32(e[c]), scale));
}

} // namespace dgemma
