// attention.cuh: scaled-dot-product attention with GQA and DiffusionGemma's masks, on tensor cores.
//
// CPU oracle: crates/dgemma-cpu/src/ops/attention.rs (attention). Model-spec 3.3, 3.6, 3.7.
//
// Shapes: q [q_len, Q_HEADS, HEAD_DIM], out like q; k and v [kv_rows, KV_HEADS, HEAD_DIM], a ring
// of kv_rows rows (the whole cache of a layer) holding the key at absolute position p in row
// p % kv_rows. The kernel reads kv_len <= kv_rows keys: key j (absolute position k_pos0 + j) from
// row (k_pos0 + j) % kv_rows. A cache that keeps every position is the ring with kv_rows >= every
// position (p % kv_rows == p); a contiguous buffer of exactly the kv_len keys is kv_rows = kv_len
// with k_pos0 a multiple of kv_len (e.g. 0).
// Paging (a vLLM-style KV pool: the caches of many sequences share one buffer of fixed-size
// pages): with page > 0, the ring's kv_rows rows are LOGICAL rows, kv_rows a multiple of page,
// and page_table (i32, kv_rows / page entries) names the physical page of each page of them:
// logical row r is row page_table[r / page] * page + r % page of k and v, whichever rows of the
// pool those are (any order, shared or not; the kernel only reads them). page == 0 (page_table
// null) is the ring itself, logical row = physical row.
// Query head h reads kv head h / GROUP (GROUP = Q_HEADS / KV_HEADS). Scale 1.0 (q and k are
// RMS-normalised upstream), no logit softcap. Positions are absolute: query i sits at q_pos0 + i,
// key j at k_pos0 + j, and key j is visible to query i when
//   Causal:        kp <= qp                       (encoder, full layers)
//   CausalSliding: kp <= qp && qp - kp < window   (encoder, sliding layers)
//   Bidirectional: always                          (decoder; the caller passes exactly the keys
//                                                   the layer may see: cache tail + canvas)
// Visible keys always form one contiguous range [j0, j1) per query, and both ends grow with the
// query, so a block of queries sees one contiguous range too: that is all the kernel scans.
//
// Rounding points (the CPU's bf16 mode, which mirrors torch's CPU flash-attention for bf16):
//   s_j   = q . k_j                  fp32 (tensor-core accumulation of exact bf16 products)
//   m     = max_j s_j                over ALL visible keys of the row (not a running max)
//   e_j   = exp(s_j - m)             fp32; denom = sum_j e_j in fp32 (another order than the CPU)
//   p_j   = bf16(e_j)                the unnormalised probability is rounded before P.V (it is
//                                    the bf16 A operand of the P.V mma)
//   acc   = sum_j p_j * v_j          fp32 (tensor-core accumulation)
//   out   = bf16(acc * (1 / denom))
//   no visible key: out = 0 (the CPU fills zeros)
// Up to 512 keys this is the CPU's rounding exactly. Beyond, the CPU takes a running max per
// 512-key block and rescales, so its p_j are rounded relative to a block max and ours relative to
// the final one: at 600-700 random keys 2.5-8% of the outputs differ by a bf16 ulp or two. The
// kernel tests compare such key ranges with this contract computed on the host
// (crates/dgemma-cuda/tests/common/mod.rs exact_max_attention), shorter ones with the CPU.
//
// Algorithm: mma.sync m16n8k16 (csrc/mma.cuh; sm_80+, so Portable), two passes over the keys.
//   * GQA packed into M: the GROUP query heads sharing a kv head are one matrix of
//     rows = q_len * GROUP "packed rows", row r = query r / GROUP, head kvh * GROUP + r % GROUP
//     (the decoder's full layers: 256 queries x 8 heads = 2048 rows per kv head). A block owns BM
//     packed rows of one kv head (grid: row tiles x KV_HEADS [x splits]; row tiles vary fastest,
//     so the blocks sharing a kv head's K/V run together), and each K/V tile it loads serves all
//     of them.
//   * Scores of one key tile, S[BM x BN] = Q K^T: Q and K stream through shared memory in BK-wide
//     head-dim chunks (Stage, double-buffered with a register prefetch as csrc/linear.cuh: 64 rows
//     of a 512-wide head are 64 KiB, more than the 48 KiB of static shared memory the launcher
//     allows, so Q is re-streamed per key tile, from L2). The WARPS_M x WARPS_N warps each own a
//     (BM / WARPS_M) x (BN / WARPS_N) sub-tile of S.
//   * Pass 1 scans every visible key tile for the row maxima m (each lane keeps a max per row it
//     holds, then the 4 lanes of a row and the warp columns reduce). Pass 2 recomputes S tile by
//     tile with the same code (so every s_j, hence m, is bit-identical), forms e = exp(s - m)
//     (masked keys: 0), adds e into per-lane row denominators, rounds p = bf16(e) into a shared
//     P tile [BM x BN], and accumulates O[BM x HEAD_DIM] += P V over 16-key slices of V (staged
//     double-buffered; V is k-major, so its B fragments load with ldmatrix.trans). Each warp owns
//     (BM / WARPS_M) x (HEAD_DIM / WARPS_N) of O in fp32 registers. Exp needs no cross-warp
//     communication because m is known; the denominators reduce once, at the end (4 lanes, then
//     the warp columns in order), and out = bf16(acc * (1 / denom)).
//     Trade: the exact max costs QK^T twice, 1.5x the mma work of a one-pass (online-softmax)
//     flash kernel, in exchange for the CPU's rounding of p relative to the final max.
//   * Masks: the block scans the union of its rows' ranges in key tiles aligned to absolute key
//     positions (multiples of BN: a key's lane and k16 step, hence every fp32 sum, do not depend
//     on the pass's other queries, so a prompt prefilled in chunks gives the bits of one pass);
//     tiles wholly outside the range are never visited, and m16 / n8 fragments wholly past the
//     rows or keys skip their mma (warp-uniform tests). Element (row, key) is live iff the key is
//     in the row's range; keys outside the block's range (tile padding) and packed rows past
//     q_len * GROUP are staged as zeros and masked, so ring rows outside the range are never read.
//   * Split KV (flash-decoding, for decoder passes whose row tiles x KV_HEADS do not fill the
//     GPU; the host picks `splits`, a function of the pass's shape only, so a sequence's result
//     does not depend on what else runs; encoder passes are not split, which keeps chunked
//     prefill exact). `phase` says which launch this is:
//       ATTENTION_WHOLE      unsplit (splits = 1), the only launch: both passes, writes out.
//     A split attention is three launches:
//       ATTENTION_SPLIT_MAX  grid z = split s: pass 1 over the s-th share of the block's key tiles
//                            -> the partial row maxima in `scratch`.
//       ATTENTION_SPLIT_PV   m = the max over the splits' partial maxima (exact: max is
//                            order-free), then pass 2 over the same share -> the partial
//                            denominators and fp32 accumulators in `scratch`.
//       ATTENTION_COMBINE    denom = sum_s denom_s, acc = sum_s acc_s in split order (fixed; no
//                            atomics), out = bf16(acc * (1 / denom)).
//     scratch (fp32): max [splits][KV_HEADS][rows], denom [splits][KV_HEADS][rows],
//     acc [splits][KV_HEADS][rows][HEAD_DIM]. Only the order of the denominator and accumulator
//     sums differs from the unsplit kernel (an fp32 rounding, within the tolerance above).
//   * WGMMA (sm_90a; codegen's Attention::wgmma, shapes.rs attention_spec_for): S = Q K^T runs
//     on wgmma m64n32k16 (csrc/wgmma.cuh) instead of mma.sync. WARPS_M = 4, WARPS_N = 2, and
//     warp w is (wm, wn) = (w % 4, w / 4), so a warpgroup is the 4 row warps of one 32-key
//     column and its accumulator layout is exactly the mma.sync fragments s_acc[0][0..3] of
//     each warp: the maxima, exp and denominators are the same code. Where a warp column's
//     head dims are whole n64 tiles (head_dim >= 128: the 26B model), P V runs on wgmma too:
//     P is written as K-major core matrices (8 rows x 8 keys), each 16-key V slice as N-major
//     core matrices (8 keys x 8 dims, imm-trans-b), and O[64 x head_dim / 2] += P V is
//     head_dim / 128 wgmma m64n64k16 per slice on the same o fragments; smaller heads keep
//     P V on mma.sync. Q and K chunks are stored in wgmma's core-matrix layout
//     (Stage::store_core_matrices, then fence.proxy.async before the barrier); each chunk's
//     BK / 16 wgmma are committed and waited for before the next chunk is stored over the other
//     buffer. No fragment skipping (a wgmma is the whole warpgroup's): rows past the pass and
//     keys outside the range are the staged zeros, masked as before. The staged tiles and P live
//     in dynamic shared memory (the descriptors address it). The fp32 sums of S are the tensor
//     cores' own order, as with mma.sync; the tests hold both variants to the same tolerances.
// Shared memory (static, <= 48 KiB; spec.rs Attention::shared_bytes): two Q+K chunk buffers
// (BM + BN) x (BK + 8), which the two V slice buffers 16 x (HEAD_DIM + 8 or 16) reuse, the P tile
// BM x (BN + 8), and two fp32 row-statistic arrays. Fragments load with ldmatrix.x4 (csrc/mma.cuh
// *_ldsm); the padded row lengths (8 mod 16 elements) put the 8 rows of an ldmatrix phase in 8
// distinct bank groups.
//
// Requirements (checked by ops.rs plan_attention): q, k, v 16-byte aligned (16-byte chunks of rows
// of HEAD_DIM elements, HEAD_DIM a multiple of 8), out 4-byte aligned (paired stores), scratch
// 4-byte aligned and sized as above when splits > 1; when paged, page_table 4-byte aligned with
// kv_rows / page entries, kv_rows a multiple of page, each entry a page of k and v.
#pragma once
#include "common.cuh"
#include "mma.cuh"
#include "wgmma.cuh"

