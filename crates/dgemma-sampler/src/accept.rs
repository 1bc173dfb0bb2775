//! Entropy-bound acceptance, mirroring `EntropyBoundSampler.accept_canvas`
//! (generation_diffusion_gemma.py, transformers 5.23):
//!
//! ```python
//! token_entropy = Categorical(logits=processed).entropy()
//! sorted_H, sorted_idx = torch.sort(token_entropy, dim=-1, descending=False)
//! cum = torch.cumsum(sorted_H, dim=-1)
//! sorted_mask = cum - sorted_H <= self.entropy_bound
//! mask = torch.scatter(zeros_like(sorted_mask), -1, sorted_idx, sorted_mask)
//! ```
//!
//! Rule, per canvas: sort the positions by entropy ascending; take the **inclusive** float32
//! running sum `cum[k] = fl(cum[k-1] + H[k])`; sorted rank `k` is accepted iff
//! `fl(cum[k] - H[k]) <= bound` (the bound is a Python float compared against a float32 tensor,
//! i.e. it is rounded to f32 first); scatter the mask back to positions.
//! In exact arithmetic `cum[k] - H[k]` is the sum of the strictly lower-ranked entropies, so the
//! lowest-entropy position is always accepted (`fl(H - H) = 0 <= bound`, bound > 0) and the
//! accepted set is a prefix of the sorted order.
//!
//! Deliberate choices and known differences from torch:
//! * Ties: `torch.sort` is not stable; here ties are broken by position index (lower first),
//!   which makes the mask deterministic. `-0.0` and `0.0` compare equal, as in torch.
//! * The running sum is sequential float32 ([`accept_mask_on`] with `TorchDevice::Cpu` reproduces
//!   torch CPU's float64 accumulation). torch CUDA computes the same inclusive sum with a
//!   CUB block scan (different association order, float32); torch CPU accumulates in float64
//!   and rounds each prefix to float32. Results can differ by an ulp of `cum`, which only matters
//!   when `cum[k] - H[k]` is within an ulp of the bound.
//! * The expression is evaluated per rank exactly as HF does, without forcing a prefix. In
//!   float32 HF's expression is *not* always a prefix: with 100 entropies of 1e-7 followed by one
//!   of 12.0 and bound 9.7e-6, rank 100 gives `9.8999e-6` (rejected) but rank 101 gives
//!   `fl(fl(1e-5 + 12) - 12) = 9.5367e-6` (accepted), both in torch and here. This needs a bound
//!   below ~5e-4 together with entropies below ~1e-6; for bounds >= 1e-3, canvases of <= 256
//!   positions and entropies <= ln(262144) the mask is provably a prefix (checked by a property
//!   test).

use crate::error::{Result, SamplerError};
use crate::schedule::TorchDevice;

/// Reusable buffers for [`accept_mask`] (avoids an allocation per step).
#[derive(Debug, Default, Clone)]
pub struct AcceptScratch {
    order: Vec<u32>,
}

/// Computes the acceptance mask for one canvas. Writes `mask[pos]` and returns the number of
/// accepted positions (always >= 1 for a non-empty canvas).
///
/// Errors: empty input, length mismatch, NaN entropy, a bound that is not a finite positive
/// number (HF's `EntropyBoundSamplerConfig` requires `entropy_bound > 0`), or more than
/// `u32::MAX` positions.
pub fn accept_mask(
    entropies: &[f32],
    bound: f32,
    mask: &mut [bool],
    scratch: &mut AcceptScratch,
) -> Result<usize> {
    accept_mask_on(TorchDevice::Cuda, entropies, bound, mask, scratch)
}

