// grouped_gemm_wgmma.cuh: the MoE expert GEMMs on Hopper's warpgroup tensor cores (wgmma, sm_90a
// only), fed by a multi-stage cp.async pipeline. Same contract as grouped_gemm_mma
// (grouped_gemm_mma.cuh: the routing input, both epilogues, the NaN rows of invalid expert ids,
// the rounding points, both weight formats): codegen's GroupedGemm with GemmEngine::Wgmma, the
// kernel the backend launches on sm_90a (codegen/src/shapes.rs, grouped_gemm_spec_for).
//
// CPU oracle: crates/dgemma-cpu/src/ops/moe.rs (experts_forward) with ops/linear.rs and
// ops/activation.rs. Model-spec 3.4.
//
// Numerics are the mma kernel's: exact bf16 products summed in fp32 by the tensor cores in their
// own order, g, u and y rounded to bf16 once, e4m3 weights dequantised to bf16(f32(code) *
// scale) first (the CPU's Fp8Matrix); the kernel tests hold both to the same tolerance.
//
// Algorithm. Grid (E + 1, ceil(output columns / BN)), 128 x WG threads (WG warpgroups): block
// (e, tile) computes BN output columns for every pair of expert e, in chunks of BM pairs (BM / 64
// m64 tiles). Its weight tile is WROWS = 64 WG rows of W[e] (GeGLU: BN gate rows and the BN
// matching up rows; down: BN rows); warpgroup wg owns rows 64wg.. of it, so each wgmma is
// D[64 pairs x 64 weight rows] += X[64 x 16] W_tile[64 x 16]^T with the pairs as M, the weight
// rows as N, both operands K-major in shared memory (wgmma.cuh's unswizzled layout).
//   * Per chunk: the first BM threads read the chunk's pairs from `sorted` into shared memory
//     (-1 past the chunk's end) and their input rows (GeGLU: p / top_k, down: p).
//   * The K loop streams BK-wide slices of the chunk's input rows (GATHERED from x through the
//     row list: no permuted copy) and of the weight tile through STAGES shared-memory buffers
//     with cp.async: slice kt + STAGES - 1 is in flight while the tensor cores multiply slice kt.
//     Iteration kt: wait for slice kt's copies, fence them into the async proxy, one
//     __syncthreads (every thread's copies landed, and every warpgroup finished slice kt - 1),
//     issue the copies of slice kt + STAGES - 1 into slice kt - 1's buffer, then the BK / 16
//     wgmma of slice kt, commit and wait for them.
//   * e4m3 weights: the stages hold the codes (8-byte cp.async chunks, half the bytes); after
//     its wait each thread dequantises the chunks it copied into bf16 operand buffer kt % 2
//     (each warpgroup its own 64 rows), before the fence and the barrier. Two buffers, because
//     the last reader of one is slice kt - 2's wgmma, which every warp has waited for by then,
//     while slice kt - 1's may still run in another warp of the same warpgroup.
//   * Skips: input rows past the chunk's pairs and weight rows past the matrix are never copied
//     (their D rows / columns are never stored, and a matrix product keeps rows and columns
//     apart, so whatever those bytes hold stays there); k >= K is copied as zeros (cp.async's
//     zero fill) since it meets live rows; a k16 step wholly past K and a warpgroup whose weight
//     rows are all past the matrix issue no wgmma, nor do the m64 tiles after the first while
//     the chunk has at most 64 pairs (the tiles in between of a chunk of more run on rows past
//     its end: wasted, not wrong).
//   * Epilogue, in the original pair order: lane (g, t) of warp w holds, for pair rows 16w + g
//     and 16w + g + 8 of each m64 tile, weight-row columns 8j + 2t, 8j + 2t + 1 of its
//     warpgroup's 64 rows (register 4j + 2h + c). For GeGLU a warpgroup's rows are laid out in
//     blocks of 8 as [gate of columns q*8.., up of the same columns] (block j = 2q + up), so a
//     lane holds g (block 2q) and u (block 2q + 1) of the same output elements; it rounds them,
//     applies GeGLU and stores two bf16 as one 32-bit word at row sorted[...] of the output.
//
// Tiles (codegen/src/shapes.rs, grouped_gemm_wgmma_spec_for): BM = 128 pairs, BK = 64, 3 stages,
// 2 warpgroups (256 threads); GeGLU BN = 64 output columns (128 weight rows), down BN = 128. A
// stage is (128 + 128) rows x 128 bytes = 32 KiB, so 96 KiB of dynamic shared memory plus 1 KiB
// of pair lists: two blocks per SM (228 KiB), each with two slices (32 KiB of weights) in
// flight. e4m3: 24 KiB stages and two 16 KiB operand buffers, 105 KiB. 64 fp32 accumulators per
// thread. The 26B grids are the mma kernel's: 129 x 11 (gate_up) and 129 x 22 (down).
//
// Bandwidth: a weight element is read from HBM once per chunk of 128 pairs of its expert. One
// 256-token canvas (2048 pairs over 128 experts, 16 on average) reads every expert weight once
// per layer with one m64 tile's wgmma; 16 canvases (about 256 pairs per expert) read it about
// twice, with 128 multiply-adds per weight element read (128 flop per byte in bf16, 256 in
// e4m3: still under an H100's bf16 ridge point of about 295, so both stay bandwidth-bound).
//
// Requirements (codegen's validate, ops.rs plan_grouped): K % 8 == 0, output columns even,
// BM % 64 == 0, BK % 16 == 0, x and bf16 W 16-byte aligned, e4m3 W 8-byte and w_scale 4-byte
// aligned, out 4-byte aligned.
#pragma once
#include <type_traits>

