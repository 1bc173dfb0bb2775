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
// rows as N.
//   * Per chunk: the first BM threads read the chunk's pairs from `sorted` into shared memory
//     (-1 past the chunk's end) and their input rows (GeGLU: p / top_k, down: p); the mainloop
//     (wgmma_gemm.cuh: the cp.async pipeline, e4m3 dequantisation, the skips) GATHERS those rows
//     of x straight into shared memory (no permuted copy) and multiplies them by the tile.
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
#include "common.cuh"
#include "grouped_gemm.cuh"
#include "mma.cuh"
#include "wgmma_gemm.cuh"

namespace dgemma {

template <int N, int K, bool GEGLU, int BM, int BN, int BK, int STAGES, typename W = WeightBf16>
__device__ __forceinline__ void grouped_gemm_wgmma(const bf16* __restrict__ x, const int* __restrict__ sorted,
                                                   const int* __restrict__ offsets, const typename W::T* __restrict__ w,
                                                   const float* __restrict__ w_scale, bf16* __restrict__ out, int tokens,
                                                   int top_k, int num_experts)
{
    constexpr int OUT_COLS = GEGLU ? N / 2 : N; // output row width
    constexpr int WROWS = GEGLU ? 2 * BN : BN;  // weight rows of a tile
    using Gemm = WgmmaGemm<K, BM, WROWS, BK, STAGES, W>;
    constexpr int WG_COLS = BN / Gemm::WG;      // output columns per warpgroup
    constexpr int MT = Gemm::MT;
    static_assert(!GEGLU || N % 2 == 0, "gate rows then up rows");
    static_assert(OUT_COLS % 2 == 0, "paired bf16 stores");
    static_assert(BN % Gemm::WG == 0 && WG_COLS % 8 == 0 && (!GEGLU || WG_COLS == 32), "whole n8 blocks per warpgroup");

    unsigned char* const smem = dynamic_smem();
    int* const pair_s = reinterpret_cast<int*>(smem + Gemm::SMEM_BYTES); // the chunk's pairs (-1 past its end)
    int* const row_s = pair_s + BM;                                      // their input rows

    const int tid = threadIdx.x, lane = tid & 31, wg = tid / 128, warp = (tid / 32) % 4;
    const int g = lane >> 2, t = lane & 3;
    const int e = blockIdx.x;
    const int c0 = blockIdx.y * BN;
    const int pairs = tokens * top_k;
    // Expert e's pairs (grouped_gemm.cuh); none (or a tile past the columns): the block leaves.
    int begin, end;
    if (!expert_block_pairs<OUT_COLS, Gemm::THREADS>(offsets, sorted, out, num_experts, pairs, c0, BN, begin, end)) return;

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
    Gemm gemm;
    gemm.bind_weights(smem, weight_row, K, W::SCALED ? w_scale + (size_t)e * N : nullptr); // synced below
    const typename W::T* const we = w + (size_t)e * N * K;
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

        float acc[MT][32];
        gemm.run(smem, x, [&](int r) { return r < n ? row_s[r] * K : -1; }, we, n, wg_live, acc);

        // Epilogue, in the original pair order.
        if (wg_live) {
            if constexpr (GEGLU) {
#pragma unroll
                for (int m = 0; m < MT; ++m) {
#pragma unroll
                    for (int h = 0; h < 2; ++h) {
                        const int p = pair_s[64 * m + 16 * warp + g + 8 * h];
                        if (p < 0) continue;
                        bf16* const o = out + (size_t)p * OUT_COLS;
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
                    }
                }
            } else {
                // (Not WgmmaGemm::for_each_pair: looking the pair up once per row, not per element,
                // keeps the e4m3 kernel within its 128 registers; ptxas spilled otherwise.)
#pragma unroll
                for (int m = 0; m < MT; ++m) {
#pragma unroll
                    for (int h = 0; h < 2; ++h) {
                        const int p = pair_s[64 * m + 16 * warp + g + 8 * h];
                        if (p < 0) continue;
#pragma unroll
                        for (int j = 0; j < WG_COLS / 8; ++j) {
                            const int c = c0 + wg * WG_COLS + 8 * j + 2 * t;
                            if (c < OUT_COLS) store_bf16_pair(out + (size_t)p * OUT_COLS + c, acc[m][4 * j + 2 * h], acc[m][4 * j + 2 * h + 1]);
                        }
                    }
                }
            }
        }
        __syncthreads(); // pair_s, row_s and the buffers are rewritten by the next chunk
    }
}

} // namespace dgemma
