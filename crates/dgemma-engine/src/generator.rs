//! [`Generator`]: the block-diffusion loop (model-spec sections 4 and 5) as a state machine that
//! runs **one forward pass per call**, so a scheduler can interleave many requests.
//! [`generate`](crate::generate::generate) is this machine run to the end.
//!
//! ```text
//! Prefill  --encode(prompt chunk), more to go-->    Prefill
//! Prefill  --encode(last prompt chunk)-->           Denoise(block 0, step 0)
//! Denoise  --denoise + sample, not finished-->      Denoise(step + 1)
//! Denoise  --denoise + sample, finished/last step-> commit --> Encode(block + 1) | Done
//! Encode   --encode(committed canvas)-->            Denoise(block + 1, step 0)
//! ```
//!
//! Per canvas: `noise.init_canvas`, then for `cur_step = N, N-1, ..`: a decoder pass, the
//! sampler step (`dgemma_sampler::denoise_step_in_place`: sample, accept, renoise, stop), the
//! self-conditioning input `round_to_model_dtype(logits / T)`; after the last executed step the
//! argmax canvas is committed (pad after the first EOS; stop on EOS or max_new_tokens) and, if
//! generation goes on, re-encoded at the positions it was denoised at. The last canvas is
//! never encoded.
//!
//! On-device sampling: when the backend offers [`DeviceSampling`], the noise is counter-based
//! ([`NoiseSource::counter_seed`]) and the settings allow it, a canvas's steps run entirely on
//! the device (decoder pass, sampler step, next canvas, self-conditioning input); the host
//! reads a few status words per step and the argmax canvas at the commit (and after every step
//! only when the observer wants drafts). The host keeps no `[C, V]` buffer then.

use crate::error::EngineError;
use crate::generate::{FinishReason, Generation, GenerationSettings, GenerationStats, Observer};
use dgemma_model::{Backend, DeviceCanvas, DeviceSampling, DeviceStepStatus, Precision};
use dgemma_sampler::{denoise_step_in_place, temperature_on, NoiseSource, SeededNoise, StableAndConfident, TorchDevice};
use std::time::Instant;

/// What one [`Generator::advance`] call ran.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pass {
    /// An encoder pass: the prompt (prefill) or the previous committed canvas.
    Encode,
    /// A decoder pass and the sampler step after it (and the commit when the canvas ended).
    Denoise,
    /// Nothing: the generation had already finished.
    None,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Prefill,
    Encode,
    Denoise,
    Done,
}

/// One request's generation, advanced one forward pass at a time.
///
/// The generator does not own a backend: each [`advance`](Self::advance) is given the backend
/// holding this request's KV cache (always the same one for a given generator), and a logits
/// scratch buffer that may be shared by every generator stepped on the same thread.
pub struct Generator<N: NoiseSource> {
    settings: GenerationSettings,
    noise: N,
    prompt_len: usize,
    ids: Vec<u32>,
    canvas: Vec<u32>,
    argmax: Vec<u32>,
    /// Self-conditioning logits of the previous step (allocated on the first decoder pass,
    /// freed when the generation ends).
    sc: Vec<f32>,
    have_sc: bool,
    stopping: StableAndConfident,
    /// The noise seed when this request may sample on a device (see the module docs).
    device_seed: Option<u64>,
    /// Prompt tokens encoded so far (the prefill is complete at `prompt_len`).
    prefilled: usize,
    /// Most prompt tokens one prefill pass encodes (`None`: the whole prompt in one pass).
    prefill_chunk: Option<usize>,
    block: usize,
    /// Index of the next step within the block (0 = `cur_step = N`).
    step: usize,
    phase: Phase,
    finish: FinishReason,
    stats: GenerationStats,
}

impl Generator<SeededNoise> {
    /// [`Generator::new`] with [`SeededNoise`]: the same seed gives the same output.
    pub fn seeded(prompt: &[u32], settings: GenerationSettings, seed: u64) -> Result<Self, EngineError> {
        let noise = SeededNoise::new(seed, settings.vocab_size);
        Generator::new(prompt, settings, noise)
    }
}

