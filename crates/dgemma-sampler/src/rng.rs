//! Counter-based randomness for [`crate::SeededNoise`], specified so a CUDA kernel can reproduce it
//! bit for bit.
//!
//! # Generator
//! Philox4x32-10 (Salmon et al., SC'11; Random123): 128-bit counter `c[0..4]`, 64-bit key
//! `k[0..2]`, 10 rounds, multipliers `0xD2511F53`, `0xCD9E8D57`, Weyl increments `0x9E3779B9`,
//! `0xBB67AE85`. Round: `(hi0, lo0) = mulhilo(0xD2511F53, c0)`, `(hi1, lo1) = mulhilo(0xCD9E8D57, c2)`,
//! `c = [hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0]`, then the key is bumped (not after the last
//! round). Checked against the Random123 known-answer vectors. Every draw is one stateless
//! function of (key, counter), so results do not depend on what else runs or in which order.
//!
//! # Gumbel transform ([`gumbel_from_bits`]), IEEE float32, round-to-nearest-even, no FMA
//! ```text
//! u  = (f32(w) + 0.5f) * 2^-32                 // w: u32; f32(w) rounds to nearest even; u in (0, 1]
//! L  = ln(1 - u), computed accurately:         // (1 - u) is uniform on [0, 1)
//!        u >= 0.5 :  L = ln_f32(1 - u)         // 1 - u is exact (Sterbenz)
//!        u <  0.5 :  y = 1 - u (rounded);  L = (y == 1) ? -u : (ln_f32(y) / (y - 1)) * (-u)   // y - 1 exact
//! E  = -L                                      // Exp(1); +inf when u == 1
//! g  = -ln_f32(E)                              // Gumbel(0, 1); -inf when u == 1; max 33*ln2 ~ 22.87
//! ```
//! i.e. `g = -ln(-ln(v))` with `v = 1 - u`, evaluated without the cancellation of `1 - u`, so the
//! winners of a Gumbel-max draw (small `E`) keep ~2^-32 resolution instead of float32's 2^-24
//! spacing near 1 (which would create ties among equal logits and bias them to low token ids).
//!
//! `ln_f32` is fdlibm's `__ieee754_logf` (Sun Microsystems 1993, float port by Ian Lance Taylor),
//! re-implemented here with the same constants and operation order; it uses only integer bit
//! operations and IEEE `+ - * /`, so it is reproducible on any IEEE machine (< 1 ulp error).
//! A CUDA port must use `__fadd_rn`/`__fmul_rn`/`__fdiv_rn` (or `-fmad=false`, no fast-math) and
//! `__uint2float_rn` for `f32(w)`.
//!
//! # Uniform token ids ([`uniform_below`])
//! `id = (x * V) >> 64` with `x = (w1 << 32) | w0` (two 32-bit words) and 128-bit multiply
//! (CUDA: `__umul64hi(x, V)`). Bias <= V / 2^64 (exactly uniform when V is a power of two).

/// Philox4x32 round multipliers and key increments.
const M0: u32 = 0xD251_1F53;
const M1: u32 = 0xCD9E_8D57;
const W0: u32 = 0x9E37_79B9;
const W1: u32 = 0xBB67_AE85;

/// Philox4x32-10 block function.
#[inline(always)]
pub fn philox4x32_10(counter: [u32; 4], key: [u32; 2]) -> [u32; 4] {
    let mut c = counter;
    let mut k = key;
    for round in 0..10 {
        if round > 0 {
            k[0] = k[0].wrapping_add(W0);
            k[1] = k[1].wrapping_add(W1);
        }
        let p0 = (M0 as u64) * (c[0] as u64);
        let p1 = (M1 as u64) * (c[2] as u64);
        let (hi0, lo0) = ((p0 >> 32) as u32, p0 as u32);
        let (hi1, lo1) = ((p1 >> 32) as u32, p1 as u32);
        c = [hi1 ^ c[1] ^ k[0], lo1, hi0 ^ c[3] ^ k[1], lo0];
    }
    c
}

/// Uniform integer in `0..n` from two 32-bit words (see the module docs).
#[inline]
pub fn uniform_below(w0: u32, w1: u32, n: u32) -> u32 {
    let x = ((w1 as u64) << 32) | w0 as u64;
    ((x as u128 * n as u128) >> 64) as u32
}

/// 2^-32 as f32 (exact).
const TWO_POW_M32: f32 = f32::from_bits(0x2f80_0000);

