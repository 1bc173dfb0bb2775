// mma.cuh: the tensor-core tile vocabulary (warp-level mma.sync, sm_80 and later).
//
// One instruction shape: mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32, D = A B + C with
// A 16x16 bf16 (row-major), B 16x8 bf16 ("col": stored k-contiguous per column n), C/D 16x8 f32.
// It runs on every arch of the fatbin (sm_90a, sm_120, compute_120 PTX), so kernels built on it
// are Portable. The 32 lanes of a warp each hold a fragment of every matrix, in the PTX ISA's
// layout (section "Matrix Fragments for mma.m16n8k16"). With groupID g = lane >> 2 and
// t = lane & 3, and in each 32-bit register the LOWER 16 bits holding the element with the
// lower column / k index:
//
//   FragA (A[row][k], 16x16):  r[0] = A[g][2t..2t+1]     r[1] = A[g+8][2t..2t+1]
//                              r[2] = A[g][2t+8..2t+9]   r[3] = A[g+8][2t+8..2t+9]
//   FragB (B[k][n], 16x8):     r[0] = B[2t..2t+1][g]     r[1] = B[2t+8..2t+9][g]
//   FragC (C[row][n], 16x8):   r[0], r[1] = C[g][2t], C[g][2t+1]
//                              r[2], r[3] = C[g+8][2t], C[g+8][2t+1]
//
// For y = x W^T with W in PyTorch layout [N, K], B[k][n] = W[n][k]: a B register is a
// contiguous bf16 pair of W's row n, so both operands load straight from row-major memory
// (x rows, W rows) with 32-bit loads: load_frag_a / load_frag_b below, given a pointer to the
// fragment's first element and the leading dimension in elements (even, so every pair is
// 4-byte aligned), with no ldmatrix.
//
// Numerics: the products of two bf16 values are exact in fp32; the tensor core sums them into
// the fp32 accumulator (on the GPU in an internal order and precision of its own; the emulator
// adds them in k order). Either way the result differs from the CPU oracle's fp32 dot product
// only in the last fp32 bits, and a GEMM built on it rounds once, to bf16, at its store.
//
// Staging: Stage<ROWS, BK, THREADS> moves a ROWS x BK bf16 tile of a row-major matrix from global
// memory into registers (16-byte loads; rows and k past the matrix's end read as zeros) and then
// into shared memory, so a K loop can fetch tile k+1 while the tensor cores work on tile k;
// fetch_rows does the same for a tile whose rows are gathered (attention's GQA-packed queries,
// the KV ring's rows); prefetch_l2 requests a later tile into L2 without using registers.
//
// ldmatrix path (for tiles stored unpadded and swizzled in shared memory, and for a B operand
// stored [K, N] row-major, e.g. the embedding table, whose k pairs are not contiguous):
// ldmatrix_x4 / ldmatrix_x4_trans (ldmatrix.sync.aligned.m8n8.x4[.trans].shared.b16) load four
// 8x8 bf16 matrices per instruction; Swizzle<COLS> places the 16-byte chunks of a tile row so
// that neither the staging stores nor an ldmatrix phase (8 rows, one chunk each) conflict on
// banks; Stage::store_swizzled writes a tile that way; load_frag_a_sw (A, row-major [M, K] tile)
// and load_frag_b_pair_trans (two n8 B fragments from a [K, N] tile, transposed by ldmatrix) read
// it back in the fragment layouts above.
//
// Emulator: under DGEMMA_EMULATOR (defined by crates/dgemma-cuda/emu/cuda_emu.hpp)
// mma_bf16_16816 and the ldmatrix loads call emu::mma_bf16_16816 / emu::ldmatrix_x4,
// warp-collective implementations of the same layouts (every lane must take part, as with
// .aligned on the GPU).
#pragma once
#include "common.cuh"