namespace dgemma {

enum class Mask { Causal, CausalSliding, Bidirectional };

// The `phase` argument: which launch of an attention this is (see the header).
constexpr int ATTENTION_WHOLE = 0;
constexpr int ATTENTION_SPLIT_MAX = 1;
constexpr int ATTENTION_SPLIT_PV = 2;
constexpr int ATTENTION_COMBINE = 3;

template <int HEAD_DIM, int Q_HEADS, int KV_HEADS, Mask MASK, int BM, int BN, int BK, int WARPS_M, int WARPS_N,
          bool WGMMA = false>
__device__ __forceinline__ void attention(const bf16* __restrict__ q, const bf16* __restrict__ k,
                                          const bf16* __restrict__ v, bf16* __restrict__ out,
                                          float* __restrict__ scratch, int q_len, int kv_len, int kv_rows,
                                          const int* __restrict__ page_table, int page, int q_pos0, int k_pos0,
                                          int window, int splits, int phase)
{
    static_assert(Q_HEADS % KV_HEADS == 0, "GQA needs Q_HEADS to be a multiple of KV_HEADS");
    constexpr int GROUP = Q_HEADS / KV_HEADS;
    constexpr int THREADS = 32 * WARPS_M * WARPS_N;
    constexpr int WM = BM / WARPS_M, MF = WM / 16;       // packed rows per warp, m16 fragments
    constexpr int WNS = BN / WARPS_N, NFS = WNS / 8;     // scores: keys per warp, n8 fragments
    constexpr int WD = HEAD_DIM / WARPS_N, NFO = WD / 8; // output: dims per warp, n8 fragments
    constexpr int KT = (HEAD_DIM + BK - 1) / BK;         // head-dim chunks of Q K^T
    constexpr int VK = 16;                               // keys per V slice: one k16 step of P V
    constexpr int NSL = BN / VK;                         // V slices per key tile
    constexpr int LDS = BK + 8;                          // Q / K chunk rows (elements)
    constexpr int LDV = HEAD_DIM % 16 == 0 ? HEAD_DIM + 8 : HEAD_DIM + 16; // V rows: 8 mod 16
    constexpr int LDP = BN + 8;                          // P rows
    constexpr int STAGE = WGMMA ? (BM + BN) * BK : (BM + BN) * LDS; // one Q + K chunk buffer
    constexpr int VSTAGE = VK * LDV;                     // one V slice buffer
    constexpr int STAGED = 2 * STAGE > 2 * VSTAGE ? 2 * STAGE : 2 * VSTAGE;
    static_assert(BM % (16 * WARPS_M) == 0 && BN % (8 * WARPS_N) == 0 && BN % VK == 0, "warp tiling");
    static_assert(HEAD_DIM % (8 * WARPS_N) == 0 && BK % 16 == 0, "head-dim tiling");
    static_assert(NFS % 2 == 0, "score fragments load in pairs (ldmatrix.x4)");
    static_assert(!WGMMA || (WARPS_M == 4 && MF == 1 && WNS == 32), "wgmma: a warpgroup of 4 row warps per 32 keys");
    // P V on wgmma too where a warp column's output dims are whole n64 tiles (head_dim >= 128):
    // P (A, K-major over keys) and the V slices (B, N-major: keys x head dims) in core matrices.
    constexpr bool WGMMA_PV = WGMMA && WD % 64 == 0;

    // Static shared memory for mma.sync; with wgmma the staged tiles and P are dynamic shared
    // memory (the tensor cores address them by descriptor: codegen's Attention::dynamic_shared_bytes).
    __shared__ uint4 smem_raw[WGMMA ? 1 : (STAGED + BM * LDP) / 8];
    __shared__ float row_stat[BM];          // per block row: the max, later the denominator
    __shared__ float partial[WARPS_N][BM];  // per warp column: its part of a row statistic
    bf16* staged;                           // Q + K chunks, or V slices
    if constexpr (WGMMA)
        staged = reinterpret_cast<bf16*>(dynamic_smem());
    else
        staged = reinterpret_cast<bf16*>(smem_raw);
    bf16* const p_s = staged + STAGED; // the P tile

    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
    // Warp (wm, wn) of the WARPS_M x WARPS_N grid; with wgmma the 4 warps of a warpgroup are the
    // 4 row warps of one key column (wgmma's accumulator rows).
    const int wm = WGMMA ? warp % WARPS_M : warp / WARPS_N, wn = WGMMA ? warp / WARPS_M : warp % WARPS_N;
    const int rows = q_len * GROUP; // packed rows of one kv head
    const int r0 = blockIdx.x * BM, kvh = blockIdx.y, split = blockIdx.z;

    // Element offset of packed row r in q / out.
    auto q_off = [&](int r) -> size_t {
        return ((size_t)(r / GROUP) * Q_HEADS + kvh * GROUP + r % GROUP) * HEAD_DIM;
    };
    // Split scratch (the split phases only): row r's partial max, denominator and accumulators of
    // split s.
    const size_t stats = (size_t)splits * KV_HEADS * rows;
    auto stat_at = [&](int s, int r) -> size_t { return ((size_t)s * KV_HEADS + kvh) * rows + r; };
    auto part_max = [&](int s, int r) -> float& { return scratch[stat_at(s, r)]; };
    auto part_den = [&](int s, int r) -> float& { return scratch[stats + stat_at(s, r)]; };
    auto part_acc = [&](int s, int r) -> float* { return scratch + 2 * stats + stat_at(s, r) * HEAD_DIM; };

    if (phase == ATTENTION_COMBINE) {
        for (int c = threadIdx.x; c < BM * (HEAD_DIM / 2); c += THREADS) {
            const int r = r0 + c / (HEAD_DIM / 2), d = 2 * (c % (HEAD_DIM / 2));
            if (r >= rows) break; // c grows with r
            float den = 0.0f, a0 = 0.0f, a1 = 0.0f;
            for (int s = 0; s < splits; ++s) {
                den = add(den, part_den(s, r));
                const float* acc = part_acc(s, r) + d;
                a0 = add(a0, acc[0]);
                a1 = add(a1, acc[1]);
            }
            const float inv = fdiv(1.0f, den == 0.0f ? 1.0f : den);
            store_bf16_pair(out + q_off(r) + d, mul(a0, inv), mul(a1, inv));
        }
        return;
    }

    // Visible keys [lo, hi) of packed row r (relative indices; empty when hi <= lo).
    auto visible = [&](int r, int& lo, int& hi) {
        const int qp = q_pos0 + r / GROUP;
        lo = 0;
        hi = kv_len;
        if (MASK != Mask::Bidirectional) {
            hi = min(kv_len, qp - k_pos0 + 1); // kp <= qp
            if (MASK == Mask::CausalSliding) lo = max(0, qp - window + 1 - k_pos0); // qp - kp < window
        }
    };
    // The block's keys: the union [lo, hi) of its rows' ranges (the first row's start to the last
    // row's end), covered by key tiles aligned to absolute positions (multiples of BN), so that
    // where a key falls in its tile (which lane adds it to a denominator, which k16 step of P V
    // takes it) does not depend on the pass's other queries: a prompt prefilled in chunks gives
    // the bits of one pass. It scans [a, b): this split's share of the tiles (the first tile may
    // start below key 0 or lo; those keys are staged as zeros and masked).
    int lo, a, b;
    {
        int hi, lo_last, hi_last;
        visible(r0, lo, hi);
        visible(min(r0 + BM, rows) - 1, lo_last, hi_last);
        hi = hi_last;
        a = b = lo;
        if (hi > lo) {
            const int base = lo - (int)((unsigned)(k_pos0 + lo) % BN); // k_pos0 + lo >= 0
            const int per = ((hi - base + BN - 1) / BN + splits - 1) / splits * BN;
            a = min(hi, base + split * per);
            b = min(hi, a + per);
        }
    }
    // This thread's rows (row half h of m16 fragment i) and their live keys within [a, b).
    int vlo[MF][2], vhi[MF][2];
#pragma unroll
    for (int i = 0; i < MF; ++i)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int r = r0 + wm * WM + 16 * i + g + 8 * h;
            int rlo = 0, rhi = 0;
            if (r < rows) visible(r, rlo, rhi);
            vlo[i][h] = max(rlo, a);
            vhi[i][h] = min(rhi, b);
        }

