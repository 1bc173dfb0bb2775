//! [`GpuBackend`]: the CUDA implementation of [`dgemma_model::Backend`], over any [`Executor`].
//!
//! Everything is allocated at construction: the weights, a workspace for passes of
//! `max_tokens` rows, and one sequence (a KV cache for `context` positions, its decoder inputs);
//! [`GpuBackend::add_sequence`] adds more, each with its own cache, and the [`Backend`] methods
//! act on the selected one. A decoder pass is planned once per (sequence, canvas length,
//! position, self-conditioning) and recorded (a CUDA graph on a GPU); the steps of a canvas
//! replay the recording after copying in the canvas and the self-conditioning logits. A
//! sequence's recordings are dropped when its cache moves (every commit), since positions are
//! part of the plan.
//!
//! [`DeviceSampling`]: with on-device sampling a recording holds the decoder pass followed by
//! the sampler launches ([`crate::sampling`]), which write the next canvas and the next
//! self-conditioning input where the pass reads them; a step is a 32-byte params upload, a
//! replay and a 16-byte status read.

use std::collections::HashMap;

use dgemma_cuda::{ops, Executor};
use dgemma_model::config::TextConfig;
use dgemma_model::error::{Error, Result};
use dgemma_model::weights::ModelWeights;
use dgemma_model::{Backend, DeviceCanvas, DeviceSampling, DeviceStepStatus};
use half::bf16;

use crate::error::{backend_error, cuda, NAME};
use crate::kernels::Kernels;
use crate::plan::{DecoderInputs, KvCache, Planner, Workspace};
use crate::sampling::{alloc_history, plan_sampler_step, SamplerBuffers};
use crate::weights::{DeviceWeights, Progress};

/// Sizes fixed at construction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GpuOptions {
    /// Positions the KV cache holds (prompt + every canvas); at most `max_position_embeddings`.
    pub context: usize,
    /// The longest canvas a decoder pass takes (the model's `canvas_length`).
    pub canvas: usize,
    /// Rows per encoder pass: longer prompts are encoded in chunks of this many tokens.
    pub prefill_chunk: usize,
    /// Record decoder passes (CUDA graphs) and replay them; off runs the steps one by one.
    pub record: bool,
}

impl GpuOptions {
    pub fn new(context: usize, canvas: usize) -> GpuOptions {
        GpuOptions { context, canvas, prefill_chunk: canvas.max(512), record: true }
    }
}

fn check_options(cfg: &TextConfig, options: &GpuOptions) -> Result<()> {
    if options.canvas == 0 || options.prefill_chunk == 0 || options.context == 0 {
        return Err(Error::InvalidArgument(format!("GPU backend sizes must be positive: {options:?}")));
    }
    if options.context > cfg.max_position_embeddings {
        return Err(Error::InvalidArgument(format!(
            "a context of {} positions exceeds the model's max_position_embeddings ({})",
            options.context, cfg.max_position_embeddings
        )));
    }
    if cfg.final_logit_softcapping.is_none() {
        return Err(backend_error("models without final_logit_softcapping are not supported yet"));
    }
    Ok(())
}

/// Key of a recorded decoder pass.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct DenoiseKey {
    tokens: usize,
    pos0: usize,
    self_conditioning: bool,
    /// The sampler launches follow the pass (on-device sampling).
    sample: bool,
}

/// What one sequence keeps on the executor: its KV cache, its decoder inputs and sampler
/// history, and its recorded decoder passes.
struct Sequence {
    kv: KvCache,
    len: usize,
    inputs: DecoderInputs,
    history: dgemma_cuda::Region,
    recorded: HashMap<DenoiseKey, usize>,
    /// The canvas being denoised on the device (set by `begin_canvas`, cleared whenever the
    /// cache or the decoder inputs change underneath it).
    device_canvas: Option<(DeviceCanvas, usize)>,
}

impl Sequence {
    fn new(cfg: &TextConfig, exec: &mut dyn Executor, options: &GpuOptions, max_tokens: usize) -> Result<Sequence> {
        Ok(Sequence {
            kv: KvCache::new(cfg, exec, options.context, max_tokens)?,
            len: 0,
            inputs: DecoderInputs::new(cfg, exec, options.canvas)?,
            history: alloc_history(exec, options.canvas)?,
            recorded: HashMap::new(),
            device_canvas: None,
        })
    }
}