#include "common.cuh"
#include "grouped_gemm.cuh"
#include "mma.cuh"
#include "wgmma.cuh"

namespace dgemma {

template <int N, int K, bool GEGLU, int BM, int BN, int BK, int STAGES, typename W = WeightBf16>
__device__ __forceinline__ void grouped_gemm_wgmma(const bf16* __restrict__ x, const int* __restrict__ sorted,
                                                   const int* __restrict__ offsets, const typename W::T* __restrict__ w,
                                                   const float* __restrict__ w_scale, bf16* __restrict__ out, int tokens,
                                                   int top_k, int num_experts)
{
    constexpr int OUT_COLS = GEGLU ? N / 2 : N;  // output row width
    constexpr int WROWS = GEGLU ? 2 * BN : BN;   // weight rows of a tile
    constexpr int WG = WROWS / 64;               // warpgroups, 64 weight rows each
    constexpr int WG_COLS = BN / WG;             // output columns per warpgroup
    constexpr int THREADS = 128 * WG;
    constexpr int MT = BM / 64;                  // m64 tiles of pairs per chunk
    constexpr int KC = BK / 8;                   // chunks of 8 elements per row of a slice
    constexpr int A_PER = BM * KC / THREADS;     // input chunks per thread and slice
    constexpr int B_PER = 64 * KC / 128;         // weight chunks per thread and slice
    constexpr int W_CHUNK = 8 * sizeof(typename W::T); // bytes of 8 staged weights: 16 (bf16), 8 (e4m3)
    constexpr int A_BYTES = BM * BK * 2, STAGE_BYTES = A_BYTES + WROWS * BK * (int)sizeof(typename W::T);
    // e4m3: the slice's codes are dequantised into two bf16 operand buffers after the stages
    // (slice kt into buffer kt % 2; see the K loop).
    constexpr int OPERAND_BYTES = W::SCALED ? 2 * WROWS * BK * 2 : 0;
    constexpr int KT = (K + BK - 1) / BK;        // K slices
    constexpr unsigned LBO = 128, SBO = BK * 16; // wgmma.cuh's layout
    static_assert(K % 8 == 0, "chunks of 8 weights along K");
    static_assert(!GEGLU || N % 2 == 0, "gate rows then up rows");
    static_assert(OUT_COLS % 2 == 0, "paired bf16 stores");
    static_assert(WROWS % 64 == 0 && BN % WG == 0 && WG_COLS % 8 == 0, "whole m64n64 weight tiles per warpgroup");
    static_assert(BM % 64 == 0 && BK % 16 == 0 && STAGES >= 2, "whole m64 tiles and k16 steps, a pipeline");
    static_assert((BM * KC) % THREADS == 0, "whole input chunks per thread");

    unsigned char* const smem = dynamic_smem();
    unsigned char* const operand = smem + STAGES * STAGE_BYTES; // e4m3: the dequantised slices
    int* const pair_s = reinterpret_cast<int*>(operand + OPERAND_BYTES); // the chunk's pairs (-1 past its end)
    int* const row_s = pair_s + BM;                                      // their input rows

    const int tid = threadIdx.x, lane = tid & 31, wg = tid / 128, warp = (tid / 32) % 4;
    const int g = lane >> 2, t = lane & 3;
    const int e = blockIdx.x;
    const int c0 = blockIdx.y * BN;
    const int pairs = tokens * top_k;
    // Expert e's pairs (grouped_gemm.cuh); none (or a tile past the columns): the block leaves.
    int begin, end;
    if (!expert_block_pairs<OUT_COLS, THREADS>(offsets, sorted, out, num_experts, pairs, c0, BN, begin, end)) return;

    // Chunk c of a slice tile: tile row (c / BK) * 8 + c % 8, k chunk (c / 8) % KC, at byte 16 c
    // of the bf16 tile (wgmma.cuh; W_CHUNK c of the staged e4m3 codes). Input chunks are
    // c = tid + i * THREADS; weight chunks c = wg * 64 KC + tid % 128 + 128 i, so a warpgroup
    // copies (and for e4m3 dequantises) its own 64 rows.
    auto chunk_row = [](int c) { return (c / BK) * 8 + c % 8; };
    auto chunk_k = [](int c) { return 8 * ((c / 8) % KC); };
    auto w_chunk = [&](int i) { return wg * 64 * KC + tid % 128 + 128 * i; };
    // Tile row j -> weight row of W[e] (-1 past the last column). GeGLU: warpgroup j / 64, its
    // 8-row block b = (j % 64) / 8 holds the gate (b even) or up (b odd) rows of columns
    // wg_col0 + 8 (b / 2)...
    auto weight_row = [&](int j) -> int {
        if constexpr (GEGLU) {
            const int jj = j % 64, up = (jj / 8) % 2;
            const int c = c0 + (j / 64) * WG_COLS + 8 * (jj / 16) + jj % 8;
            return c < OUT_COLS ? (up ? OUT_COLS + c : c) : -1;
        } else {
            const int c = c0 + j;
            return c < N ? c : -1;
        }
    };
    // This thread's weight chunks at k = 0, as element offsets into W[e] (32-bit, to spare
    // registers; -1: past the matrix), and for e4m3 their rows' scales.
    const typename W::T* const we = w + (size_t)e * N * K;
    int w_off[B_PER];
    float w_row_scale[B_PER];
#pragma unroll
    for (int i = 0; i < B_PER; ++i) {
        const int c = w_chunk(i), r = weight_row(chunk_row(c));
        w_off[i] = r >= 0 ? r * K + chunk_k(c) : -1;
        w_row_scale[i] = 0.0f;
        if constexpr (W::SCALED) {
            if (r >= 0) w_row_scale[i] = w_scale[(size_t)e * N + r];
        }
    }
    // Whether this warpgroup has a live column (else it issues no wgmma); warpgroup-uniform.
    const bool wg_live = c0 + wg * WG_COLS < OUT_COLS;
    const int in_div = GEGLU ? top_k : 1; // GeGLU reads token rows, the down projection pair rows

    for (int chunk = begin; chunk < end; chunk += BM) {
        const int n = min(BM, end - chunk);
        if (tid < BM) {
            const int p = tid < n ? sorted[chunk + tid] : -1;
            pair_s[tid] = p;
            row_s[tid] = p < 0 ? -1 : p / in_div;
        }
        __syncthreads(); // the row lists; every warpgroup is done with the previous chunk's buffers

        int x_off[A_PER]; // this thread's input chunks at k = 0, element offsets into x (-1: past the chunk)
#pragma unroll
        for (int i = 0; i < A_PER; ++i) {
            const int c = tid + i * THREADS, r = chunk_row(c);
            x_off[i] = r < n ? row_s[r] * K + chunk_k(c) : -1;
        }
        // Slice kt into buffer `stage`: k >= K as zeros (the source then stays at the row start).
        auto load = [&](int stage, int kt) {
            unsigned char* const a = smem + stage * STAGE_BYTES;
            unsigned char* const b = a + A_BYTES;
            const int k0 = kt * BK;
#pragma unroll
            for (int i = 0; i < A_PER; ++i) {
                const int c = tid + i * THREADS;
                const bool in_k = k0 + chunk_k(c) < K;
                if (x_off[i] >= 0) cp_async<16>(a + 16 * c, x + x_off[i] + (in_k ? k0 : 0), in_k ? 16 : 0);
            }
#pragma unroll
            for (int i = 0; i < B_PER; ++i) {
                const int c = w_chunk(i);
                const bool in_k = k0 + chunk_k(c) < K;
                if (w_off[i] >= 0) cp_async<W_CHUNK>(b + W_CHUNK * c, we + w_off[i] + (in_k ? k0 : 0), in_k ? W_CHUNK : 0);
            }
        };

        float acc[MT][32];
#pragma unroll
        for (int m = 0; m < MT; ++m) {
#pragma unroll
            for (int i = 0; i < 32; ++i) acc[m][i] = 0.0f;
            wgmma_fence_operands(acc[m]);
        }

#pragma unroll
        for (int s = 0; s < STAGES - 1; ++s) {
            if (s < KT) load(s, s);
            cp_async_commit(); // one group per slice, empty past the end: the wait count stays uniform
        }
#pragma unroll 1
        for (int kt = 0; kt < KT; ++kt) {
            cp_async_wait<STAGES - 2>(); // this thread's copies of slice kt
            if constexpr (W::SCALED) {
                // Dequantise this thread's codes of slice kt into operand buffer kt % 2, whose
                // last reader, the wgmma of slice kt - 2, every warp waited for before the
                // previous iteration's barrier. (One buffer would not do: a warp's wgmma_wait
                // says nothing of the other warps of its warpgroup, which read the same rows.)
                const unsigned char* const b = smem + (kt % STAGES) * STAGE_BYTES + A_BYTES;
                unsigned char* const o = operand + (kt % 2) * (WROWS * BK * 2);
#pragma unroll
                for (int i = 0; i < B_PER; ++i) {
                    const int c = w_chunk(i);
                    if (w_off[i] >= 0)
                        *reinterpret_cast<uint4*>(o + 16 * c) =
                            W::bf16x8(*reinterpret_cast<const typename W::Vec*>(b + W_CHUNK * c), w_row_scale[i]);
                }
            }
            fence_proxy_async();
            __syncthreads(); // everyone's copies of slice kt; slice kt - 1's wgmma done everywhere
            if (kt + STAGES - 1 < KT) load((kt + STAGES - 1) % STAGES, kt + STAGES - 1);
            cp_async_commit();
            if (wg_live) {
                const unsigned char* const a = smem + (kt % STAGES) * STAGE_BYTES;
                const unsigned char* const b =
                    (W::SCALED ? operand + (kt % 2) * (WROWS * BK * 2) : a + A_BYTES) + wg * 64 * BK * 2;
#pragma unroll
                for (int m = 0; m < MT; ++m) wgmma_fence_operands(acc[m]);
                wgmma_fence();
                // The slice's wgmma for the first TILES m64 tiles. Two straight-line forms
                // (every tile, or the first only while the chunk has at most 64 pairs) rather
                // than a per-tile condition: a conditional wgmma made ptxas insert a
                // warpgroup.arrive before every wgmma (C7519: 9 per 26B kernel; 3 remain, where
                // the two forms meet).
                auto slice_mma = [&](auto tiles) {
                    constexpr int TILES = decltype(tiles)::value;
#pragma unroll
                    for (int s = 0; s < BK / 16; ++s) {
                        if (K % BK != 0 && kt * BK + 16 * s >= K) break; // a k16 step wholly past K
                        const unsigned long long db = smem_desc(b + 256 * s, LBO, SBO);
#pragma unroll
                        for (int m = 0; m < TILES; ++m)
                            wgmma_m64n64k16_bf16(acc[m], smem_desc(a + m * 64 * BK * 2 + 256 * s, LBO, SBO), db);
                    }
                };
                if (MT > 1 && n > 64)
                    slice_mma(std::integral_constant<int, MT>{});
                else
                    slice_mma(std::integral_constant<int, 1>{});
                wgmma_commit();
                wgmma_wait<0>();
#pragma unroll
                for (int m = 0; m < MT; ++m) wgmma_fence_operands(acc[m]);
            }
        }

        // Epilogue, in the original pair order.
        if (wg_live) {
#pragma unroll
            for (int m = 0; m < MT; ++m) {
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    const int p = pair_s[64 * m + 16 * warp + g + 8 * h];
                    if (p < 0) continue;
                    bf16* const o = out + (size_t)p * OUT_COLS;
                    if constexpr (GEGLU) {
#pragma unroll
                        for (int q = 0; q < WG_COLS / 8; ++q) {
                            const int c = c0 + wg * WG_COLS + 8 * q + 2 * t;
                            if (c >= OUT_COLS) continue; // OUT_COLS even: c + 1 < OUT_COLS too
                            float v[2];
#pragma unroll
                            for (int j = 0; j < 2; ++j) {
                                const float gv = round_bf16(acc[m][4 * (2 * q) + 2 * h + j]);
                                const float uv = round_bf16(acc[m][4 * (2 * q + 1) + 2 * h + j]);
                                v[j] = mul(round_bf16(gelu_tanh(gv)), uv);
                            }
                            store_bf16_pair(o + c, v[0], v[1]);
                        }
                    } else {
#pragma unroll
                        for (int j = 0; j < WG_COLS / 8; ++j) {
                            const int c = c0 + wg * WG_COLS + 8 * j + 2 * t;
                            if (c < OUT_COLS) store_bf16_pair(o + c, acc[m][4 * j + 2 * h], acc[m][4 * j + 2 * h + 1]);
                        }
                    }
                }
            }
        }
        __syncthreads(); // pair_s, row_s and the buffers are rewritten by the next chunk
    }
}

// The bf16-weight form without a scale argument (the signature of the bf16 kernels).
template <int N, int K, bool GEGLU, int BM, int BN, int BK, int STAGES>
__device__ __forceinline__ void grouped_gemm_wgmma(const bf16* x, const int* sorted, const int* offsets, const bf16* w,
                                                   bf16* out, int tokens, int top_k, int num_experts)
{
    grouped_gemm_wgmma<N, K, GEGLU, BM, BN, BK, STAGES, WeightBf16>(x, sorted, offsets, w, nullptr, out, tokens, top_k,
                                                                    num_experts);
}

} // namespace dgemma
