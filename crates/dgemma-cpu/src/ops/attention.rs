//! Scaled-dot-product attention with DiffusionGemma's masks (model-spec 3.3, 3.6, 3.7).
//!
//! Scale is 1.0 (queries and keys are RMS-normalised instead) and there is no logit softcap.
//! Query head `h` reads kv head `h / (heads / kv_heads)` (GQA). Scores and the softmax run in
//! float32.
//!
//! The softmax follows torch's CPU flash-attention kernel (what transformers' default "sdpa"
//! runs on the CPU), so that the backend reproduces transformers' CPU runs to the bit where
//! it can: keys are taken in blocks of [`KV_SPLIT`]; per block and query row, the running max
//! is updated, `p = exp(s - max)` is computed with ATen's AVX-512 `exp_u20` polynomial on
//! 16-lane chunks and with `expf` on the tail ([`exp_reduce_sum`]), the lanes are summed and
//! tree-reduced, earlier blocks are rescaled by `exp(old_max - max)`, and `p` (rounded to bf16
//! in bf16 mode) is multiplied into V with float32 accumulation. The output is
//! `round(acc * (1 / sum))`. Masked scores are `-inf` and contribute exactly 0.
//!
//! Masks, with absolute positions `qp` (query) and `kp` (key):
//! * [`Mask::Causal`] (encoder): visible iff `kp <= qp` and, with a window `w`, `qp - kp < w`.
//! * [`Mask::Bidirectional`] (decoder): every key is visible to every query; the caller passes
//!   the keys the layer may see (the whole cache on full layers, its last `window - 1` entries
//!   on sliding layers, then the canvas).

use crate::precision::{round, Precision};
use rayon::prelude::*;

/// Keys per block of torch's CPU flash attention (`kv_split_size`).
pub const KV_SPLIT: usize = 512;
/// float32 lanes of an AVX-512 vector (ATen's `Vectorized<float>::size()` there).
const LANES: usize = 16;

/// ATen's AVX-512 `Vectorized<float>::exp_u20`, one lane: `2^n * p(r)` with a degree-5
/// polynomial (about 20 ulp), inputs below ln(FLT_MIN) give 0. Constants as written in ATen;
/// min-then-max (not `clamp`) because that is how `_mm512_min_ps`/`_mm512_max_ps` treat NaN.
#[allow(clippy::excessive_precision, clippy::manual_clamp)]
#[inline(always)]
pub fn exp_u20(x: f32) -> f32 {
    const LN_FLT_MIN: f32 = f32::from_bits(0xc2ae_ac50);
    const LN_FLT_MAX: f32 = f32::from_bits(0x42b1_7218);
    const LOG2E: f32 = f32::from_bits(0x3fb8_aa3b);
    const LN2: f32 = f32::from_bits(0x3f31_7218);
    let underflow = x < LN_FLT_MIN; // _CMP_LT_OS: false for NaN
    let src = x.min(LN_FLT_MAX).max(LN_FLT_MIN);
    let fx = src.mul_add(LOG2E, 0.5).floor();
    let r = (-fx).mul_add(LN2, src);
    let mut p = r.mul_add(0.008_289_290_59, 0.041_897_822_1);
    p = r.mul_add(p, 0.166_676_521);
    p = r.mul_add(p, 0.499_991_506);
    p = r.mul_add(p, 0.999_999_701);
    p = r.mul_add(p, 1.0);
    let two_pow = if underflow { 0.0 } else { f32::from_bits((((fx - 1.0) as i32 + 127) as u32) << 23) };
    p * two_pow * 2.0
}