/// The model on an executor and one or more sequences, each with its own KV cache: the
/// [`Backend`] methods act on the selected one ([`GpuBackend::select_sequence`]). Weights,
/// workspace and sampler scratch are shared, so sequences run one pass at a time.
pub struct GpuBackend<X: Executor> {
    exec: X,
    cfg: TextConfig,
    kernels: Kernels,
    weights: DeviceWeights,
    ws: Workspace,
    seqs: Vec<Sequence>,
    current: usize,
    options: GpuOptions,
    sampler: SamplerBuffers,
    /// Decoder passes run by replaying a recording (for tests and stats).
    pub replays: usize,
    /// Denoising steps sampled on the device ([`DeviceSampling::step`]).
    pub device_steps: usize,
}

impl<X: Executor> GpuBackend<X> {
    /// Uploads `weights` and allocates the cache and workspace. Refuses a model whose kernels
    /// were not compiled, and sizes that do not fit the model.
    pub fn new(mut exec: X, cfg: &TextConfig, weights: &ModelWeights, options: GpuOptions, progress: Progress) -> Result<Self> {
        check_options(cfg, &options)?;
        let kernels = Kernels::resolve(cfg, &exec)?;
        let weights = DeviceWeights::upload(cfg, weights, &mut exec, progress)?;
        Self::with_weights(exec, cfg, kernels, weights, options)
    }

    /// A backend on random weights of `cfg`'s shapes, generated in executor memory (benchmarks:
    /// the full-size model without a checkpoint). Its outputs mean nothing.
    pub fn synthetic(mut exec: X, cfg: &TextConfig, seed: u64, options: GpuOptions, progress: Progress) -> Result<Self> {
        check_options(cfg, &options)?;
        let kernels = Kernels::resolve(cfg, &exec)?;
        let weights = DeviceWeights::synthetic(cfg, &mut exec, seed, progress)?;
        Self::with_weights(exec, cfg, kernels, weights, options)
    }

    fn with_weights(mut exec: X, cfg: &TextConfig, kernels: Kernels, weights: DeviceWeights, options: GpuOptions) -> Result<Self> {
        let max_tokens = options.prefill_chunk.max(options.canvas);
        let ws = Workspace::new(cfg, &mut exec, max_tokens, options.canvas, options.context)?;
        let first = Sequence::new(cfg, &mut exec, &options, max_tokens)?;
        let sampler = SamplerBuffers::new(&mut exec, options.canvas, cfg.vocab_size)?;
        Ok(GpuBackend {
            sampler,
            exec,
            cfg: cfg.clone(),
            kernels,
            weights,
            ws,
            seqs: vec![first],
            current: 0,
            options,
            replays: 0,
            device_steps: 0,
        })
    }

    /// Adds a sequence (its own KV cache for `options.context` positions, decoder inputs and
    /// sampler history) and returns its index; the selection does not change. Out of memory is
    /// an error naming the buffer.
    pub fn add_sequence(&mut self) -> Result<usize> {
        let max_tokens = self.ws.max_tokens;
        let seq = Sequence::new(&self.cfg, &mut self.exec, &self.options, max_tokens)?;
        self.seqs.push(seq);
        Ok(self.seqs.len() - 1)
    }

    /// Makes sequence `index` the one the [`Backend`] methods act on.
    pub fn select_sequence(&mut self, index: usize) -> Result<()> {
        if index >= self.seqs.len() {
            return Err(Error::InvalidArgument(format!(
                "sequence {index} does not exist (this backend holds {})",
                self.seqs.len()
            )));
        }
        self.current = index;
        Ok(())
    }

    /// Sequences on this backend (1 + those added).
    pub fn sequences(&self) -> usize {
        self.seqs.len()
    }

    fn seq(&self) -> &Sequence {
        &self.seqs[self.current]
    }

    fn seq_mut(&mut self) -> &mut Sequence {
        &mut self.seqs[self.current]
    }

    pub fn executor(&self) -> &X {
        &self.exec
    }

    pub fn executor_mut(&mut self) -> &mut X {
        &mut self.exec
    }

    pub fn options(&self) -> GpuOptions {
        self.options
    }

    /// The model's text config.
    pub fn config(&self) -> &TextConfig {
        &self.cfg
    }

