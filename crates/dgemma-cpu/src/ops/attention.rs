//! Scaled-dot-product attention with DiffusionGemma's masks (model-spec 3.3, 3.6, 3.7).
//!
//! Scale is 1.0 (queries and keys are RMS-normalised instead) and there is no logit softcap.
//! Query head `h` reads kv head `h / (heads / kv_heads)` (GQA). Scores and the softmax run in
//! float32. In bf16 mode the unnormalised probabilities are rounded to bf16 before the product
//! with V and the sum is normalised afterwards by the float32 denominator, which is what
//! torch's CPU flash-attention kernel does for bf16 inputs; the output is rounded once.
//!
//! Masks, with absolute positions `qp` (query) and `kp` (key):
//! * [`Mask::Causal`] (encoder): visible iff `kp <= qp` and, with a window `w`, `qp - kp < w`.
//! * [`Mask::Bidirectional`] (decoder): every key is visible to every query; the caller passes
//!   the keys the layer may see (the whole cache on full layers, its last `window - 1` entries
//!   on sliding layers, then the canvas).

use crate::precision::{round, Precision};
use rayon::prelude::*;

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

    out.par_chunks_mut(d).enumerate().for_each(|(row, o)| {
        let (i, h) = (row / heads, row % heads);
        let kvh = h / group;
        let qrow = &q[row * d..(row + 1) * d];
        let qp = q_pos0 + i;
        let mut scores: Vec<(usize, f32)> = Vec::with_capacity(l);
        let mut max = f32::NEG_INFINITY;
        for j in 0..l {
            if !mask.visible(qp, k_pos0 + j) {
                continue;
            }
            let krow = &k[(j * kv_heads + kvh) * d..(j * kv_heads + kvh + 1) * d];
            let sc = crate::ops::linear::dot(qrow, krow);
            max = max.max(sc);
            scores.push((j, sc));
        }
        o.fill(0.0);
        if scores.is_empty() {
            return;
        }
        let mut denom = 0.0f32;
        for &(j, sc) in &scores {
            let e = (sc - max).exp();
            denom += e;
            let p = round(e, precision);
            let vrow = &v[(j * kv_heads + kvh) * d..(j * kv_heads + kvh + 1) * d];
            for (acc, &x) in o.iter_mut().zip(vrow) {
                *acc += p * x;
            }
        }
        let inv = 1.0 / denom;
        for x in o.iter_mut() {
            *x = round(*x * inv, precision);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pseudo(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                ((s >> 11) % 2001) as f32 / 1000.0 - 1.0
            })
            .collect()
    }

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