    // Row pointers of the staged tiles: packed query rows, and key j's ring row in k / v (its
    // physical row through the page table when paged).
    const int ring0 = k_pos0 % kv_rows;
    auto ring_row = [&](int j) -> size_t {
        int p = ring0 + j; // j < kv_len <= kv_rows: at most one wrap
        if (p >= kv_rows) p -= kv_rows;
        const size_t row = page > 0 ? (size_t)page_table[p / page] * page + p % page : (size_t)p;
        return (row * KV_HEADS + kvh) * HEAD_DIM;
    };
    auto q_row = [&](int r) { return q + q_off(r); };
    auto k_row = [&](int j) { return k + ring_row(j); };
    auto v_row = [&](int j) { return v + ring_row(j); };

    // S = Q K^T for the key tile j0 .. j0 + BN (keys outside [lo, b) are zeros) into s_acc.
    FragC s_acc[MF][NFS];
    auto scores = [&](int j0) {
#pragma unroll
        for (int i = 0; i < MF; ++i)
#pragma unroll
            for (int j = 0; j < NFS; ++j) zero(s_acc[i][j]);
        Stage<BM, BK, THREADS> qs;
        Stage<BN, BK, THREADS> ks;
        // Chunk buffer `buf` <- the fetched chunks (padded rows, or wgmma's core matrices).
        auto stage_store = [&](bf16* buf) {
            if constexpr (WGMMA) {
                qs.store_core_matrices(buf);
                ks.store_core_matrices(buf + BM * BK);
                fence_proxy_async(); // visible to the tensor cores' reads after the barrier
            } else {
                qs.store(buf, LDS);
                ks.store(buf + BM * LDS, LDS);
            }
        };
        qs.fetch_rows(q_row, r0, 0, rows, 0, HEAD_DIM);
        ks.fetch_rows(k_row, j0, lo, b, 0, HEAD_DIM);
        __syncthreads(); // every warp is done with `staged` (the previous tile's chunks or V)
        stage_store(staged);
        __syncthreads();
#pragma unroll 1
        for (int kt = 0; kt < KT; ++kt) {
            if (kt + 1 < KT) {
                qs.fetch_rows(q_row, r0, 0, rows, (kt + 1) * BK, HEAD_DIM);
                ks.fetch_rows(k_row, j0, lo, b, (kt + 1) * BK, HEAD_DIM);
            }
            if constexpr (WGMMA) {
                // The warpgroup's S[64 rows x 32 keys] += Q_chunk K_chunk^T, k16 step by step: its
                // accumulators are s_acc (MF = 1, NFS = 4: the mma.sync fragment layout).
                const bf16* const sq = staged + (kt & 1) * STAGE;
                const bf16* const sk = sq + BM * BK + wn * WNS * BK;
                float(&acc)[16] = *reinterpret_cast<float(*)[16]>(&s_acc[0][0]);
                wgmma_fence_operands(acc);
                wgmma_fence();
#pragma unroll
                for (int s = 0; s < BK / 16; ++s) {
                    if (HEAD_DIM % BK != 0 && kt * BK + 16 * s >= HEAD_DIM) break; // past the head (zeros)
                    wgmma_m64n32k16_bf16(acc, smem_desc(sq + 128 * s, 128, BK * 16), smem_desc(sk + 128 * s, 128, BK * 16));
                }
                wgmma_commit();
                wgmma_wait<0>();
                wgmma_fence_operands(acc);
                if (kt + 1 < KT) {
                    stage_store(staged + ((kt + 1) & 1) * STAGE);
                    __syncthreads();
                }
                continue;
            }
            const bf16* const sq = staged + (kt & 1) * STAGE + wm * WM * LDS;
            const bf16* const sk = staged + (kt & 1) * STAGE + (BM + wn * WNS) * LDS;
#pragma unroll
            for (int kk = 0; kk < BK; kk += 16) {
                if (kt * BK + kk >= HEAD_DIM) break; // a k16 step wholly past the head (zeros)
                FragB kf[NFS];
#pragma unroll
                for (int j = 0; j < NFS; j += 2)
                    if (j0 + wn * WNS + 8 * j < b) load_frag_b_pair_ldsm(kf[j], kf[j + 1], sk + 8 * j * LDS + kk, LDS);
#pragma unroll
                for (int i = 0; i < MF; ++i) {
                    if (r0 + wm * WM + 16 * i >= rows) continue;
                    const FragA qf = load_frag_a_ldsm(sq + 16 * i * LDS + kk, LDS);
#pragma unroll
                    for (int j = 0; j < NFS; ++j)
                        if (j0 + wn * WNS + 8 * j < b) mma_bf16_16816(s_acc[i][j], qf, kf[j]);
                }
            }
            if (kt + 1 < KT) {
                stage_store(staged + ((kt + 1) & 1) * STAGE);
                __syncthreads();
            }
        }
    };
    // Key of register c of S fragment (i, j) (its row is this thread's row half h).
    auto key_of = [&](int j0, int j, int c) { return j0 + wn * WNS + 8 * j + 2 * t + c; };

