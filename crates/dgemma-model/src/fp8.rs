//! FP8 E4M3 (OCP "E4M3FN", `torch.float8_e4m3fn`, safetensors `F8_E4M3`): one sign bit, four
//! exponent bits (bias 7), three mantissa bits; no infinities, NaN is `0x7f` / `0xff`, the largest
//! finite value is 448 (`0x7e`), the smallest normal 2^-6 (`0x08`) and the smallest subnormal 2^-9
//! (`0x01`).
//!
//! [`encode`] rounds a float32 to the nearest e4m3 value (ties to even) and saturates: every
//! magnitude from 448 up, infinities included, becomes ±448, as torch's
//! `x.clamp(-448, 448).to(torch.float8_e4m3fn)` in the quantisers. NaN becomes `0x7f` (`0xff` for a
//! negative NaN). [`decode`] is exact (every e4m3 value is a float32).
//!
//! Weight quantisation (compressed-tensors "FP8-dynamic" weights, model-spec section 2 and issue
//! #6): one float32 scale per output row, `scale = max|w_row| / 448`, `q = e4m3(w / scale)`, and
//! the dequantised weight is `f32(q) * scale` (one float32 product). A row of zeros gets scale 1
//! (its codes are all +0, so it dequantises to exactly 0). [`quantize_row`] / [`dequantize_row`].
//!
//! `csrc/fp8.cuh` decodes with the same integer bit manipulation, so the GPU, the CPU emulator and
//! this module agree bit for bit.

/// The largest finite e4m3 magnitude.
pub const E4M3_MAX: f32 = 448.0;

/// The code of +448.
pub const E4M3_MAX_CODE: u8 = 0x7e;

/// The code of the (positive) NaN.
pub const E4M3_NAN: u8 = 0x7f;

/// The float32 value of an e4m3 code (exact).
#[inline]
pub fn decode(code: u8) -> f32 {
    let em = (code & 0x7f) as u32;
    let sign = ((code & 0x80) as u32) << 24;
    let magnitude = if em == 0x7f {
        return f32::from_bits(sign | 0x7fc0_0000);
    } else if em < 8 {
        // Subnormal: m * 2^-9 (exact in float32).
        em as f32 * (1.0 / 512.0)
    } else {
        // Normal: exponent field e = em >> 3 (1..=15), value 2^(e - 7) * (1 + m / 8): float32
        // exponent e - 7 + 127 = e + 120, the 3 mantissa bits at the top of float32's 23.
        f32::from_bits((em << 20) + (120 << 23))
    };
    f32::from_bits(magnitude.to_bits() | sign)
}

/// The nearest e4m3 code of `x` (ties to even), saturating at ±448; NaN gives NaN.
#[inline]
pub fn encode(x: f32) -> u8 {
    let bits = x.to_bits();
    let sign = ((bits >> 24) & 0x80) as u8;
    if x.is_nan() {
        return sign | E4M3_NAN;
    }
    let a = f32::from_bits(bits & 0x7fff_ffff);
    let code = if a >= E4M3_MAX {
        E4M3_MAX_CODE
    } else if a < 1.0 / 64.0 {
        // Below the smallest normal: a multiple of 2^-9 (a * 512 is exact), rounded half to even;
        // 8 (a value that rounds up to 2^-6) is the smallest normal's code.
        (a * 512.0).round_ties_even() as u8
    } else {
        // Round float32's 23 mantissa bits to 3, ties to even (a carry moves into the exponent,
        // which is the right next value), then rebias the exponent from 127 to 7.
        let b = a.to_bits();
        let r = (b + 0x7_ffff + ((b >> 20) & 1)) >> 20;
        (r - (120 << 3)).min(E4M3_MAX_CODE as u32) as u8
    };
    sign | code
}

/// `x` rounded to e4m3 and widened back.
#[inline]
pub fn round(x: f32) -> f32 {
    decode(encode(x))
}