    /// Bytes of weights in executor memory.
    pub fn weight_bytes(&self) -> usize {
        self.weights.bytes
    }

    fn planner(&self) -> Planner<'_> {
        let seq = self.seq();
        Planner { cfg: &self.cfg, kernels: &self.kernels, weights: &self.weights, ws: &self.ws, kv: &seq.kv, inputs: seq.inputs }
    }

    fn check_ids(&self, ids: &[u32], what: &str) -> Result<()> {
        if let Some(&bad) = ids.iter().find(|&&id| id as usize >= self.cfg.vocab_size) {
            return Err(Error::InvalidInput(format!(
                "{what} holds token id {bad}, outside the vocabulary of {} tokens",
                self.cfg.vocab_size
            )));
        }
        let (len, capacity) = (self.seq().len, self.seq().kv.capacity);
        let end = len + ids.len();
        if end > capacity {
            return Err(Error::InvalidInput(format!(
                "{what} would reach position {end}, over the context of {capacity} positions this backend was sized for \
                 ({len} already in the cache, {} new)",
                ids.len()
            )));
        }
        Ok(())
    }

    /// Copies `ids` into the start of `dst` (i32).
    fn upload_ids(&mut self, dst: dgemma_cuda::Region, ids: &[u32]) -> Result<()> {
        let as_i32: Vec<i32> = ids.iter().map(|&i| i as i32).collect();
        let dst = dst.sub(0, 4 * ids.len()).map_err(cuda)?;
        self.exec.upload(dst, &as_i32).map_err(cuda)
    }

    /// The steps of a decoder pass (and of the sampler after it).
    fn pass_steps(&self, key: DenoiseKey) -> Result<Vec<dgemma_cuda::Step>> {
        let mut steps = self.planner().denoise(key.tokens, key.pos0, key.self_conditioning)?;
        if key.sample {
            let seq = self.seq();
            let (inputs, history) = (seq.inputs, seq.history);
            steps.extend(plan_sampler_step(&self.kernels, &self.ws, &self.sampler, inputs, history, key.tokens, self.cfg.vocab_size)?);
        }
        Ok(steps)
    }

    /// Runs a decoder pass whose inputs are already in the workspace.
    fn run_denoise(&mut self, key: DenoiseKey) -> Result<()> {
        if !self.options.record {
            let steps = self.pass_steps(key)?;
            // SAFETY: the planner only addresses regions of this backend, alive as long as `self`.
            return unsafe { self.exec.run(&steps) }.map_err(cuda);
        }
        let graph = match self.seq().recorded.get(&key) {
            Some(&g) => g,
            None => {
                let steps = self.pass_steps(key)?;
                // SAFETY: as above; recordings are dropped before the regions (with `self`).
                let g = unsafe { self.exec.record(&steps) }.map_err(cuda)?;
                self.seq_mut().recorded.insert(key, g);
                g
            }
        };
        self.replays += 1;
        self.exec.replay(graph).map_err(cuda)
    }

    /// Drops the selected sequence's recordings (their positions are stale once its cache
    /// moves) and its device canvas.
    fn forget_recordings(&mut self) {
        let seq = &mut self.seqs[self.current];
        seq.device_canvas = None;
        for (_, g) in seq.recorded.drain() {
            self.exec.forget(g);
        }
    }

    /// Benchmarks: queues one decoder pass of `tokens` rows over whatever the workspace holds
    /// (no upload, no download, no sync), recording it on first use.
    pub fn queue_denoise(&mut self, tokens: usize, self_conditioning: bool) -> Result<()> {
        let pos0 = self.seq().len;
        self.run_denoise(DenoiseKey { tokens, pos0, self_conditioning, sample: false })
    }

    /// Benchmarks: queues one encoder pass of `tokens` rows of `ws.ids` at the cache's end and
    /// advances the cache (no upload, no sync).
    pub fn queue_encode(&mut self, tokens: usize) -> Result<()> {
        let steps = self.planner().encode(tokens, self.seq().len)?;
        // SAFETY: the planner only addresses regions of this backend.
        unsafe { self.exec.run(&steps) }.map_err(cuda)?;
        self.seq_mut().len += tokens;
        self.forget_recordings();
        Ok(())
    }

    /// Benchmarks: declares the first `len` cache positions filled (with whatever they hold), so
    /// a step at a long context can be timed without encoding that context first.
    pub fn assume_cache_len(&mut self, len: usize) -> Result<()> {
        let capacity = self.seq().kv.capacity;
        if len > capacity {
            return Err(Error::InvalidInput(format!("{len} positions exceed the cache's {capacity}")));
        }
        self.seq_mut().len = len;
        self.forget_recordings();
        Ok(())
    }

    /// Bytes of executor memory one sequence's KV cache holds (every layer's K and V rings).
    pub fn kv_bytes(&self) -> usize {
        self.seq().kv.allocated_bytes()
    }

    /// Rows of each layer's KV ring (`context` on full layers, fewer on sliding layers).
    pub fn kv_rows(&self) -> &[usize] {
        &self.seq().kv.rows
    }

    /// Bytes of cached K and V a decoder pass reads at a cache length of `len` positions.
    pub fn kv_bytes_attended(&self, len: usize) -> usize {
        KvCache::bytes_attended(&self.cfg, len)
    }
}