    // ---- The row maxima: pass 1 (whole, split max) or the splits' partial maxima (split P V).
    if (phase == ATTENTION_SPLIT_PV) {
        for (int r = threadIdx.x; r < BM; r += THREADS) {
            float m = -f32_inf();
            if (r0 + r < rows)
                for (int s = 0; s < splits; ++s) m = fmaxf(m, part_max(s, r0 + r));
            row_stat[r] = m;
        }
        __syncthreads();
    } else {
        float mx[MF][2];
#pragma unroll
        for (int i = 0; i < MF; ++i) mx[i][0] = mx[i][1] = -f32_inf();
        for (int j0 = a; j0 < b; j0 += BN) {
            scores(j0);
#pragma unroll
            for (int i = 0; i < MF; ++i)
#pragma unroll
                for (int j = 0; j < NFS; ++j)
#pragma unroll
                    for (int h = 0; h < 2; ++h)
#pragma unroll
                        for (int c = 0; c < 2; ++c) {
                            const int key = key_of(j0, j, c);
                            if (key >= vlo[i][h] && key < vhi[i][h]) mx[i][h] = fmaxf(mx[i][h], s_acc[i][j].r[2 * h + c]);
                        }
        }
#pragma unroll
        for (int i = 0; i < MF; ++i)
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                float m = mx[i][h];
                m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 1));
                m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 2));
                if (t == 0) partial[wn][wm * WM + 16 * i + g + 8 * h] = m;
            }
        __syncthreads();
        for (int r = threadIdx.x; r < BM; r += THREADS) {
            float m = partial[0][r];
#pragma unroll
            for (int w = 1; w < WARPS_N; ++w) m = fmaxf(m, partial[w][r]);
            row_stat[r] = m;
        }
        __syncthreads();
        if (phase == ATTENTION_SPLIT_MAX) {
            for (int r = threadIdx.x; r < BM && r0 + r < rows; r += THREADS) part_max(split, r0 + r) = row_stat[r];
            return;
        }
    }
    float m_row[MF][2];
