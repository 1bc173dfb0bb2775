// wgmma_gemm.cuh: the block-level GEMM mainloop of the sm_90a kernels (csrc/wgmma.cuh's
// vocabulary): acc = X_tile . W_tile^T over all of K, for one block, where
//   X_tile: BM rows of an activation matrix x [*, K] (bf16), any rows (a row list: the MoE's
//           gathered tokens or pairs; a dense row range: the linear), BM / 64 m64 tiles;
//   W_tile: WROWS rows of a weight matrix [*, K] in format W (bf16, or e4m3 codes with one fp32
//           scale per row, dequantised to bf16(f32(code) * scale) in shared memory), fixed for
//           the block, warpgroup wg owning rows 64wg .. 64wg + 63;
// and acc[m][i] is this thread's wgmma accumulator i of m64 tile m against its warpgroup's 64
// rows (wgmma.cuh: row 64m + 16 warp + g + 8 ((i / 2) % 2), weight row 8 (i / 4) + 2t + i % 2 of
// the warpgroup's). Users: grouped_gemm_wgmma.cuh (the MoE expert GEMMs) and linear_wgmma.cuh.
//
// Pipeline: BK-wide slices of both tiles stream through STAGES shared-memory buffers with
// cp.async (bf16: 16-byte chunks; e4m3: 8-byte chunks of codes), slice kt + STAGES - 1 in flight
// while the tensor cores multiply slice kt. Iteration kt: wait for this thread's copies of slice
// kt; (e4m3: dequantise the chunks it copied into bf16 operand buffer kt % 2); fence them into the
// async proxy; one __syncthreads (every thread's copies landed, every warp finished slice
// kt - 1's wgmma); issue slice kt + STAGES - 1 into slice kt - 1's buffer; the BK / 16 wgmma of
// slice kt; commit; wait. e4m3 needs two operand buffers: the last reader of buffer kt % 2 is
// slice kt - 2's wgmma, which every warp has waited for by then, while slice kt - 1's may still
// run in another warp of the same warpgroup (a warp's wgmma_wait says nothing of the others).
//
// Chunks: chunk c of a slice tile is tile row (c / BK) * 8 + c % 8, k chunk (c / 8) % KC, at byte
// 16 c of the bf16 tile (wgmma.cuh's layout; W_CHUNK c of staged e4m3 codes). X chunks are
// c = tid + i * THREADS; W chunks c = wg * 64 KC + tid % 128 + 128 i (a warpgroup copies, and
// dequantises, its own rows). Addresses are 32-bit element offsets (to spare registers: the
// e4m3 kernels sit at 128 registers), so x's rows and W's tile must stay under 2^31 elements
// (the ops.rs plans check).
//
// Skips: X rows past `live_rows` and W rows past the matrix (offset -1) are never copied: their
// accumulator rows / columns are garbage that the caller never stores (a matrix product keeps
// rows and columns apart); k >= K is copied as zeros (cp.async's zero fill) since it meets live
// rows; a k16 step wholly past K and a warpgroup with `wg_live` false issue no wgmma, nor do the
// m64 tiles after the first while live_rows <= 64 (tiles in between of a larger tile run on rows
// past its end: wasted, not wrong). The two straight-line forms (every tile, or the first only)
// replace a per-tile condition, which made ptxas insert a warpgroup.arrive before every wgmma
// (C7519: 9 per 26B MoE kernel; 3 remain, where the two forms meet).
//
// Shared memory: SMEM_BYTES at the start of the block's dynamic shared memory (the stages, for
// e4m3 the two operand buffers and the tile rows' scales; the caller's own data follows); one
// block tile at a time (the caller syncs before reusing it).
#pragma once
#include <type_traits>

#include "common.cuh"
#include "grouped_gemm.cuh"
#include "wgmma.cuh"

