// grouped_gemm.cuh: the MoE expert GEMMs over the routed (token, slot) pairs grouped by expert,
// and the routing-weighted combine.
//
// CPU oracle: crates/dgemma-cpu/src/ops/moe.rs (experts_forward) with ops/linear.rs and
// ops/activation.rs. Model-spec 3.4 (transformers' default grouped_mm path).
//
// Routing input: pair p = t * top_k + j is token t's slot j; experts[p] is its expert and
// weights[p] its fp32 weight (the router's output, renormalised and times per_expert_scale).
// moe_sort.cuh groups the pairs: sorted[offsets[e] .. offsets[e + 1]] are expert e's pairs in
// ascending order, sorted[offsets[E] .. tokens * top_k] those with an expert id outside [0, E)
// (E = num_experts). Expert weights are one tensor [E, N, K], PyTorch layout (row n of expert e
// at (e * N + n) * K).
//
// Weight formats (template parameter W; codegen's GroupedGemm::weights):
//   WeightBf16: bf16 weights, used as they are.
//   WeightE4m3: FP8 E4M3 codes (fp8.cuh) with one fp32 scale per output row, w_scale[e * N + n]:
//               weight-only FP8. Each weight is dequantised while it is staged into shared memory,
//               W[e][n][k] = bf16(f32(code) * w_scale[e * N + n]) (one fp32 product, then the bf16
//               rounding of any weight of the bf16 model): exactly the CPU backend's FP8 expert
//               matrices (crates/dgemma-cpu/src/weights.rs, Fp8Matrix, bf16 mode), so everything
//               below, bit-identical dots included, holds for both formats.
//
// grouped_gemm_sorted<GEGLU = true> (gate_up projection + GeGLU), N = 2 * moe_width, gate rows
// first, K = hidden, input x [tokens, K] (row t = pair / top_k):
//   g = bf16(x[t] . W[e][c]);  u = bf16(x[t] . W[e][N/2 + c])          fp32 dot, bf16 store
//   out[p, c] = bf16( bf16(gelu_tanh(g)) * u )                          c < N/2, out [pairs, N/2]
// grouped_gemm_sorted<GEGLU = false> (down projection), N = hidden, K = moe_width, input
// act [pairs, K] (row p):
//   y[p, c] = bf16(act[p] . W[e][c])                                    y [pairs, N]
// moe_combine (the routing-weighted sum over the slots, y [pairs, N] in, out [tokens, N]):
//   out[t, c] = bf16( ((0 + y_0 * w_0) + y_1 * w_1) + ... )             fp32, slot order, like the CPU
// Every output is indexed by the ORIGINAL pair (token) order; the grouping only decides which
// block computes it. An expert id outside [0, E) writes NaN: the pair's GeGLU row and y row (the
// invalid bucket's block), and the token's combined row (moe_combine checks the ids itself).
//
// Rounding: every dot product is the CPU's `dot` (ops/linear.rs) step for step: eight fp32
// accumulators, lane l summing the products at k = 8 m + l in increasing m, then
// ((l0 + l4) + (l1 + l5)) + ((l2 + l6) + (l3 + l7)) + 0 (the empty tail: K % 8 == 0). A product
// of two bf16 is exact in fp32, so fmaf(a, b, acc) rounds exactly as the CPU's acc + a * b (the
// only exception, a product below fp32's normal range, does not occur with real activations),
// and the dots, hence g, u and y, are bit-identical to the CPU's. The element-wise steps are the
// CPU's IEEE operations too; only tanhf (in gelu) is the GPU's own (the emulator uses glibc's).
// Matching the CPU's order makes a whole-model run bit-identical to the CPU's up to the other
// kernels' orders (a different order flips a bf16 rounding now and then, and on long contexts
// the flips cascade); the backend runs grouped_gemm_mma.cuh instead for speed, and whole-model
// tests hold it to the float32 run as closely as the CPU's bf16 run is.
//
// Algorithm (SIMT fp32 FMAs with weight reuse; grouped_gemm_mma.cuh is the tensor-core version,
// same contract, the CPU's results up to the fp32 summation order):
// grid (E + 1, column tiles), ROWS = pairs per chunk, COLS = output columns per tile. Block
// (e, tile) loops over expert e's pairs in chunks of ROWS (the pair count is read from offsets
// on the device, so the grid does not depend on the routing and can be baked into a CUDA graph;
// an expert without pairs exits at once), and per chunk over K in steps of KT: the chunk's input
// rows [ROWS x KT] and the tile's weight rows [WROWS x KT] (WROWS = 2 * COLS for GeGLU: the gate
// rows and the matching up rows; COLS otherwise) are converted to fp32 in shared memory (the next
// step's global loads are issued before this step's FMAs), and each thread accumulates a 4 x 2
// register tile of 8-lane dots: pair slots ty + TY i (i < 4, TY = ROWS / 4) times weight rows
// tx + TX q (q < 2, TX = WROWS / 2); for GeGLU q = 0 is the gate row of column tx and q = 1 its
// up row, so the epilogue has g and u of a column in the same thread. Each weight element read
// from memory serves every pair of the chunk: an expert's weights are read once per ROWS pairs
// (once per layer for an expert with at most ROWS pairs), not once per pair. Groups of TY pair
// slots past the chunk's end skip their FMAs. Block (E, tile) writes NaN for the invalid bucket.
//
// The k past K in the last step (K % KT != 0, the tiny test models) are zero-filled: they add
// +0 to the lanes, which changes nothing but the sign of a lane that is exactly -0.
//
// Limits: K % 8 == 0 (16-byte loads of 8 bf16 or 8-byte loads of 8 e4m3 codes, the CPU dot without
// a tail; x / act and bf16 W must be 16-byte aligned, e4m3 W 8-byte and w_scale 4-byte aligned,
// checked by the plan functions), ROWS % 4 == 0, WROWS % 2 == 0, and
// (ROWS / 4) * (WROWS / 2) threads (codegen's GroupedGemm::validate). With ROWS 32 and 64 weight
// rows: 256 threads, 26 KiB of shared memory, about 140 registers per thread (ptxas, sm_90a and
// sm_120; no spills), so one block per SM at a time: occupancy is the first thing to tune on a GPU.
// The e4m3 kernels of the 26B shapes: 139-141 registers on sm_90a without spills; on sm_120 ptxas
// caps them at 128 with 8-24 bytes of spills (nvcc 13.0), plus 256 bytes of shared row scales.
#pragma once
#include "common.cuh"
#include "fp8.cuh"

