// wgmma.cuh: the Hopper (sm_90a) tile vocabulary: asynchronous copies into shared memory
// (cp.async), shared-memory matrix descriptors and the warpgroup MMA (wgmma.mma_async).
//
// wgmma. A warpgroup (4 consecutive warps, 128 threads, the first warp a multiple of 4) computes
// D[64 x N] += A[64 x 16] B[16 x N] per instruction, with A and B read by the tensor cores straight
// from shared memory through 64-bit matrix descriptors, and D in fp32 registers: warp w of the
// warpgroup holds rows 16w..16w+15, and register i of lane (g = lane / 4, t = lane % 4) is
//   D[16w + g + 8 ((i / 2) % 2)][8 (i / 4) + 2t + i % 2]          i = 0 .. N / 2 - 1
// (the mma.m16n8 accumulator of csrc/mma.cuh repeated along N). Both operands here are K-major:
// A is [64 rows][16 k] and B is [N rows][16 k] with k contiguous, which is PyTorch's [out, in]
// weight layout and a row-major activation matrix alike ("y = x W^T" needs no transpose).
//
// Shared-memory layout, unswizzled ("interleaved"): a CORE MATRIX is 8 rows x 16 bytes (8 bf16),
// its rows 16 bytes apart (128 contiguous bytes). A tile of R rows x BK k is stored as core
// matrices (row group rb = r / 8, k group kb = k / 8) at byte ((rb * BK / 8) + kb) * 128, i.e.
//   element (r, k) at byte  (r / 8) * SBO + (k / 8) * LBO + (r % 8) * 16 + (k % 8) * 2
// with LBO = 128 (the next core matrix along K) and SBO = BK * 16 (the next 8 rows). The 16-byte
// chunk (r, kb) is chunk number (rb * BK / 8 + kb) * 8 + r % 8 of the tile: a thread that copies
// chunk c writes bytes 16c..16c+15, so consecutive threads fill consecutive bytes (no bank
// conflicts) while reading 8 rows' 16-byte pieces of the same k range from global memory. A k16
// step s of a tile is the descriptor of its base plus 2s core matrices (256 s bytes).
//
// Ordering rules the kernels follow (PTX ISA, "Asynchronous Warpgroup Level Matrix
// Multiply-Accumulate"): shared memory written by ordinary or cp.async stores must be made
// visible to the tensor cores' async proxy (fence_proxy_async, by the writing thread, then a
// barrier) before a wgmma reads it; wgmma_fence before the first wgmma and after registers of
// the accumulators were written by other instructions; wgmma_commit closes a group and
// wgmma_wait<N> waits until at most N groups are in flight: only then may the accumulators be
// read or the operands' shared memory be overwritten.
//
// cp.async: cp_async<BYTES>(dst, src, src_bytes) copies BYTES (4, 8 or 16) global -> shared
// without a register round trip (16: .cg, cached in L2 only, right for weights streamed once;
// 4 and 8 only exist as .ca), the first src_bytes from src and zeros after them (src_bytes 0:
// a chunk of zeros, src is not read). cp_async_commit closes a group, cp_async_wait<N> waits
// until at most N of this thread's groups are pending.
//
// Emulator: under DGEMMA_EMULATOR these call emu::cp_async / emu::wgmma
// (crates/dgemma-cuda/emu/cuda_emu.hpp), which decode the same descriptors and queue the work
// until the wait, so the kernels' layouts and their waits are executed on the CPU. The inline
// PTX is compiled only for the sm_90a image (DGEMMA_ARCH_SM90A): wgmma exists nowhere else.
#pragma once
#include "common.cuh"

namespace dgemma {

// The shared-memory address of a pointer into shared memory.
__device__ __forceinline__ unsigned smem_addr(const void* p)
{
#ifdef DGEMMA_EMULATOR
    return emu::shared_offset(p);
#else
    return (unsigned)__cvta_generic_to_shared(p);
#endif
}

// ---------------------------------------------------------------------------------------------
// cp.async

template <int BYTES>
__device__ __forceinline__ void cp_async(void* dst, const void* src, int src_bytes)
{
    static_assert(BYTES == 4 || BYTES == 8 || BYTES == 16, "cp.async copies 4, 8 or 16 bytes");
#ifdef DGEMMA_EMULATOR
    emu::cp_async(dst, src, BYTES, src_bytes);
#else
    if constexpr (BYTES == 16)
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src), "r"(src_bytes)
                     : "memory");
    else
        asm volatile("cp.async.ca.shared.global [%0], [%1], %2, %3;\n" ::"r"(smem_addr(dst)), "l"(src), "n"(BYTES),
                     "r"(src_bytes)
                     : "memory");
#endif
}

