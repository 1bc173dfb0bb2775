//! `y = x W^T`: the projection every nn.Linear (and every expert GEMM) performs.
//!
//! Weights are `[out_features, in_features]` (PyTorch layout). Each weight row is widened to
//! `f32` once per call and dotted with every input row in float32; the output is rounded once
//! to the activation dtype, as torch's bf16 GEMM (fp32 accumulation, bf16 store) does.
//! Work is split across threads by blocks of weight rows.

use crate::precision::{round, Precision};
use rayon::prelude::*;

/// A `[rows, cols]` weight matrix whose rows can be read as `f32`.
pub trait Matrix: Sync {
    fn rows(&self) -> usize;
    fn cols(&self) -> usize;
    /// Writes row `r` (length `cols()`) into `out`.
    fn read_row(&self, r: usize, out: &mut [f32]);
}

/// A matrix held in memory as `f32` (tests, and small weights converted at load).
#[derive(Clone, Debug)]
pub struct DenseMatrix {
    pub rows: usize,
    pub cols: usize,
    pub data: Vec<f32>,
}

impl DenseMatrix {
    pub fn new(rows: usize, cols: usize, data: Vec<f32>) -> Self {
        assert_eq!(data.len(), rows * cols, "DenseMatrix data length");
        DenseMatrix { rows, cols, data }
    }
}

impl Matrix for DenseMatrix {
    fn rows(&self) -> usize {
        self.rows
    }
    fn cols(&self) -> usize {
        self.cols
    }
    fn read_row(&self, r: usize, out: &mut [f32]) {
        out.copy_from_slice(&self.data[r * self.cols..(r + 1) * self.cols]);
    }
}

/// Float32 dot product with eight independent accumulators (vectorises well).
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    let mut acc = [0.0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    let mut tail = 0.0f32;
    for (x, y) in ra.iter().zip(rb) {
        tail += x * y;
    }
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) + tail
}

/// Weight rows handled by one task.
const ROW_BLOCK: usize = 16;
/// Below this many multiply-adds a product runs on the calling thread (task overhead wins).
const PARALLEL_MACS: usize = 1 << 18;

/// `out[t, r] = round(sum_k x[t, k] * w[r, k])` for `tokens` input rows.
pub fn linear(x: &[f32], tokens: usize, w: &dyn Matrix, out: &mut [f32], precision: Precision) {
    let (n, k) = (w.rows(), w.cols());
    assert_eq!(x.len(), tokens * k, "linear: input is not [{tokens}, {k}]");
    assert_eq!(out.len(), tokens * n, "linear: output is not [{tokens}, {n}]");
    let block = |b: usize| {
            let r0 = b * ROW_BLOCK;
            let r1 = (r0 + ROW_BLOCK).min(n);
            let mut row = vec![0.0f32; k];
            let mut res = vec![0.0f32; (r1 - r0) * tokens];
            for r in r0..r1 {
                w.read_row(r, &mut row);
                for t in 0..tokens {
                    res[(r - r0) * tokens + t] = round(dot(&x[t * k..(t + 1) * k], &row), precision);
                }
            }
            (r0, res)
    };
    let blocks: Vec<(usize, Vec<f32>)> = if tokens * n * k < PARALLEL_MACS {
        (0..n.div_ceil(ROW_BLOCK)).map(block).collect()
    } else {
        (0..n.div_ceil(ROW_BLOCK)).into_par_iter().map(block).collect()
    };
    for (r0, res) in blocks {
        let rows = res.len() / tokens.max(1);
        for i in 0..rows {
            for t in 0..tokens {
                out[t * n + r0 + i] = res[i * tokens + t];
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::test_values::pseudo;

    #[test]
    fn matches_naive_float64_product() {
        for (t, n, k) in [(1, 1, 1), (3, 17, 29), (5, 40, 64), (2, 33, 7)] {
            let x = pseudo(t * k, 1);
            let w = DenseMatrix::new(n, k, pseudo(n * k, 2));
            let mut y = vec![f32::NAN; t * n];
            linear(&x, t, &w, &mut y, Precision::F32);
            for ti in 0..t {
                for r in 0..n {
                    let want: f64 = (0..k).map(|i| x[ti * k + i] as f64 * w.data[r * k + i] as f64).sum();
                    let got = y[ti * n + r];
                    assert!(got.is_finite());
                    assert!((got as f64 - want).abs() < 1e-5 * (1.0 + k as f64), "[{ti},{r}] {got} vs {want}");
                }
            }
        }
    }

    #[test]
    fn bf16_mode_rounds_outputs() {
        let x = pseudo(4 * 24, 3);
        let w = DenseMatrix::new(9, 24, pseudo(9 * 24, 4));
        let (mut a, mut b) = (vec![0.0; 36], vec![0.0; 36]);
        linear(&x, 4, &w, &mut a, Precision::F32);
        linear(&x, 4, &w, &mut b, Precision::Bf16);
        for (a, b) in a.iter().zip(&b) {
            assert_eq!(crate::precision::to_bf16(*a), *b);
        }
    }
}