namespace dgemma {

// Four fp32 values as one 16-byte shared-memory access (a float4 the CPU emulator also has).
struct alignas(16) F32x4 {
    float x, y, z, w;
};

// The 8 bf16 of a 16-byte word, widened to fp32 (exact), as two F32x4.
__device__ __forceinline__ void widen_bf16x8(const uint4& q, F32x4& lo, F32x4& hi)
{
    lo.x = __uint_as_float(q.x << 16);
    lo.y = __uint_as_float(q.x & 0xffff0000u);
    lo.z = __uint_as_float(q.y << 16);
    lo.w = __uint_as_float(q.y & 0xffff0000u);
    hi.x = __uint_as_float(q.z << 16);
    hi.y = __uint_as_float(q.z & 0xffff0000u);
    hi.z = __uint_as_float(q.w << 16);
    hi.w = __uint_as_float(q.w & 0xffff0000u);
}

// The expert weight formats (see the top of the file): the element type in memory, the vector
// of 8 weights read at once, its widening to fp32 and its eight bf16 weights as a 16-byte
// shared-memory chunk for the tensor-core kernels (`scale`: the row's scale, if any).
struct WeightBf16 {
    using T = bf16;
    using Vec = uint4;
    static constexpr bool SCALED = false;
    __device__ static __forceinline__ void widen(const Vec& q, float, F32x4& lo, F32x4& hi) { widen_bf16x8(q, lo, hi); }
    __device__ static __forceinline__ uint4 bf16x8(const Vec& q, float) { return q; }
};

struct WeightE4m3 {
    using T = e4m3;
    using Vec = uint2;
    static constexpr bool SCALED = true;
    __device__ static __forceinline__ void widen(const Vec& q, float scale, F32x4& lo, F32x4& hi)
    {
        lo.x = dequant_e4m3(q.x & 0xffu, scale);
        lo.y = dequant_e4m3((q.x >> 8) & 0xffu, scale);
        lo.z = dequant_e4m3((q.x >> 16) & 0xffu, scale);
        lo.w = dequant_e4m3(q.x >> 24, scale);
        hi.x = dequant_e4m3(q.y & 0xffu, scale);
        hi.y = dequant_e4m3((q.y >> 8) & 0xffu, scale);
        hi.z = dequant_e4m3((q.y >> 16) & 0xffu, scale);
        hi.w = dequant_e4m3(q.y >> 24, scale);
    }
    // Codes dequantised to bf16(f32(code) * scale) (dequant_e4m3 returns that bf16 value
    // widened, so its upper 16 bits are the bf16).
    __device__ static __forceinline__ uint4 bf16x8(const Vec& q, float scale)
    {
        auto pair = [&](unsigned w, int s) {
            const unsigned lo = __float_as_uint(dequant_e4m3((w >> s) & 0xffu, scale)) >> 16;
            const unsigned hi = __float_as_uint(dequant_e4m3((w >> (s + 8)) & 0xffu, scale)) >> 16;
            return lo | (hi << 16);
        };
        return uint4{pair(q.x, 0), pair(q.x, 16), pair(q.y, 0), pair(q.y, 16)};
    }
};

// acc[l] += a[l] * b[l] for the four lanes of a product group (lanes 0-3 or 4-7 of a dot).
__device__ __forceinline__ void fma4(float* acc, const F32x4& a, const F32x4& b)
{
    acc[0] = fmaf(a.x, b.x, acc[0]);
    acc[1] = fmaf(a.y, b.y, acc[1]);
    acc[2] = fmaf(a.z, b.z, acc[2]);
    acc[3] = fmaf(a.w, b.w, acc[3]);
}

// The CPU dot's final sum of its eight lanes (and its empty tail).
__device__ __forceinline__ float dot8_sum(const float (&l)[8])
{
    return add(add(add(add(l[0], l[4]), add(l[1], l[5])), add(add(l[2], l[6]), add(l[3], l[7]))), 0.0f);
}

// acc[i][q][lane] += xs[ty + TY i] * ws[tx + TX q] over one KT step, for the first NR pair groups
// i. kq (4 products) covers k = 8 m + 4 (kq % 2) + 0..3 of the step (KT % 8 == 0, steps start at
// multiples of 8): lanes 4 (kq % 2) + 0..3 of the CPU dot.
template <int NR, int KQ, int PAD_KQ, int TX, int TY>
__device__ __forceinline__ void grouped_tile_fma(float (&acc)[4][2][8], const F32x4 (*xs)[PAD_KQ],
                                                 const F32x4 (*ws)[PAD_KQ], int tx, int ty)
{
    static_assert(KQ % 2 == 0, "whole groups of 8 products");
#pragma unroll 1 // the body already has 32 independent FMA chains; unrolling only adds registers
    for (int kq = 0; kq < KQ; kq += 2) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const F32x4 b0 = ws[tx][kq + h], b1 = ws[tx + TX][kq + h];
#pragma unroll
            for (int i = 0; i < NR; ++i) {
                const F32x4 a = xs[ty + TY * i][kq + h];
                fma4(&acc[i][0][4 * h], a, b0);
                fma4(&acc[i][1][4 * h], a, b1);
            }
        }
    }
}

