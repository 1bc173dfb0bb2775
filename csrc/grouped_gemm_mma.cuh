// grouped_gemm_mma.cuh: the MoE expert GEMMs on tensor cores (mma.sync m16n8k16 bf16 -> fp32),
// over the routed (token, slot) pairs grouped by expert. Same contract as grouped_gemm_sorted
// (grouped_gemm.cuh, whose header describes the routing input, the weight formats and both
// epilogues): codegen's GroupedGemm with GemmEngine::Mma, what the backend launches
// (GROUPED_GEMM_TENSOR_CORES in codegen/src/shapes.rs). The SIMT kernel stays compiled as the
// bit-exact reference path.
//
// CPU oracle: crates/dgemma-cpu/src/ops/moe.rs (experts_forward) with ops/linear.rs and
// ops/activation.rs. Model-spec 3.4.
//
// grouped_gemm_mma<GEGLU = true> (gate_up + GeGLU), N = 2 * moe_width (gate rows, then up rows),
// K = hidden, x [tokens, K] (row t = pair / top_k):
//   g = bf16(x[t] . W[e][c]);  u = bf16(x[t] . W[e][N/2 + c])          fp32 sums, bf16 store
//   out[p, c] = bf16( bf16(gelu_tanh(g)) * u )                          out [pairs, N/2]
// grouped_gemm_mma<GEGLU = false> (down), N = hidden, K = moe_width, act [pairs, K] (row p):
//   y[p, c] = bf16(act[p] . W[e][c])                                    y [pairs, N]
// Outputs are indexed by the ORIGINAL pair order; an expert id outside [0, E) writes NaN rows
// (the invalid bucket's blocks). FP8 weights (WeightE4m3) are dequantised while they are staged
// into shared memory, W[e][n][k] = bf16(f32(code) * w_scale[e * N + n]) (the CPU's Fp8Matrix), so
// both formats feed the tensor cores the same bf16 weights as the CPU's dots.
//
// Rounding: every product of two bf16 is exact in fp32 and the tensor core accumulates in fp32;
// g, u and y are rounded to bf16 once, at the end, like the CPU. Only the order of the fp32 sum
// differs from the CPU's 8-lane dot (the tensor core's own order on the GPU, k order in the
// emulator): an fp32 difference of about K * 2^-24 * sum |x_i w_i|, so a g, u or y differs from
// the CPU's, by one bf16 ulp, only where its sum lies that close to a bf16 rounding boundary (a
// small fraction of the elements). The GeGLU epilogue is the CPU's IEEE operations on the rounded
// g and u (only tanhf is the GPU's own): a flipped g or u moves out by at most about two bf16
// ulps. (The SIMT kernel reproduces the 8-lane order and is bit-identical; this one trades that
// for the tensor cores. The kernel tests state both tolerances.)
//
// Algorithm. Grid (E + 1, ceil(out columns / BN)): block (e, tile) computes BN output columns
// (GeGLU: the BN gate rows and the BN matching up rows of W[e], 2 BN weight rows; down: BN weight
// rows) for every pair of expert e, in chunks of BM pairs. The pair count is read from `offsets`
// on the device, so the grid does not depend on the routing and the launch can be captured in a
// CUDA graph; a block whose expert has no pair exits at once, and block (E, tile) writes the NaN
// rows of the invalid ids.
//   * Per chunk: the first BM threads read the chunk's pairs from `sorted` into shared memory
//     (their input rows: p / top_k for GeGLU, p for down; -1 past the chunk's end). The K loop
//     then streams BK-wide slices of the chunk's input rows and of the tile's weight rows through
//     two shared-memory buffers, with a register prefetch (Stage in mma.cuh): while the warps
//     multiply slice kt out of one buffer, every thread holds its 16-byte chunks of slice kt + 1
//     (8-byte codes for e4m3) in registers and writes them (dequantised) to the other buffer
//     afterwards; one __syncthreads per slice. The input rows are GATHERED straight from global
//     memory (Stage::fetch_rows through the chunk's row list): there is no permuted copy of x.
//     Rows past the chunk, columns past the matrix and k >= K stage as zeros (exact zero
//     products).
//   * Warps: WARPS side by side along the tile's columns, each owning all BM pair rows x
//     WC = BN / WARPS output columns: (BM / 16) x NF mma fragments with NF = WR / 8 weight-row
//     fragments (WR = 2 WC for GeGLU, WC for down). For GeGLU the tile's weight rows are laid out
//     per warp as [its WC gate rows, its WC up rows], so gate fragment f and up fragment
//     f + NF / 2 of a warp hold the same columns, and the epilogue has g and u of an output
//     element in the same lane's registers. Fragments are read with ldmatrix.x4 (an A fragment;
//     two B fragments per instruction), from rows padded to BK + 8 elements (8 mod 16: the 8 rows
//     of an ldmatrix phase hit 8 distinct bank groups).
//   * Skips (warp-uniform): m16 fragments wholly past the chunk's pairs (a chunk of 16 pairs runs
//     1/4 of the mma of a full 64-pair chunk), weight fragments wholly past the last column, k16
//     steps wholly past K.
//   * Epilogue, in the original pair order: each lane rounds its accumulator pairs (C[g][2t],
//     C[g][2t + 1]), applies GeGLU for the gate_up kernel, and stores two bf16 as one 32-bit word
//     at row sorted[...] of the output.
//
// Tile choice (codegen/src/shapes.rs, grouped_gemm_mma_spec_for): BM = 64 pairs, BK = 32, 8 warps
// (256 threads); GeGLU BN = 64 output columns (128 weight rows, WC = 8: one gate and one up
// fragment per warp), down BN = 128 (WC = 16, two fragments per warp). Shared memory:
// 2 x (64 + 128) x 40 bf16 = 30 KiB plus 512 bytes of pair lists (codegen's shared_bytes; the
// 48 KiB static limit leaves no room for BK = 64 with 128 weight rows). 32 fp32 accumulators per
// thread; ptxas (nvcc 13.0) gives the 26B kernels 78-80 registers, no spills but 8 bytes for the
// bf16 gate_up kernel on sm_120. The 26B model's grids: 129 x 11 (gate_up, 704 columns) and
// 129 x 22 (down, 2816), 1419 and 2838 blocks; a block per expert and tile, of which the
// experts without pairs exit at once.
//
// Bandwidth: a weight element is read from global memory once per chunk of BM pairs of its
// expert (every warp of the block uses the staged slice for all of the chunk's pairs), and every
// byte of x a block stages serves BN output columns. One 256-token canvas of the 26B model routes
// 2048 pairs to 128 experts (16 on average, skewed): nearly every expert fits one 64-pair chunk,
// so the expert weights stream from HBM once per layer (7.9 MB gate_up + 4.0 MB down per expert
// in bf16, half in e4m3), the same bytes as the SIMT kernel, with most m16 fragments skipped: the
// kernels are bound by HBM bandwidth there. At 16 canvases (about 256 pairs per expert) a block
// re-streams its weight tile once per further chunk, about 4 times per layer; the tile
// (128 rows x K: 704 KiB gate_up, 176 KiB down in bf16) times the resident blocks exceeds L2, so
// mostly from HBM: 64 MACs per weight element read (32 flop per byte in bf16, 64 in e4m3), still
// below an H100's bf16 ridge point (about 300), so still bandwidth-bound, at about 4x the
// one-canvas time rather than 16x. A larger BM (128: 64 accumulators per thread) would halve the
// re-reads of a batch.
//
// Requirements (checked by ops.rs plan_grouped, codegen's validate): K % 8 == 0 (16-byte chunks
// of 8 bf16 / 8-byte chunks of 8 codes), output columns even (paired stores); x and bf16 W
// 16-byte aligned, e4m3 W 8-byte and w_scale 4-byte aligned, out 4-byte aligned.
#pragma once
#include "common.cuh"
#include "fp8.cuh"
#include "grouped_gemm.cuh"
#include "mma.cuh"

