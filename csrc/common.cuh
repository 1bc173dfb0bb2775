// common.cuh: the few helpers every dgemma kernel template shares.
//
// Numeric contract (the CPU oracle is crates/dgemma-cpu, bf16 mode; see its precision.rs):
// tensors live in memory as bfloat16, all arithmetic is float32, and a value is rounded to
// bf16 (round to nearest, ties to even: __float2bfloat16_rn, the same as half::bf16::from_f32)
// exactly where transformers' bf16 run stores a tensor. Where the CPU rounds each product on its
// own, the templates use mul()/add() below: __fmul_rn/__fadd_rn are never contracted into an FMA
// by nvcc, so such element-wise steps are bit-identical to the CPU. Reductions (sums of squares,
// dot products, softmax denominators) run in a different order than the CPU's loops, so their
// fp32 results differ in the last bits; the tests compare those within a bf16 ulp or two.
//
// Arch guards: DGEMMA_ARCH_SM90A is 1 only while compiling the sm_90a image (Hopper features:
// wgmma, setmaxnreg, TMA multicast); DGEMMA_ARCH_SM120 is 1 for the sm_120 image and the
// compute_120 PTX. Generated arch-specific kernels put their body under one of these and trap
// elsewhere (codegen/src/emit.rs); Hopper-only instructions must never appear outside
// `#if DGEMMA_ARCH_SM90A`.
#pragma once

#include <cuda_bf16.h>

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define DGEMMA_ARCH_SM90A 1
#else
#define DGEMMA_ARCH_SM90A 0
#endif

#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 1200)
#define DGEMMA_ARCH_SM120 1
#else
#define DGEMMA_ARCH_SM120 0
#endif