/// `_exp_reduce_sum_fusion_kernel`: replaces `row` by `exp(row - max)` and returns the sum,
/// with `exp_u20` on whole 16-lane chunks, lane-wise sums reduced as AVX-512's
/// `vec_reduce_all` does (halves, then quarters, pairs, neighbours), then `expf` on the tail.
///
/// On x86-64 CPUs with FMA this runs a copy compiled for FMA and SSE4.1: `mul_add` then becomes
/// one instruction instead of a call to libm's `fmaf`, and `floor` one `roundss`. Both are exact
/// operations, so the two copies give the same bits (tested); the attention's hot loop runs
/// about 3x faster.
pub fn exp_reduce_sum(row: &mut [f32], max: f32) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("fma") && std::is_x86_feature_detected!("sse4.1") {
        // SAFETY: the CPU has the features the copy is compiled for (just detected).
        return unsafe { exp_reduce_sum_fma(row, max) };
    }
    exp_reduce_sum_body(row, max)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "fma,sse4.1")]
unsafe fn exp_reduce_sum_fma(row: &mut [f32], max: f32) -> f32 {
    exp_reduce_sum_body(row, max)
}

#[inline(always)]
fn exp_reduce_sum_body(row: &mut [f32], max: f32) -> f32 {
    let whole = row.len() / LANES * LANES;
    let mut lanes = [0.0f32; LANES];
    for chunk in row[..whole].chunks_exact_mut(LANES) {
        for (l, x) in lanes.iter_mut().zip(chunk.iter_mut()) {
            *x = exp_u20(*x - max);
            *l += *x;
        }
    }
    let mut width = LANES / 2;
    while width >= 1 {
        for i in 0..LANES {
            if i & width == 0 {
                lanes[i] += lanes[i | width];
            }
        }
        width /= 2;
    }
    let mut sum = lanes[0];
    for x in &mut row[whole..] {
        *x = (*x - max).exp();
        sum += *x;
    }
    sum
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mask {
    Causal { window: Option<usize> },
    Bidirectional,
}

#[derive(Clone, Copy, Debug)]
pub struct AttentionShape {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

impl Mask {
    #[inline]
    fn visible(self, qp: usize, kp: usize) -> bool {
        match self {
            Mask::Bidirectional => true,
            Mask::Causal { window } => kp <= qp && window.is_none_or(|w| qp - kp < w),
        }
    }
}

/// `q`: `[S, heads, D]` at positions `q_pos0..`; `k`, `v`: `[L, kv_heads, D]` at positions
/// `k_pos0..`; `out`: `[S, heads, D]`.
#[allow(clippy::too_many_arguments)]
pub fn attention(
    q: &[f32],
    q_pos0: usize,
    k: &[f32],
    v: &[f32],
    k_pos0: usize,
    shape: AttentionShape,
    mask: Mask,
    precision: Precision,
    out: &mut [f32],
) {
    let AttentionShape { heads, kv_heads, head_dim: d } = shape;
    assert!(kv_heads > 0 && heads % kv_heads == 0, "attention: {heads} heads over {kv_heads} kv heads");
    let group = heads / kv_heads;
    let s = q.len() / (heads * d);
    let l = k.len() / (kv_heads * d);
    assert_eq!(q.len(), s * heads * d);
    assert_eq!(k.len(), l * kv_heads * d);
    assert_eq!(v.len(), k.len());
    assert_eq!(out.len(), q.len());

    let row_fn = |(row, o): (usize, &mut [f32])| {
        let (i, h) = (row / heads, row % heads);
        let kvh = h / group;
        let qrow = &q[row * d..(row + 1) * d];
        let qp = q_pos0 + i;
        let mut scores: Vec<f32> = (0..l)
            .map(|j| {
                if mask.visible(qp, k_pos0 + j) {
                    crate::ops::linear::dot(qrow, &k[(j * kv_heads + kvh) * d..(j * kv_heads + kvh + 1) * d])
                } else {
                    f32::NEG_INFINITY
                }
            })
            .collect();
        o.fill(0.0);
        let (mut max, mut sum) = (f32::NEG_INFINITY, 0.0f32);
        for (b, block) in scores.chunks_mut(KV_SPLIT).enumerate() {
            let new_max = block.iter().copied().fold(max, f32::max);
            if new_max == f32::NEG_INFINITY {
                continue; // fully masked so far: contributes nothing
            }
            let block_sum = exp_reduce_sum(block, new_max);
            let rescale = (max - new_max).exp();
            sum = block_sum + rescale * sum;
            max = new_max;
            if b > 0 {
                for x in o.iter_mut() {
                    *x *= rescale;
                }
            }
            for (jj, &e) in block.iter().enumerate() {
                let p = round(e, precision);
                if p == 0.0 {
                    continue;
                }
                let j = b * KV_SPLIT + jj;
                let vrow = &v[(j * kv_heads + kvh) * d..(j * kv_heads + kvh + 1) * d];
                for (acc, &x) in o.iter_mut().zip(vrow) {
                    *acc += p * x;
                }
            }
        }
        let inv = 1.0 / if sum == 0.0 { 1.0 } else { sum };
        for x in o.iter_mut() {
            *x = round(*x * inv, precision);
        }
    };
    // Small problems run on the calling thread; rayon's task overhead would dominate.
    if s * heads * l * d < 1 << 16 {
        out.chunks_mut(d).enumerate().for_each(row_fn);
    } else {
        out.par_chunks_mut(d).enumerate().for_each(row_fn);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::test_values::pseudo;

    /// Textbook float64 attention with an explicit visibility predicate.
    fn reference(
        q: &[f32],
        k: &[f32],
        v: &[f32],
        sh: AttentionShape,
        visible: impl Fn(usize, usize) -> bool,
    ) -> Vec<f64> {
        let d = sh.head_dim;
        let s = q.len() / (sh.heads * d);
        let l = k.len() / (sh.kv_heads * d);
        let mut out = vec![0.0f64; q.len()];
        for i in 0..s {
            for h in 0..sh.heads {
                let kvh = h / (sh.heads / sh.kv_heads);
                let js: Vec<usize> = (0..l).filter(|&j| visible(i, j)).collect();
                let sc: Vec<f64> = js
                    .iter()
                    .map(|&j| (0..d).map(|x| q[(i * sh.heads + h) * d + x] as f64 * k[(j * sh.kv_heads + kvh) * d + x] as f64).sum())
                    .collect();
                let m = sc.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = sc.iter().map(|x| (x - m).exp()).sum();
                for (n, &j) in js.iter().enumerate() {
                    let p = (sc[n] - m).exp() / z;
                    for x in 0..d {
                        out[(i * sh.heads + h) * d + x] += p * v[(j * sh.kv_heads + kvh) * d + x] as f64;
                    }
                }
            }
        }
        out
    }

    fn check(mask: Mask, s: usize, l: usize, q_pos0: usize, k_pos0: usize, sh: AttentionShape) {
        let d = sh.head_dim;
        let q = pseudo(s * sh.heads * d, 1);
        let k = pseudo(l * sh.kv_heads * d, 2);
        let v = pseudo(l * sh.kv_heads * d, 3);
        let mut out = vec![f32::NAN; q.len()];
        attention(&q, q_pos0, &k, &v, k_pos0, sh, mask, Precision::F32, &mut out);
        let want = reference(&q, &k, &v, sh, |i, j| mask.visible(q_pos0 + i, k_pos0 + j));
        for (a, b) in out.iter().zip(&want) {
            assert!(a.is_finite(), "NaN/inf in output");
            assert!((*a as f64 - b).abs() < 1e-5, "{a} vs {b}");
        }
    }

    #[test]
    fn causal_gqa_ratio_2_and_8() {
        check(Mask::Causal { window: None }, 5, 9, 4, 0, AttentionShape { heads: 4, kv_heads: 2, head_dim: 8 });
        check(Mask::Causal { window: None }, 6, 6, 0, 0, AttentionShape { heads: 8, kv_heads: 1, head_dim: 16 });
    }

    #[test]
    fn sliding_window_hides_old_keys() {
        // Keys start at position 2 (older ones were evicted), queries at 7.., window 4.
        check(Mask::Causal { window: Some(4) }, 6, 11, 7, 2, AttentionShape { heads: 2, kv_heads: 1, head_dim: 4 });
        let m = Mask::Causal { window: Some(4) };
        assert!(m.visible(10, 7) && !m.visible(10, 6) && !m.visible(10, 11) && m.visible(10, 10));
    }

    #[test]
    fn bidirectional_sees_future_keys() {
        check(Mask::Bidirectional, 4, 10, 6, 0, AttentionShape { heads: 4, kv_heads: 4, head_dim: 8 });
        let m = Mask::Bidirectional;
        assert!(m.visible(0, 100));
    }

    #[test]
    fn exp_u20_is_close_to_exp_and_underflows_to_zero() {
        for i in -800..=80 {
            let x = i as f32 * 0.1;
            let (a, b) = (exp_u20(x), x.exp());
            assert!((a - b).abs() <= 3e-6 * b, "exp_u20({x}) = {a}, exp = {b}");
        }
        assert_eq!(exp_u20(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_u20(-100.0), 0.0);
        assert_eq!(exp_u20(0.0), 1.0);
    }

    #[test]
    fn exp_reduce_sum_handles_chunks_and_tail() {
        let mut row: Vec<f32> = (0..37).map(|i| -(i as f32) * 0.05).collect();
        row[3] = f32::NEG_INFINITY;
        let want: f64 = row.iter().map(|&x| (x as f64).exp()).sum();
        let sum = exp_reduce_sum(&mut row, 0.0);
        assert!((sum as f64 - want).abs() < 1e-4, "{sum} vs {want}");
        assert_eq!(row[3], 0.0);
    }

    #[test]
    fn the_fma_copy_gives_the_portable_bits() {
        // Rows of every kind the attention feeds it: many chunks, a tail, -inf and huge
        // negative values (underflow), values near 0 and near ln(FLT_MAX).
        let mut rng = 0x2545_f491_4f6c_dd1du64;
        let mut next = || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            (rng >> 40) as f32 / (1u64 << 24) as f32
        };
        for len in [1usize, 15, 16, 17, 512, 1000] {
            let row: Vec<f32> = (0..len)
                .map(|i| match i % 7 {
                    0 => f32::NEG_INFINITY,
                    1 => -200.0 * next(),
                    2 => 88.0 * next(),
                    _ => 40.0 * next() - 20.0,
                })
                .collect();
            let (mut a, mut b) = (row.clone(), row.clone());
            let sa = exp_reduce_sum(&mut a, 20.0);
            let sb = exp_reduce_sum_body(&mut b, 20.0);
            assert_eq!(sa.to_bits(), sb.to_bits(), "sum, len {len}");
            assert!(a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()), "values, len {len}");
        }
    }

    #[test]
    fn several_kv_blocks_match_the_reference() {
        // More keys than one block: the online rescaling across blocks must be exact math.
        check(Mask::Bidirectional, 2, KV_SPLIT + 300, 0, 0, AttentionShape { heads: 2, kv_heads: 1, head_dim: 4 });
        check(Mask::Causal { window: Some(700) }, 3, 2 * KV_SPLIT + 5, 2 * KV_SPLIT + 2, 0, AttentionShape { heads: 2, kv_heads: 2, head_dim: 4 });
    }

    #[test]
    fn bf16_mode_stays_close_and_is_rounded() {
        let sh = AttentionShape { heads: 2, kv_heads: 1, head_dim: 8 };
        let q = pseudo(3 * 2 * 8, 5);
        let k = pseudo(7 * 8, 6);
        let v = pseudo(7 * 8, 7);
        let (mut a, mut b) = (vec![0.0; q.len()], vec![0.0; q.len()]);
        attention(&q, 0, &k, &v, 0, sh, Mask::Bidirectional, Precision::F32, &mut a);
        attention(&q, 0, &k, &v, 0, sh, Mask::Bidirectional, Precision::Bf16, &mut b);
        for (x, y) in a.iter().zip(&b) {
            assert_eq!(*y, crate::precision::to_bf16(*y));
            assert!((x - y).abs() < 2e-2, "{x} vs {y}");
        }
    }
}