__device__ __forceinline__ void cp_async_commit()
{
#ifdef DGEMMA_EMULATOR
    emu::cp_async_commit();
#else
    asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}

template <int PENDING>
__device__ __forceinline__ void cp_async_wait()
{
#ifdef DGEMMA_EMULATOR
    emu::cp_async_wait(PENDING);
#else
    asm volatile("cp.async.wait_group %0;\n" ::"n"(PENDING) : "memory");
#endif
}

// ---------------------------------------------------------------------------------------------
// wgmma (sm_90a)

// The descriptor of a K-major, unswizzled operand tile at `tile` (16-byte aligned shared memory)
// with core matrices LBO bytes apart along K and SBO bytes apart along the rows.
__device__ __forceinline__ unsigned long long smem_desc(const void* tile, unsigned lbo, unsigned sbo)
{
    return (unsigned long long)((smem_addr(tile) & 0x3ffffu) >> 4) | ((unsigned long long)((lbo >> 4) & 0x3fffu) << 16) |
           ((unsigned long long)((sbo >> 4) & 0x3fffu) << 32);
}

__device__ __forceinline__ void fence_proxy_async()
{
#if !defined(DGEMMA_EMULATOR) && DGEMMA_ARCH_SM90A
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
}

__device__ __forceinline__ void wgmma_fence()
{
#if !defined(DGEMMA_EMULATOR) && DGEMMA_ARCH_SM90A
    asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#endif
}

__device__ __forceinline__ void wgmma_commit()
{
#ifdef DGEMMA_EMULATOR
    emu::wgmma_commit();
#elif DGEMMA_ARCH_SM90A
    asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
#endif
}

template <int PENDING>
__device__ __forceinline__ void wgmma_wait()
{
#ifdef DGEMMA_EMULATOR
    emu::wgmma_wait(PENDING);
#elif DGEMMA_ARCH_SM90A
    asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(PENDING) : "memory");
#endif
}

// Keeps the compiler from moving reads or writes of the accumulators across the asynchronous
// MMA (their registers are written behind its back until wgmma_wait): call it on every
// accumulator after writing them and after the wait. (The emulator's accumulators are memory
// that the queued MMA writes through a pointer: nothing to pin.)
template <int N>
__device__ __forceinline__ void wgmma_fence_operands(float (&d)[N])
{
#ifndef DGEMMA_EMULATOR
#pragma unroll
    for (int i = 0; i < N; ++i) asm volatile("" : "+f"(d[i])::"memory");
#else
    (void)d;
#endif
}

// d[0..31] += A[64 x 16] B[16 x 64] (bf16, by descriptor), fp32: one
// wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 with scale-d = 1 (accumulate), A and B
// unscaled, A K-major, B K-major or, with TRANS_B (imm-trans-b = 1), N-major: stored [K][N] with
// N contiguous, in the MN-major core-matrix layout (a core matrix is 8 K-rows of 8 consecutive
// N elements, 16 bytes apart; LBO steps 8 K, SBO steps 8 N).
template <bool TRANS_B = false>
__device__ __forceinline__ void wgmma_m64n64k16_bf16(float (&d)[32], unsigned long long desc_a, unsigned long long desc_b)
{
#ifdef DGEMMA_EMULATOR
    emu::wgmma(d, 64, desc_a, desc_b, true, TRANS_B);
#elif DGEMMA_ARCH_SM90A
    asm volatile("{\n"
                 ".reg .pred p;\n"
                 "setp.ne.b32 p, %34, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 "
                 "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
                 "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, "
                 "%32, %33, p, 1, 1, 0, %35;\n"
                 "}\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
                   "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]),
                   "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]),
                   "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]),
                   "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
                 : "l"(desc_a), "l"(desc_b), "r"(1), "n"(TRANS_B ? 1 : 0));
#else
    __trap();
#endif
}

// The same with N = 32: d[0..15] (csrc/attention.cuh: a warpgroup's 64 query rows x 32 keys).
__device__ __forceinline__ void wgmma_m64n32k16_bf16(float (&d)[16], unsigned long long desc_a, unsigned long long desc_b)
{
#ifdef DGEMMA_EMULATOR
    emu::wgmma(d, 32, desc_a, desc_b, true);
#elif DGEMMA_ARCH_SM90A
    asm volatile("{\n"
                 ".reg .pred p;\n"
                 "setp.ne.b32 p, %18, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n32k16.f32.bf16.bf16 "
                 "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15}, "
                 "%16, %17, p, 1, 1, 0, 0;\n"
                 "}\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
                   "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]),
                   "+f"(d[15])
                 : "l"(desc_a), "l"(desc_b), "r"(1));
#else
    __trap();
#endif
}

} // namespace dgemma