/// Standard Gumbel variate from 32 random bits (see the module docs for the exact recipe).
#[inline]
pub fn gumbel_from_bits(w: u32) -> f32 {
    let u = (w as f32 + 0.5f32) * TWO_POW_M32;
    let l = if u >= 0.5f32 {
        ln_f32(1.0f32 - u)
    } else {
        let y = 1.0f32 - u;
        if y == 1.0f32 {
            -u
        } else {
            (ln_f32(y) / (y - 1.0f32)) * (-u)
        }
    };
    let e = -l;
    -ln_f32(e)
}

/// Upper bound of [`gumbel_from_bits`]`(w)` from the leading zeros of `w` alone:
/// `g = -ln(E) <= -ln(u)` because `E = -ln(1-u) >= u`, and `u >= 2^-(1 + lz(w))`, so
/// `g <= (1 + lz(w)) * ln 2`; `1e-3` covers the float32 rounding of `g` (~1e-6).
/// Lets a CPU Gumbel-max skip evaluating the logarithms for words that cannot win.
/// Verified exhaustively over all 2^32 words (as was `gumbel_from_bits(0)` being the maximum).
#[inline]
pub fn gumbel_upper_bound(w: u32) -> f32 {
    (1 + w.leading_zeros()) as f32 * std::f32::consts::LN_2 + 1e-3
}

