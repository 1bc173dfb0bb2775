//! Adaptive stopping, mirroring `StableAndConfidentStoppingCriteria`
//! (generation_diffusion_gemma.py, transformers 5.23).
//!
//! Rule, evaluated after every denoising step of a canvas:
//! * **stable**: if `stability_threshold == 0`, always true. Otherwise HF keeps a history of the
//!   last `stability_threshold` argmax canvases, initialised on the first call of a canvas to
//!   `-1` everywhere (a value no token id equals). `stable = all(history[j] == argmax for all j)`,
//!   computed *before* the history is updated; then the history is rolled and the current argmax
//!   appended. Hence the first step of a canvas is never stable, threshold 1 needs two identical
//!   consecutive argmax canvases, threshold 2 needs three, and so on.
//! * **confident**: `mean(H) < confidence_threshold`, where `H` are the per-position entropies of
//!   the processed (temperature-scaled) logits, the same values as the acceptance rule uses. The
//!   mean is float32: `sum * (1/n)` as torch CUDA's `MeanOps` computes it (exact for n = 256;
//!   torch CPU divides by n). The sum here is sequential float32; torch's block reduction may
//!   round differently (an ulp of the sum).
//! * `finished = stable & confident`.
//!
//! `reset()` clears the history (HF calls it per canvas in `_prepare_denoiser_inputs`).
//! Batching is the engine's business: use one instance per sequence (HF's history is per row).
//! To disable early stopping, use `confidence_threshold = f32::NEG_INFINITY`.

use crate::error::{Result, SamplerError};

/// Stable-and-confident stopping state for one canvas at a time.
#[derive(Debug, Clone)]
pub struct StableAndConfident {
    stability_threshold: usize,
    confidence_threshold: f32,
    /// Ring of the last `stability_threshold` argmax canvases; `None` stands for HF's `-1` fill.
    history: Vec<Option<Vec<u32>>>,
    /// Index of the oldest entry in `history`.
    head: usize,
    /// Canvas length fixed by the first call after a reset.
    canvas_len: Option<usize>,
}

impl StableAndConfident {
    /// New criterion. `confidence_threshold` must not be NaN.
    pub fn new(stability_threshold: usize, confidence_threshold: f32) -> Result<Self> {
        if confidence_threshold.is_nan() {
            return Err(SamplerError::InvalidSettings(
                "confidence_threshold is NaN".into(),
            ));
        }
        Ok(Self {
            stability_threshold,
            confidence_threshold,
            history: Vec::new(),
            head: 0,
            canvas_len: None,
        })
    }

    /// Forget the history (call at the start of every canvas).
    pub fn reset(&mut self) {
        self.history.clear();
        self.head = 0;
        self.canvas_len = None;
    }

    /// The stability threshold.
    pub fn stability_threshold(&self) -> usize {
        self.stability_threshold
    }

    /// The confidence threshold.
    pub fn confidence_threshold(&self) -> f32 {
        self.confidence_threshold
    }

    /// float32 mean of the entropies as torch CUDA computes it: `sum * (1.0f / n)`.
    pub fn mean_entropy(entropies: &[f32]) -> Result<f32> {
        if entropies.is_empty() {
            return Err(SamplerError::Empty("entropies"));
        }
        if let Some(position) = entropies.iter().position(|h| h.is_nan()) {
            return Err(SamplerError::NanEntropy { position });
        }
        let sum: f32 = entropies.iter().fold(0.0f32, |a, &h| a + h);
        Ok(sum * (1.0f32 / entropies.len() as f32))
    }

