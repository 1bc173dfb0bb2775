//! One denoising step's sampler work, mirroring the part of `_denoising_step`
//! (generation_diffusion_gemma.py, transformers 5.23) that follows the decoder forward:
//!
//! ```python
//! processed = logits_processor(input_ids, raw_logits, cur_step=cur_step)     # raw / T(cur_step)
//! probs     = torch.softmax(processed, dim=-1, dtype=torch.float32)
//! denoiser  = torch.multinomial(probs.view(-1, V), num_samples=1)              # noise.sample
//! argmax    = torch.argmax(processed, dim=-1)
//! accepted  = sampler.accept_canvas(canvas, denoiser, processed, cur_step)      # entropy-bound mask
//! next      = sampler.renoise_canvas(accepted, cur_step)                        # noise.renoise
//! finished |= stopping(argmax, processed)                                        # stable & confident
//! self_conditioning = processed.to(model_dtype)                                  # left to the engine
//! ```
//!
//! Result: `next_canvas[p] = accepted[p] ? sample[p] : renoise[p]` (the current canvas never
//! survives: every position is either this step's sample or fresh noise), `argmax_canvas` is what
//! the engine commits after the last executed step, and the processed logits stay in the caller's
//! buffer for self-conditioning. Random draws happen in HF's order: sample, then renoise.
//!
//! Batch rows that already finished are frozen by HF; here the engine simply stops calling
//! `step` for a finished sequence (use one [`Sampler`] per sequence).
//!
//! Work is parallelised over canvas positions with rayon (temperature, argmax, entropy, and the
//! Gumbel-max sample); every per-position result depends only on that position's row, so the
//! outcome is identical for any thread count.

use std::cell::RefCell;

use rayon::prelude::*;

use crate::accept::{accept_mask_on, AcceptScratch};
use crate::entropy::{check_row, entropy_checked};
use crate::error::{Result, SamplerError};
use crate::noise::NoiseSource;
use crate::schedule::{temperature_on, TorchDevice};
use crate::stopping::StableAndConfident;

/// Sampler settings, filled by the engine from `generation_config.json`. `t_min`/`t_max` are f64
/// because HF computes `t_max - t_min` with Python floats before rounding to float32.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplerSettings {
    /// `sampler_config.entropy_bound` (HF default 0.1). Compared in float32, as torch does.
    pub entropy_bound: f32,
    /// Temperature at the last step (`cur_step = 1` gives `t_min + (t_max - t_min)/N`).
    pub t_min: f64,
    /// Temperature at the first step (`cur_step = N`).
    pub t_max: f64,
    /// N, the most denoising steps per canvas (48).
    pub max_denoising_steps: usize,
    /// Previous argmax canvases that must equal the current one (1). 0 = always stable.
    pub stability_threshold: usize,
    /// Mean entropy must be strictly below this to stop (0.005). `f32::NEG_INFINITY` disables stopping.
    pub confidence_threshold: f32,
    /// Whose float32 arithmetic to reproduce where torch's CPU and CUDA kernels round
    /// differently (the temperature and the entropy cumsum); see [`TorchDevice`].
    pub device: TorchDevice,
}

impl Default for SamplerSettings {
    /// HF's defaults (`_get_default_generation_params`), equal to the checkpoint's config.
    fn default() -> Self {
        Self {
            entropy_bound: 0.1,
            t_min: 0.4,
            t_max: 0.8,
            max_denoising_steps: 48,
            stability_threshold: 1,
            confidence_threshold: 0.005,
            device: TorchDevice::Cuda,
        }
    }
}