namespace dgemma {

struct FragA {
    unsigned r[4];
};
struct FragB {
    unsigned r[2];
};
struct FragC {
    float r[4];
};

__device__ __forceinline__ void zero(FragC& c)
{
#pragma unroll
    for (int i = 0; i < 4; ++i) c.r[i] = 0.0f;
}

// A 32-bit word (a bf16 pair, lower index in the low half) of shared or global memory.
__device__ __forceinline__ unsigned ld_pair(const bf16* p) { return *reinterpret_cast<const unsigned*>(p); }

// A[0..15][0..15] at `a` (row-major, leading dimension `ld` elements).
__device__ __forceinline__ FragA load_frag_a(const bf16* a, int ld)
{
    const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const bf16* lo = a + g * ld + 2 * t;
    const bf16* hi = lo + 8 * ld;
    FragA f;
    f.r[0] = ld_pair(lo);
    f.r[1] = ld_pair(hi);
    f.r[2] = ld_pair(lo + 8);
    f.r[3] = ld_pair(hi + 8);
    return f;
}

// B[k][n] = w[n * ld + k] for n in 0..7, k in 0..15: eight rows of a [N, K] weight at `w`.
__device__ __forceinline__ FragB load_frag_b(const bf16* w, int ld)
{
    const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const bf16* p = w + g * ld + 2 * t;
    FragB f;
    f.r[0] = ld_pair(p);
    f.r[1] = ld_pair(p + 8);
    return f;
}

// B[k][n] = b[k * ld + n] for k in 0..15, n in 0..7: a k-major operand (row-major [K, N], e.g. V
// in attention's P.V, whose rows are keys). A register pairs two k, which are ld elements apart
// here, so each is gathered from two 16-bit loads (ldmatrix.trans would do it in one).
__device__ __forceinline__ FragB load_frag_b_kmajor(const bf16* b, int ld)
{
    const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const unsigned short* p = reinterpret_cast<const unsigned short*>(b + 2 * t * ld + g);
    FragB f;
    f.r[0] = (unsigned)p[0] | ((unsigned)p[ld] << 16);
    f.r[1] = (unsigned)p[8 * ld] | ((unsigned)p[9 * ld] << 16);
    return f;
}

// d += a * b (fp32 accumulation). Warp-collective: all 32 lanes, converged.
__device__ __forceinline__ void mma_bf16_16816(FragC& d, const FragA& a, const FragB& b)
{
#if defined(DGEMMA_EMULATOR)
    emu::mma_bf16_16816(d.r, a.r, b.r);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
                 "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
                 : "+f"(d.r[0]), "+f"(d.r[1]), "+f"(d.r[2]), "+f"(d.r[3])
                 : "r"(a.r[0]), "r"(a.r[1]), "r"(a.r[2]), "r"(a.r[3]), "r"(b.r[0]), "r"(b.r[1]));
#else
    trap_wrong_arch(); // no tensor cores below sm_80 (never compiled for: see GENCODES)
#endif
}

// Two fp32 values rounded to bf16 (round to nearest even) and stored as one 32-bit word at `p`
// (4-byte aligned): `lo` at p[0], `hi` at p[1].
__device__ __forceinline__ void store_bf16_pair(bf16* p, float lo, float hi)
{
    *reinterpret_cast<__nv_bfloat162*>(p) = __floats2bfloat162_rn(lo, hi);
}