namespace dgemma {

template <int K, int BM, int WROWS, int BK, int STAGES, typename W, bool W_MN = false>
struct WgmmaGemm {
    using T = typename W::T;
    static constexpr int WG = WROWS / 64;          // warpgroups, 64 weight rows each
    static constexpr int THREADS = 128 * WG;
    static constexpr int MT = BM / 64;             // m64 tiles of X rows
    static constexpr int KC = BK / 8;              // chunks of 8 elements per row of a slice
    static constexpr int A_PER = BM * KC / THREADS; // X chunks per thread and slice
    static constexpr int B_PER = 64 * KC / 128;    // W chunks per thread and slice
    static constexpr int W_CHUNK = 8 * (int)sizeof(T); // bytes of 8 staged weights: 16 (bf16), 8 (e4m3)
    static constexpr int A_BYTES = BM * BK * 2, STAGE_BYTES = A_BYTES + WROWS * BK * (int)sizeof(T);
    static constexpr int OPERAND_BYTES = W::SCALED ? 2 * WROWS * BK * 2 : 0; // e4m3: dequantised slices
    static constexpr int SCALE_BYTES = W::SCALED ? WROWS * 4 : 0;            // e4m3: the tile rows' scales
    static constexpr int SMEM_BYTES = STAGES * STAGE_BYTES + OPERAND_BYTES + SCALE_BYTES;
    static constexpr unsigned LBO = 128, SBO = BK * 16; // wgmma.cuh's layout (K-major)
    // W_MN: the weight tile is stored [K][WROWS] (e.g. the embedding table E [V, H] as the B of
    // p E): MN-major core matrices, 8 K-rows of 8 consecutive weight rows; LBO steps 8 K
    // (WROWS / 8 core matrices), SBO one core matrix (wgmma.cuh).
    static constexpr unsigned MN_LBO = WROWS * 16, MN_SBO = 128;
    static_assert(K % 8 == 0, "chunks of 8 elements along K");
    static_assert(WROWS % 64 == 0 && BM % 64 == 0 && BK % 16 == 0 && STAGES >= 2,
                  "whole warpgroup tiles, m64 tiles and k16 steps, a pipeline");
    static_assert((BM * KC) % THREADS == 0, "whole X chunks per thread");
    static_assert(!(W_MN && W::SCALED), "MN-major weights are bf16");

    int w_off[B_PER]; // this thread's W chunks at k = 0, element offsets into W (-1: none)

    __device__ static int chunk_row(int c) { return (c / BK) * 8 + c % 8; }
    __device__ static int chunk_k(int c) { return 8 * ((c / 8) % KC); }
    __device__ static int w_chunk(int i) { return (threadIdx.x / 128) * 64 * KC + threadIdx.x % 128 + 128 * i; }
    // W_MN chunk c (warpgroup wg = c / (64 KC), local l = c % (64 KC)): K-row v = (l / 64) * 8 +
    // l % 8 of the slice, tile weight rows 64 wg + 8 ((l / 8) % 8) + 0..7, at byte
    // ((v / 8) * WROWS / 8 + its column group) * 128 + (v % 8) * 16 (consecutive chunks:
    // consecutive 16 bytes).
    __device__ static int mn_k(int c) { return ((c % (64 * KC)) / 64) * 8 + c % 8; }
    __device__ static int mn_row(int c) { return (c / (64 * KC)) * 64 + 8 * ((c / 8) % 8); }
    __device__ static int mn_byte(int c) { return ((mn_k(c) / 8) * (WROWS / 8) + mn_row(c) / 8) * 128 + (mn_k(c) % 8) * 16; }

