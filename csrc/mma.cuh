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
// 4-byte aligned). No ldmatrix.
//
// Numerics: the products of two bf16 values are exact in fp32; the tensor core sums them into
// the fp32 accumulator (on the GPU in an internal order and precision of its own; the emulator
// adds them in k order). Either way the result differs from the CPU oracle's fp32 dot product
// only in the last fp32 bits, and a GEMM built on it rounds once, to bf16, at its store.
//
// Staging: Stage<ROWS, BK, THREADS> moves a ROWS x BK bf16 tile of a row-major matrix from global
// memory into registers (16-byte loads; rows and k past the matrix's end read as zeros) and then
// into shared memory, so a K loop can fetch tile k+1 while the tensor cores work on tile k.
//
// Emulator: under DGEMMA_EMULATOR (defined by crates/dgemma-cuda/emu/cuda_emu.hpp)
// mma_bf16_16816 calls emu::mma_bf16_16816, a warp-collective implementation of the same layout
// (every lane must take part, as with .aligned on the GPU).
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
};

} // namespace dgemma