/// Natural logarithm, fdlibm `__ieee754_logf` algorithm (portable, < 1 ulp).
pub fn ln_f32(x: f32) -> f32 {
    const LN2_HI: f32 = f32::from_bits(0x3f31_7180); // 6.9313812256e-01
    const LN2_LO: f32 = f32::from_bits(0x3717_f7d1); // 9.0580006145e-06
    const TWO25: f32 = f32::from_bits(0x4c00_0000); // 3.355443200e+07
    const LG1: f32 = f32::from_bits(0x3f2a_aaab); // 6.6666668653e-01
    const LG2: f32 = f32::from_bits(0x3ecc_cccd); // 4.0000000596e-01
    const LG3: f32 = f32::from_bits(0x3e92_4925); // 2.8571429849e-01
    const LG4: f32 = f32::from_bits(0x3e63_8e29); // 2.2222198546e-01
    const LG5: f32 = f32::from_bits(0x3e3a_3325); // 1.8183572590e-01
    const LG6: f32 = f32::from_bits(0x3e1c_d04f); // 1.5313838422e-01
    const LG7: f32 = f32::from_bits(0x3e17_8897); // 1.4798198640e-01
    const ONE_THIRD: f32 = f32::from_bits(0x3eaa_aaab); // (float)0.33333333333333333

    let mut x = x;
    let mut ix = x.to_bits() as i32;
    let mut k: i32 = 0;
    if ix < 0x0080_0000 {
        // x < 2^-126, zero, or negative
        if ix & 0x7fff_ffff == 0 {
            return f32::NEG_INFINITY;
        }
        if ix < 0 {
            return f32::NAN;
        }
        k -= 25;
        x *= TWO25; // subnormal: scale up
        ix = x.to_bits() as i32;
    }
    if ix >= 0x7f80_0000 {
        return x + x; // +inf or NaN
    }
    k += (ix >> 23) - 127;
    ix &= 0x007f_ffff;
    let i = (ix + (0x95f64 << 3)) & 0x0080_0000;
    x = f32::from_bits((ix | (i ^ 0x3f80_0000)) as u32); // normalise x or x/2
    k += i >> 23;
    let f = x - 1.0f32;
    if (0x007f_ffff & (15 + ix)) < 16 {
        // |f| < 2^-20
        if f == 0.0f32 {
            if k == 0 {
                return 0.0f32;
            }
            let dk = k as f32;
            return dk * LN2_HI + dk * LN2_LO;
        }
        let r = f * f * (0.5f32 - ONE_THIRD * f);
        if k == 0 {
            return f - r;
        }
        let dk = k as f32;
        return dk * LN2_HI - ((r - dk * LN2_LO) - f);
    }
    let s = f / (2.0f32 + f);
    let dk = k as f32;
    let z = s * s;
    let mut i = ix - (0x6147a << 3);
    let w = z * z;
    let j = (0x6b851 << 3) - ix;
    let t1 = w * (LG2 + w * (LG4 + w * LG6));
    let t2 = z * (LG1 + w * (LG3 + w * (LG5 + w * LG7)));
    i |= j;
    let r = t2 + t1;
    if i > 0 {
        let hfsq = 0.5f32 * f * f;
        if k == 0 {
            f - (hfsq - s * (hfsq + r))
        } else {
            dk * LN2_HI - ((hfsq - (s * (hfsq + r) + dk * LN2_LO)) - f)
        }
    } else if k == 0 {
        f - s * (f - r)
    } else {
        dk * LN2_HI - ((s * (f - r) - dk * LN2_LO) - f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Random123 `tests/kat_vectors`, the three `philox4x32 10` lines (ctr[4] key[2] -> out[4]).
    #[test]
    fn philox_known_answers() {
        assert_eq!(
            philox4x32_10([0; 4], [0; 2]),
            [0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8]
        );
        assert_eq!(
            philox4x32_10([u32::MAX; 4], [u32::MAX; 2]),
            [0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd]
        );
        assert_eq!(
            philox4x32_10(
                [0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344],
                [0xa4093822, 0x299f31d0]
            ),
            [0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1]
        );
    }

    fn ulp_err(got: f32, exact: f64) -> f64 {
        let e = exact as f32;
        let ulp = (f32::from_bits(e.abs().to_bits() + 1) - e.abs()) as f64;
        (got as f64 - exact).abs() / ulp
    }

    #[test]
    fn ln_accuracy() {
        assert_eq!(ln_f32(1.0), 0.0);
        assert_eq!(ln_f32(0.0), f32::NEG_INFINITY);
        assert_eq!(ln_f32(-0.0), f32::NEG_INFINITY);
        assert!(ln_f32(-1.0).is_nan());
        assert!(ln_f32(f32::NAN).is_nan());
        assert_eq!(ln_f32(f32::INFINITY), f32::INFINITY);
        let mut worst = 0.0f64;
        // Walk the whole positive range with a stride over the bit patterns (incl. subnormals).
        let mut bits = 1u32;
        while bits < 0x7f80_0000 {
            let x = f32::from_bits(bits);
            let exact = (x as f64).ln();
            if exact != 0.0 {
                worst = worst.max(ulp_err(ln_f32(x), exact));
            }
            bits += 997;
        }
        // Dense around 1 (the cancellation-prone region).
        for d in -200_000i32..200_000 {
            let x = f32::from_bits((1.0f32.to_bits() as i32 + d) as u32);
            let exact = (x as f64).ln();
            if exact != 0.0 {
                worst = worst.max(ulp_err(ln_f32(x), exact));
            }
        }
        assert!(worst < 1.0, "worst ln error {worst} ulp");
    }

    #[test]
    fn gumbel_range_and_accuracy() {
        // w = 0 gives the largest value, 33 ln 2.
        let gmax = gumbel_from_bits(0);
        assert!(
            (gmax as f64 - 33.0 * std::f64::consts::LN_2).abs() < 1e-5,
            "{gmax}"
        );
        assert_eq!(gumbel_from_bits(u32::MAX), f32::NEG_INFINITY);
        let mut worst = 0.0f64;
        let mut w = 0u64;
        while w < (1u64 << 32) - 256 {
            let wf = w as u32;
            let u = ((wf as f32 + 0.5f32) * TWO_POW_M32) as f64; // exact value of u used
            let exact = -(-(-u).ln_1p()).ln();
            let g = gumbel_from_bits(wf);
            assert!(g <= gmax);
            // absolute error: g is O(1) and |g| can cross zero.
            worst = worst.max((g as f64 - exact).abs());
            w += 65_537;
        }
        assert!(worst < 4e-6, "worst gumbel abs error {worst}");
    }

    #[test]
    fn gumbel_upper_bound_holds() {
        // Each leading-zero class attains its largest g at its smallest w; check those exactly,
        // plus a stride through every class.
        for lz in 0..=32u32 {
            let w = if lz == 32 { 0 } else { 1u32 << (31 - lz) };
            assert!(gumbel_from_bits(w) <= gumbel_upper_bound(w), "lz {lz}");
            for k in 0..64u32 {
                let w2 = w.saturating_add(k);
                assert!(gumbel_from_bits(w2) <= gumbel_upper_bound(w2), "w {w2}");
            }
        }
        let mut w = 0u64;
        while w < (1u64 << 32) {
            assert!(
                gumbel_from_bits(w as u32) <= gumbel_upper_bound(w as u32),
                "w {w}"
            );
            w += 40_009;
        }
    }

    #[test]
    fn uniform_below_bounds() {
        assert_eq!(uniform_below(0, 0, 262_144), 0);
        assert_eq!(uniform_below(u32::MAX, u32::MAX, 262_144), 262_143);
        assert_eq!(uniform_below(u32::MAX, u32::MAX, 10), 9);
        // power of two: the top bits of w1.
        assert_eq!(uniform_below(0, 0xABCD_0000, 1 << 16), 0xABCD);
    }
}