// The placement of the 16-byte chunks (8 bf16) of a shared-memory tile with unpadded rows of COLS
// elements: chunk c of row r is stored at chunk c ^ f(r) of the same row, f(r) = (r / L) % S with
// S = min(COLS / 8, 8) chunks permuted per 128-byte line and L = 8 / S rows per line. Shared
// memory has 32 banks of 4 bytes, i.e. eight 16-byte bank groups per 128 bytes: an ldmatrix
// phase reads one chunk from each of 8 consecutive rows (from a multiple of 8), and eight
// consecutive threads of a staging store write 8 consecutive chunks; with the XOR both land in
// 8 distinct bank groups (no conflict), where unpadded rows of 64 bytes or more would put all 8
// rows of a phase in the same group.
template <int COLS>
struct Swizzle {
    static constexpr int CHUNKS = COLS / 8;
    static_assert(COLS % 8 == 0 && CHUNKS >= 2 && (CHUNKS & (CHUNKS - 1)) == 0,
                  "a swizzled row is a power of two of at least two 16-byte chunks");
    static constexpr int SPAN = CHUNKS < 8 ? CHUNKS : 8;
    static constexpr int ROWS_PER_LINE = 8 / SPAN;
    // Element offset of the chunk holding (row, col), col a multiple of 8.
    __device__ static __forceinline__ int at(int row, int col)
    {
        return row * COLS + 8 * ((col >> 3) ^ ((row / ROWS_PER_LINE) & (SPAN - 1)));
    }
};

// A ROWS x BK tile of a row-major bf16 matrix [row_end.., ld], staged global -> registers ->
// shared memory in 16-byte chunks (8 elements). Chunk c of the tile is row c / (BK / 8), elements
// 8 * (c % (BK / 8)).. of it; thread i holds chunks i, i + THREADS, ... (consecutive threads read
// consecutive 16 bytes of a row). Requirements: `src` 16-byte aligned, `ld` and `k_end` multiples
// of 8 (a chunk is either wholly inside the matrix or wholly past its end), BK a multiple of 8.
template <int ROWS, int BK, int THREADS>
struct Stage {
    static constexpr int CHUNKS_PER_ROW = BK / 8;
    static constexpr int CHUNKS = ROWS * CHUNKS_PER_ROW;
    static constexpr int PER_THREAD = (CHUNKS + THREADS - 1) / THREADS;
    static_assert(BK % 8 == 0, "a tile row is whole 16-byte chunks");
    uint4 v[PER_THREAD];

    // Rows row0.. and k k0.. of `src`; rows >= row_end and k >= k_end read as zero.
    __device__ __forceinline__ void fetch(const bf16* src, int ld, int row0, int row_end, int k0, int k_end)
    {
#pragma unroll
        for (int i = 0; i < PER_THREAD; ++i) {
            const int c = threadIdx.x + i * THREADS;
            const int r = row0 + c / CHUNKS_PER_ROW, k = k0 + 8 * (c % CHUNKS_PER_ROW);
            if (c < CHUNKS && r < row_end && k < k_end)
                v[i] = *reinterpret_cast<const uint4*>(src + (size_t)r * ld + k);
            else
                v[i] = uint4{0u, 0u, 0u, 0u};
        }
    }

    // As fetch, for a tile whose rows are not evenly spaced: tile row i is the matrix row r =
    // row0 + i, which starts at `row(r)` (16-byte aligned); rows outside [row_begin, row_end) and
    // k >= k_end read as zero and `row` is not called for them (row0 may be below row_begin).
    template <class RowPtr>
    __device__ __forceinline__ void fetch_rows(RowPtr row, int row0, int row_begin, int row_end, int k0, int k_end)
    {
#pragma unroll
        for (int i = 0; i < PER_THREAD; ++i) {
            const int c = threadIdx.x + i * THREADS;
            const int r = row0 + c / CHUNKS_PER_ROW, k = k0 + 8 * (c % CHUNKS_PER_ROW);
            if (c < CHUNKS && r >= row_begin && r < row_end && k < k_end)
                v[i] = *reinterpret_cast<const uint4*>(row(r) + k);
            else
                v[i] = uint4{0u, 0u, 0u, 0u};
        }
    }

    // The chunks fetch() would read for the same arguments, requested into L2 (prefetch.global.L2:
    // a hint without a result, so a later fetch() finds them there instead of waiting on HBM;
    // nothing in the emulator).
    __device__ __forceinline__ void prefetch_l2(const bf16* src, int ld, int row0, int row_end, int k0, int k_end) const
    {
#if !defined(DGEMMA_EMULATOR) && defined(__CUDA_ARCH__)
#pragma unroll
        for (int i = 0; i < PER_THREAD; ++i) {
            const int c = threadIdx.x + i * THREADS;
            const int r = row0 + c / CHUNKS_PER_ROW, k = k0 + 8 * (c % CHUNKS_PER_ROW);
            if (c < CHUNKS && r < row_end && k < k_end)
                asm volatile("prefetch.global.L2 [%0];\n" ::"l"(src + (size_t)r * ld + k));
        }
#endif
    }