/// The per-row scale of `row`: `max|w| / 448`, or 1 for a row of zeros. `None` when the row holds
/// a NaN or an infinity (such a row can not be quantised).
pub fn row_scale(row: &[f32]) -> Option<f32> {
    let mut max = 0.0f32;
    for &w in row {
        if !w.is_finite() {
            return None;
        }
        max = max.max(w.abs());
    }
    Some(if max == 0.0 { 1.0 } else { max / E4M3_MAX })
}

/// Quantises one row into `out` (same length) and returns its scale; `None` (and `out`
/// untouched) when the row is not finite. See [`row_scale`].
pub fn quantize_row(row: &[f32], out: &mut [u8]) -> Option<f32> {
    assert_eq!(row.len(), out.len(), "quantize_row: lengths");
    let scale = row_scale(row)?;
    for (o, &w) in out.iter_mut().zip(row) {
        *o = encode(w / scale);
    }
    Some(scale)
}

/// The dequantised row `f32(q) * scale` (one float32 product per element).
pub fn dequantize_row(codes: &[u8], scale: f32, out: &mut [f32]) {
    assert_eq!(codes.len(), out.len(), "dequantize_row: lengths");
    for (o, &q) in out.iter_mut().zip(codes) {
        *o = decode(q) * scale;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The value of a code from the format's definition (float64, independent of `decode`).
    fn reference(code: u8) -> Option<f64> {
        let s = if code & 0x80 != 0 { -1.0 } else { 1.0 };
        let e = ((code >> 3) & 0xf) as i32;
        let m = (code & 7) as f64;
        if e == 15 && m == 7.0 {
            return None;
        }
        Some(s * if e == 0 { m / 8.0 * 2f64.powi(-6) } else { (1.0 + m / 8.0) * 2f64.powi(e - 7) })
    }

    fn finite_codes() -> impl Iterator<Item = u8> {
        (0..=255u8).filter(|&c| c & 0x7f != 0x7f)
    }

    #[test]
    fn every_code_decodes_to_its_value() {
        for code in 0..=255u8 {
            let got = decode(code);
            match reference(code) {
                None => assert!(got.is_nan(), "{code:#04x}: {got}"),
                Some(v) => {
                    assert_eq!(got as f64, v, "{code:#04x}");
                    assert_eq!(got.is_sign_negative(), code & 0x80 != 0, "{code:#04x}: sign");
                }
            }
        }
        assert_eq!(decode(0x7e), 448.0);
        assert_eq!(decode(0xfe), -448.0);
        assert_eq!(decode(0x08), 1.0 / 64.0);
        assert_eq!(decode(0x01), 1.0 / 512.0);
        assert_eq!(decode(0x38), 1.0);
        assert_eq!(decode(0x80).to_bits(), (-0.0f32).to_bits());
    }

    #[test]
    fn every_code_round_trips() {
        for code in finite_codes() {
            assert_eq!(encode(decode(code)), code, "{code:#04x} ({})", decode(code));
        }
        assert_eq!(encode(f32::NAN), 0x7f);
        assert_eq!(encode(-f32::NAN), 0xff);
        assert!(round(f32::NAN).is_nan());
    }

    #[test]
    fn saturates_at_448() {
        for x in [448.0f32, 449.0, 463.9, 464.0, 480.0, 1e9, f32::MAX, f32::INFINITY] {
            assert_eq!(encode(x), 0x7e, "{x}");
            assert_eq!(encode(-x), 0xfe, "{}", -x);
        }
        assert_eq!(encode(447.0), 0x7e); // between 416 and 448, nearer 448
        assert_eq!(encode(431.0), 0x7d); // nearer 416
    }

    #[test]
    fn midpoints_round_to_even() {
        // Between consecutive positive codes c and c + 1 (both finite), the midpoint goes to the
        // even code and anything off the midpoint to the nearer one.
        for c in 0u8..0x7e {
            let (lo, hi) = (decode(c) as f64, decode(c + 1) as f64);
            let mid = ((lo + hi) / 2.0) as f32;
            assert_eq!(mid as f64, (lo + hi) / 2.0, "midpoint of {c:#04x} is a float32");
            let even = if c % 2 == 0 { c } else { c + 1 };
            assert_eq!(encode(mid), even, "midpoint {mid} of {c:#04x}");
            assert_eq!(encode(-mid), 0x80 | even, "midpoint {} of {c:#04x}", -mid);
            let below = f32::from_bits(mid.to_bits() - 1);
            let above = f32::from_bits(mid.to_bits() + 1);
            assert_eq!(encode(below), c, "just below the midpoint of {c:#04x}");
            assert_eq!(encode(above), c + 1, "just above the midpoint of {c:#04x}");
        }
        // Below half the smallest subnormal: zero (the tie at 2^-10 goes to even 0).
        assert_eq!(encode(1.0 / 1024.0), 0);
        assert_eq!(encode(1.0e-30), 0);
        assert_eq!(encode(f32::from_bits(1)), 0);
        assert_eq!(encode(-1.0e-30), 0x80);
    }

    #[test]
    fn encode_is_the_nearest_code() {
        // Against a brute-force search over the finite codes on many float32 values.
        let values: Vec<(f64, u8)> = finite_codes().filter(|c| c & 0x80 == 0).map(|c| (decode(c) as f64, c)).collect();
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        for i in 0..200_000 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            // Magnitudes spread over 2^-12 .. 2^10, both signs.
            let e = (state % 23) as i32 - 12;
            let m = ((state >> 8) % (1 << 24)) as f32 / (1 << 24) as f32;
            let x = (1.0 + m) * 2f32.powi(e) * if i % 2 == 0 { 1.0 } else { -1.0 };
            let a = x.abs() as f64;
            let want = if a >= 448.0 {
                0x7e
            } else {
                let mut best = values[0];
                for &(v, c) in &values {
                    let (d, db) = ((v - a).abs(), (best.0 - a).abs());
                    if d < db || (d == db && c % 2 == 0) {
                        best = (v, c);
                    }
                }
                best.1
            };
            let want = want | if x < 0.0 { 0x80 } else { 0 };
            assert_eq!(encode(x), want, "{x}");
        }
    }

    #[test]
    fn encode_is_monotonic() {
        let mut prev = f32::NEG_INFINITY;
        let mut x = -500.0f32;
        while x < 500.0 {
            let r = round(x);
            assert!(r >= prev, "{x}: {r} < {prev}");
            prev = r;
            x += 0.0137;
        }
    }

    #[test]
    fn rows_quantise_per_channel() {
        let row = [0.5f32, -1.25, 3.0, 0.0, -0.001, 2.9];
        let mut q = [0u8; 6];
        let scale = quantize_row(&row, &mut q).unwrap();
        assert_eq!(scale, 3.0 / 448.0);
        assert_eq!(q[2], 0x7e, "the row's largest magnitude maps to 448");
        assert_eq!(q[3], 0);
        let mut back = [0.0f32; 6];
        dequantize_row(&q, scale, &mut back);
        for (w, d) in row.iter().zip(&back) {
            // Three mantissa bits: within half a step (2^-4 relative) of a normal value, and
            // within half the subnormal step (2^-10 * scale) below the normal range.
            let limit = (w.abs() / 16.0).max(scale / 1024.0) * 1.0001;
            assert!((w - d).abs() <= limit, "{w} -> {d}");
        }
        // A zero row: scale 1, codes 0, exactly zero back.
        let mut q = [0xaau8; 3];
        assert_eq!(quantize_row(&[0.0, -0.0, 0.0], &mut q), Some(1.0));
        assert_eq!(q, [0, 0x80, 0]);
        dequantize_row(&q, 1.0, &mut back[..3]);
        assert!(back[..3].iter().all(|&v| v == 0.0));
        // Non-finite rows are refused.
        assert_eq!(quantize_row(&[1.0, f32::INFINITY], &mut [0u8; 2]), None);
        assert_eq!(quantize_row(&[f32::NAN, 1.0], &mut [0u8; 2]), None);
    }
}
