//! Rounding points of the two numeric modes.
//!
//! Every tensor of a transformers bfloat16 run is stored in bfloat16 while the arithmetic that
//! produced it ran in float32 (torch's "opmath"). The CPU backend keeps every activation in
//! `f32` and, in [`Precision::Bf16`] mode, rounds it to the nearest bfloat16 (ties to even) at
//! exactly the points where torch writes a bf16 tensor. In [`Precision::F32`] mode rounding is
//! the identity.

pub use dgemma_model::Precision;
use half::bf16;

/// Rounds one value to bfloat16 and widens it back (round to nearest, ties to even).
#[inline]
pub fn to_bf16(x: f32) -> f32 {
    bf16::from_f32(x).to_f32()
}

/// Rounds `x` to the storage type of `precision`.
#[inline]
pub fn round(x: f32, precision: Precision) -> f32 {
    match precision {
        Precision::F32 => x,
        Precision::Bf16 => to_bf16(x),
    }
}

/// Rounds every element of `xs` to the storage type of `precision`.
pub fn round_slice(xs: &mut [f32], precision: Precision) {
    if precision == Precision::Bf16 {
        for x in xs {
            *x = to_bf16(*x);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bf16_rounding_is_nearest_even() {
        // 1 + 2^-8 lies exactly between 1 and 1 + 2^-7: ties go to the even mantissa (1.0).
        assert_eq!(to_bf16(1.0 + 1.0 / 256.0), 1.0);
        // 1 + 3*2^-8 lies between 1+2^-7 and 1+2^-6: ties to even gives 1 + 2^-6.
        assert_eq!(to_bf16(1.0 + 3.0 / 256.0), 1.0 + 1.0 / 64.0);
        // sqrt(2816) = 53.066 rounds to 53.0 in bf16 (model-spec 3.1).
        assert_eq!(to_bf16((2816f32).sqrt()), 53.0);
        assert_eq!(round(0.1, Precision::F32), 0.1);
    }
}