    // Into shared memory `dst`: ROWS rows of leading dimension `lds` (a multiple of 8 elements).
    __device__ __forceinline__ void store(bf16* dst, int lds) const
    {
#pragma unroll
        for (int i = 0; i < PER_THREAD; ++i) {
            const int c = threadIdx.x + i * THREADS;
            if (c < CHUNKS)
                *reinterpret_cast<uint4*>(dst + (c / CHUNKS_PER_ROW) * lds + 8 * (c % CHUNKS_PER_ROW)) = v[i];
        }
    }

    // Into shared memory `dst` (16-byte aligned) in wgmma's K-major core-matrix layout
    // (csrc/wgmma.cuh: chunk (r, kc) at element ((r / 8) * (BK / 8) + kc) * 64 + (r % 8) * 8, i.e.
    // LBO 128 bytes, SBO BK * 16 bytes).
    __device__ __forceinline__ void store_core_matrices(bf16* dst) const
    {
#pragma unroll
        for (int i = 0; i < PER_THREAD; ++i) {
            const int c = threadIdx.x + i * THREADS;
            const int r = c / CHUNKS_PER_ROW, kc = c % CHUNKS_PER_ROW;
            if (c < CHUNKS) *reinterpret_cast<uint4*>(dst + ((r / 8) * CHUNKS_PER_ROW + kc) * 64 + (r % 8) * 8) = v[i];
        }
    }

    // Into shared memory `dst` (16-byte aligned): ROWS unpadded rows of BK elements, chunks placed
    // by Swizzle<BK> (read back with load_frag_a_sw / load_frag_b_pair_trans).
    __device__ __forceinline__ void store_swizzled(bf16* dst) const
    {
#pragma unroll
        for (int i = 0; i < PER_THREAD; ++i) {
            const int c = threadIdx.x + i * THREADS;
            if (c < CHUNKS)
                *reinterpret_cast<uint4*>(dst + Swizzle<BK>::at(c / CHUNKS_PER_ROW, 8 * (c % CHUNKS_PER_ROW))) = v[i];
        }
    }
};

// ---------------------------------------------------------------------------------------------
// ldmatrix

// ldmatrix.sync.aligned.m8n8.x4[.trans].shared.b16. Lane l passes `row`, the address in shared
// memory of row l % 8 of matrix l / 8 (8 contiguous bf16, 16-byte aligned). With g = lane >> 2,
// t = lane & 3 and M_q[i][j] element j of row i of matrix q, register q receives
//   ldmatrix_x4:        M_q[g][2t], M_q[g][2t+1]        (the A / B fragment register layout)
//   ldmatrix_x4_trans:  M_q[2t][g], M_q[2t+1][g]        (the same of the transposed matrix)
// the first in the low 16 bits. Warp-collective: all 32 lanes, converged.
__device__ __forceinline__ void ldmatrix_x4(unsigned (&r)[4], const bf16* row)
{
#if defined(DGEMMA_EMULATOR)
    emu::ldmatrix_x4(r, row, false);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    const unsigned a = static_cast<unsigned>(__cvta_generic_to_shared(row));
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(a));
#else
    trap_wrong_arch();
#endif
}

__device__ __forceinline__ void ldmatrix_x4_trans(unsigned (&r)[4], const bf16* row)
{
#if defined(DGEMMA_EMULATOR)
    emu::ldmatrix_x4(r, row, true);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    const unsigned a = static_cast<unsigned>(__cvta_generic_to_shared(row));
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(a));
#else
    trap_wrong_arch();
#endif
}

