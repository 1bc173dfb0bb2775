// softcap.cuh: the final-logit soft cap.
//
// CPU oracle: crates/dgemma-cpu/src/ops/softmax.rs (softcap), applied in model.rs (denoise) to
// the LM head output. Model-spec 3.5.
//
//   out[i] = tanh(float32(logits[i]) / cap) * cap        fp32 in, fp32 out
//
// The logits arrive as bf16 (the LM head GEMM rounds) and leave as fp32, like transformers'
// `float32(logits)` before the cap. IEEE division and product; tanhf versus the host libm is the
// only difference (a couple of fp32 ulps). Grid-stride loop.
#pragma once
#include "common.cuh"

namespace dgemma {

template <int THREADS>
__device__ __forceinline__ void softcap(const bf16* logits, float* out, float cap, long long n)
{
    for (long long i = (long long)blockIdx.x * THREADS + threadIdx.x; i < n; i += (long long)gridDim.x * THREADS)
        out[i] = mul(tanhf(fdiv(f32(logits[i]), cap)), cap);
}

} // namespace dgemma