impl<N: NoiseSource> Generator<N> {
    /// A generation of `prompt` with `settings` and the given noise. Refuses a bad request
    /// before any compute (settings, empty prompt, context length).
    pub fn new(prompt: &[u32], settings: GenerationSettings, noise: N) -> Result<Self, EngineError> {
        settings.validate()?;
        if prompt.is_empty() {
            return Err(EngineError::InvalidRequest(
                "the prompt is empty (it needs at least a BOS token)".into(),
            ));
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
        let stopping = StableAndConfident::new(
            settings.sampler.stability_threshold,
            settings.sampler.confidence_threshold,
        )?;
        let device_seed = if settings.device_sampling && settings.sampler.device == TorchDevice::Cuda {
            noise.counter_seed()
        } else {
            None
        };
        Ok(Generator {
            device_seed,
            canvas: vec![0; settings.canvas_length],
            argmax: Vec::new(),
            sc: Vec::new(),
            have_sc: false,
            stopping,
            prefilled: 0,
            prefill_chunk: None,
            block: 0,
            step: 0,
            phase: Phase::Prefill,
            finish: FinishReason::MaxNewTokens,
            stats: GenerationStats {
                prompt_tokens: prompt.len(),
                ..Default::default()
            },
            prompt_len: prompt.len(),
            ids: prompt.to_vec(),
            noise,
            settings,
        })
    }

    /// Splits the prefill into encoder passes of at most `tokens` prompt tokens, one per
    /// [`advance`](Self::advance), so that a scheduler can run other requests' passes between
    /// the chunks of a long prompt (the cache is filled in order; the result is the same as one
    /// pass wherever the backend's own chunking lines up, see `EngineOptions::prefill_chunk`).
    /// `tokens` = 0 is refused.
    pub fn with_prefill_chunk(mut self, tokens: usize) -> Result<Self, EngineError> {
        if tokens == 0 {
            return Err(EngineError::InvalidRequest("the prefill chunk must hold at least one token".into()));
        }
        self.prefill_chunk = Some(tokens);
        Ok(self)
    }

    pub fn settings(&self) -> &GenerationSettings {
        &self.settings
    }

    /// Prompt tokens still to encode (0 once the prefill is complete).
    pub fn prefill_remaining(&self) -> usize {
        self.prompt_len - self.prefilled
    }

    /// True once the last canvas has been committed.
    pub fn is_done(&self) -> bool {
        self.phase == Phase::Done
    }

    /// Statistics so far.
    pub fn stats(&self) -> &GenerationStats {
        &self.stats
    }

    /// Prompt followed by every canvas committed so far.
    pub fn ids(&self) -> &[u32] {
        &self.ids
    }

    pub fn prompt_len(&self) -> usize {
        self.prompt_len
    }

    /// Runs one forward pass (and the sampler step / commit that follows a decoder pass).
    /// `observer` receives `on_step` after every denoising step and `on_canvas` after every
    /// commit, exactly as with `generate`. Returns which pass ran; check
    /// [`is_done`](Self::is_done) afterwards. After an error the generator must be dropped.
    pub fn advance(
        &mut self,
        backend: &mut dyn Backend,
        logits: &mut Vec<f32>,
        observer: &mut dyn Observer,
    ) -> Result<Pass, EngineError> {
        match self.phase {
            Phase::Done => Ok(Pass::None),
            Phase::Prefill => {
                if self.prefilled == 0 {
                    backend.reset();
                }
                let t = Instant::now();
                let end = match self.prefill_chunk {
                    Some(chunk) => (self.prefilled + chunk).min(self.prompt_len),
                    None => self.prompt_len,
                };
                backend.encode(&self.ids[self.prefilled..end])?;
                self.prefilled = end;
                self.stats.prefill_time += t.elapsed();
                if self.prefilled == self.prompt_len {
                    self.begin_block()?;
                }
                Ok(Pass::Encode)
            }
            Phase::Encode => {
                let t = Instant::now();
                let c = self.settings.canvas_length;
                backend.encode(&self.ids[self.ids.len() - c..])?;
                self.stats.commit_time += t.elapsed();
                self.begin_block()?;
                Ok(Pass::Encode)
            }
            Phase::Denoise => {
                self.denoise(backend, logits, observer)?;
                Ok(Pass::Denoise)
            }
        }
    }

    /// Advances until done and returns the result (the one-shot `generate` on this machine).
    pub fn run_to_end(
        mut self,
        backend: &mut dyn Backend,
        observer: &mut dyn Observer,
    ) -> Result<Generation, EngineError> {
        let mut logits = Vec::new();
        while !self.is_done() {
            self.advance(backend, &mut logits, observer)?;
        }
        Ok(self.into_generation().expect("the generation is done"))
    }

    /// The result, once [`is_done`](Self::is_done); `None` before.
    pub fn into_generation(self) -> Option<Generation> {
        let done = self.is_done();
        done.then_some(Generation {
            ids: self.ids,
            prompt_len: self.prompt_len,
            finish: self.finish,
            stats: self.stats,
        })
    }

    fn begin_block(&mut self) -> Result<(), EngineError> {
        self.noise.init_canvas(self.block, &mut self.canvas)?;
        self.stopping.reset();
        self.have_sc = false;
        self.argmax.clone_from(&self.canvas);
        self.step = 0;
        self.phase = Phase::Denoise;
        Ok(())
    }

    fn denoise(
        &mut self,
        backend: &mut dyn Backend,
        logits: &mut Vec<f32>,
        observer: &mut dyn Observer,
    ) -> Result<(), EngineError> {
        if let Some(seed) = self.device_seed {
            if let Some(device) = backend.device_sampling() {
                return self.denoise_on_device(device, seed, observer);
            }
        }
        let (c, v) = (self.settings.canvas_length, self.settings.vocab_size);
        let n = self.settings.sampler.max_denoising_steps;
        let cur_step = n - self.step;
        logits.resize(c * v, 0.0);
        let t = Instant::now();
        backend.denoise(
            &self.canvas,
            self.have_sc.then_some(self.sc.as_slice()),
            logits,
        )?;
        self.stats.denoise_time += t.elapsed();
        let t = Instant::now();
        let out = denoise_step_in_place(
            &self.settings.sampler,
            &mut self.stopping,
            &mut self.noise,
            self.block,
            cur_step,
            &self.canvas,
            logits,
        )?;
        // Self-conditioning input of the next step: the processed logits in the model dtype.
        self.sc.resize(c * v, 0.0);
        self.sc.copy_from_slice(logits);
        if self.settings.precision == Precision::Bf16 {
            for x in self.sc.iter_mut() {
                *x = half::bf16::from_f32(*x).to_f32();
            }
        }
        self.have_sc = true;
        self.canvas = out.next_canvas;
        self.argmax = out.argmax_canvas;
        self.stats.sample_time += t.elapsed();
        observer.on_step(self.block, self.step, &self.argmax, out.accepted);
        self.step += 1;
        if out.finished || self.step == n {
            self.commit(observer);
        }
        Ok(())
    }

    /// One step on the device: the same step as [`denoise`](Self::denoise) with the canvas,
    /// the self-conditioning input and the stability history kept in device memory.
    fn denoise_on_device(
        &mut self,
        device: &mut dyn DeviceSampling,
        seed: u64,
        observer: &mut dyn Observer,
    ) -> Result<(), EngineError> {
        let t = Instant::now();
        let (step, temperature) = self.prepare_device_step(device, seed)?;
        let status = device.step(step, temperature)?;
        self.stats.denoise_time += t.elapsed();
        self.finish_device_step(device, status, observer)
    }

    /// For a scheduler that batches the denoising steps of several generations into one
    /// decoder pass: when this generation's next pass is a denoising step that can run on
    /// `device`, begins its canvas there if this is the canvas's first step and returns the
    /// `(step, temperature)` to run; `None` when it must [`advance`](Self::advance) instead
    /// (an encoder pass, host sampling, or done). After the batched step, hand its status to
    /// [`finish_device_step`](Self::finish_device_step).
    pub fn device_step(&mut self, device: &mut dyn DeviceSampling) -> Result<Option<(usize, f32)>, EngineError> {
        match (self.phase, self.device_seed) {
            (Phase::Denoise, Some(seed)) => self.prepare_device_step(device, seed).map(Some),
            _ => Ok(None),
        }
    }

    fn prepare_device_step(&mut self, device: &mut dyn DeviceSampling, seed: u64) -> Result<(usize, f32), EngineError> {
        let s = &self.settings.sampler;
        let n = s.max_denoising_steps;
        if self.step == 0 {
            device.begin_canvas(
                &self.canvas,
                DeviceCanvas {
                    seed,
                    block: self.block,
                    entropy_bound: s.entropy_bound,
                    confidence_threshold: s.confidence_threshold,
                    stability_threshold: s.stability_threshold,
                },
            )?;
        }
        let temperature = temperature_on(s.device, n - self.step, n, s.t_min, s.t_max)?;
        Ok((self.step, temperature))
    }

    /// Applies the status of the device step [`device_step`](Self::device_step) returned:
    /// reads the argmax canvas when the canvas ends (or the observer wants drafts), reports the
    /// step and commits. Call it right after the pass, before any other decoder pass on
    /// `device`'s backend.
    pub fn finish_device_step(
        &mut self,
        device: &mut dyn DeviceSampling,
        status: DeviceStepStatus,
        observer: &mut dyn Observer,
    ) -> Result<(), EngineError> {
        let n = self.settings.sampler.max_denoising_steps;
        let last = status.finished || self.step + 1 == n;
        let draft = observer.wants_drafts();
        if last || draft {
            self.argmax.resize(self.settings.canvas_length, 0);
            device.read_argmax(&mut self.argmax)?;
        }
        observer.on_step(self.block, self.step, if draft { &self.argmax } else { &[] }, status.accepted);
        self.step += 1;
        if last {
            self.commit(observer);
        }
        Ok(())
    }

    /// For a scheduler that merges encoder work into batched decoder passes: the ids of this
    /// generation's next pass when it is an encoder pass that fits in `max` tokens, the next
    /// prompt chunk (cut to `max`: the prefill may be split anywhere, the cache fills in order)
    /// or the committed canvas to re-encode (whole, or `None` when it is longer than `max`);
    /// `None` for a denoising step or when done. Unlike [`advance`](Self::advance) this does not
    /// reset the backend before the first chunk: its cache must hold exactly what this
    /// generation encoded so far (an empty one at first). After the pass, report it with
    /// [`finish_encode`](Self::finish_encode).
    pub fn pending_encode(&self, max: usize) -> Option<&[u32]> {
        match self.phase {
            Phase::Prefill => {
                let chunk = self.prefill_chunk.unwrap_or(usize::MAX).min(max);
                let end = self.prefilled.saturating_add(chunk).min(self.prompt_len);
                (end > self.prefilled).then(|| &self.ids[self.prefilled..end])
            }
            Phase::Encode => {
                let c = self.settings.canvas_length;
                (c <= max).then(|| &self.ids[self.ids.len() - c..])
            }
            Phase::Denoise | Phase::Done => None,
        }
    }

    /// Records that a batched pass encoded the first `tokens` ids [`pending_encode`]
    /// (Self::pending_encode) returned, `elapsed` being this generation's share of it, and moves
    /// on as [`advance`](Self::advance) would have. A count that does not match the pending
    /// encoder pass is an error (and changes nothing).
    pub fn finish_encode(&mut self, tokens: usize, elapsed: std::time::Duration) -> Result<Pass, EngineError> {
        match self.phase {
            Phase::Prefill if tokens > 0 && tokens <= self.prompt_len - self.prefilled => {
                self.prefilled += tokens;
                self.stats.prefill_time += elapsed;
                if self.prefilled == self.prompt_len {
                    self.begin_block()?;
                }
            }
            Phase::Encode if tokens == self.settings.canvas_length => {
                self.stats.commit_time += elapsed;
                self.begin_block()?;
            }
            _ => {
                return Err(EngineError::InvalidRequest(format!(
                    "finish_encode({tokens}): this generation's next pass is not an encoder pass of that many tokens"
                )))
            }
        }
        Ok(Pass::Encode)
    }

    /// Adds time a scheduler spent on this generation's batched decoder passes.
    pub fn add_denoise_time(&mut self, t: std::time::Duration) {
        self.stats.denoise_time += t;
    }

    /// Commit: pad everything after the first EOS of this canvas; stop on EOS or length.
    fn commit(&mut self, observer: &mut dyn Observer) {
        let s = &self.settings;
        self.stats.steps_per_canvas.push(self.step);
        self.stats.canvases += 1;
        let start = self.ids.len();
        self.ids.extend_from_slice(&self.argmax);
        let mut done = false;
        if let Some(first) = self.ids[start..]
            .iter()
            .position(|t| s.eos_token_ids.contains(t))
        {
            self.finish = FinishReason::Eos(self.ids[start + first]);
            for t in &mut self.ids[start + first + 1..] {
                *t = s.pad_token_id;
            }
            done = true;
        }
        if self.ids.len() - self.prompt_len >= s.max_new_tokens {
            done = true;
        }
        self.stats.new_tokens += self.ids[start..]
            .iter()
            .filter(|&&t| t != s.pad_token_id)
            .count();
        observer.on_canvas(self.block, &self.ids[start..]);
        if done {
            self.phase = Phase::Done;
            // Free the per-request buffers now; the ids and stats stay.
            self.sc = Vec::new();
            self.canvas = Vec::new();
            self.argmax = Vec::new();
        } else {
            self.phase = Phase::Encode;
            self.block += 1;
        }
    }
}
