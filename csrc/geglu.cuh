// geglu.cuh: the GeGLU product of an MLP, element-wise.
//
// CPU oracle: crates/dgemma-cpu/src/ops/activation.rs (geglu, gelu_tanh). Model-spec 3.1.
//
//   out[r, c] = bf16( bf16(gelu_tanh(gate[r, c])) * up[r, c] )
//
// gate and up are read with a row stride `in_stride`, so the same kernel serves separate gate/up
// buffers (stride = width) and a fused gate_up projection output (gate = base, up = base + width,
// stride = 2 * width). gelu_tanh runs in fp32 in the CPU's operation order (common.cuh); the only
// difference from the CPU is tanhf versus the host libm (a couple of fp32 ulps), which flips the
// first bf16 rounding rarely. Grid-stride loop over rows * width.
#pragma once
#include "common.cuh"

namespace dgemma {

template <int THREADS>
__device__ __forceinline__ void geglu(const bf16* gate, const bf16* up, int in_stride, bf16* out, int width, int rows)
{
    const long long total = (long long)rows * width;
    for (long long i = (long long)blockIdx.x * THREADS + threadIdx.x; i < total; i += (long long)gridDim.x * THREADS) {
        const long long r = i / width, c = i - r * width;
        const float g = f32(gate[r * in_stride + c]);
        const float u = f32(up[r * in_stride + c]);
        out[i] = to_bf16(mul(round_bf16(gelu_tanh(g)), u));
    }
}

} // namespace dgemma
