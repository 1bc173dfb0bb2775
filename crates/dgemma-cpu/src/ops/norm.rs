//! RMSNorm as DiffusionGemma defines it (model-spec 3.1).
//!
//! `y = x * (mean(x^2) + eps)^-0.5 * w`, computed in float32, the scale being `w` itself (not
//! `1 + w`), and the result rounded once to the activation dtype. Several norms carry no scale
//! (v_norm, the router's norm, the self-conditioning post-norm): pass `None`.

use crate::precision::{round, Precision};
use rayon::prelude::*;

/// Normalises one row in place.
pub fn rms_norm_row(x: &mut [f32], weight: Option<&[f32]>, eps: f32, precision: Precision) {
    let n = x.len();
    let mean_sq = x.iter().map(|&v| v * v).sum::<f32>() / n as f32;
    let inv = (mean_sq + eps).powf(-0.5);
    match weight {
        Some(w) => {
            assert_eq!(w.len(), n, "rms_norm weight length");
            for (v, &s) in x.iter_mut().zip(w) {
                *v = round(*v * inv * s, precision);
            }
        }
        None => {
            for v in x.iter_mut() {
                *v = round(*v * inv, precision);
            }
        }
    }
}

/// Normalises every row of width `width` in `x` (for per-head norms, `width` = head_dim).
pub fn rms_norm(x: &mut [f32], width: usize, weight: Option<&[f32]>, eps: f32, precision: Precision) {
    assert_eq!(x.len() % width, 0, "rms_norm: length {} not a multiple of width {width}", x.len());
    if x.len() < 1 << 16 {
        x.chunks_mut(width).for_each(|row| rms_norm_row(row, weight, eps, precision));
    } else {
        x.par_chunks_mut(width).for_each(|row| rms_norm_row(row, weight, eps, precision));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Straightforward float64 reference.
    fn reference(x: &[f32], w: Option<&[f32]>, eps: f64) -> Vec<f64> {
        let ms = x.iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>() / x.len() as f64;
        let inv = 1.0 / (ms + eps).sqrt();
        x.iter()
            .enumerate()
            .map(|(i, &v)| v as f64 * inv * w.map_or(1.0, |w| w[i] as f64))
            .collect()
    }

    #[test]
    fn matches_float64_reference() {
        let x: Vec<f32> = (0..64).map(|i| ((i * 37 % 17) as f32 - 8.0) * 0.31).collect();
        let w: Vec<f32> = (0..64).map(|i| 0.5 + (i % 5) as f32 * 0.25).collect();
        for weight in [None, Some(w.as_slice())] {
            let mut y = x.clone();
            rms_norm(&mut y, 64, weight, 1e-6, Precision::F32);
            let want = reference(&x, weight, 1e-6);
            for (a, b) in y.iter().zip(&want) {
                assert!((*a as f64 - b).abs() < 1e-5 * (1.0 + b.abs()), "{a} vs {b}");
            }
        }
    }

    #[test]
    fn scale_is_w_not_one_plus_w() {
        let mut y = vec![2.0f32; 4];
        rms_norm(&mut y, 4, Some(&[0.5; 4]), 0.0, Precision::F32);
        assert_eq!(y, vec![0.5; 4]);
    }

    #[test]
    fn zero_row_stays_zero() {
        let mut y = vec![0.0f32; 8];
        rms_norm(&mut y, 8, None, 1e-6, Precision::Bf16);
        assert!(y.iter().all(|&v| v == 0.0));
    }

    #[test]
    fn per_head_rows_are_independent() {
        let mut y = vec![1.0f32, 1.0, 10.0, 10.0];
        rms_norm(&mut y, 2, None, 0.0, Precision::F32);
        assert_eq!(y, vec![1.0; 4]);
    }
}