/// [`accept_mask`] with the running sum of the given torch device: sequential float32 for
/// [`TorchDevice::Cuda`], a float64 accumulator rounded to float32 at every prefix for
/// [`TorchDevice::Cpu`] (ATen's CPU cumsum uses `acc_type<float, false> = double`).
pub fn accept_mask_on(
    device: TorchDevice,
    entropies: &[f32],
    bound: f32,
    mask: &mut [bool],
    scratch: &mut AcceptScratch,
) -> Result<usize> {
    if entropies.is_empty() {
        return Err(SamplerError::Empty("entropies"));
    }
    if mask.len() != entropies.len() {
        return Err(SamplerError::LengthMismatch {
            what: "acceptance mask",
            expected: entropies.len(),
            got: mask.len(),
        });
    }
    if !(bound.is_finite() && bound > 0.0) {
        return Err(SamplerError::InvalidSettings(format!(
            "entropy_bound must be a finite float > 0, got {bound}"
        )));
    }
    if entropies.len() > u32::MAX as usize {
        return Err(SamplerError::LengthMismatch {
            what: "canvas (too long)",
            expected: u32::MAX as usize,
            got: entropies.len(),
        });
    }
    if let Some(position) = entropies.iter().position(|h| h.is_nan()) {
        return Err(SamplerError::NanEntropy { position });
    }
    let order = &mut scratch.order;
    order.clear();
    order.extend(0..entropies.len() as u32);
    // Ascending entropy, ties by position. No NaN here, so partial_cmp is total
    // (and treats -0.0 == 0.0, like torch).
    order.sort_unstable_by(|&a, &b| {
        let (ha, hb) = (entropies[a as usize], entropies[b as usize]);
        ha.partial_cmp(&hb)
            .unwrap_or(std::cmp::Ordering::Equal)
            .then(a.cmp(&b))
    });
    let mut cum = 0.0f32;
    let mut cum64 = 0.0f64;
    let mut accepted = 0usize;
    for &pos in order.iter() {
        let h = entropies[pos as usize];
        // inclusive cumsum
        match device {
            TorchDevice::Cuda => cum += h,
            TorchDevice::Cpu => {
                cum64 += h as f64;
                cum = cum64 as f32;
            }
        }
        let ok = cum - h <= bound; // HF: cumulative_entropy - sorted_token_entropy <= entropy_bound
        mask[pos as usize] = ok;
        accepted += ok as usize;
    }
    Ok(accepted)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(h: &[f32], bound: f32) -> (Vec<bool>, usize) {
        let mut mask = vec![false; h.len()];
        let n = accept_mask(h, bound, &mut mask, &mut AcceptScratch::default()).unwrap();
        (mask, n)
    }

    #[test]
    fn lowest_always_accepted() {
        let (m, n) = run(&[5.0, 3.0, 9.0], 0.1);
        assert_eq!(n, 1);
        assert_eq!(m, vec![false, true, false]);
    }

    #[test]
    fn ties_broken_by_position() {
        // Ranks: pos0 (0), then pos1 and pos2 tie at 1.0: pos1 is ranked first and accepted.
        let (m, n) = run(&[0.0, 1.0, 1.0], 0.5);
        assert_eq!(n, 2);
        assert_eq!(m, vec![true, true, false]);
    }

    #[test]
    fn hf_expression_is_not_always_a_prefix() {
        // Same values as checked against torch (CPU, float64 running sum) and numpy float32:
        // ranks 0..=97 accepted, 98 and 99 rejected, rank 100 (the 12.0) accepted again.
        let mut h = vec![1e-7f32; 100];
        h.push(12.0);
        let (m, n) = run(&h, 9.7e-6);
        assert!(m[97]);
        assert!(!m[98]);
        assert!(!m[99]);
        assert!(m[100]);
        assert_eq!(n, 99);
    }

    #[test]
    fn errors() {
        let mut mask = vec![false; 2];
        let mut s = AcceptScratch::default();
        assert!(accept_mask(&[], 0.1, &mut [], &mut s).is_err());
        assert!(accept_mask(&[0.1, f32::NAN], 0.1, &mut mask, &mut s).is_err());
        assert!(accept_mask(&[0.1, 0.2], 0.0, &mut mask, &mut s).is_err());
        assert!(accept_mask(&[0.1, 0.2], -1.0, &mut mask, &mut s).is_err());
        assert!(accept_mask(&[0.1, 0.2, 0.3], 0.1, &mut mask, &mut s).is_err());
    }
}
