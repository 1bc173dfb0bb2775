//! A scalar port of SLEEF's `xpowf` (the `Sleef_powf8_u10` / `Sleef_powf16_u10` kernels that
//! PyTorch's `Vectorized<float>::pow` calls on x86 with AVX2 or AVX-512).
//!
//! torch computes RoPE inverse frequencies as `base ** (arange(..) / dim)` in float32 on the CPU.
//! Its vectorised pow is SLEEF's 1-ULP double-float algorithm, which is *not* correctly rounded,
//! so reproducing torch's `inv_freq` bit for bit needs the same operation sequence. This file
//! transcribes `xpowf`, `logkf`, `expkf` (src/libm/sleefsimdsp.c) and the double-float helpers
//! of src/common/df.h in their FMA variant (`ENABLE_FMA_SP`, which the AVX2 and AVX-512 helpers
//! define), one lane at a time. Only finite, positive bases are handled (RoPE thetas); other
//! inputs fall back to the special cases of `xpowf`.

// Constants are copied verbatim from SLEEF; the compiler rounds them to f32 exactly as C does.
#![allow(clippy::excessive_precision)]

#[derive(Clone, Copy, Debug)]
struct F2 {
    x: f32,
    y: f32,
}

#[inline]
fn f2(x: f32, y: f32) -> F2 {
    F2 { x, y }
}

#[inline]
fn fma(x: f32, y: f32, z: f32) -> f32 {
    x.mul_add(y, z)
}

/// x*y - z with one rounding (`_mm256_fmsub_ps`).
#[inline]
fn fmapn(x: f32, y: f32, z: f32) -> f32 {
    x.mul_add(y, -z)
}

/// -x*y + z with one rounding (`_mm256_fnmadd_ps`).
#[inline]
fn fmanp(x: f32, y: f32, z: f32) -> f32 {
    (-x).mul_add(y, z)
}

#[inline]
fn dfnormalize(t: F2) -> F2 {
    let s = t.x + t.y;
    f2(s, (t.x - s) + t.y)
}

#[inline]
fn dfscale(d: F2, s: f32) -> F2 {
    f2(d.x * s, d.y * s)
}

#[inline]
fn dfadd2_f_f(x: f32, y: f32) -> F2 {
    let s = x + y;
    let v = s - x;
    f2(s, (x - (s - v)) + (y - v))
}

#[inline]
fn dfadd_f_f2(x: f32, y: F2) -> F2 {
    let s = x + y.x;
    f2(s, ((x - s) + y.x) + y.y)
}

#[inline]
fn dfadd2_f2_f(x: F2, y: f32) -> F2 {
    let s = x.x + y;
    let v = s - x.x;
    let t = (x.x - (s - v)) + (y - v);
    f2(s, t + x.y)
}

#[inline]
fn dfadd_f2_f2(x: F2, y: F2) -> F2 {
    let s = x.x + y.x;
    f2(s, (((x.x - s) + y.x) + x.y) + y.y)
}

#[inline]
fn dfadd2_f2_f2(x: F2, y: F2) -> F2 {
    let s = x.x + y.x;
    let v = s - x.x;
    let t = (x.x - (s - v)) + (y.x - v);
    f2(s, t + (x.y + y.y))
}

#[inline]
fn dfdiv(n: F2, d: F2) -> F2 {
    let t = 1.0f32 / d.x;
    let s = n.x * t;
    let u = fmapn(t, n.x, s);
    let v = fmanp(d.y, t, fmanp(d.x, t, 1.0));
    f2(s, fma(s, v, fma(n.y, t, u)))
}

#[inline]
fn dfsqu(x: F2) -> F2 {
    let s = x.x * x.x;
    f2(s, fma(x.x + x.x, x.y, fmapn(x.x, x.x, s)))
}

#[inline]
fn dfmul_f2_f2(x: F2, y: F2) -> F2 {
    let s = x.x * y.x;
    f2(s, fma(x.x, y.y, fma(x.y, y.x, fmapn(x.x, y.x, s))))
}

#[inline]
fn dfmul_f2_f(x: F2, y: f32) -> F2 {
    let s = x.x * y;
    f2(s, fma(x.y, y, fmapn(x.x, y, s)))
}

/// `vilogb2k_vi2_vf`: the biased exponent field minus 127.
#[inline]
fn ilogb2k(d: f32) -> i32 {
    (((d.to_bits() >> 23) & 0xff) as i32) - 0x7f
}

/// `vldexp3_vf_vf_vi2`: adds `q` to the exponent field.
#[inline]
fn ldexp3(d: f32, q: i32) -> f32 {
    f32::from_bits((d.to_bits() as i32).wrapping_add(q.wrapping_shl(23)) as u32)
}

