// fp8.cuh: FP8 E4M3 (OCP E4M3FN: bias 7, no infinities, 0x7f / 0xff NaN, largest finite 448)
// weight codes and their dequantisation, as integer bit manipulation so the GPU and the CPU
// emulator run the same code (no cuda_fp8.h intrinsics).
//
// CPU oracle: crates/dgemma-model/src/fp8.rs (decode, dequantize_row) and the CPU backend's FP8
// expert matrices (crates/dgemma-cpu/src/weights.rs, Fp8Matrix): a weight is f32(code) * scale of
// its output row, one float32 product, then rounded to bf16 like every weight of the bf16 model.
#pragma once
#include "common.cuh"

namespace dgemma {

// One e4m3 code (a byte in memory; the kernels read them 8 at a time).
using e4m3 = unsigned char;

// The float32 value of an e4m3 code (exact): subnormals m * 2^-9, normals 2^(e - 7) (1 + m / 8)
// with the float32 exponent e + 120 and the 3 mantissa bits at the top of float32's 23.
__device__ __forceinline__ float e4m3_to_f32(unsigned int code)
{
    const unsigned int em = code & 0x7fu;
    const unsigned int sign = (code & 0x80u) << 24;
    if (em == 0x7fu) return __uint_as_float(sign | 0x7fc00000u);
    const float magnitude = em < 8u ? mul((float)em, 1.0f / 512.0f) : __uint_as_float((em << 20) + (120u << 23));
    return __uint_as_float(__float_as_uint(magnitude) | sign);
}

// The weight of `code` in a row of scale `scale`, as the bf16 model holds it:
// bf16(f32(code) * scale).
__device__ __forceinline__ float dequant_e4m3(unsigned int code, float scale)
{
    return round_bf16(mul(e4m3_to_f32(code), scale));
}

} // namespace dgemma