// A[row0..row0+15][k0..k0+15] (k0 a multiple of 16) from a swizzled tile of COLS-element rows
// holding A row-major (k along the row): matrices (rows 0-7, k 0-7), (rows 8-15, k 0-7),
// (rows 0-7, k 8-15), (rows 8-15, k 8-15) are FragA's r[0..3].
template <int COLS>
__device__ __forceinline__ FragA load_frag_a_sw(const bf16* tile, int row0, int k0)
{
    const int lane = threadIdx.x & 31, q = lane >> 3, i = lane & 7;
    FragA f;
    ldmatrix_x4(f.r, tile + Swizzle<COLS>::at(row0 + 8 * (q & 1) + i, k0 + 8 * (q >> 1)));
    return f;
}

// The B fragments of columns n0..n0+7 (b0) and n0+8..n0+15 (b1), k0..k0+15 (k0 a multiple of 16),
// from a swizzled tile of COLS-element rows holding B[k][n] row-major (n along the row: a [K, N]
// weight such as the embedding table). ldmatrix.trans of matrices (k 0-7, n 0-7), (k 8-15, n 0-7),
// (k 0-7, n 8-15), (k 8-15, n 8-15) gives b0.r[0], b0.r[1], b1.r[0], b1.r[1].
template <int COLS>
__device__ __forceinline__ void load_frag_b_pair_trans(FragB& b0, FragB& b1, const bf16* tile, int k0, int n0)
{
    const int lane = threadIdx.x & 31, q = lane >> 3, i = lane & 7;
    unsigned r[4];
    ldmatrix_x4_trans(r, tile + Swizzle<COLS>::at(k0 + 8 * (q & 1) + i, n0 + 8 * (q >> 1)));
    b0.r[0] = r[0];
    b0.r[1] = r[1];
    b1.r[0] = r[2];
    b1.r[1] = r[3];
}

// The fragments of a padded tile (rows of `ld` elements with ld = 8 mod 16: rows 16-byte aligned
// and an odd number of 16-byte bank groups apart, so the 8 rows an ldmatrix phase reads fall in 8
// distinct groups), one ldmatrix.x4 each: A[0..15][0..15] at `a` (row-major, as load_frag_a); ...
__device__ __forceinline__ FragA load_frag_a_ldsm(const bf16* a, int ld)
{
    const int lane = threadIdx.x & 31, q = lane >> 3, i = lane & 7;
    FragA f;
    ldmatrix_x4(f.r, a + (8 * (q & 1) + i) * ld + 8 * (q >> 1));
    return f;
}

// ... the B fragments of columns 0..7 (b0) and 8..15 (b1) with B[k][n] = w[n * ld + k] (rows of a
// [N, K] weight, as load_frag_b: attention's K) ...
__device__ __forceinline__ void load_frag_b_pair_ldsm(FragB& b0, FragB& b1, const bf16* w, int ld)
{
    const int lane = threadIdx.x & 31, q = lane >> 3, i = lane & 7;
    unsigned r[4];
    ldmatrix_x4(r, w + (8 * (q >> 1) + i) * ld + 8 * (q & 1));
    b0.r[0] = r[0];
    b0.r[1] = r[1];
    b1.r[0] = r[2];
    b1.r[1] = r[3];
}

// ... and the same with B[k][n] = b[k * ld + n] (k-major, as load_frag_b_kmajor: attention's V),
// transposed by ldmatrix.trans.
__device__ __forceinline__ void load_frag_b_pair_kmajor_ldsm(FragB& b0, FragB& b1, const bf16* b, int ld)
{
    const int lane = threadIdx.x & 31, q = lane >> 3, i = lane & 7;
    unsigned r[4];
    ldmatrix_x4_trans(r, b + (8 * (q & 1) + i) * ld + 8 * (q >> 1));
    b0.r[0] = r[0];
    b0.r[1] = r[1];
    b1.r[0] = r[2];
    b1.r[1] = r[3];
}

} // namespace dgemma
