// rmsnorm.cuh: RMSNorm with DiffusionGemma's neighbouring element-wise ops fused in.
//
// CPU oracle: crates/dgemma-cpu/src/ops/norm.rs (rms_norm_row) and the add/scale steps of
// model.rs (add_rounded, finish_layer). Model-spec 3.1 / 3.2.
//
// Algorithm: one block per row of WIDTH elements. Each thread loads its ceil(WIDTH/THREADS)
// elements (strided, so loads coalesce) into registers, the block reduces the sum of squares,
// and each thread writes its elements. Two passes over registers, one over memory.
//
// Rounding points, in order (bf16 = round to nearest even):
//   in  = INPUT_ADD ? bf16(x + x_add) : x         the CPU stores d + e before the norm
//   ms  = sum(in^2) / WIDTH                        fp32; tree order here, sequential on the CPU
//   inv = 1 / sqrt(ms + eps)                       fp32; IEEE sqrt and division (CPU: powf(-0.5))
//   y   = bf16((in * inv) * w)   or bf16(in * inv) without a scale; the scale is w, not 1 + w
//   y   = RESIDUAL_ADD ? bf16(out + y) : y         `out` holds the residual stream h (in place)
//   y   = LAYER_SCALAR ? bf16(y * layer_scalar) : y
//   out = y
// The products after `inv` are exact IEEE ops (mul/add), so the only differences from the CPU
// come from the order of the sum of squares and from `inv` (each at most an fp32 ulp or so,
// which flips a bf16 rounding only rarely).
//
// Aliasing: `out` may be `x` (a per-head norm in place) or the residual; every element is read
// before the block-wide reduction and written after it.
#pragma once
#include "common.cuh"

namespace dgemma {

template <int WIDTH, int THREADS, bool HAS_SCALE, bool INPUT_ADD, bool RESIDUAL_ADD, bool LAYER_SCALAR>
__device__ __forceinline__ void rmsnorm(const bf16* x, const bf16* x_add, const bf16* weight, bf16* out,
                                        float eps, float layer_scalar, int rows)
{
    constexpr int PER = (WIDTH + THREADS - 1) / THREADS;
    __shared__ float scratch[32];
    const int row = blockIdx.x;
    if (row >= rows) return; // whole block leaves together
    const size_t base = (size_t)row * WIDTH;

    float v[PER];
    float sum_sq = 0.0f;
#pragma unroll
    for (int i = 0; i < PER; ++i) {
        const int c = threadIdx.x + i * THREADS;
        float a = 0.0f;
        if (c < WIDTH) {
            a = f32(x[base + c]);
            if (INPUT_ADD) a = round_bf16(add(a, f32(x_add[base + c])));
        }
        v[i] = a;
        sum_sq = fmaf(a, a, sum_sq);
    }
    const float mean_sq = block_sum<THREADS>(sum_sq, scratch) / (float)WIDTH;
    const float inv = 1.0f / sqrtf(mean_sq + eps);

#pragma unroll
    for (int i = 0; i < PER; ++i) {
        const int c = threadIdx.x + i * THREADS;
        if (c >= WIDTH) continue;
        float y = mul(v[i], inv);
        if (HAS_SCALE) y = mul(y, f32(weight[c]));
        y = round_bf16(y);
        if (RESIDUAL_ADD) y = round_bf16(add(f32(out[base + c]), y));
        if (LAYER_SCALAR) y = round_bf16(mul(y, layer_scalar));
        out[base + c] = to_bf16(y);
    }
}

} // namespace dgemma
