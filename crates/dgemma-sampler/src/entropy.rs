//! Row statistics of the processed logits, mirroring torch:
//!
//! * [`argmax`]: `torch.argmax(processed, dim=-1)`: the **first** index of the maximum
//!   (`_denoising_step`: `new_argmax_canvas = torch.argmax(processed_logits, dim=-1)`).
//! * [`logsumexp`]: ATen `logsumexp_out_impl`: `m = amax(x)` (replaced by 0 when infinite),
//!   `lse = log(sum(exp(x - m))) + m`.
//! * [`softmax`]: `F.softmax` as the CUDA kernel computes it: `exp(x - max) / sum` (a division, as
//!   in `SoftMaxForwardEpilogue`; torch's CPU kernel multiplies by `1/sum` instead).
//! * [`entropy`]: `torch.distributions.Categorical(logits=row).entropy()`, used by both
//!   `EntropyBoundSampler.accept_canvas` and `StableAndConfidentStoppingCriteria`:
//!
//!   ```text
//!   ln    = row - logsumexp(row)                  # Categorical.__init__ normalises the logits
//!   probs = softmax(ln)                           # logits_to_probs: softmax of the *normalised* logits
//!   H     = -(clamp(ln, min=f32::MIN) * probs).sum(-1)
//!   ```
//!
//!   Every element-wise operation is the same float32 operation as torch's, in the same order
//!   (`fl(row - lse)`, `fl(exp(fl(ln - m2)))`, `fl(e / s2)`, `fl(clamp(ln) * p)`), where
//!   `m2 = max(ln) = fl(max(row) - lse)` (exact: `x -> fl(x - c)` is monotone).
//!
//! What is *not* bit-identical to torch:
//! * the three sums (`sum(exp)`, `sum(e)`, `sum(p*ln)`) use a pairwise float32 summation
//!   (8 lanes per 64-element leaf), torch CUDA uses a block tree reduction and torch CPU a
//!   vectorised cascade sum; each is within ~`log2(V) * eps` relative of the exact sum;
//! * `exp`/`ln` come from the platform libm (glibc: < 1 ulp), torch uses CUDA's `expf` (<= 2 ulp)
//!   or SLEEF (<= 1 ulp).
//!
//! Expected error versus torch: the sums differ by a few ulp relative, which moves `lse` by about
//! one ulp of `|lse|`, and therefore every `ln_i` by up to `ulp(|max row|)`. Hence
//! `|H_ours - H_torch| <~ 1e-6 * H + 2 * ulp(max|row|)` (the second term matters only for near
//! one-hot rows, where H itself is tiny). The unit tests check agreement with torch at
//! `4e-6 * H + 4 * ulp(max|row|)`.
//!
//! Inputs must be NaN-free and must not contain +inf (torch's `Categorical` rejects NaN logits
//! by argument validation; +inf makes every entropy NaN); rows that are entirely -inf have no
//! distribution. Such rows return an error. Individual -inf entries are valid (probability 0).

use crate::error::{Result, SamplerError};

/// Validates a row: no NaN, no +inf, at least one finite value. Returns `(argmax, max)` where
/// argmax is the first index of the maximum (torch semantics). `position` is only used for
/// error messages.
pub(crate) fn check_row(row: &[f32], position: usize) -> Result<(usize, f32)> {
    if row.is_empty() {
        return Err(SamplerError::Empty("vocabulary"));
    }
    let mut best = f32::NEG_INFINITY;
    let mut best_idx = 0usize;
    let mut bad = false;
    // Branch-light scan; the slow path below pinpoints the bad element.
    for (i, &v) in row.iter().enumerate() {
        bad |= v.is_nan() | (v == f32::INFINITY);
        if v > best {
            best = v;
            best_idx = i;
        }
    }
    if bad {
        for (index, &value) in row.iter().enumerate() {
            if value.is_nan() || value == f32::INFINITY {
                return Err(SamplerError::NonFiniteLogit {
                    position,
                    index,
                    value,
                });
            }
        }
    }
    if best == f32::NEG_INFINITY {
        return Err(SamplerError::NoFiniteLogit { position });
    }
    Ok((best_idx, best))
}

/// `torch.argmax(row)`: first index of the maximum. Errors on NaN / +inf / all -inf / empty.
pub fn argmax(row: &[f32]) -> Result<usize> {
    check_row(row, 0).map(|(i, _)| i)
}

/// Pairwise float32 sum: leaves of 64 elements summed with 8 interleaved accumulators, combined
/// pairwise. Deterministic (depends only on the length).
pub(crate) fn pairwise_sum(x: &[f32]) -> f32 {
    const LEAF: usize = 64;
    if x.len() <= LEAF {
        let mut acc = [0.0f32; 8];
        let chunks = x.chunks_exact(8);
        let rem = chunks.remainder();
        for c in chunks {
            for k in 0..8 {
                acc[k] += c[k];
            }
        }
        for (k, &v) in rem.iter().enumerate() {
            acc[k] += v;
        }
        ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]))
    } else {
        // Split on a multiple of LEAF so the tree shape only depends on the length.
        let half = (x.len() / LEAF).div_ceil(2) * LEAF;
        let half = half.min(x.len());
        pairwise_sum(&x[..half]) + pairwise_sum(&x[half..])
    }
}

