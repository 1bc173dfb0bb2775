//! Linear temperature schedule, mirroring `LinearTemperatureScheduleLogitsProcessor.__call__`
//! (generation_diffusion_gemma.py, transformers 5.23):
//!
//! ```python
//! cur_step = torch.tensor(cur_step, device=canvas.device, dtype=torch.int32)   # in _denoising_step
//! temperature = self.t_min + ((self.t_max - self.t_min) * (cur_step / self.max_denoising_steps))
//! return scores / temperature
//! ```
//!
//! `cur_step` counts **down** `N, N-1, ..., 1` (steps remaining). `t_min`, `t_max` are Python floats
//! (f64) and `max_denoising_steps` a Python int, but `cur_step` is an **int32 tensor**, so the
//! expression is evaluated by torch in float32, one rounding per operation:
//!
//! 1. `x = cur_step / N`: int32 tensor / Python int is true division with result dtype float32.
//!    *On CUDA* the Python int is a "CPU scalar" and `div_true_kernel_cuda` computes
//!    `x = f32(cur_step) * (1.0f / f32(N))` (multiplication by the rounded reciprocal).
//!    *On CPU* torch computes `x = f32(cur_step) / f32(N)` (a true division). The two differ
//!    for some steps: with N = 48 the reciprocal form changes `x` for cur_step in
//!    {5, 7, 10, 14, 17, 20, 23, 25, 28, 31, 34, 37, 40, 43, 46} and the final `T` for
//!    cur_step in {31, 34, 46} (one ulp).
//! 2. `y = (t_max - t_min) * x`: the difference is taken in f64 (Python), then cast to f32
//!    (round to nearest even) when it meets the float32 tensor; f32 multiply.
//! 3. `T = t_min + y`: `t_min` cast to f32, f32 add (`a + alpha*b` with alpha = 1, exact).
//! 4. `processed = scores / T`: `T` is a 0-dim float32 *device* tensor (not a CPU scalar), so both
//!    CUDA (`DivFunctor`) and CPU do an IEEE float32 division per element, not a multiplication
//!    by `1/T`. [`apply_temperature`] does exactly that, so processed logits are bit-identical.
//!
//! [`temperature`] follows the CUDA arithmetic (the reference runs on GPU; the spec's validation
//! vectors are CUDA runs). [`temperature_on`] selects either device.

use crate::error::{Result, SamplerError};

/// Whose torch arithmetic to reproduce for `cur_step / N` (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TorchDevice {
    /// `f32(cur_step) * (1.0f / f32(N))` (CUDA: the divisor is a CPU scalar).
    #[default]
    Cuda,
    /// `f32(cur_step) / f32(N)` (CPU true division).
    Cpu,
}

/// `T(cur_step)` exactly as HF computes it on CUDA. `cur_step` counts down `max_steps..=1`.
///
/// Errors: `max_steps == 0`, `cur_step` outside `1..=max_steps`, or a result that is not a finite
/// positive number (e.g. `t_max == t_min == 0`).
pub fn temperature(cur_step: usize, max_steps: usize, t_min: f64, t_max: f64) -> Result<f32> {
    temperature_on(TorchDevice::Cuda, cur_step, max_steps, t_min, t_max)
}

/// `T(cur_step)` with the rounding of the given torch device (see the module docs).
pub fn temperature_on(
    device: TorchDevice,
    cur_step: usize,
    max_steps: usize,
    t_min: f64,
    t_max: f64,
) -> Result<f32> {
    if max_steps == 0 || cur_step == 0 || cur_step > max_steps {
        return Err(SamplerError::StepOutOfRange {
            cur_step,
            max_steps,
        });
    }
    // `cur_step` is an int32 tensor in HF.
    let step_i32 = i32::try_from(cur_step).map_err(|_| SamplerError::StepOutOfRange {
        cur_step,
        max_steps,
    })?;
    let step = step_i32 as f32;
    // The Python int is converted to the float32 op-math type.
    let n = max_steps as f32;
    let x = match device {
        TorchDevice::Cuda => step * (1.0f32 / n),
        TorchDevice::Cpu => step / n,
    };
    let span = (t_max - t_min) as f32; // Python float subtraction, then cast to float32
    let y = span * x;
    let t = (t_min as f32) + y;
    if !(t.is_finite() && t > 0.0) {
        return Err(SamplerError::BadTemperature(t));
    }
    Ok(t)
}

/// `logits[i] /= t` in place, one IEEE float32 division per element (what torch does for
/// `scores / temperature` with a 0-dim float32 device tensor). Rejects a non-finite or
/// non-positive `t`. Non-finite logits are left for the caller to judge.
pub fn apply_temperature(logits: &mut [f32], t: f32) -> Result<()> {
    if !(t.is_finite() && t > 0.0) {
        return Err(SamplerError::BadTemperature(t));
    }
    for l in logits.iter_mut() {
        *l /= t;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_section9_values() {
        // T(48) = 0.8 and T(24) = 0.6 for N = 48, t_min 0.4, t_max 0.8.
        assert_eq!(temperature(48, 48, 0.4, 0.8).unwrap(), 0.8f32);
        assert_eq!(temperature(24, 48, 0.4, 0.8).unwrap(), 0.6f32);
    }

    #[test]
    fn rejects_bad_steps() {
        assert!(temperature(0, 48, 0.4, 0.8).is_err());
        assert!(temperature(49, 48, 0.4, 0.8).is_err());
        assert!(temperature(1, 0, 0.4, 0.8).is_err());
        assert!(temperature(1, 48, 0.0, 0.0).is_err());
        assert!(temperature(1, 48, f64::NAN, 0.8).is_err());
        let mut v = [1.0f32];
        assert!(apply_temperature(&mut v, 0.0).is_err());
        assert!(apply_temperature(&mut v, f32::NAN).is_err());
    }
}
