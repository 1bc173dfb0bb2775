// cuda_emu.hpp: just enough of CUDA to run dgemma's kernel templates on the CPU.
//
// Purpose: machines without a GPU (this project's build machines, CI) can still EXECUTE every
// generated kernel and compare it with the CPU oracle (crates/dgemma-cuda/tests/emulated_kernels.rs,
// `cargo test -p dgemma-cuda --features emulator`). It checks the kernels' logic (indexing, masks,
// reductions, rounding points); it says nothing about speed, occupancy, memory-model races or
// the exact ulps of CUDA's expf/tanhf (glibc's are used here).
//
// Model: one launch runs its blocks one after another. The threads of a block are fibers
// (own stacks; setjmp/longjmp switches) on the calling OS thread, scheduled round robin; they only switch at barriers, so
// `__shared__` can simply be a function-local `static`. __syncthreads waits for every live
// thread of the block and a warp shuffle for every live lane of the warp (threads that returned
// count as arrived, as on sm_70+). A pass of the scheduler without progress is a deadlock
// (e.g. a barrier inside divergent code): reported and aborted.
//
// The emulated arch is sm_90a: __CUDA_ARCH__ = 900 and __CUDA_ARCH_FEAT_SM90_ALL are defined,
// so sm_90a-specific kernels run their body and sm_120-specific ones trap. DGEMMA_EMULATOR is
// defined too: device code whose GPU form is inline PTX (csrc/mma.cuh) calls the emulation below
// instead (emu::mma_bf16_16816: the tensor-core mma, and emu::ldmatrix_x4: the shared-memory
// fragment loads, plain and transposed; both warp-collective like a shuffle; emu::cp_async and
// emu::wgmma: the asynchronous copies and warpgroup MMAs of csrc/wgmma.cuh, queued per thread and
// carried out at the thread's wait, so a missing wait shows up as wrong values). Dynamic shared
// memory (dgemma::dynamic_smem) is one buffer per launch, poisoned with NaN bytes per block.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <csetjmp>
#include <setjmp.h>
#include <ucontext.h>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__
#define __launch_bounds__(...)
#define __shared__ static
#define __CUDA_ARCH__ 900
#define __CUDA_ARCH_FEAT_SM90_ALL 1
#define DGEMMA_EMULATOR 1

struct dim3 {
    unsigned x = 0, y = 0, z = 0;
};

struct __nv_bfloat16 {
    unsigned short bits;
};

// A bf16 pair in one 32-bit word, `x` at the lower address (cuda_bf16.h's __nv_bfloat162).
struct alignas(4) __nv_bfloat162 {
    __nv_bfloat16 x, y;
};

// CUDA's built-in 16-byte vector type (vector_types.h), aligned as on the device: a misaligned
// address faults here too (csrc/bandwidth.cuh).
struct alignas(16) uint4 {
    unsigned int x, y, z, w;
};

// The 8-byte vector type (8 e4m3 codes in csrc/grouped_gemm.cuh), aligned as on the device.
struct alignas(8) uint2 {
    unsigned int x, y;
};