namespace dgemma {

// A ROWS x BK tile of expert weights (format W) whose rows are fixed for the whole block: bind()
// resolves each of this thread's chunks to its weight row once (nullptr: a row past the matrix,
// staged as zeros) and, for e4m3, its row scale; fetch() loads slice k0.. of them into registers
// (k >= k_end as zeros) and store() writes them to shared memory as bf16 (rows of `lds`
// elements). The chunk assignment is Stage's (mma.cuh): chunk c = row c / (BK / 8), elements
// 8 * (c % (BK / 8)).., thread i holding chunks i, i + THREADS, ...
template <class W, int ROWS, int BK, int THREADS>
struct WeightStage {
    static constexpr int CHUNKS_PER_ROW = BK / 8;
    static constexpr int CHUNKS = ROWS * CHUNKS_PER_ROW;
    static constexpr int PER_THREAD = (CHUNKS + THREADS - 1) / THREADS;
    static_assert(BK % 8 == 0, "a tile row is whole chunks of 8 weights");
    const typename W::T* row[PER_THREAD];
    float scale[PER_THREAD];
    typename W::Vec v[PER_THREAD];

    // `row_of(j)`: the weight row (0.. of the expert's [n, ld] matrix `we`) of tile row j, or -1;
    // `scales`: the expert's row scales (e4m3) or nullptr.
    template <class RowOf>
    __device__ __forceinline__ void bind(const typename W::T* we, int ld, const float* scales, RowOf row_of)
    {
#pragma unroll
        for (int i = 0; i < PER_THREAD; ++i) {
            const int c = threadIdx.x + i * THREADS;
            const int r = c < CHUNKS ? row_of(c / CHUNKS_PER_ROW) : -1;
            row[i] = r >= 0 ? we + (size_t)r * ld : nullptr;
            scale[i] = 0.0f;
            if constexpr (W::SCALED) {
                if (r >= 0) scale[i] = scales[r];
            }
        }
    }

