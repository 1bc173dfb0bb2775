//! One generation's settings, statistics and result, and [`generate`], which runs the
//! block-diffusion loop ([`Generator`]) over any [`Backend`] to the end.
//!
//! ```text
//! encode(prompt)
//! for each canvas b < ceil(max_new_tokens / C):
//!     if b > 0: encode(previous committed canvas)      # same positions it was denoised at
//!     canvas = noise.init_canvas(); sc = None; stopping.reset()
//!     for cur_step in N, N-1, .., 1:
//!         logits = denoise(canvas, sc)                   # positions cache_len .. cache_len + C
//!         sample / accept / renoise / stop (dgemma-sampler)
//!         sc = round_to_model_dtype(logits / T(cur_step))
//!         if finished: break
//!     commit the argmax canvas; EOS -> pad after the first EOS and stop; stop at max_new_tokens
//! ```
//! The last canvas is never encoded. Noise comes from a [`NoiseSource`]: a seeded generator,
//! or a tape recorded from transformers, replayed to reproduce its output exactly.

use crate::error::{EngineError, Result};
use dgemma_model::{Backend, Precision};
use crate::generator::Generator;
use dgemma_sampler::{NoiseSource, SamplerSettings, TorchDevice};
use std::time::Duration;

/// Everything one generation needs besides the prompt and the noise.
#[derive(Clone, Debug)]
pub struct GenerationSettings {
    pub max_new_tokens: usize,
    pub canvas_length: usize,
    pub vocab_size: usize,
    pub sampler: SamplerSettings,
    pub eos_token_ids: Vec<u32>,
    pub pad_token_id: u32,
    /// Rounding applied to the self-conditioning logits (the embedding dtype).
    pub precision: Precision,
    /// Most positions the model supports (`max_position_embeddings`).
    pub context_length: usize,
    /// Sample on the backend's device when it offers [`dgemma_model::DeviceSampling`] and the
    /// noise is counter-based ([`dgemma_sampler::SeededNoise`]) with CUDA arithmetic: only a few
    /// status words come back per step. `false` always samples on the host (the `[C, V]` logits
    /// are read back every step).
    pub device_sampling: bool,
}

impl GenerationSettings {
    pub fn canvases(&self) -> usize {
        self.max_new_tokens.div_ceil(self.canvas_length)
    }

    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(EngineError::InvalidRequest(m));
        if self.max_new_tokens == 0 {
            return bad("max_new_tokens must be at least 1".into());
        }
        if self.canvas_length == 0 {
            return bad("canvas_length must be at least 1".into());
        }
        if self.sampler.max_denoising_steps == 0 {
            return bad("max_denoising_steps must be at least 1".into());
        }
        self.sampler.validate().map_err(|e| EngineError::InvalidRequest(e.to_string()))
    }
}

/// Why generation stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    /// An EOS id appeared in a committed canvas.
    Eos(u32),
    /// `max_new_tokens` were generated without an EOS.
    MaxNewTokens,
}

/// Measurements of one generation.
#[derive(Clone, Debug, Default)]
pub struct GenerationStats {
    pub prompt_tokens: usize,
    pub canvases: usize,
    /// Denoising steps run for each canvas.
    pub steps_per_canvas: Vec<usize>,
    /// Non-pad generated tokens.
    pub new_tokens: usize,
    pub prefill_time: Duration,
    pub denoise_time: Duration,
    pub commit_time: Duration,
    pub sample_time: Duration,
}

impl GenerationStats {
    pub fn decoder_passes(&self) -> usize {
        self.steps_per_canvas.iter().sum()
    }

    /// Non-pad tokens per decoder pass (transformers' `tokens_per_forward`).
    pub fn tokens_per_forward(&self) -> f64 {
        self.new_tokens as f64 / self.decoder_passes().max(1) as f64
    }

    pub fn total_time(&self) -> Duration {
        self.prefill_time + self.denoise_time + self.commit_time + self.sample_time
    }

    /// Committed tokens per second over the whole generation.
    pub fn tokens_per_second(&self) -> f64 {
        self.new_tokens as f64 / self.total_time().as_secs_f64().max(1e-9)
    }
}

/// The result of a generation.
#[derive(Clone, Debug)]
pub struct Generation {
    /// Prompt followed by every committed canvas (pad after the first EOS).
    pub ids: Vec<u32>,
    pub prompt_len: usize,
    pub finish: FinishReason,
    pub stats: GenerationStats,
}

impl Generation {
    pub fn new_ids(&self) -> &[u32] {
        &self.ids[self.prompt_len..]
    }
}

/// Receives progress while generating. Every method has a no-op default.
pub trait Observer {
    /// After each denoising step: the argmax ("draft") canvas and how many tokens were accepted.
    /// `draft` is empty when [`wants_drafts`](Self::wants_drafts) is false and the step ran on
    /// the device (the draft was not read back).
    fn on_step(&mut self, _block: usize, _step: usize, _draft: &[u32], _accepted: usize) {}
    /// Whether `on_step` needs the draft canvas; with on-device sampling, false saves reading it
    /// back after every step.
    fn wants_drafts(&self) -> bool {
        true
    }
    /// After each commit: the committed canvas (pad after the first EOS).
    fn on_canvas(&mut self, _block: usize, _tokens: &[u32]) {}
}

/// An observer that ignores everything.
pub struct Silent;
impl Observer for Silent {
    fn wants_drafts(&self) -> bool {
        false
    }
}

/// Runs a whole generation for one prompt on a fresh cache: [`Generator`] run to the end.
pub fn generate(
    backend: &mut dyn Backend,
    prompt: &[u32],
    settings: &GenerationSettings,
    noise: &mut dyn NoiseSource,
    observer: &mut dyn Observer,
) -> Result<Generation> {
    Generator::new(prompt, settings.clone(), noise)?.run_to_end(backend, observer)
}

impl GenerationSettings {
    /// The checkpoint's defaults: sampler settings from generation_config.json, shapes and
    /// special ids from config.json. `max_new_tokens` is the generation config's value, or
    /// one canvas when it has none.
    pub fn from_checkpoint(
        model: &dgemma_model::config::ModelConfig,
        gen: &dgemma_model::generation::GenerationConfig,
        precision: Precision,
    ) -> GenerationSettings {
        GenerationSettings {
            max_new_tokens: gen.max_new_tokens.unwrap_or(model.canvas_length),
            canvas_length: model.canvas_length,
            vocab_size: model.text.vocab_size,
            sampler: SamplerSettings {
                entropy_bound: gen.entropy_bound as f32,
                t_min: gen.t_min,
                t_max: gen.t_max,
                max_denoising_steps: gen.max_denoising_steps,
                stability_threshold: gen.stability_threshold,
                confidence_threshold: gen.confidence_threshold as f32,
                device: TorchDevice::Cuda,
            },
            eos_token_ids: gen.eos_token_ids.clone(),
            pad_token_id: gen.pad_token_id,
            precision,
            context_length: model.text.max_position_embeddings,
            device_sampling: true,
        }
    }
}