/// `vldexp_vf_vf_vi2`.
#[inline]
fn ldexp(x: f32, q: i32) -> f32 {
    let mut q = q;
    let mut m = q >> 31;
    m = (((m.wrapping_add(q)) >> 6).wrapping_sub(m)) << 4;
    q = q.wrapping_sub(m << 2);
    m = m.wrapping_add(0x7f);
    m = if m > 0 { m } else { 0 };
    m = if m > 0xff { 0xff } else { m };
    let u = f32::from_bits((m << 23) as u32);
    let x = x * u * u * u * u;
    let u = f32::from_bits((q.wrapping_add(0x7f) << 23) as u32);
    x * u
}

fn logkf(d: f32) -> F2 {
    let o = d < f32::MIN_POSITIVE;
    let d = if o {
        d * ((1u64 << 32) as f32 * (1u64 << 32) as f32)
    } else {
        d
    };
    let mut e = ilogb2k(d * (1.0f32 / 0.75f32));
    let m = ldexp3(d, -e);
    if o {
        e -= 64;
    }

    let x = dfdiv(dfadd2_f_f(-1.0, m), dfadd2_f_f(1.0, m));
    let x2 = dfsqu(x);

    let mut t = 0.240_320_354_700_088_500_976_562_f32;
    t = fma(t, x2.x, 0.285_112_679_004_669_189_453_125);
    t = fma(t, x2.x, 0.400_007_992_982_864_379_882_812);
    let c = f2(
        0.666_666_626_930_236_816_406_25,
        3.691_838_612_596_143_320_843_11e-9,
    );

    let mut s = dfmul_f2_f(
        f2(0.693_147_182_464_599_609_38, -1.904_654_323_148_236_017e-9),
        e as f32,
    );
    s = dfadd_f2_f2(s, dfscale(x, 2.0));
    s = dfadd_f2_f2(
        s,
        dfmul_f2_f2(dfmul_f2_f2(x2, x), dfadd2_f2_f2(dfmul_f2_f(x2, t), c)),
    );
    s
}

/// SLEEF's `R_LN2f` (1/ln 2), the same float as `LOG2_E`.
const R_LN2F: f32 = std::f32::consts::LOG2_E;
const L2UF: f32 = 0.693_145_751_953_125_f32;
const L2LF: f32 = 1.428_606_765_330_187_045e-6_f32;

fn expkf(d: F2) -> f32 {
    let u = (d.x + d.y) * R_LN2F;
    // `_mm256_cvtps_epi32`: round to nearest, ties to even.
    let q = u.round_ties_even() as i32;

    let mut s = dfadd2_f2_f(d, q as f32 * -L2UF);
    s = dfadd2_f2_f(s, q as f32 * -L2LF);
    s = dfnormalize(s);

    let mut u = 0.001_363_246_468_827_128_410_339_36_f32;
    u = fma(u, s.x, 0.008_365_969_173_610_210_418_701_17);
    u = fma(u, s.x, 0.041_671_082_377_433_776_855_468_8);
    u = fma(u, s.x, 0.166_665_524_244_308_471_679_688);
    u = fma(u, s.x, 0.499_999_850_988_388_061_523_438);

    let mut t = dfadd_f2_f2(s, dfmul_f2_f(dfsqu(s), u));
    t = dfadd_f_f2(1.0, t);
    let u = ldexp(t.x + t.y, q);
    if d.x < -104.0 {
        0.0
    } else {
        u
    }
}

/// `Sleef_powf_u10` for one lane (FMA build).
pub(crate) fn powf_u10(x: f32, y: f32) -> f32 {
    if y == 0.0 || x == 1.0 {
        return 1.0;
    }
    if x.is_nan() || y.is_nan() {
        return f32::NAN;
    }
    let yisint = y.trunc() == y || y.abs() > (1u32 << 24) as f32;
    let yisodd = yisint && y.abs() < (1u32 << 24) as f32 && ((y.trunc() as i32) & 1) == 1;

    let mut result = expkf(dfmul_f2_f(logkf(x.abs()), y));
    if result.is_nan() {
        result = f32::INFINITY;
    }
    let sign = if x > 0.0 {
        1.0
    } else if yisint {
        if yisodd {
            -1.0
        } else {
            1.0
        }
    } else {
        f32::NAN
    };
    result *= sign;

    if y.is_infinite() {
        let efx = (x.abs() - 1.0).copysign(y);
        result = if efx < 0.0 {
            0.0
        } else if efx == 0.0 {
            1.0
        } else {
            f32::INFINITY
        };
    }
    if x.is_infinite() || x == 0.0 {
        let mag = if y.is_sign_negative() ^ (x == 0.0) {
            0.0
        } else {
            f32::INFINITY
        };
        let s = if yisodd { x } else { 1.0 };
        result = if s.is_sign_negative() { -mag } else { mag };
    }
    result
}

#[cfg(test)]
mod tests {
    use super::powf_u10;

    #[test]
    fn exact_on_easy_values() {
        assert_eq!(powf_u10(2.0, 3.0), 8.0);
        assert_eq!(powf_u10(10000.0, 0.5), 100.0);
        assert_eq!(powf_u10(10000.0, 0.0), 1.0);
        assert_eq!(powf_u10(4.0, -0.5), 0.5);
    }
}