// The pairs block (e, tile) of a grouped GEMM serves: expert e's slice [begin, end) of `sorted`
// (e == num_experts: the bucket of ids outside [0, E)), clamped so that a corrupt offsets buffer
// can not send the block outside the buffers. False when the block has nothing to do.
__device__ __forceinline__ bool expert_pair_range(const int* offsets, int e, int num_experts, int pairs, int& begin,
                                                  int& end)
{
    if (e > num_experts) return false;
    begin = max(0, min(offsets[e], pairs));
    end = e < num_experts ? max(begin, min(offsets[e + 1], pairs)) : pairs;
    return begin < end;
}

// The invalid bucket's rows: NaN in output columns c0 .. c0 + cols (those below OUT_COLS) of the
// pairs sorted[begin .. end), the block's THREADS threads striding over them.
template <int OUT_COLS, int THREADS>
__device__ __forceinline__ void write_invalid_rows(bf16* out, const int* sorted, int begin, int end, int c0, int cols,
                                                   int tid)
{
    for (int i = tid; i < (end - begin) * cols; i += THREADS) {
        const int c = c0 + i % cols;
        if (c < OUT_COLS) out[(size_t)sorted[begin + i / cols] * OUT_COLS + c] = bf16_nan();
    }
}

// The start every grouped GEMM block (e = blockIdx.x, output columns c0 .. c0 + cols) makes:
// expert e's pair range [begin, end) of `sorted`. False when the block has nothing more to do:
// no pairs, a tile past the columns, or the invalid bucket, whose NaN rows it has just written.
template <int OUT_COLS, int THREADS>
__device__ __forceinline__ bool expert_block_pairs(const int* offsets, const int* sorted, bf16* out, int num_experts,
                                                   int pairs, int c0, int cols, int& begin, int& end)
{
    const int e = blockIdx.x;
    if (c0 >= OUT_COLS || !expert_pair_range(offsets, e, num_experts, pairs, begin, end)) return false;
    if (e == num_experts) { // expert ids out of range: NaN rows
        write_invalid_rows<OUT_COLS, THREADS>(out, sorted, begin, end, c0, cols, threadIdx.x);
        return false;
    }
    return true;
}