    __device__ __forceinline__ void fetch(int k0, int k_end)
    {
#pragma unroll
        for (int i = 0; i < PER_THREAD; ++i) {
            const int c = threadIdx.x + i * THREADS;
            const int k = k0 + 8 * (c % CHUNKS_PER_ROW);
            if (row[i] != nullptr && k < k_end)
                v[i] = *reinterpret_cast<const typename W::Vec*>(row[i] + k);
            else
                v[i] = typename W::Vec{};
        }
    }

    __device__ __forceinline__ void store(bf16* dst, int lds) const
    {
#pragma unroll
        for (int i = 0; i < PER_THREAD; ++i) {
            const int c = threadIdx.x + i * THREADS;
            if (c < CHUNKS)
                *reinterpret_cast<uint4*>(dst + (c / CHUNKS_PER_ROW) * lds + 8 * (c % CHUNKS_PER_ROW)) =
                    W::bf16x8(v[i], scale[i]);
        }
    }
};

template <int N, int K, bool GEGLU, int BM, int BN, int BK, int WARPS, typename W = WeightBf16>
__device__ __forceinline__ void grouped_gemm_mma(const bf16* __restrict__ x, const int* __restrict__ sorted,
                                                 const int* __restrict__ offsets, const typename W::T* __restrict__ w,
                                                 const float* __restrict__ w_scale, bf16* __restrict__ out, int tokens,
                                                 int top_k, int num_experts)
{
    constexpr int OUT_COLS = GEGLU ? N / 2 : N;   // output row width
    constexpr int WROWS = GEGLU ? 2 * BN : BN;    // weight rows of a tile
    constexpr int THREADS = 32 * WARPS;
    constexpr int WC = BN / WARPS;                // output columns per warp
    constexpr int WR = GEGLU ? 2 * WC : WC;       // weight rows per warp
    constexpr int MF = BM / 16, NF = WR / 8;      // m16 / n8 fragments per warp
    constexpr int LDS = BK + 8;                   // shared-memory row length (elements)
    constexpr int KT = (K + BK - 1) / BK;         // K slices
    constexpr int STAGE = (BM + WROWS) * LDS;     // one buffer: the input rows, then the weight rows
    static_assert(K % 8 == 0, "16-byte chunks of 8 bf16 (8-byte chunks of 8 codes) along K");
    static_assert(!GEGLU || N % 2 == 0, "gate rows then up rows");
    static_assert(OUT_COLS % 2 == 0, "paired bf16 stores");
    static_assert(BM % 16 == 0 && BK % 16 == 0, "whole m16 fragments and k16 steps");
    static_assert(BN % WARPS == 0 && WC % 8 == 0 && WR % 16 == 0, "whole pairs of n8 fragments per warp");

    __shared__ uint4 smem_raw[2 * STAGE / 8];
    __shared__ int pair_s[BM]; // the chunk's pairs (-1 past its end)
    __shared__ int row_s[BM];  // their input rows
    bf16* const smem = reinterpret_cast<bf16*>(smem_raw);

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int g = lane >> 2, t = lane & 3;
    const int e = blockIdx.x;
    const int c0 = blockIdx.y * BN;
    const int pairs = tokens * top_k;
    // Expert e's pairs (grouped_gemm.cuh); none (or a tile past the columns): the block leaves.
    int begin, end;
    if (!expert_block_pairs<OUT_COLS, THREADS>(offsets, sorted, out, num_experts, pairs, c0, BN, begin, end)) return;

    // This warp's output columns, and the first column of weight fragment f (-1: past the end).
    const int wc0 = c0 + warp * WC;
    auto frag_col = [&](int f) { return wc0 + 8 * (GEGLU ? f % (NF / 2) : f); };
    // Tile row j -> weight row of W[e] (-1 past the last column).
    auto weight_row = [&](int j) -> int {
        if constexpr (GEGLU) {
            const int r = j % WR, up = r >= WC;
            const int c = c0 + (j / WR) * WC + (up ? r - WC : r);
            return c < OUT_COLS ? (up ? OUT_COLS + c : c) : -1;
        } else {
            const int c = c0 + j;
            return c < N ? c : -1;
        }
    };
    WeightStage<W, WROWS, BK, THREADS> ws;
    ws.bind(w + (size_t)e * N * K, K, W::SCALED ? w_scale + (size_t)e * N : nullptr, weight_row);
    const int in_div = GEGLU ? top_k : 1; // GeGLU reads token rows, the down projection pair rows
    auto x_row = [&](int r) { return x + (size_t)row_s[r] * K; };

    for (int chunk = begin; chunk < end; chunk += BM) {
        const int n = min(BM, end - chunk);
        if (tid < BM) {
            const int p = tid < n ? sorted[chunk + tid] : -1;
            pair_s[tid] = p;
            row_s[tid] = p < 0 ? -1 : p / in_div;
        }
        __syncthreads(); // the row lists; every warp is done with the previous chunk's buffers

        FragC acc[MF][NF];
#pragma unroll
        for (int i = 0; i < MF; ++i)
#pragma unroll
            for (int f = 0; f < NF; ++f) zero(acc[i][f]);

        Stage<BM, BK, THREADS> xs;
        xs.fetch_rows(x_row, 0, 0, n, 0, K);
        ws.fetch(0, K);
        xs.store(smem, LDS);
        ws.store(smem + BM * LDS, LDS);
        __syncthreads();

#pragma unroll 1
        for (int kt = 0; kt < KT; ++kt) {
            if (kt + 1 < KT) { // in flight during the mma below
                xs.fetch_rows(x_row, 0, 0, n, (kt + 1) * BK, K);
                ws.fetch((kt + 1) * BK, K);
            }
            const bf16* const sx = smem + (kt & 1) * STAGE;
            const bf16* const sw = smem + (kt & 1) * STAGE + (BM + warp * WR) * LDS;
#pragma unroll
            for (int kk = 0; kk < BK; kk += 16) {
                if (kt * BK + kk >= K) break; // a k16 step wholly past K (zeros)
                FragB b[NF];
#pragma unroll
                for (int f = 0; f < NF; f += 2)
                    if (frag_col(f) < OUT_COLS || frag_col(f + 1) < OUT_COLS)
                        load_frag_b_pair_ldsm(b[f], b[f + 1], sw + 8 * f * LDS + kk, LDS);
#pragma unroll
                for (int i = 0; i < MF; ++i) {
                    if (16 * i >= n) break; // fragments wholly past the chunk's pairs
                    const FragA a = load_frag_a_ldsm(sx + 16 * i * LDS + kk, LDS);
#pragma unroll
                    for (int f = 0; f < NF; ++f)
                        if (frag_col(f) < OUT_COLS) mma_bf16_16816(acc[i][f], a, b[f]);
                }
            }
            if (kt + 1 < KT) {
                bf16* const next = smem + ((kt + 1) & 1) * STAGE;
                xs.store(next, LDS);
                ws.store(next + BM * LDS, LDS);
                __syncthreads();
            }
        }

        // Epilogue, in the original pair order: lane (g, t) holds rows g, g + 8 and columns
        // 2t, 2t + 1 of each fragment.
#pragma unroll
        for (int i = 0; i < MF; ++i) {
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const int p = pair_s[16 * i + g + 8 * h];
                if (p < 0) continue;
                bf16* const o = out + (size_t)p * OUT_COLS;
                if constexpr (GEGLU) {
#pragma unroll
                    for (int f = 0; f < NF / 2; ++f) {
                        const int c = frag_col(f) + 2 * t;
                        if (c >= OUT_COLS) continue; // OUT_COLS even: c + 1 < OUT_COLS too
                        float v[2];
#pragma unroll
                        for (int j = 0; j < 2; ++j) {
                            const float gv = round_bf16(acc[i][f].r[2 * h + j]);
                            const float uv = round_bf16(acc[i][f + NF / 2].r[2 * h + j]);
                            v[j] = mul(round_bf16(gelu_tanh(gv)), uv);
                        }
                        store_bf16_pair(o + c, v[0], v[1]);
                    }
                } else {
#pragma unroll
                    for (int f = 0; f < NF; ++f) {
                        const int c = frag_col(f) + 2 * t;
                        if (c < OUT_COLS) store_bf16_pair(o + c, acc[i][f].r[2 * h], acc[i][f].r[2 * h + 1]);
                    }
                }
            }
        }
        __syncthreads(); // pair_s, row_s and the buffers are rewritten by the next chunk
    }
}

} // namespace dgemma