impl<X: Executor> Backend for GpuBackend<X> {
    fn name(&self) -> &str {
        NAME
    }

    fn cache_len(&self) -> usize {
        self.seq().len
    }

    fn reset(&mut self) {
        self.seq_mut().len = 0;
        self.forget_recordings();
    }

    fn encode(&mut self, ids: &[u32]) -> Result<()> {
        self.check_ids(ids, "the encoder input")?;
        for chunk in ids.chunks(self.ws.max_tokens) {
            self.upload_ids(self.ws.ids, chunk)?;
            let steps = self.planner().encode(chunk.len(), self.seq().len)?;
            // SAFETY: the planner only addresses regions of this backend.
            unsafe { self.exec.run(&steps) }.map_err(cuda)?;
            self.seq_mut().len += chunk.len();
        }
        if !ids.is_empty() {
            self.forget_recordings();
        }
        Ok(())
    }

    fn denoise(&mut self, canvas: &[u32], sc_logits: Option<&[f32]>, logits: &mut [f32]) -> Result<()> {
        self.check_ids(canvas, "the canvas")?;
        let (c, v) = (canvas.len(), self.cfg.vocab_size);
        if c == 0 || c > self.ws.canvas {
            return Err(Error::InvalidInput(format!(
                "a canvas of {c} tokens: this backend was sized for 1..={}",
                self.ws.canvas
            )));
        }
        if logits.len() != c * v {
            return Err(Error::InvalidInput(format!(
                "logits buffer holds {} floats, the canvas needs {c} x {v}",
                logits.len()
            )));
        }
        let inputs = self.seq().inputs;
        self.upload_ids(inputs.canvas, canvas)?;
        if let Some(sc) = sc_logits {
            if sc.len() != c * v {
                return Err(Error::InvalidInput(format!(
                    "self-conditioning logits hold {} floats, the canvas needs {c} x {v}",
                    sc.len()
                )));
            }
            let narrow: Vec<bf16> = sc.iter().map(|&x| bf16::from_f32(x)).collect();
            let dst = inputs.sc_logits.sub(0, 2 * c * v).map_err(cuda)?;
            self.exec.upload(dst, &narrow).map_err(cuda)?;
        }
        // The host path overwrites the canvas and self-conditioning inputs of a device canvas.
        self.seq_mut().device_canvas = None;
        let pos0 = self.seq().len;
        self.run_denoise(DenoiseKey { tokens: c, pos0, self_conditioning: sc_logits.is_some(), sample: false })?;
        let src = self.ws.logits.sub(0, 4 * c * v).map_err(cuda)?;
        self.exec.download_bytes(src, bytemuck::cast_slice_mut(logits)).map_err(cuda)
    }

    fn device_sampling(&mut self) -> Option<&mut dyn DeviceSampling> {
        Some(self)
    }
}

