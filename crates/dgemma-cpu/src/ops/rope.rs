//! Rotary position embedding, non-interleaved ("rotate_half", NeoX style).
//!
//! For head dim D and position p: `angle[j] = p * inv_freq[j]` (float32) for j < D/2,
//! `cos = cat(cos(angle), cos(angle))`, `sin` likewise, both rounded to the activation dtype,
//! and `x' = x * cos + rotate_half(x) * sin` with `rotate_half(x) = cat(-x[D/2:], x[:D/2])`.
//! A bf16 run rounds each product and the sum. Proportional RoPE (full layers) is the same
//! with `inv_freq[j] = 0` beyond the rotary width, which leaves those pairs unchanged.

use crate::precision::{round, Precision};

/// cos/sin rows for a run of consecutive positions.
#[derive(Clone, Debug)]
pub struct RopeTable {
    pub dim: usize,
    pub cos: Vec<f32>,
    pub sin: Vec<f32>,
}

impl RopeTable {
    /// Tables for positions `start .. start + count`; `inv_freq` has `dim / 2` entries.
    pub fn new(inv_freq: &[f32], start: usize, count: usize, precision: Precision) -> RopeTable {
        let half = inv_freq.len();
        let dim = 2 * half;
        let mut cos = vec![0.0f32; count * dim];
        let mut sin = vec![0.0f32; count * dim];
        for i in 0..count {
            let p = (start + i) as f32;
            for (j, &f) in inv_freq.iter().enumerate() {
                let a = p * f;
                let (c, s) = (round(a.cos(), precision), round(a.sin(), precision));
                cos[i * dim + j] = c;
                cos[i * dim + j + half] = c;
                sin[i * dim + j] = s;
                sin[i * dim + j + half] = s;
            }
        }
        RopeTable { dim, cos, sin }
    }
}

/// Rotates `x`, laid out `[tokens, heads, dim]`, in place with the table's rows.
pub fn apply_rope(x: &mut [f32], heads: usize, table: &RopeTable, precision: Precision) {
    let d = table.dim;
    let half = d / 2;
    let tokens = x.len() / (heads * d);
    assert_eq!(x.len(), tokens * heads * d, "apply_rope: bad input length");
    assert!(table.cos.len() >= tokens * d, "apply_rope: table shorter than input");
    let mut tmp = vec![0.0f32; d];
    for t in 0..tokens {
        let (cos, sin) = (&table.cos[t * d..(t + 1) * d], &table.sin[t * d..(t + 1) * d]);
        for h in 0..heads {
            let row = &mut x[(t * heads + h) * d..(t * heads + h + 1) * d];
            tmp.copy_from_slice(row);
            for j in 0..d {
                let rot = if j < half { -tmp[j + half] } else { tmp[j - half] };
                let a = round(tmp[j] * cos[j], precision);
                let b = round(rot * sin[j], precision);
                row[j] = round(a + b, precision);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotates_pairs_j_and_j_plus_half() {
        // One head, dim 4, inv_freq [1, 0]: pair (0, 2) rotates by angle p, pair (1, 3) is fixed.
        let table = RopeTable::new(&[1.0, 0.0], 3, 1, Precision::F32);
        let mut x = vec![1.0f32, 5.0, 0.0, 7.0];
        apply_rope(&mut x, 1, &table, Precision::F32);
        let (c, s) = (3f32.cos(), 3f32.sin());
        assert!((x[0] - c).abs() < 1e-6 && (x[2] - s).abs() < 1e-6);
        assert_eq!((x[1], x[3]), (5.0, 7.0));
    }

    #[test]
    fn position_zero_is_identity_and_norm_is_preserved() {
        let inv: Vec<f32> = (0..8).map(|j| 10000f32.powf(-(2.0 * j as f32) / 16.0)).collect();
        let t0 = RopeTable::new(&inv, 0, 1, Precision::F32);
        let x0: Vec<f32> = (0..32).map(|i| (i as f32 * 0.37).sin()).collect();
        let mut x = x0.clone();
        apply_rope(&mut x, 2, &t0, Precision::F32);
        assert_eq!(x, x0);
        let t = RopeTable::new(&inv, 1000, 1, Precision::F32);
        apply_rope(&mut x, 2, &t, Precision::F32);
        for h in 0..2 {
            let n0: f32 = x0[h * 16..(h + 1) * 16].iter().map(|v| v * v).sum();
            let n1: f32 = x[h * 16..(h + 1) * 16].iter().map(|v| v * v).sum();
            assert!((n0 - n1).abs() < 1e-4);
        }
    }

    #[test]
    fn relative_position_property() {
        // <rope(q, m), rope(k, n)> depends only on m - n.
        let inv: Vec<f32> = (0..4).map(|j| 100f32.powf(-(2.0 * j as f32) / 8.0)).collect();
        let q: Vec<f32> = (0..8).map(|i| i as f32 * 0.1 - 0.3).collect();
        let k: Vec<f32> = (0..8).map(|i| (i as f32).cos()).collect();
        let score = |m: usize, n: usize| {
            let (mut a, mut b) = (q.clone(), k.clone());
            apply_rope(&mut a, 1, &RopeTable::new(&inv, m, 1, Precision::F32), Precision::F32);
            apply_rope(&mut b, 1, &RopeTable::new(&inv, n, 1, Precision::F32), Precision::F32);
            a.iter().zip(&b).map(|(x, y)| x * y).sum::<f32>()
        };
        assert!((score(7, 3) - score(14, 10)).abs() < 1e-4);
    }
}