namespace emu {

enum State { RUNNING, DONE };

// An asynchronous copy to shared memory (cp.async): `src_bytes` of `bytes` come from `src`, the
// rest are zeros.
struct AsyncCopy {
    void* dst;
    const void* src;
    int bytes, src_bytes;
};

// A warpgroup MMA in flight (wgmma.mma_async m64nNk16, bf16 -> fp32): this thread's N / 2
// accumulators, the two shared-memory matrix descriptors and scale-d.
struct AsyncMma {
    float* d;
    int n;
    uint64_t desc_a, desc_b;
    bool scale_d;
    bool trans_b; // B N-major (imm-trans-b = 1)
};

// Operations a thread issued and has not waited for, split into committed groups (`*_groups`:
// the end index of each group in the queue; operations after the last end are uncommitted).
template <class Op>
struct AsyncQueue {
    std::vector<Op> ops;
    std::vector<size_t> groups;
    void clear()
    {
        ops.clear();
        groups.clear();
    }
};

struct Fiber {
    ucontext_t ctx; // only to start the fiber on its own stack
    jmp_buf jb;     // where it yielded
    dim3 tid;
    State state;
    bool started;
    AsyncQueue<AsyncCopy> copies; // cp.async
    AsyncQueue<AsyncMma> mmas;    // wgmma.mma_async
    long wgmma_issued;            // wgmma.mma_async issued in this block
};

struct Barrier {
    int arrived = 0;
    unsigned gen = 0;
};

constexpr int MAX_THREADS = 1024;
constexpr int MAX_WARPS = MAX_THREADS / 32;
constexpr size_t STACK = 128 * 1024;

struct Runtime {
    ucontext_t scheduler;
    jmp_buf scheduler_jb;
    std::vector<Fiber> fibers;
    std::vector<std::vector<char>> stacks;
    Fiber* cur = nullptr;
    dim3 block_idx, block_dim, grid_dim;
    Barrier block_bar;
    Barrier warp_bar[MAX_WARPS];
    int live_in_block = 0;
    int live_in_warp[MAX_WARPS] = {};
    uint32_t warp_slots[MAX_WARPS][2][32];
    uint32_t mma_a[MAX_WARPS][2][32][4]; // mma operands, double-buffered as warp_slots
    uint32_t mma_b[MAX_WARPS][2][32][2];
    const void* ldm_rows[MAX_WARPS][2][32]; // ldmatrix row addresses, double-buffered likewise
    int or_acc = 0;
    long events = 0; // arrivals, releases and exits: progress of the scheduler
    void (*thunk)(void**) = nullptr;
    void** args = nullptr;
    // The launch's dynamic shared memory (extern __shared__): `dyn_bytes` at `dyn_smem`, 1 KiB
    // aligned, filled with 0xff bytes (bf16 / fp32 NaN) before every block. Shared-memory
    // addresses (__cvta_generic_to_shared, the wgmma descriptors) are offsets into it.
    unsigned char* dyn_smem = nullptr;
    size_t dyn_bytes = 0;
};

inline Runtime& rt()
{
    static Runtime r;
    return r;
}

inline int cur_thread() { return (int)rt().cur->tid.x; }

// Switches use _setjmp/_longjmp (no signal-mask syscalls); makecontext/swapcontext only start a
// fiber on its stack. A finished fiber jumps back instead of returning.
inline void yield()
{
    if (!_setjmp(rt().cur->jb)) _longjmp(rt().scheduler_jb, 1);
}

inline void release_if_complete(Barrier& b, int live)
{
    if (b.arrived > 0 && b.arrived >= live) {
        b.arrived = 0;
        b.gen++;
        rt().events++;
    }
}

inline void barrier_wait(Barrier& b, const int& live)
{
    const unsigned g = b.gen;
    b.arrived++;
    rt().events++;
    release_if_complete(b, live);
    while (b.gen == g) yield();
}

inline void syncthreads() { barrier_wait(rt().block_bar, rt().live_in_block); }

inline uint32_t shfl_xor_bits(uint32_t v, int mask)
{
    Runtime& r = rt();
    const int t = cur_thread(), w = t / 32, lane = t % 32;
    // Double-buffered by barrier generation: a lane cannot write this parity again before every
    // lane has read it (that needs the next barrier to pass first).
    uint32_t* slot = r.warp_slots[w][r.warp_bar[w].gen & 1];
    slot[lane] = v;
    barrier_wait(r.warp_bar[w], r.live_in_warp[w]);
    return slot[lane ^ mask];
}

inline float bf16_bits_to_float(uint32_t bits16)
{
    const uint32_t u = bits16 << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

// mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32: d += A B for the warp's 16x16 A and 16x8
// B, each lane passing its fragment registers in the PTX layout (csrc/mma.cuh: g = lane >> 2,
// t = lane & 3, the lower k / column index in the low 16 bits). Every lane deposits its A and B
// registers in the warp's slots (double-buffered by barrier generation, as shfl_xor_bits), waits
// for the warp, and computes its own four outputs C[g][2t..2t+1], C[g+8][2t..2t+1] from the
// gathered operands: fp32, k ascending, starting from its accumulator (a bf16 x bf16 product
// is exact in fp32, so only the adds round). All 32 lanes must take part (.aligned).
inline void mma_bf16_16816(float d[4], const uint32_t a[4], const uint32_t b[2])
{
    Runtime& r = rt();
    const int th = cur_thread(), w = th / 32, lane = th % 32;
    if (r.live_in_warp[w] != 32) {
        std::fprintf(stderr, "cuda_emu: mma.sync in warp %d with only %d live lanes (all 32 must take part)\n", w,
                     r.live_in_warp[w]);
        std::abort();
    }
    const unsigned parity = r.warp_bar[w].gen & 1;
    uint32_t(*sa)[4] = r.mma_a[w][parity];
    uint32_t(*sb)[2] = r.mma_b[w][parity];
    std::memcpy(sa[lane], a, sizeof(uint32_t) * 4);
    std::memcpy(sb[lane], b, sizeof(uint32_t) * 2);
    barrier_wait(r.warp_bar[w], r.live_in_warp[w]);
    const int g = lane >> 2, t = lane & 3;
    for (int h = 0; h < 2; ++h) {     // output row g + 8h
        for (int j = 0; j < 2; ++j) { // output column 2t + j
            const int row = g + 8 * h, col = 2 * t + j;
            float acc = d[2 * h + j];
            for (int k = 0; k < 16; ++k) {
                // A[row][k]: lane (row % 8) * 4 + (k % 8) / 2, register (row / 8) + 2 (k / 8).
                const uint32_t aw = sa[(row & 7) * 4 + ((k & 7) >> 1)][(row >> 3) + 2 * (k >> 3)];
                // B[k][col]: lane col * 4 + (k % 8) / 2, register k / 8.
                const uint32_t bw = sb[col * 4 + ((k & 7) >> 1)][k >> 3];
                const float av = bf16_bits_to_float((aw >> (16 * (k & 1))) & 0xffffu);
                const float bv = bf16_bits_to_float((bw >> (16 * (k & 1))) & 0xffffu);
                acc += av * bv;
            }
            d[2 * h + j] = acc;
        }
    }
}

// ldmatrix.sync.aligned.m8n8.x4[.trans].shared.b16: lane l passes the address of row l % 8 of
// matrix l / 8 (8 contiguous bf16 of the block's shared memory, a host address here). Every lane
// deposits its address, waits for the warp, and assembles its four registers from the gathered
// rows (csrc/mma.cuh: register q holds M_q[g][2t..2t+1], or with `trans` M_q[2t][g], M_q[2t+1][g];
// the first element in the low 16 bits). All 32 lanes must take part (.aligned).
inline void ldmatrix_x4(unsigned r[4], const void* row, bool trans)
{
    Runtime& rr = rt();
    const int th = cur_thread(), w = th / 32, lane = th % 32;
    if (rr.live_in_warp[w] != 32) {
        std::fprintf(stderr, "cuda_emu: ldmatrix in warp %d with only %d live lanes (all 32 must take part)\n", w,
                     rr.live_in_warp[w]);
        std::abort();
    }
    if (reinterpret_cast<uintptr_t>(row) % 16 != 0) {
        std::fprintf(stderr, "cuda_emu: ldmatrix row address %p is not 16-byte aligned\n", row);
        std::abort();
    }
    const unsigned parity = rr.warp_bar[w].gen & 1;
    const void** slots = rr.ldm_rows[w][parity];
    slots[lane] = row;
    barrier_wait(rr.warp_bar[w], rr.live_in_warp[w]);
    const int g = lane >> 2, t = lane & 3;
    auto elem = [&](int q, int i, int j) -> uint32_t { // M_q[i][j]
        uint16_t v;
        std::memcpy(&v, static_cast<const char*>(slots[8 * q + i]) + 2 * j, 2);
        return v;
    };
    for (int q = 0; q < 4; ++q) {
        const uint32_t lo = trans ? elem(q, 2 * t, g) : elem(q, g, 2 * t);
        const uint32_t hi = trans ? elem(q, 2 * t + 1, g) : elem(q, g, 2 * t + 1);
        r[q] = lo | (hi << 16);
    }
}

// ---------------------------------------------------------------------------------------------
// Dynamic shared memory and the asynchronous operations (cp.async, wgmma). Both are queued per
// thread and carried out only when the thread waits for them (cp.async.wait_group,
// wgmma.wait_group), reading and writing shared memory as it is THEN: a kernel that reads a
// copy's destination or a wgmma's accumulators before waiting, or overwrites a wgmma's operands
// before its wait, gets stale or wrong values here and fails its test, as it could on the GPU.

[[noreturn]] inline void fail(const char* what)
{
    std::fprintf(stderr, "cuda_emu: %s\n", what);
    std::abort();
}

inline unsigned char* dynamic_smem()
{
    if (rt().dyn_smem == nullptr) fail("the kernel uses dynamic shared memory but was launched with none");
    return rt().dyn_smem;
}

// The shared-memory address of `p` (an offset into the dynamic shared memory).
inline uint32_t shared_offset(const void* p)
{
    Runtime& r = rt();
    const unsigned char* c = static_cast<const unsigned char*>(p);
    if (r.dyn_smem == nullptr || c < r.dyn_smem || c >= r.dyn_smem + r.dyn_bytes)
        fail("a shared-memory address outside the launch's dynamic shared memory");
    return (uint32_t)(c - r.dyn_smem);
}

template <class Op, class Run>
inline void complete_groups(AsyncQueue<Op>& q, int pending, Run run)
{
    const int done = (int)q.groups.size() - pending;
    if (done <= 0) return;
    const size_t end = q.groups[done - 1];
    for (size_t i = 0; i < end; ++i) run(q.ops[i]);
    q.ops.erase(q.ops.begin(), q.ops.begin() + end);
    q.groups.erase(q.groups.begin(), q.groups.begin() + done);
    for (size_t& g : q.groups) g -= end;
}

inline void cp_async(void* dst, const void* src, int bytes, int src_bytes)
{
    if (reinterpret_cast<uintptr_t>(dst) % bytes != 0 || (src_bytes > 0 && reinterpret_cast<uintptr_t>(src) % bytes != 0))
        fail("cp.async with a misaligned address");
    shared_offset(dst);
    rt().cur->copies.ops.push_back(AsyncCopy{dst, src, bytes, src_bytes});
}

inline void cp_async_commit() { rt().cur->copies.groups.push_back(rt().cur->copies.ops.size()); }

inline void cp_async_wait(int pending)
{
    complete_groups(rt().cur->copies, pending, [](const AsyncCopy& c) {
        std::memcpy(c.dst, c.src, (size_t)c.src_bytes);
        std::memset(static_cast<char*>(c.dst) + c.src_bytes, 0, (size_t)(c.bytes - c.src_bytes));
    });
}

// Element (row, k) of a K-major bf16 operand in shared memory given by a wgmma matrix
// descriptor, without swizzling (PTX ISA "Matrix Descriptor Format" and "Shared Memory Matrix
// Layout"): bits 0-13 the start address, 16-29 the leading-dimension byte offset (LBO: from a
// core matrix to the next along K), 32-45 the stride-dimension byte offset (SBO: from one
// 8-row group to the next), each >> 4; bits 49-51 the base offset and 62-63 the swizzle mode,
// both 0 here. A core matrix is 8 rows of 16 contiguous bytes (8 bf16), rows 16 bytes apart.
//
// MN-major (a B operand with imm-trans-b = 1, stored [K][N]: N contiguous), unswizzled: a core
// matrix is 8 K-rows of 16 bytes (8 consecutive N elements), rows 16 bytes apart; LBO is the
// byte offset from one 8-K group to the next, SBO from one 8-N group to the next (CUTLASS's
// canonical MN-major INTERLEAVE layout ((T,1,m),(8,k)):((1,T,SBO),(1T,LBO))). So element
// (n, k) is at (n / 8) * SBO + (n % 8) * 2 + (k / 8) * LBO + (k % 8) * 16.
inline float wgmma_operand(uint64_t desc, int row, int k, bool mn_major = false)
{
    Runtime& r = rt();
    if ((desc >> 62) != 0 || ((desc >> 49) & 7) != 0) fail("wgmma descriptor: only unswizzled layouts are emulated");
    const size_t start = (size_t)(desc & 0x3fff) << 4, lbo = (size_t)((desc >> 16) & 0x3fff) << 4,
                 sbo = (size_t)((desc >> 32) & 0x3fff) << 4;
    const size_t at = mn_major ? start + (size_t)(row / 8) * sbo + (size_t)(row % 8) * 2 + (size_t)(k / 8) * lbo +
                                     (size_t)(k % 8) * 16
                               : start + (size_t)(row / 8) * sbo + (size_t)(row % 8) * 16 + (size_t)(k / 8) * lbo +
                                     (size_t)(k % 8) * 2;
    if (at + 2 > r.dyn_bytes) fail("wgmma operand outside the dynamic shared memory");
    uint16_t bits;
    std::memcpy(&bits, r.dyn_smem + at, 2);
    return bf16_bits_to_float(bits);
}

// wgmma.mma_async.sync.aligned.m64nNk16.f32.bf16.bf16 with both operands K-major in shared
// memory, queued; run_wgmma carries it out for the calling thread: warp w of the warpgroup owns
// D rows 16w.., and accumulator i of lane (g = lane / 4, t = lane % 4) is
// D[16w + g + 8 ((i / 2) % 2)][8 (i / 4) + 2t + i % 2] (PTX "Matrix Fragments for
// wgmma.m64nNk16", the mma.m16n8 accumulator layout repeated along N), summed in k order from
// the accumulator (or from zero without scale-d).
// Every thread of the warpgroup must issue the same wgmma (.aligned): the launch checks, per
// block, that the 128 threads of each warpgroup issued as many (threads run one after another
// here, so a warp may finish before the next one issues its part).
inline void wgmma(float* d, int n, uint64_t desc_a, uint64_t desc_b, bool scale_d, bool trans_b = false)
{
    if (rt().block_dim.x % 128 != 0) fail("wgmma in a block that is not whole warpgroups");
    rt().cur->mmas.ops.push_back(AsyncMma{d, n, desc_a, desc_b, scale_d, trans_b});
    rt().cur->wgmma_issued++;
}

inline void run_wgmma(const AsyncMma& m)
{
    const int th = cur_thread(), w = (th / 32) % 4, lane = th % 32, g = lane / 4, t = lane % 4;
    for (int i = 0; i < m.n / 2; ++i) {
        const int row = 16 * w + g + 8 * ((i / 2) % 2), col = 8 * (i / 4) + 2 * t + i % 2;
        float acc = m.scale_d ? m.d[i] : 0.0f;
        for (int k = 0; k < 16; ++k) acc += wgmma_operand(m.desc_a, row, k) * wgmma_operand(m.desc_b, col, k, m.trans_b);
        m.d[i] = acc;
    }
}

inline void wgmma_commit() { rt().cur->mmas.groups.push_back(rt().cur->mmas.ops.size()); }

inline void wgmma_wait(int pending) { complete_groups(rt().cur->mmas, pending, run_wgmma); }

inline void fiber_entry()
{
    Runtime& r = rt();
    r.thunk(r.args);
    const int t = cur_thread();
    if (!r.cur->copies.ops.empty() || !r.cur->mmas.ops.empty())
        fail("a thread exited with cp.async or wgmma operations it never waited for");
    r.cur->state = DONE;
    r.live_in_block--;
    r.live_in_warp[t / 32]--;
    r.events++;
    release_if_complete(r.block_bar, r.live_in_block);
    release_if_complete(r.warp_bar[t / 32], r.live_in_warp[t / 32]);
    _longjmp(r.scheduler_jb, 1);
}

// Runs `thunk(args)` over the grid. Not reentrant (the Rust side serialises launches).
inline int launch(void (*thunk)(void**), dim3 grid, unsigned block, size_t shared_bytes, void** args)
{
    Runtime& r = rt();
    if (block == 0 || block > (unsigned)MAX_THREADS || block % 32 != 0) return 2;
    std::free(r.dyn_smem);
    r.dyn_smem = nullptr;
    r.dyn_bytes = shared_bytes;
    if (shared_bytes > 0) {
        void* p = nullptr;
        if (posix_memalign(&p, 1024, shared_bytes) != 0) return 2;
        r.dyn_smem = static_cast<unsigned char*>(p);
    }
    r.thunk = thunk;
    r.args = args;
    r.grid_dim = grid;
    r.block_dim = dim3{block, 1, 1};
    r.fibers.resize(block);
    if (r.stacks.size() < block) r.stacks.resize(block);
    for (auto& s : r.stacks)
        if (s.size() != STACK) s.resize(STACK);
    for (unsigned bz = 0; bz < grid.z; ++bz)
        for (unsigned by = 0; by < grid.y; ++by)
            for (unsigned bx = 0; bx < grid.x; ++bx) {
                r.block_idx = dim3{bx, by, bz};
                if (r.dyn_smem != nullptr) std::memset(r.dyn_smem, 0xff, r.dyn_bytes);
                r.block_bar = Barrier{};
                r.live_in_block = (int)block;
                for (unsigned w = 0; w < block / 32; ++w) {
                    r.warp_bar[w] = Barrier{};
                    r.live_in_warp[w] = 32;
                }
                for (unsigned t = 0; t < block; ++t) {
                    Fiber& f = r.fibers[t];
                    f.tid = dim3{t, 0, 0};
                    f.state = RUNNING;
                    f.started = false;
                    f.copies.clear();
                    f.mmas.clear();
                    f.wgmma_issued = 0;
                    getcontext(&f.ctx);
                    f.ctx.uc_stack.ss_sp = r.stacks[t].data();
                    f.ctx.uc_stack.ss_size = STACK;
                    f.ctx.uc_link = &r.scheduler;
                    makecontext(&f.ctx, fiber_entry, 0);
                }
                while (r.live_in_block > 0) {
                    const long before = r.events;
                    for (unsigned t = 0; t < block; ++t) {
                        Fiber& f = r.fibers[t];
                        if (f.state == DONE) continue;
                        r.cur = &f;
                        if (!_setjmp(r.scheduler_jb)) {
                            if (!f.started) {
                                f.started = true;
                                swapcontext(&r.scheduler, &f.ctx);
                            } else {
                                _longjmp(f.jb, 1);
                            }
                        }
                    }
                    if (r.events == before) {
                        std::fprintf(stderr, "cuda_emu: deadlock in block (%u,%u,%u): a barrier some threads never reach\n",
                                     bx, by, bz);
                        return 3;
                    }
                }
                for (unsigned t = 0; t < block; ++t)
                    if (r.fibers[t].wgmma_issued != r.fibers[t - t % 128].wgmma_issued)
                        fail("a wgmma that not every thread of its warpgroup issued (all 128 must take part)");
            }
    return 0;
}

} // namespace emu

// ---------------------------------------------------------------------------------------------
// The CUDA surface the templates use.

#define threadIdx (emu::rt().cur->tid)
#define blockIdx (emu::rt().block_idx)
#define blockDim (emu::rt().block_dim)
#define gridDim (emu::rt().grid_dim)

inline void __syncthreads() { emu::syncthreads(); }

inline int __syncthreads_or(int p)
{
    emu::Runtime& r = emu::rt();
    emu::syncthreads(); // nobody is still reading a previous result
    if (p) r.or_acc = 1;
    emu::syncthreads();
    const int result = r.or_acc;
    emu::syncthreads();
    if (threadIdx.x == 0) r.or_acc = 0;
    return result;
}

inline float __shfl_xor_sync(unsigned, float v, int mask)
{
    uint32_t b;
    std::memcpy(&b, &v, 4);
    b = emu::shfl_xor_bits(b, mask);
    std::memcpy(&v, &b, 4);
    return v;
}

inline int __shfl_xor_sync(unsigned, int v, int mask) { return (int)emu::shfl_xor_bits((uint32_t)v, mask); }

[[noreturn]] inline void __trap()
{
    std::fprintf(stderr, "cuda_emu: __trap()\n");
    std::abort();
}

inline float __int_as_float(int i)
{
    float f;
    std::memcpy(&f, &i, 4);
    return f;
}

inline float __bfloat162float(__nv_bfloat16 b)
{
    const uint32_t u = (uint32_t)b.bits << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

// Round to nearest, ties to even; NaN becomes the canonical 0x7fff (as CUDA's).
inline __nv_bfloat16 __float2bfloat16_rn(float f)
{
    uint32_t u;
    std::memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return __nv_bfloat16{0x7fff};
    u += 0x7fffu + ((u >> 16) & 1u);
    return __nv_bfloat16{(unsigned short)(u >> 16)};
}

inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short bits) { return __nv_bfloat16{bits}; }

inline __nv_bfloat162 __floats2bfloat162_rn(float lo, float hi)
{
    return __nv_bfloat162{__float2bfloat16_rn(lo), __float2bfloat16_rn(hi)};
}

// Compiled with -ffp-contract=off: these are single IEEE operations, as on the GPU.
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fsub_rn(float a, float b) { return a - b; }

// Bit casts and integer intrinsics (the device sampler: Philox, uniform ids, the Gumbel bound).
inline int __float_as_int(float f)
{
    int i;
    std::memcpy(&i, &f, 4);
    return i;
}
inline unsigned __float_as_uint(float f)
{
    unsigned u;
    std::memcpy(&u, &f, 4);
    return u;
}
inline float __uint_as_float(unsigned u)
{
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}
// Round to nearest even, as the x86 conversion in the default rounding mode.
inline float __uint2float_rn(unsigned u) { return (float)u; }
inline unsigned __umulhi(unsigned a, unsigned b) { return (unsigned)(((unsigned long long)a * b) >> 32); }
inline unsigned long long __umul64hi(unsigned long long a, unsigned long long b)
{
    return (unsigned long long)(((unsigned __int128)a * b) >> 64);
}
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz((unsigned)x); }

inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