impl<X: Executor> DeviceSampling for GpuBackend<X> {
    fn begin_canvas(&mut self, canvas: &[u32], settings: DeviceCanvas) -> Result<()> {
        self.seq_mut().device_canvas = None;
        self.check_ids(canvas, "the canvas")?;
        let c = canvas.len();
        if c == 0 || c > self.sampler.canvas {
            return Err(Error::InvalidInput(format!(
                "a canvas of {c} tokens: this backend was sized for 1..={}",
                self.sampler.canvas
            )));
        }
        let bad = |what: String| Err(Error::InvalidArgument(format!("device sampler: {what}")));
        if !(settings.entropy_bound.is_finite() && settings.entropy_bound > 0.0) {
            return bad(format!("entropy_bound must be a finite float > 0, got {}", settings.entropy_bound));
        }
        if settings.confidence_threshold.is_nan() {
            return bad("confidence_threshold is NaN".into());
        }
        if u32::try_from(settings.block).is_err() || u32::try_from(settings.stability_threshold).is_err() {
            return bad(format!(
                "block {} and stability_threshold {} must fit in 32 bits",
                settings.block, settings.stability_threshold
            ));
        }
        let inputs = self.seq().inputs;
        self.upload_ids(inputs.canvas, canvas)?;
        self.seq_mut().device_canvas = Some((settings, c));
        Ok(())
    }

    fn step(&mut self, step: usize, temperature: f32) -> Result<DeviceStepStatus> {
        let Some((s, c)) = self.seq().device_canvas else {
            return Err(Error::InvalidArgument(
                "device sampler: no canvas begun at the cache's end (begin_canvas after every encode)".into(),
            ));
        };
        if !(temperature.is_finite() && temperature > 0.0) {
            return Err(Error::InvalidArgument(format!("device sampler: temperature {temperature}")));
        }
        let step32 = u32::try_from(step).ok().filter(|&x| x < 1 << 24);
        let Some(step32) = step32 else {
            return Err(Error::InvalidArgument(format!("device sampler: step {step} is over 2^24")));
        };
        let params = ops::SamplerParams {
            seed: s.seed,
            block: s.block as u32,
            step: step32,
            temperature,
            entropy_bound: s.entropy_bound,
            confidence_threshold: s.confidence_threshold,
            stability_threshold: s.stability_threshold as u32,
        };
        self.sampler.write_params(&mut self.exec, &params)?;
        // Step 0 has no self-conditioning input; later steps read the one the last step wrote.
        let pos0 = self.seq().len;
        self.run_denoise(DenoiseKey { tokens: c, pos0, self_conditioning: step > 0, sample: true })?;
        let status = self.sampler.read_status(&mut self.exec)?;
        self.device_steps += 1;
        if status.error != 0 {
            // The canvas on the device is not a valid next canvas any more.
            self.seq_mut().device_canvas = None;
            return Err(sampler_status_error(status.error, step, s.block));
        }
        self.seq_mut().device_canvas = Some((s, c));
        Ok(DeviceStepStatus {
            finished: status.finished,
            accepted: status.accepted as usize,
            mean_entropy: status.mean_entropy,
        })
    }

    fn read_argmax(&mut self, out: &mut [u32]) -> Result<()> {
        let Some((_, c)) = self.seq().device_canvas else {
            return Err(Error::InvalidArgument("device sampler: no canvas to read".into()));
        };
        if out.len() != c {
            return Err(Error::InvalidInput(format!("argmax buffer holds {} ids, the canvas has {c}", out.len())));
        }
        let src = self.sampler.argmax.sub(0, 4 * c).map_err(cuda)?;
        let mut ids = vec![0i32; c];
        self.exec.download_bytes(src, bytemuck::cast_slice_mut(&mut ids)).map_err(cuda)?;
        for (o, &id) in out.iter_mut().zip(&ids) {
            *o = u32::try_from(id)
                .ok()
                .filter(|&x| (x as usize) < self.cfg.vocab_size)
                .ok_or_else(|| backend_error(format!("device sampler: argmax id {id} outside the vocabulary")))?;
        }
        Ok(())
    }
}

/// The error a sampler status word reports (the host sampler's errors, in words).
fn sampler_status_error(bits: u32, step: usize, block: usize) -> Error {
    let mut why = Vec::new();
    if bits & ops::SAMPLER_ERR_NAN_ENTROPY != 0 {
        why.push("an entropy is NaN");
    }
    if bits & (ops::SAMPLER_ERR_SAMPLE | ops::SAMPLER_ERR_ARGMAX) != 0 {
        why.push("a logits row holds NaN or +inf, or only -inf");
    }
    if bits & ops::SAMPLER_ERR_PARAMS != 0 {
        why.push("the sampler params are out of range");
    }
    backend_error(format!("device sampler, canvas {block} step {step}: {} (status bits {bits:#x})", why.join("; ")))
}
