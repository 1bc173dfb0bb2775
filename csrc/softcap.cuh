// softcap.cuh: the final-logit soft cap.
//
// CPU oracle: crates/dgemma-cpu/src/ops/softmax.rs (softcap), applied in model.rs (denoise) to
// the LM head output. Model-spec 3.5.
//
//   out[i] = tanh(float32(logits[i]) / cap) * cap        fp32 in, fp32 out
//
// The logits arrive as bf16 (the LM head GEMM rounds) and leave as fp32, like transformers'
// `float32(logits)` before the cap. IEEE division and product; tanhf versus the host libm is the
// only difference (a couple of fp32 ulps). Grid-stride loop. The device sampler does not use it:
// its kernels recompute the capped value from the bf16 logits (common.cuh processed_logit, the
// same expression); only a host-sampled step reads fp32 logits back.
#pragma once
#include "common.cuh"

namespace dgemma {

template <int THREADS>
__device__ __forceinline__ void softcap(const bf16* logits, float* out, float cap, long long n)
{
    for (long long i = (long long)blockIdx.x * THREADS + threadIdx.x; i < n; i += (long long)gridDim.x * THREADS)
        out[i] = softcap_value(f32(logits[i]), cap);
}

} // namespace dgemma