impl SamplerSettings {
    /// Checks the ranges HF's config validation enforces (and NaN). Differences: `t_max == t_min`
    /// (a constant temperature) is allowed here, HF rejects it; `confidence_threshold` may be any
    /// non-NaN value (HF requires > 0) so that `-inf` can disable early stopping.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(SamplerError::InvalidSettings(m));
        if !(self.entropy_bound.is_finite() && self.entropy_bound > 0.0) {
            return bad(format!(
                "entropy_bound must be a finite float > 0, got {}",
                self.entropy_bound
            ));
        }
        if !(self.t_min.is_finite() && self.t_min >= 0.0) {
            return bad(format!("t_min must be finite and >= 0, got {}", self.t_min));
        }
        if !(self.t_max.is_finite() && self.t_max >= self.t_min && self.t_max > 0.0) {
            return bad(format!(
                "t_max must be finite, > 0 and >= t_min, got {} (t_min {})",
                self.t_max, self.t_min
            ));
        }
        if self.max_denoising_steps == 0 || self.max_denoising_steps > i32::MAX as usize {
            return bad(format!(
                "max_denoising_steps must be in 1..=i32::MAX, got {}",
                self.max_denoising_steps
            ));
        }
        if self.confidence_threshold.is_nan() {
            return bad("confidence_threshold is NaN".into());
        }
        Ok(())
    }

    /// The noise `step` index of `cur_step`: 0 for the first executed step of a block.
    pub fn step_index(&self, cur_step: usize) -> Result<usize> {
        if cur_step == 0 || cur_step > self.max_denoising_steps {
            return Err(SamplerError::StepOutOfRange {
                cur_step,
                max_steps: self.max_denoising_steps,
            });
        }
        Ok(self.max_denoising_steps - cur_step)
    }
}

/// What one step produced.
#[derive(Debug, Clone, PartialEq)]
pub struct StepOutcome {
    /// Canvas for the next decoder pass: the sample where accepted, fresh noise elsewhere.
    pub next_canvas: Vec<u32>,
    /// `argmax(processed)` per position (first index of the max): the draft / the commit.
    pub argmax_canvas: Vec<u32>,
    /// The per-position sample (HF's `denoiser_canvas`).
    pub sampled: Vec<u32>,
    /// Acceptance mask per position.
    pub accepted_mask: Vec<bool>,
    /// Entropy of `Categorical(logits=processed[p])` per position.
    pub entropies: Vec<f32>,
    /// Number of accepted positions (>= 1).
    pub accepted: usize,
    /// float32 mean of `entropies` (the confidence statistic).
    pub mean_entropy: f32,
    /// The temperature of this step.
    pub temperature: f32,
    /// Stable and confident: the block loop should stop after this step.
    pub finished: bool,
}