/// ATen `logsumexp` over a validated row with maximum `m` (finite).
fn logsumexp_checked(row: &[f32], m: f32, scratch: &mut [f32]) -> f32 {
    // maxes.masked_fill_(maxes.abs() == INFINITY, 0): m is finite here.
    for (s, &x) in scratch.iter_mut().zip(row) {
        *s = (x - m).exp();
    }
    let sum = pairwise_sum(scratch);
    sum.ln() + m
}

/// `torch.logsumexp(row, -1)`. Errors on NaN / +inf / all -inf / empty.
pub fn logsumexp(row: &[f32]) -> Result<f32> {
    let (_, m) = check_row(row, 0)?;
    let mut scratch = vec![0.0f32; row.len()];
    Ok(logsumexp_checked(row, m, &mut scratch))
}

/// `F.softmax(row, -1)` written into `out` (CUDA form: `exp(x - max) / sum`).
pub fn softmax(row: &[f32], out: &mut [f32]) -> Result<()> {
    if out.len() != row.len() {
        return Err(SamplerError::LengthMismatch {
            what: "softmax output",
            expected: row.len(),
            got: out.len(),
        });
    }
    let (_, m) = check_row(row, 0)?;
    for (o, &x) in out.iter_mut().zip(row) {
        *o = (x - m).exp();
    }
    let s = pairwise_sum(out);
    for o in out.iter_mut() {
        *o /= s;
    }
    Ok(())
}

/// Entropy of `Categorical(logits=row)` (see the module docs). Allocates a scratch row; use
/// [`entropy_with_scratch`] in hot loops.
pub fn entropy(row: &[f32]) -> Result<f32> {
    let mut scratch = vec![0.0f32; row.len()];
    entropy_with_scratch(row, &mut scratch)
}

/// [`entropy`] with a caller-provided scratch buffer of at least `row.len()` floats.
pub fn entropy_with_scratch(row: &[f32], scratch: &mut [f32]) -> Result<f32> {
    let (_, m) = check_row(row, 0)?;
    if scratch.len() < row.len() {
        return Err(SamplerError::LengthMismatch {
            what: "entropy scratch",
            expected: row.len(),
            got: scratch.len(),
        });
    }
    Ok(entropy_checked(row, m, &mut scratch[..row.len()]))
}

/// Entropy of a row already validated by [`check_row`] (maximum `m`, finite).
pub(crate) fn entropy_checked(row: &[f32], m: f32, scratch: &mut [f32]) -> f32 {
    debug_assert_eq!(row.len(), scratch.len());
    // self.logits = logits - logits.logsumexp(-1, keepdim=True)
    let lse = logsumexp_checked(row, m, scratch);
    // softmax(ln): its max is fl(m - lse) because x -> fl(x - lse) is monotone.
    let m2 = m - lse;
    for (s, &x) in scratch.iter_mut().zip(row) {
        let ln = x - lse;
        *s = (ln - m2).exp();
    }
    let s2 = pairwise_sum(scratch);
    // p_log_p = clamp(ln, min=finfo.min) * probs ; H = -p_log_p.sum(-1)
    for (s, &x) in scratch.iter_mut().zip(row) {
        let ln = (x - lse).max(f32::MIN);
        let p = *s / s2;
        *s = ln * p;
    }
    -pairwise_sum(scratch)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argmax_first_index() {
        assert_eq!(argmax(&[1.0, 3.0, 3.0, 2.0]).unwrap(), 1);
        assert_eq!(argmax(&[f32::NEG_INFINITY, -5.0, -5.0]).unwrap(), 1);
        assert!(argmax(&[f32::NEG_INFINITY; 3]).is_err());
        assert!(argmax(&[1.0, f32::NAN]).is_err());
        assert!(argmax(&[1.0, f32::INFINITY]).is_err());
        assert!(argmax(&[]).is_err());
    }

    #[test]
    fn uniform_and_onehot() {
        let h = entropy(&[0.0f32; 10000]).unwrap();
        assert!((h - 10000f32.ln()).abs() < 1e-5, "{h}");
        let mut row = vec![f32::NEG_INFINITY; 7];
        row[3] = 1.0;
        assert_eq!(entropy(&row).unwrap(), 0.0);
    }

    #[test]
    fn softmax_sums_to_one() {
        let row: Vec<f32> = (0..100).map(|i| (i as f32 * 0.37).sin() * 5.0).collect();
        let mut p = vec![0.0; 100];
        softmax(&row, &mut p).unwrap();
        let s: f64 = p.iter().map(|&v| v as f64).sum();
        assert!((s - 1.0).abs() < 1e-6);
        let lse = logsumexp(&row).unwrap();
        let exact: f64 = row.iter().map(|&v| (v as f64).exp()).sum::<f64>().ln();
        assert!((lse as f64 - exact).abs() < 1e-5);
    }

    #[test]
    fn pairwise_sum_matches_f64() {
        for n in [0usize, 1, 7, 8, 63, 64, 65, 1000, 4097] {
            let x: Vec<f32> = (0..n).map(|i| ((i * 7919) % 1000) as f32 * 1e-3).collect();
            let exact: f64 = x.iter().map(|&v| v as f64).sum();
            assert!(
                (pairwise_sum(&x) as f64 - exact).abs() <= 1e-6 * exact.max(1.0),
                "n={n}"
            );
        }
    }
}