    /// Evaluates the criterion for this step and updates the history.
    /// Returns `(finished, mean_entropy)`.
    pub fn update(&mut self, argmax_canvas: &[u32], entropies: &[f32]) -> Result<(bool, f32)> {
        if argmax_canvas.is_empty() {
            return Err(SamplerError::Empty("argmax canvas"));
        }
        if entropies.len() != argmax_canvas.len() {
            return Err(SamplerError::LengthMismatch {
                what: "entropies",
                expected: argmax_canvas.len(),
                got: entropies.len(),
            });
        }
        if let Some(len) = self.canvas_len {
            if len != argmax_canvas.len() {
                return Err(SamplerError::LengthMismatch {
                    what: "argmax canvas (vs history)",
                    expected: len,
                    got: argmax_canvas.len(),
                });
            }
        }
        // Validate before mutating anything.
        let mean = Self::mean_entropy(entropies)?;
        self.canvas_len = Some(argmax_canvas.len());

        let stable = if self.stability_threshold == 0 {
            true
        } else {
            if self.history.is_empty() {
                self.history = vec![None; self.stability_threshold];
                self.head = 0;
            }
            let stable = self
                .history
                .iter()
                .all(|h| h.as_deref() == Some(argmax_canvas));
            // roll(shifts=-1) then history[-1] = argmax: overwrite the oldest entry.
            match &mut self.history[self.head] {
                Some(buf) => {
                    buf.clear();
                    buf.extend_from_slice(argmax_canvas);
                }
                slot @ None => *slot = Some(argmax_canvas.to_vec()),
            }
            self.head = (self.head + 1) % self.stability_threshold;
            stable
        };
        let confident = mean < self.confidence_threshold;
        Ok((stable && confident, mean))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOW: [f32; 3] = [0.0, 0.001, 0.0];

    #[test]
    fn threshold_one_needs_two_identical() {
        let mut s = StableAndConfident::new(1, 0.005).unwrap();
        let a = [1u32, 2, 3];
        assert!(!s.update(&a, &LOW).unwrap().0, "first step is never stable");
        assert!(s.update(&a, &LOW).unwrap().0);
        assert!(!s.update(&[1, 2, 4], &LOW).unwrap().0);
        assert!(s.update(&[1, 2, 4], &LOW).unwrap().0);
        s.reset();
        assert!(
            !s.update(&[1, 2, 4], &LOW).unwrap().0,
            "reset restores the -1 history"
        );
    }

    #[test]
    fn threshold_two_needs_three_identical() {
        let mut s = StableAndConfident::new(2, 0.005).unwrap();
        let a = [7u32, 7];
        let h = [0.0f32, 0.0];
        assert!(!s.update(&a, &h).unwrap().0);
        assert!(!s.update(&a, &h).unwrap().0);
        assert!(s.update(&a, &h).unwrap().0);
        assert!(!s.update(&[7, 8], &h).unwrap().0);
        assert!(!s.update(&a, &h).unwrap().0);
        assert!(!s.update(&a, &h).unwrap().0);
        assert!(s.update(&a, &h).unwrap().0);
    }

    #[test]
    fn threshold_zero_is_always_stable() {
        let mut s = StableAndConfident::new(0, 0.005).unwrap();
        assert!(s.update(&[1, 2], &[0.0, 0.0]).unwrap().0);
        assert!(
            !s.update(&[1, 2], &[0.0, 0.011]).unwrap().0,
            "mean 0.0055 is not confident"
        );
    }

    #[test]
    fn confidence_is_strict_and_mean_based() {
        let mut s = StableAndConfident::new(0, 0.5).unwrap();
        assert_eq!(s.update(&[0, 0], &[0.0, 1.0]).unwrap(), (false, 0.5));
        assert_eq!(s.update(&[0, 0], &[0.0, 0.998]).unwrap(), (true, 0.499));
    }

    #[test]
    fn errors() {
        let mut s = StableAndConfident::new(1, 0.005).unwrap();
        assert!(s.update(&[], &[]).is_err());
        assert!(s.update(&[1], &[0.0, 0.0]).is_err());
        assert!(s.update(&[1], &[f32::NAN]).is_err());
        s.update(&[1, 2], &[0.0, 0.0]).unwrap();
        assert!(s.update(&[1, 2, 3], &[0.0; 3]).is_err());
        assert!(StableAndConfident::new(1, f32::NAN).is_err());
    }
}