thread_local! {
    static ROW_SCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Per-row work: `processed = raw / t` (in place, or copied from `raw`), validation, argmax, entropy.
fn process_row(
    raw: Option<&[f32]>,
    row: &mut [f32],
    t: f32,
    position: usize,
) -> Result<(u32, f32)> {
    match raw {
        Some(src) => {
            for (d, &s) in row.iter_mut().zip(src) {
                *d = s / t;
            }
        }
        None => {
            for d in row.iter_mut() {
                *d /= t;
            }
        }
    }
    let (am, m) = check_row(row, position)?;
    let h = ROW_SCRATCH.with(|cell| {
        let mut scratch = cell.borrow_mut();
        if scratch.len() < row.len() {
            scratch.resize(row.len(), 0.0);
        }
        entropy_checked(row, m, &mut scratch[..row.len()])
    });
    if h.is_nan() {
        return Err(SamplerError::NanEntropy { position });
    }
    let am =
        u32::try_from(am).map_err(|_| SamplerError::CounterOverflow("vocab exceeds u32".into()))?;
    Ok((am, h))
}

#[allow(clippy::too_many_arguments)]
fn step_core(
    settings: &SamplerSettings,
    stopping: &mut StableAndConfident,
    scratch: &mut AcceptScratch,
    noise: &mut dyn NoiseSource,
    block: usize,
    cur_step: usize,
    canvas: &[u32],
    raw: Option<&[f32]>,
    processed: &mut [f32],
) -> Result<StepOutcome> {
    settings.validate()?;
    let c = canvas.len();
    if c == 0 {
        return Err(SamplerError::Empty("canvas"));
    }
    if processed.is_empty() {
        return Err(SamplerError::Empty("logits"));
    }
    if (processed.len() / c) * c != processed.len() {
        return Err(SamplerError::LengthMismatch {
            what: "logits (not a multiple of the canvas length)",
            expected: (processed.len() / c + 1) * c,
            got: processed.len(),
        });
    }
    let vocab = processed.len() / c;
    if let Some(raw) = raw {
        if raw.len() != processed.len() {
            return Err(SamplerError::LengthMismatch {
                what: "raw logits vs processed buffer",
                expected: processed.len(),
                got: raw.len(),
            });
        }
    }
    if vocab > u32::MAX as usize {
        return Err(SamplerError::CounterOverflow(format!(
            "vocab {vocab} exceeds u32"
        )));
    }
    let step = settings.step_index(cur_step)?;
    let t = temperature_on(
        settings.device,
        cur_step,
        settings.max_denoising_steps,
        settings.t_min,
        settings.t_max,
    )?;

    // 1. processed = raw / T, argmax, entropy (parallel over positions, deterministic).
    let rows: Vec<Result<(u32, f32)>> = processed
        .par_chunks_mut(vocab)
        .enumerate()
        .map(|(p, row)| process_row(raw.map(|r| &r[p * vocab..(p + 1) * vocab]), row, t, p))
        .collect();
    let mut argmax_canvas = Vec::with_capacity(c);
    let mut entropies = Vec::with_capacity(c);
    for r in rows {
        let (a, h) = r?;
        argmax_canvas.push(a);
        entropies.push(h);
    }
    let processed: &[f32] = processed;

    // 2. Sample (HF: multinomial), then 3. acceptance, then 4. renoise (HF: randint).
    let mut sampled = vec![0u32; c];
    noise.sample(block, step, processed, vocab, &mut sampled)?;
    check_tokens("sample", &sampled, vocab)?;
    let mut accepted_mask = vec![false; c];
    let accepted = accept_mask_on(
        settings.device,
        &entropies,
        settings.entropy_bound,
        &mut accepted_mask,
        scratch,
    )?;
    let mut next_canvas = vec![0u32; c];
    noise.renoise(block, step, &mut next_canvas)?;
    check_tokens("renoise", &next_canvas, vocab)?;
    for ((n, &s), &ok) in next_canvas.iter_mut().zip(&sampled).zip(&accepted_mask) {
        if ok {
            *n = s;
        }
    }

    // 5. Stopping (validates before mutating its history).
    let (finished, mean_entropy) = stopping.update(&argmax_canvas, &entropies)?;
    Ok(StepOutcome {
        next_canvas,
        argmax_canvas,
        sampled,
        accepted_mask,
        entropies,
        accepted,
        mean_entropy,
        temperature: t,
        finished,
    })
}

fn check_tokens(_what: &'static str, tokens: &[u32], vocab: usize) -> Result<()> {
    match tokens
        .iter()
        .enumerate()
        .find(|(_, &t)| t as usize >= vocab)
    {
        Some((position, &token)) => Err(SamplerError::TokenOutOfRange {
            position,
            token,
            vocab,
        }),
        None => Ok(()),
    }
}

/// One sampler step. `raw_logits` is `[C, V]` float32 (softcapped), `processed` a caller buffer
/// of the same length that receives `raw / T` (left there for self-conditioning). `canvas` is the
/// current canvas (its length defines C). `cur_step` counts down `N..=1`; the noise step index is
/// `N - cur_step`. The caller owns `stopping` (reset it per block).
#[allow(clippy::too_many_arguments)]
pub fn denoise_step(
    settings: &SamplerSettings,
    stopping: &mut StableAndConfident,
    noise: &mut dyn NoiseSource,
    block: usize,
    cur_step: usize,
    canvas: &[u32],
    raw_logits: &[f32],
    processed: &mut [f32],
) -> Result<StepOutcome> {
    let mut scratch = AcceptScratch::default();
    step_core(
        settings,
        stopping,
        &mut scratch,
        noise,
        block,
        cur_step,
        canvas,
        Some(raw_logits),
        processed,
    )
}

/// [`denoise_step`] that overwrites `logits` (raw on entry) with the processed logits.
pub fn denoise_step_in_place(
    settings: &SamplerSettings,
    stopping: &mut StableAndConfident,
    noise: &mut dyn NoiseSource,
    block: usize,
    cur_step: usize,
    canvas: &[u32],
    logits: &mut [f32],
) -> Result<StepOutcome> {
    let mut scratch = AcceptScratch::default();
    step_core(
        settings,
        stopping,
        &mut scratch,
        noise,
        block,
        cur_step,
        canvas,
        None,
        logits,
    )
}

/// Settings plus per-sequence state (stopping history, scratch): the convenient way to drive a
/// block loop.
///
/// ```
/// use dgemma_sampler::{Sampler, SamplerSettings, SeededNoise};
/// let settings = SamplerSettings { max_denoising_steps: 4, ..SamplerSettings::default() };
/// let (c, v) = (4usize, 8usize);
/// let mut sampler = Sampler::new(settings).unwrap();
/// let mut noise = SeededNoise::new(42, v);
/// let mut canvas = vec![0u32; c];
/// sampler.begin_block(&mut noise, 0, &mut canvas).unwrap();
/// let mut logits = vec![0.0f32; c * v];
/// for cur_step in (1..=settings.max_denoising_steps).rev() {
///     for p in 0..c { logits[p * v + p] = 20.0; } // stand-in for the decoder
///     let out = sampler.step_in_place(&mut noise, 0, cur_step, &canvas, &mut logits).unwrap();
///     canvas = out.next_canvas;
///     if out.finished { assert_eq!(out.argmax_canvas, vec![0, 1, 2, 3]); break; }
/// }
/// ```
#[derive(Debug, Clone)]
pub struct Sampler {
    settings: SamplerSettings,
    stopping: StableAndConfident,
    scratch: AcceptScratch,
}

impl Sampler {
    /// Validates the settings.
    pub fn new(settings: SamplerSettings) -> Result<Self> {
        settings.validate()?;
        let stopping =
            StableAndConfident::new(settings.stability_threshold, settings.confidence_threshold)?;
        Ok(Self {
            settings,
            stopping,
            scratch: AcceptScratch::default(),
        })
    }

    /// The settings.
    pub fn settings(&self) -> &SamplerSettings {
        &self.settings
    }

    /// Resets the stopping history (start of a canvas).
    pub fn reset(&mut self) {
        self.stopping.reset();
    }

    /// Starts a block: resets the stopping history and draws the initial canvas into `canvas`.
    pub fn begin_block(
        &mut self,
        noise: &mut dyn NoiseSource,
        block: usize,
        canvas: &mut [u32],
    ) -> Result<()> {
        if canvas.is_empty() {
            return Err(SamplerError::Empty("canvas"));
        }
        self.stopping.reset();
        noise.init_canvas(block, canvas)
    }

    /// [`denoise_step`] with this sampler's settings and state.
    pub fn step(
        &mut self,
        noise: &mut dyn NoiseSource,
        block: usize,
        cur_step: usize,
        canvas: &[u32],
        raw_logits: &[f32],
        processed: &mut [f32],
    ) -> Result<StepOutcome> {
        step_core(
            &self.settings,
            &mut self.stopping,
            &mut self.scratch,
            noise,
            block,
            cur_step,
            canvas,
            Some(raw_logits),
            processed,
        )
    }

    /// [`denoise_step_in_place`] with this sampler's settings and state.
    pub fn step_in_place(
        &mut self,
        noise: &mut dyn NoiseSource,
        block: usize,
        cur_step: usize,
        canvas: &[u32],
        logits: &mut [f32],
    ) -> Result<StepOutcome> {
        step_core(
            &self.settings,
            &mut self.stopping,
            &mut self.scratch,
            noise,
            block,
            cur_step,
            canvas,
            None,
            logits,
        )
    }
}