#pragma unroll
    for (int i = 0; i < MF; ++i)
#pragma unroll
        for (int h = 0; h < 2; ++h) m_row[i][h] = row_stat[wm * WM + 16 * i + g + 8 * h];

    // ---- Pass 2: p = bf16(exp(s - m)), the denominators, O += P V.
    FragC o[MF][NFO];
#pragma unroll
    for (int i = 0; i < MF; ++i)
#pragma unroll
        for (int n = 0; n < NFO; ++n) zero(o[i][n]);
    float den[MF][2];
#pragma unroll
    for (int i = 0; i < MF; ++i) den[i][0] = den[i][1] = 0.0f;
    for (int j0 = a; j0 < b; j0 += BN) {
        scores(j0);
#pragma unroll
        for (int i = 0; i < MF; ++i)
#pragma unroll
            for (int j = 0; j < NFS; ++j)
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    float e[2];
#pragma unroll
                    for (int c = 0; c < 2; ++c) {
                        const int key = key_of(j0, j, c);
                        const bool live = key >= vlo[i][h] && key < vhi[i][h];
                        e[c] = live ? expf(s_acc[i][j].r[2 * h + c] - m_row[i][h]) : 0.0f;
                        den[i][h] += e[c];
                    }
                    const int pr = wm * WM + 16 * i + g + 8 * h, pk = wn * WNS + 8 * j + 2 * t;
                    if constexpr (WGMMA_PV) // core matrices of 8 rows x 8 keys (wgmma.cuh)
                        store_bf16_pair(p_s + ((pr / 8) * (BN / 8) + pk / 8) * 64 + (pr % 8) * 8 + pk % 8, e[0], e[1]);
                    else
                        store_bf16_pair(p_s + pr * LDP + pk, e[0], e[1]);
                }
        Stage<VK, HEAD_DIM, THREADS> vs;
        vs.fetch_rows(v_row, j0, lo, b, 0, HEAD_DIM);
        // V slice buffer `buf` <- the fetched rows: padded for ldmatrix, or (P V on wgmma) N-major
        // core matrices of 8 keys x 8 dims (the same chunk placement as store_core_matrices).
        auto v_store = [&](bf16* buf) {
            if constexpr (WGMMA_PV) {
                vs.store_core_matrices(buf);
                fence_proxy_async();
            } else {
                vs.store(buf, LDV);
            }
        };
        if constexpr (WGMMA_PV) fence_proxy_async(); // P, for the tensor cores' reads
        __syncthreads(); // P is complete and every warp is done with the Q / K chunks
        v_store(staged);
        __syncthreads();