    // Binds the W tile: tile row j is row weight_row(j) of W (-1: past the matrix; W_MN: the
    // column of the [K][ld] matrix, whole groups of 8), whose scale (e4m3) is
    // scales[weight_row(j)]. For e4m3 it writes the tile rows' scales to shared memory (kept
    // there, not in registers: the e4m3 kernels are at the 128-register limit), so a
    // __syncthreads must come between it and run().
    template <class RowOf>
    __device__ void bind_weights(unsigned char* smem, RowOf weight_row, int ld, const float* scales)
    {
#pragma unroll
        for (int i = 0; i < B_PER; ++i) {
            const int c = w_chunk(i);
            if constexpr (W_MN) {
                const int col = weight_row(mn_row(c));
                w_off[i] = col >= 0 ? mn_k(c) * ld + col : -1;
            } else {
                const int r = weight_row(chunk_row(c));
                w_off[i] = r >= 0 ? r * ld + chunk_k(c) : -1;
            }
        }
        if constexpr (W::SCALED) {
            float* const scale_s = reinterpret_cast<float*>(smem + STAGES * STAGE_BYTES + OPERAND_BYTES);
            for (int j = threadIdx.x; j < WROWS; j += THREADS) {
                const int r = weight_row(j);
                scale_s[j] = r >= 0 ? scales[r] : 0.0f;
            }
        }
    }

    // Calls f(r, c, v0, v1) for this thread's accumulator pairs of the tile rows r < live_rows:
    // v0, v1 = acc at tile row r and weight rows (columns) c, c + 1 of the tile (c even).
    template <class F>
    __device__ static void for_each_pair(const float (&acc)[MT][32], int live_rows, F f)
    {
        const int lane = threadIdx.x & 31, wg = threadIdx.x / 128, warp = (threadIdx.x / 32) % 4;
        const int g = lane >> 2, t = lane & 3;
#pragma unroll
        for (int m = 0; m < MT; ++m) {
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const int r = 64 * m + 16 * warp + g + 8 * h;
                if (r >= live_rows) continue;
#pragma unroll
                for (int j = 0; j < 8; ++j) f(r, 64 * wg + 8 * j + 2 * t, acc[m][4 * j + 2 * h], acc[m][4 * j + 2 * h + 1]);
            }
        }
    }

