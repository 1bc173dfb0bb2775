//! GELU with the tanh approximation and the GeGLU gate.
//!
//! torch's `gelu(x, approximate="tanh")` computes, in float32 even for bf16 tensors,
//! `0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 * x^3)))` and rounds the result once.

use crate::precision::{round, Precision};

const SQRT_2_OVER_PI: f32 = 0.797_884_6;
const KAPPA: f32 = 0.044715;

/// gelu_tanh of one value in float32.
#[inline]
pub fn gelu_tanh(x: f32) -> f32 {
    let inner = SQRT_2_OVER_PI * (x + KAPPA * x * x * x);
    0.5 * x * (1.0 + inner.tanh())
}

/// `out[i] = round(round(gelu(gate[i])) * up[i])`: the GeGLU product of an MLP, with the
/// rounding of a bf16 run after the activation and after the product.
pub fn geglu(gate: &[f32], up: &[f32], out: &mut [f32], precision: Precision) {
    assert_eq!(gate.len(), up.len());
    assert_eq!(gate.len(), out.len());
    for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
        *o = round(round(gelu_tanh(g), precision) * u, precision);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gelu_tanh_matches_known_values() {
        // Values from torch.nn.functional.gelu(x, approximate="tanh") in float32.
        let cases = [(0.0f32, 0.0f32), (1.0, 0.841_191_95), (-1.0, -0.158_808_03), (3.0, 2.996_362_7)];
        for (x, want) in cases {
            assert!((gelu_tanh(x) - want).abs() < 1e-6, "gelu({x}) = {} want {want}", gelu_tanh(x));
        }
    }

    #[test]
    fn geglu_rounds_twice_in_bf16() {
        let mut out = [0.0f32; 1];
        geglu(&[1.0], &[1.0 + 1.0 / 128.0], &mut out, Precision::Bf16);
        let g = crate::precision::to_bf16(gelu_tanh(1.0));
        assert_eq!(out[0], crate::precision::to_bf16(g * (1.0 + 1.0 / 128.0)));
    }
}
