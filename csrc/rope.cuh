// rope.cuh: table-driven rotary position embedding, in place.
//
// CPU oracle: crates/dgemma-cpu/src/ops/rope.rs (RopeTable + apply_rope). Model-spec 3.1.
//
// Layout: x is [tokens, heads, HEAD_DIM]; dims j and j + HEAD_DIM/2 form a pair ("rotate_half",
// NeoX style). Only pairs j < PAIRS rotate: PAIRS = HEAD_DIM/2 for default RoPE, fewer for
// proportional RoPE (full layers: inv_freq is 0 beyond the rotary width, so cos = 1, sin = 0 and
// the CPU's update is the identity; here those pairs are simply not touched).
//
// The tables are [table_rows, PAIRS] bf16, row p = position p, built on the host exactly as the
// CPU's RopeTable builds them (angle = float32(p) * inv_freq[j], cos/sin rounded to bf16), so the
// GPU never recomputes theta powers or trig functions and matches the CPU bit for bit.
// positions[t] is the absolute position of token t (device memory, so a captured graph can be
// replayed at a new offset by rewriting it).
//
// Rounding points (identical to the CPU):
//   out[j]        = bf16( bf16(x[j] * cos)        + bf16(-x[j + half] * sin) )
//   out[j + half] = bf16( bf16(x[j + half] * cos) + bf16( x[j] * sin) )
// Products of two bf16 values are exact in fp32, so each step is a single IEEE rounding.
//
// Algorithm: one block per token; threads stride over (head, pair). A position outside the table
// fills the token's rows with NaN (visible in every downstream check, and no sticky trap).
#pragma once
#include "common.cuh"

namespace dgemma {

template <int HEAD_DIM, int PAIRS, int THREADS>
__device__ __forceinline__ void rope(bf16* x, const bf16* cos_table, const bf16* sin_table, const int* positions,
                                     int table_rows, int tokens, int heads)
{
    static_assert(HEAD_DIM % 2 == 0 && PAIRS >= 1 && PAIRS <= HEAD_DIM / 2, "bad RoPE shape");
    constexpr int HALF = HEAD_DIM / 2;
    const int t = blockIdx.x;
    if (t >= tokens) return;
    bf16* xt = x + (size_t)t * heads * HEAD_DIM;
    const int pos = positions[t];
    if (pos < 0 || pos >= table_rows) {
        for (int i = threadIdx.x; i < heads * HEAD_DIM; i += THREADS) xt[i] = bf16_nan();
        return;
    }
    const bf16* cos_row = cos_table + (size_t)pos * PAIRS;
    const bf16* sin_row = sin_table + (size_t)pos * PAIRS;
    for (int idx = threadIdx.x; idx < heads * PAIRS; idx += THREADS) {
        const int h = idx / PAIRS, j = idx - h * PAIRS;
        bf16* row = xt + (size_t)h * HEAD_DIM;
        const float c = f32(cos_row[j]), s = f32(sin_row[j]);
        const float lo = f32(row[j]), hi = f32(row[j + HALF]);
        row[j] = to_bf16(add(round_bf16(mul(lo, c)), round_bf16(mul(-hi, s))));
        row[j + HALF] = to_bf16(add(round_bf16(mul(hi, c)), round_bf16(mul(lo, s))));
    }
}

} // namespace dgemma