    // acc = X_tile . W_tile^T over k in [k_begin, k_end) (k_begin a multiple of BK; a split of
    // K): X tile row r starts at element x_row(r) of x (-1: not a row); rows r >= live_rows must
    // be -1; w_ld is W's leading dimension (W_MN: the element stride from one k to the next).
    // Block-uniform arguments; wg_live warpgroup-uniform.
    template <class XRow>
    __device__ void run(unsigned char* smem, const bf16* __restrict__ x, XRow x_row, const T* __restrict__ w,
                        int live_rows, bool wg_live, float (&acc)[MT][32], int k_begin = 0, int k_end = K,
                        int w_ld = K) const
    {
        const int tid = threadIdx.x, wg = tid / 128;
        const int kt_count = (k_end - k_begin + BK - 1) / BK;
        unsigned char* const operand = smem + STAGES * STAGE_BYTES;
        int x_off[A_PER];
#pragma unroll
        for (int i = 0; i < A_PER; ++i) {
            const int c = tid + i * THREADS, r = x_row(chunk_row(c));
            x_off[i] = r >= 0 ? r + chunk_k(c) : -1;
        }
        // Slice kt into buffer `stage`: k >= k_end as zeros (the source then stays at k_begin).
        auto load = [&](int stage, int kt) {
            unsigned char* const a = smem + stage * STAGE_BYTES;
            unsigned char* const b = a + A_BYTES;
            const int k0 = k_begin + kt * BK;
#pragma unroll
            for (int i = 0; i < A_PER; ++i) {
                const int c = tid + i * THREADS;
                const bool in_k = k0 + chunk_k(c) < k_end;
                if (x_off[i] >= 0) cp_async<16>(a + 16 * c, x + x_off[i] + (in_k ? k0 : k_begin), in_k ? 16 : 0);
            }
#pragma unroll
            for (int i = 0; i < B_PER; ++i) {
                const int c = w_chunk(i);
                if (w_off[i] < 0) continue;
                if constexpr (W_MN) {
                    const bool in_k = k0 + mn_k(c) < k_end;
                    cp_async<16>(b + mn_byte(c), w + w_off[i] + (size_t)(in_k ? k0 : k_begin) * w_ld, in_k ? 16 : 0);
                } else {
                    const bool in_k = k0 + chunk_k(c) < k_end;
                    cp_async<W_CHUNK>(b + W_CHUNK * c, w + w_off[i] + (in_k ? k0 : k_begin), in_k ? W_CHUNK : 0);
                }
            }
        };

#pragma unroll
        for (int m = 0; m < MT; ++m) {
#pragma unroll
            for (int i = 0; i < 32; ++i) acc[m][i] = 0.0f;
            wgmma_fence_operands(acc[m]);
        }
#pragma unroll
        for (int s = 0; s < STAGES - 1; ++s) {
            if (s < kt_count) load(s, s);
            cp_async_commit(); // one group per slice, empty past the end: the wait count stays uniform
        }
#pragma unroll 1
        for (int kt = 0; kt < kt_count; ++kt) {
            cp_async_wait<STAGES - 2>(); // this thread's copies of slice kt
            if constexpr (W::SCALED) {
                const unsigned char* const b = smem + (kt % STAGES) * STAGE_BYTES + A_BYTES;
                unsigned char* const o = operand + (kt % 2) * (WROWS * BK * 2);
                const float* const scale_s = reinterpret_cast<const float*>(operand + OPERAND_BYTES);
#pragma unroll
                for (int i = 0; i < B_PER; ++i) {
                    const int c = w_chunk(i);
                    if (w_off[i] >= 0)
                        *reinterpret_cast<uint4*>(o + 16 * c) = W::bf16x8(
                            *reinterpret_cast<const typename W::Vec*>(b + W_CHUNK * c), scale_s[chunk_row(c)]);
                }
            }
            fence_proxy_async();
            __syncthreads(); // everyone's copies of slice kt; slice kt - 1's wgmma done everywhere
            if (kt + STAGES - 1 < kt_count) load((kt + STAGES - 1) % STAGES, kt + STAGES - 1);
            cp_async_commit();
            if (!wg_live) continue;
            const unsigned char* const a = smem + (kt % STAGES) * STAGE_BYTES;
            const unsigned char* const b_tile = W::SCALED ? operand + (kt % 2) * (WROWS * BK * 2) : a + A_BYTES;
            const unsigned char* const b = b_tile + (W_MN ? wg * 8 * 128 : wg * 64 * BK * 2);
            const int k0 = k_begin + kt * BK;
#pragma unroll
            for (int m = 0; m < MT; ++m) wgmma_fence_operands(acc[m]);
            wgmma_fence();
            auto slice_mma = [&](auto tiles) { // the slice's wgmma for the first TILES m64 tiles
                constexpr int TILES = decltype(tiles)::value;
#pragma unroll
                for (int s = 0; s < BK / 16; ++s) {
                    if (K % BK != 0 && k0 + 16 * s >= k_end) break; // a k16 step wholly past K
                    const unsigned long long db = W_MN ? smem_desc(b + 2 * MN_LBO * s, MN_LBO, MN_SBO)
                                                       : smem_desc(b + 256 * s, LBO, SBO);
#pragma unroll
                    for (int m = 0; m < TILES; ++m)
                        wgmma_m64n64k16_bf16<W_MN>(acc[m], smem_desc(a + m * 64 * BK * 2 + 256 * s, LBO, SBO), db);
                }
            };
            if (MT > 1 && live_rows > 64)
                slice_mma(std::integral_constant<int, MT>{});
            else
                slice_mma(std::integral_constant<int, 1>{});
            wgmma_commit();
            wgmma_wait<0>();
#pragma unroll
            for (int m = 0; m < MT; ++m) wgmma_fence_operands(acc[m]);
        }
    }
};

} // namespace dgemma