#pragma unroll 1
        for (int sl = 0; sl < NSL; ++sl) {
            const int k0 = j0 + sl * VK;
            if (k0 >= b) break; // a slice wholly past the range (P is 0 there)
            // (a slice wholly below lo, in a first tile starting below it, is zeros times P = 0)
            const bool more = sl + 1 < NSL && k0 + VK < b;
            if (more) vs.fetch_rows(v_row, k0 + VK, lo, b, 0, HEAD_DIM);
            if constexpr (WGMMA_PV) {
                // O[64 rows x this warpgroup's WD dims] += P[64 x 16 keys] V_slice[16 x WD], as
                // WD / 64 wgmma m64n64k16 on the accumulators o[0][8q .. 8q + 7] (the mma.sync
                // fragment layout again). P: LBO 8 keys, SBO 8 rows; V: LBO 8 keys (one row of
                // HEAD_DIM / 8 core matrices), SBO 8 dims.
                const bf16* const sv = staged + (sl & 1) * VSTAGE + (wn * WD / 8) * 64;
                const unsigned long long dp = smem_desc(p_s + sl * 128, 128, (BN / 8) * 128);
                float(&oacc)[NFO * 4] = *reinterpret_cast<float(*)[NFO * 4]>(&o[0][0]);
                wgmma_fence_operands(oacc);
                wgmma_fence();
#pragma unroll
                for (int q = 0; q < WD / 64; ++q)
                    wgmma_m64n64k16_bf16<true>(*reinterpret_cast<float(*)[32]>(&o[0][8 * q]), dp,
                                               smem_desc(sv + q * 8 * 64, HEAD_DIM * 16, 128));
                wgmma_commit();
                wgmma_wait<0>();
                wgmma_fence_operands(oacc);
                if (more) {
                    v_store(staged + ((sl + 1) & 1) * VSTAGE);
                    __syncthreads();
                }
                continue;
            }
            const bf16* const sv = staged + (sl & 1) * VSTAGE + wn * WD;
            FragA pf[MF];
#pragma unroll
            for (int i = 0; i < MF; ++i)
                if (r0 + wm * WM + 16 * i < rows) pf[i] = load_frag_a_ldsm(p_s + (wm * WM + 16 * i) * LDP + sl * VK, LDP);
#pragma unroll
            for (int n = 0; n < NFO; n += 2) {
                FragB vf[2];
                if (n + 1 < NFO)
                    load_frag_b_pair_kmajor_ldsm(vf[0], vf[1], sv + 8 * n, LDV);
                else
                    vf[0] = load_frag_b_kmajor(sv + 8 * n, LDV); // an odd last fragment (head_dim 24)
#pragma unroll
                for (int u = 0; u < 2 && n + u < NFO; ++u)
#pragma unroll
                    for (int i = 0; i < MF; ++i)
                        if (r0 + wm * WM + 16 * i < rows) mma_bf16_16816(o[i][n + u], pf[i], vf[u]);
            }
            if (more) {
                v_store(staged + ((sl + 1) & 1) * VSTAGE);
                __syncthreads();
            }
        }
    }

    // ---- Denominators: the 4 lanes of a row, then the warp columns in order.
