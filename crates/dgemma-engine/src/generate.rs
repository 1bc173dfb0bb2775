//! The block-diffusion generation loop (model-spec sections 4 and 5), over any [`Backend`].
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
use dgemma_sampler::{denoise_step_in_place, NoiseSource, SamplerSettings, StableAndConfident, TorchDevice};
use std::time::{Duration, Instant};

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
    fn on_step(&mut self, _block: usize, _step: usize, _draft: &[u32], _accepted: usize) {}
    /// After each commit: the committed canvas (pad after the first EOS).
    fn on_canvas(&mut self, _block: usize, _tokens: &[u32]) {}
}

/// An observer that ignores everything.
pub struct Silent;
impl Observer for Silent {}

/// Runs a whole generation for one prompt on a fresh cache.
pub fn generate(
    backend: &mut dyn Backend,
    prompt: &[u32],
    settings: &GenerationSettings,
    noise: &mut dyn NoiseSource,
    observer: &mut dyn Observer,
) -> Result<Generation> {
    settings.validate()?;
    if prompt.is_empty() {
        return Err(EngineError::InvalidRequest("the prompt is empty (it needs at least a BOS token)".into()));
    }
    let needed = prompt.len() + settings.canvases() * settings.canvas_length;
    if needed > settings.context_length {
        return Err(EngineError::InvalidRequest(format!(
            "the prompt ({} tokens) plus {} canvas(es) of {} tokens needs {needed} positions, over the model's \
             context of {} (max_position_embeddings); shorten the prompt or lower max_new_tokens",
            prompt.len(),
            settings.canvases(),
            settings.canvas_length,
            settings.context_length
        )));
    }
    let (c, v) = (settings.canvas_length, settings.vocab_size);
    let mut stats = GenerationStats { prompt_tokens: prompt.len(), ..Default::default() };
    backend.reset();
    let t = Instant::now();
    backend.encode(prompt)?;
    stats.prefill_time = t.elapsed();

    let mut ids = prompt.to_vec();
    let mut canvas = vec![0u32; c];
    let mut logits = vec![0.0f32; c * v];
    let mut sc = vec![0.0f32; c * v];
    let mut stopping = StableAndConfident::new(settings.sampler.stability_threshold, settings.sampler.confidence_threshold)?;
    let mut finish = FinishReason::MaxNewTokens;
    let n = settings.sampler.max_denoising_steps;

    for block in 0..settings.canvases() {
        if block > 0 {
            let t = Instant::now();
            let committed = ids[ids.len() - c..].to_vec();
            backend.encode(&committed)?;
            stats.commit_time += t.elapsed();
        }
        noise.init_canvas(block, &mut canvas)?;
        stopping.reset();
        let mut have_sc = false;
        let mut argmax = canvas.clone();
        let mut steps = 0;
        for s in 0..n {
            let cur_step = n - s;
            let t = Instant::now();
            backend.denoise(&canvas, have_sc.then_some(sc.as_slice()), &mut logits)?;
            stats.denoise_time += t.elapsed();
            let t = Instant::now();
            let out = denoise_step_in_place(&settings.sampler, &mut stopping, noise, block, cur_step, &canvas, &mut logits)?;
            // Self-conditioning input of the next step: the processed logits in the model dtype.
            sc.copy_from_slice(&logits);
            if settings.precision == Precision::Bf16 {
                for x in sc.iter_mut() {
                    *x = half::bf16::from_f32(*x).to_f32();
                }
            }
            have_sc = true;
            canvas = out.next_canvas;
            argmax = out.argmax_canvas;
            stats.sample_time += t.elapsed();
            steps += 1;
            observer.on_step(block, s, &argmax, out.accepted);
            if out.finished {
                break;
            }
        }
        stats.steps_per_canvas.push(steps);
        stats.canvases += 1;

        // Commit: pad everything after the first EOS of this canvas; stop on EOS or length.
        let start = ids.len();
        ids.extend_from_slice(&argmax);
        let mut done = false;
        if let Some(first) = ids[start..].iter().position(|t| settings.eos_token_ids.contains(t)) {
            finish = FinishReason::Eos(ids[start + first]);
            for t in &mut ids[start + first + 1..] {
                *t = settings.pad_token_id;
            }
            done = true;
        }
        if ids.len() - prompt.len() >= settings.max_new_tokens {
            done = true;
        }
        stats.new_tokens += ids[start..].iter().filter(|&&t| t != settings.pad_token_id).count();
        observer.on_canvas(block, &ids[start..]);
        if done {
            break;
        }
    }
    Ok(Generation { ids, prompt_len: prompt.len(), finish, stats })
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
        }
    }
}