namespace dgemma {

using bf16 = __nv_bfloat16;

// ---------------------------------------------------------------------------------------------
// Conversions and exact element-wise arithmetic

__device__ __forceinline__ float f32(bf16 x) { return __bfloat162float(x); }
__device__ __forceinline__ bf16 to_bf16(float x) { return __float2bfloat16_rn(x); }
// x rounded to bf16 and widened back: the CPU's `round(x, Precision::Bf16)`.
__device__ __forceinline__ float round_bf16(float x) { return __bfloat162float(__float2bfloat16_rn(x)); }
// IEEE float32 product / sum / quotient, never fused with a neighbouring op.
__device__ __forceinline__ float mul(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ float add(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ float fdiv(float a, float b) { return __fdiv_rn(a, b); }

__device__ __forceinline__ float f32_inf() { return __int_as_float(0x7f800000); }
__device__ __forceinline__ float f32_nan() { return __int_as_float(0x7fc00000); }
__device__ __forceinline__ bf16 bf16_nan() { return __ushort_as_bfloat16((unsigned short)0x7fc0); }

// The final-logit soft cap, tanh(x / cap) * cap (model-spec 3.5): the softcap kernel and every
// kernel that recomputes a processed logit from the LM head's bf16 output use this one
// expression, so their values are bit-identical.
__device__ __forceinline__ float softcap_value(float x, float cap) { return mul(tanhf(fdiv(x, cap)), cap); }

// gelu with the tanh approximation, in the CPU's operation order
// (ops/activation.rs: inner = sqrt(2/pi) * (x + 0.044715 * x * x * x); 0.5 * x * (1 + tanh(inner))).
// tanhf differs from the host libm by at most a couple of float32 ulps.
__device__ __forceinline__ float gelu_tanh(float x)
{
    const float sqrt_2_over_pi = 0.7978845608028654f;
    const float kappa = 0.044715f;
    const float cube = mul(mul(mul(kappa, x), x), x);
    const float inner = mul(sqrt_2_over_pi, add(x, cube));
    return mul(mul(0.5f, x), add(1.0f, tanhf(inner)));
}

// ---------------------------------------------------------------------------------------------
// Reductions. Every thread of the warp / block must call them; every thread gets the result.

__device__ __forceinline__ float warp_sum(float v)
{
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v)
{
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// `scratch`: 32 floats of shared memory, free for the duration of the call.
template <int THREADS>
__device__ __forceinline__ float block_sum(float v, float* scratch)
{
    constexpr int WARPS = THREADS / 32;
    v = warp_sum(v);
    if (WARPS == 1) return v;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    __syncthreads(); // a previous reduction may still be reading scratch
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    return warp_sum(lane < WARPS ? scratch[lane] : 0.0f);
}

template <int THREADS>
__device__ __forceinline__ float block_max(float v, float* scratch)
{
    constexpr int WARPS = THREADS / 32;
    v = warp_max(v);
    if (WARPS == 1) return v;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    return warp_max(lane < WARPS ? scratch[lane] : -f32_inf());
}

// Maximum and the FIRST index holding it (torch.argmax semantics). Lanes with no candidate pass
// (-inf, INT_MAX). `vs`, `is`: 32 floats / ints of shared memory.
template <int THREADS>
__device__ __forceinline__ void block_argmax(float& v, int& i, float* vs, int* is)
{
    constexpr int WARPS = THREADS / 32;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const float ov = __shfl_xor_sync(0xffffffffu, v, o);
        const int oi = __shfl_xor_sync(0xffffffffu, i, o);
        if (ov > v || (ov == v && oi < i)) { v = ov; i = oi; }
    }
    if (WARPS == 1) return;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    __syncthreads();
    if (lane == 0) { vs[warp] = v; is[warp] = i; }
    __syncthreads();
    v = lane < WARPS ? vs[lane] : -f32_inf();
    i = lane < WARPS ? is[lane] : 0x7fffffff;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const float ov = __shfl_xor_sync(0xffffffffu, v, o);
        const int oi = __shfl_xor_sync(0xffffffffu, i, o);
        if (ov > v || (ov == v && oi < i)) { v = ov; i = oi; }
    }
}

// The sampler params buffer (8 x 32-bit words in device memory, written by the host before each
// denoising step; ops.rs `SamplerParams`). Kernels read per-step values from it, so one captured
// graph serves every step. Layout documented in sampler.cuh.
constexpr int SAMPLER_P_SEED_LO = 0;
constexpr int SAMPLER_P_SEED_HI = 1;
constexpr int SAMPLER_P_BLOCK = 2;
constexpr int SAMPLER_P_STEP = 3;
constexpr int SAMPLER_P_TEMPERATURE = 4;
constexpr int SAMPLER_P_ENTROPY_BOUND = 5;
constexpr int SAMPLER_P_CONFIDENCE = 6;
constexpr int SAMPLER_P_STABILITY = 7;

// The processed logit P = softcap(x) / T of one LM-head output x (bf16), the value the sampler
// and the next step's self-conditioning see (model-spec 4.2): T is read from the params buffer
// (null: T = 1), cap <= 0 means no soft cap (the host's self-conditioning logits arrive as bf16
// P already, so cap 0 and T 1 give them back exactly).
__device__ __forceinline__ float sampler_temperature(const unsigned int* params)
{
    return params ? __uint_as_float(params[SAMPLER_P_TEMPERATURE]) : 1.0f;
}
__device__ __forceinline__ float processed_logit(bf16 x, float cap, float temperature)
{
    const float l = cap > 0.0f ? softcap_value(f32(x), cap) : f32(x);
    return fdiv(l, temperature);
}

// Body of an arch-specific kernel launched on the wrong arch: fail loudly (the launch returns
// CUDA_ERROR_LAUNCH_FAILED / an illegal-instruction error) rather than compute garbage.
__device__ __noinline__ void trap_wrong_arch() { __trap(); }

// The block's dynamic shared memory (the launch's `sharedMemBytes`: codegen's
// KernelSpec::dynamic_shared_bytes, which the launcher also raises the kernel's limit to), 1 KiB
// aligned. One declaration for every kernel of the translation unit, as CUDA requires.
#ifdef DGEMMA_EMULATOR
__device__ __forceinline__ unsigned char* dynamic_smem() { return emu::dynamic_smem(); }
#else
extern __shared__ __align__(1024) unsigned char dgemma_dynamic_smem[];
__device__ __forceinline__ unsigned char* dynamic_smem() { return dgemma_dynamic_smem; }
#endif

} // namespace dgemma