#pragma unroll
    for (int i = 0; i < MF; ++i)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            float d = den[i][h];
            d += __shfl_xor_sync(0xffffffffu, d, 1);
            d += __shfl_xor_sync(0xffffffffu, d, 2);
            if (t == 0) partial[wn][wm * WM + 16 * i + g + 8 * h] = d;
        }
    __syncthreads(); // also: every thread has read its m from row_stat
    for (int r = threadIdx.x; r < BM; r += THREADS) {
        float d = partial[0][r];
#pragma unroll
        for (int w = 1; w < WARPS_N; ++w) d = add(d, partial[w][r]);
        row_stat[r] = d;
    }
    __syncthreads();

    if (phase == ATTENTION_SPLIT_PV) {
        for (int r = threadIdx.x; r < BM && r0 + r < rows; r += THREADS) part_den(split, r0 + r) = row_stat[r];
#pragma unroll
        for (int i = 0; i < MF; ++i)
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const int r = r0 + wm * WM + 16 * i + g + 8 * h;
                if (r >= rows) continue;
                float* const acc = part_acc(split, r) + wn * WD + 2 * t;
#pragma unroll
                for (int n = 0; n < NFO; ++n) {
                    acc[8 * n] = o[i][n].r[2 * h];
                    acc[8 * n + 1] = o[i][n].r[2 * h + 1];
                }
            }
        return;
    }
#pragma unroll
    for (int i = 0; i < MF; ++i)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int pr = wm * WM + 16 * i + g + 8 * h, r = r0 + pr;
            if (r >= rows) continue;
            const float d = row_stat[pr];
            const float inv = fdiv(1.0f, d == 0.0f ? 1.0f : d);
            bf16* const o_row = out + q_off(r) + wn * WD + 2 * t;
#pragma unroll
            for (int n = 0; n < NFO; ++n)
                store_bf16_pair(o_row + 8 * n, mul(o[i][n].r[2 * h], inv), mul(o[i][n].r[2 * h + 1], inv));
        }
}

} // namespace dgemma