template <int N, int K, bool GEGLU, int ROWS, int COLS, typename W = WeightBf16>
__device__ __forceinline__ void grouped_gemm_sorted(const bf16* x, const int* sorted, const int* offsets,
                                                    const typename W::T* w, const float* w_scale, bf16* out,
                                                    int tokens, int top_k, int num_experts)
{
    static_assert(K % 8 == 0, "loads of 8 weights along K; the CPU dot's 8 lanes without a tail");
    static_assert(!GEGLU || N % 2 == 0, "gate rows then up rows");
    static_assert(ROWS % 4 == 0 && COLS % 2 == 0, "4 x 2 register tiles");
    constexpr int OUT_COLS = GEGLU ? N / 2 : N;     // output row width
    constexpr int WROWS = GEGLU ? 2 * COLS : COLS;  // weight rows of a tile
    constexpr int TY = ROWS / 4, TX = WROWS / 2;    // threads along pairs / weight rows
    constexpr int THREADS = TX * TY;
    static_assert(THREADS % 32 == 0 && THREADS <= 1024, "whole warps");
    constexpr int KT = K >= 64 ? 64 : 32;           // K step (zero-filled past K)
    constexpr int KQ = KT / 4, PAD_KQ = KQ + 1;     // F32x4 per row; +16 bytes against bank conflicts
    constexpr int XV = ROWS * KT / 8, WV = WROWS * KT / 8; // 16-byte loads per step
    constexpr int XL = (XV + THREADS - 1) / THREADS, WL = (WV + THREADS - 1) / THREADS;
    __shared__ F32x4 xs[ROWS][PAD_KQ];
    __shared__ F32x4 ws[WROWS][PAD_KQ];
    __shared__ int pair_s[ROWS]; // the chunk's pairs (-1 past its end)
    __shared__ int row_s[ROWS];  // their input rows
    __shared__ float wscale_s[W::SCALED ? WROWS : 1]; // the tile's weight rows' scales

    const int tid = threadIdx.x, tx = tid % TX, ty = tid / TX;
    const int e = blockIdx.x;
    const int c0 = blockIdx.y * COLS;
    const int pairs = tokens * top_k;
    // Expert e's pairs; none (or a tile past the columns): the whole block leaves at once.
    int begin, end;
    if (!expert_block_pairs<OUT_COLS, THREADS>(offsets, sorted, out, num_experts, pairs, c0, COLS, begin, end)) return;

    const typename W::T* we = w + (size_t)e * N * K;
    const int in_div = GEGLU ? top_k : 1; // GeGLU reads token rows, the down projection pair rows
    // Weight row of tile row j (-1: past the last column).
    auto weight_row = [&](int j) -> int {
        if (GEGLU) {
            const int c = c0 + (j < COLS ? j : j - COLS);
            return c < OUT_COLS ? (j < COLS ? c : OUT_COLS + c) : -1;
        }
        const int c = c0 + j;
        return c < N ? c : -1;
    };
    // The scales of the tile's weight rows, fixed for the block (0 past the last column, whose
    // codes are zero-filled); visible after the first chunk's barrier.
    if constexpr (W::SCALED) {
        for (int j = tid; j < WROWS; j += THREADS) {
            const int row = weight_row(j);
            wscale_s[j] = row >= 0 ? w_scale[(size_t)e * N + row] : 0.0f;
        }
    }
    auto row_scale = [&](int j) -> float {
        if constexpr (W::SCALED) return wscale_s[j];
        else return 1.0f;
    };

    for (int chunk = begin; chunk < end; chunk += ROWS) {
        const int n = min(ROWS, end - chunk);
        if (tid < ROWS) {
            const int p = tid < n ? sorted[chunk + tid] : -1;
            pair_s[tid] = p;
            row_s[tid] = p < 0 ? -1 : p / in_div;
        }
        __syncthreads();
        const int groups = (n + TY - 1) / TY; // pair groups i with a pair (block-uniform)

        uint4 px[XL];
        typename W::Vec pw[WL];
        auto load = [&](int k0) {
#pragma unroll
            for (int l = 0; l < XL; ++l) {
                const int v = tid + l * THREADS, r = v / (KT / 8), k = k0 + (v % (KT / 8)) * 8;
                px[l] = uint4{0, 0, 0, 0};
                if (v < XV && row_s[r] >= 0 && k < K)
                    px[l] = *reinterpret_cast<const uint4*>(x + (size_t)row_s[r] * K + k);
            }
#pragma unroll
            for (int l = 0; l < WL; ++l) {
                const int v = tid + l * THREADS, j = v / (KT / 8), k = k0 + (v % (KT / 8)) * 8;
                pw[l] = typename W::Vec{};
                if (v < WV) {
                    const int row = weight_row(j);
                    if (row >= 0 && k < K)
                        pw[l] = *reinterpret_cast<const typename W::Vec*>(we + (size_t)row * K + k);
                }
            }
        };

        float acc[4][2][8];
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
            for (int q = 0; q < 2; ++q)
#pragma unroll
                for (int l = 0; l < 8; ++l) acc[i][q][l] = 0.0f;
        load(0);
        for (int k0 = 0; k0 < K; k0 += KT) {
#pragma unroll
            for (int l = 0; l < XL; ++l) {
                const int v = tid + l * THREADS, r = v / (KT / 8), kv = (v % (KT / 8)) * 2;
                if (v < XV) widen_bf16x8(px[l], xs[r][kv], xs[r][kv + 1]);
            }
#pragma unroll
            for (int l = 0; l < WL; ++l) {
                const int v = tid + l * THREADS, j = v / (KT / 8), kv = (v % (KT / 8)) * 2;
                if (v < WV) W::widen(pw[l], row_scale(j), ws[j][kv], ws[j][kv + 1]);
            }
            __syncthreads();
            if (k0 + KT < K) load(k0 + KT); // in flight during the FMAs below
            switch (groups) {
            case 1: grouped_tile_fma<1, KQ, PAD_KQ, TX, TY>(acc, xs, ws, tx, ty); break;
            case 2: grouped_tile_fma<2, KQ, PAD_KQ, TX, TY>(acc, xs, ws, tx, ty); break;
            case 3: grouped_tile_fma<3, KQ, PAD_KQ, TX, TY>(acc, xs, ws, tx, ty); break;
            default: grouped_tile_fma<4, KQ, PAD_KQ, TX, TY>(acc, xs, ws, tx, ty); break;
            }
            __syncthreads();
        }

        // Epilogue, in the original pair order.
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const int p = pair_s[ty + TY * i];
            if (p < 0) continue;
            bf16* o = out + (size_t)p * OUT_COLS;
            if (GEGLU) {
                const int c = c0 + tx;
                if (c < OUT_COLS) {
                    const float g = round_bf16(dot8_sum(acc[i][0])), u = round_bf16(dot8_sum(acc[i][1]));
                    o[c] = to_bf16(mul(round_bf16(gelu_tanh(g)), u));
                }
            } else {
#pragma unroll
                for (int q = 0; q < 2; ++q) {
                    const int c = c0 + tx + TX * q;
                    if (c < N) o[c] = to_bf16(dot8_sum(acc[i][q]));
                }
            }
        }
        __syncthreads(); // pair_s is rewritten by the next chunk
    }
}

// out[t, c] = bf16(sum_j y[t * top_k + j, c] * weights[t * top_k + j]) in slot order (fp32), NaN
// if any of token t's expert ids is outside [0, num_experts). Grid (tokens, ceil(N / THREADS)).
template <int N, int THREADS>
__device__ __forceinline__ void moe_combine(const bf16* y, const int* experts, const float* weights, bf16* out,
                                            int tokens, int top_k, int num_experts)
{
    const int t = blockIdx.x;
    const int c = blockIdx.y * THREADS + threadIdx.x;
    if (t >= tokens || c >= N) return;
    float total = 0.0f;
    bool bad = false;
    for (int j = 0; j < top_k; ++j) {
        const int pair = t * top_k + j;
        const int e = experts[pair];
        if (e < 0 || e >= num_experts) {
            bad = true;
            continue;
        }
        total = add(total, mul(f32(y[(size_t)pair * N + c]), weights[pair]));
    }
    out[(size_t)t * N + c] = bad ? bf16_nan() : to_bf16(total);
}

} // namespace dgemma
