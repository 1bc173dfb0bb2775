//! [`GpuBackend`]: the CUDA implementation of [`dgemma_model::Backend`], over any [`Executor`].
//!
//! Everything is allocated at construction: the weights, the KV cache for `context` positions,
//! and a workspace for passes of `max_tokens` rows. A decoder pass is planned once per (canvas
//! length, position, self-conditioning) and recorded (a CUDA graph on a GPU); the steps of a
//! canvas replay the recording after copying in the canvas and the self-conditioning logits.
//! The recordings are dropped when the cache moves (every commit), since positions are part of
//! the plan.

use std::collections::HashMap;

use dgemma_cuda::Executor;
use dgemma_model::config::TextConfig;
use dgemma_model::error::{Error, Result};
use dgemma_model::weights::ModelWeights;
use dgemma_model::Backend;
use half::bf16;

use crate::error::{backend_error, cuda, NAME};
use crate::kernels::Kernels;
use crate::plan::{KvCache, Planner, Workspace};
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
}

/// One sequence on an executor.
pub struct GpuBackend<X: Executor> {
    exec: X,
    cfg: TextConfig,
    kernels: Kernels,
    weights: DeviceWeights,
    ws: Workspace,
    kv: KvCache,
    len: usize,
    options: GpuOptions,
    recorded: HashMap<DenoiseKey, usize>,
    /// Decoder passes run by replaying a recording (for tests and stats).
    pub replays: usize,
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
        let kv = KvCache::new(cfg, &mut exec, options.context)?;
        Ok(GpuBackend {
            exec,
            cfg: cfg.clone(),
            kernels,
            weights,
            ws,
            kv,
            len: 0,
            options,
            recorded: HashMap::new(),
            replays: 0,
        })
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

    /// Bytes of weights in executor memory.
    pub fn weight_bytes(&self) -> usize {
        self.weights.bytes
    }

    fn planner(&self) -> Planner<'_> {
        Planner { cfg: &self.cfg, kernels: &self.kernels, weights: &self.weights, ws: &self.ws, kv: &self.kv }
    }

    fn check_ids(&self, ids: &[u32], what: &str) -> Result<()> {
        if let Some(&bad) = ids.iter().find(|&&id| id as usize >= self.cfg.vocab_size) {
            return Err(Error::InvalidInput(format!(
                "{what} holds token id {bad}, outside the vocabulary of {} tokens",
                self.cfg.vocab_size
            )));
        }
        let end = self.len + ids.len();
        if end > self.kv.capacity {
            return Err(Error::InvalidInput(format!(
                "{what} would reach position {end}, over the context of {} positions this backend was sized for \
                 ({} already in the cache, {} new)",
                self.kv.capacity,
                self.len,
                ids.len()
            )));
        }
        Ok(())
    }

    fn upload_ids(&mut self, ids: &[u32]) -> Result<()> {
        let as_i32: Vec<i32> = ids.iter().map(|&i| i as i32).collect();
        let dst = self.ws.ids.sub(0, 4 * ids.len()).map_err(cuda)?;
        self.exec.upload(dst, &as_i32).map_err(cuda)
    }

    /// Runs a decoder pass whose inputs are already in the workspace.
    fn run_denoise(&mut self, key: DenoiseKey) -> Result<()> {
        if !self.options.record {
            let steps = self.planner().denoise(key.tokens, key.pos0, key.self_conditioning)?;
            // SAFETY: the planner only addresses regions of this backend, alive as long as `self`.
            return unsafe { self.exec.run(&steps) }.map_err(cuda);
        }
        let graph = match self.recorded.get(&key) {
            Some(&g) => g,
            None => {
                let steps = self.planner().denoise(key.tokens, key.pos0, key.self_conditioning)?;
                // SAFETY: as above; recordings are dropped before the regions (with `self`).
                let g = unsafe { self.exec.record(&steps) }.map_err(cuda)?;
                self.recorded.insert(key, g);
                g
            }
        };
        self.replays += 1;
        self.exec.replay(graph).map_err(cuda)
    }

    fn forget_recordings(&mut self) {
        self.recorded.clear();
        self.exec.forget_recordings();
    }

    /// Benchmarks: queues one decoder pass of `tokens` rows over whatever the workspace holds
    /// (no upload, no download, no sync), recording it on first use.
    pub fn queue_denoise(&mut self, tokens: usize, self_conditioning: bool) -> Result<()> {
        self.run_denoise(DenoiseKey { tokens, pos0: self.len, self_conditioning })
    }

    /// Benchmarks: queues one encoder pass of `tokens` rows of `ws.ids` at the cache's end and
    /// advances the cache (no upload, no sync).
    pub fn queue_encode(&mut self, tokens: usize) -> Result<()> {
        let steps = self.planner().encode(tokens, self.len)?;
        // SAFETY: the planner only addresses regions of this backend.
        unsafe { self.exec.run(&steps) }.map_err(cuda)?;
        self.len += tokens;
        self.forget_recordings();
        Ok(())
    }

    /// Benchmarks: declares the first `len` cache positions filled (with whatever they hold), so
    /// a step at a long context can be timed without encoding that context first.
    pub fn assume_cache_len(&mut self, len: usize) -> Result<()> {
        if len > self.kv.capacity {
            return Err(Error::InvalidInput(format!("{len} positions exceed the cache's {}", self.kv.capacity)));
        }
        self.len = len;
        self.forget_recordings();
        Ok(())
    }

    /// Bytes of executor memory held by the cache for one position over all layers.
    pub fn kv_bytes_per_position(&self) -> usize {
        KvCache::bytes_per_position(&self.cfg)
    }
}

impl<X: Executor> Backend for GpuBackend<X> {
    fn name(&self) -> &str {
        NAME
    }

    fn cache_len(&self) -> usize {
        self.len
    }

    fn reset(&mut self) {
        self.len = 0;
        self.forget_recordings();
    }

    fn encode(&mut self, ids: &[u32]) -> Result<()> {
        self.check_ids(ids, "the encoder input")?;
        for chunk in ids.chunks(self.ws.max_tokens) {
            self.upload_ids(chunk)?;
            let steps = self.planner().encode(chunk.len(), self.len)?;
            // SAFETY: the planner only addresses regions of this backend.
            unsafe { self.exec.run(&steps) }.map_err(cuda)?;
            self.len += chunk.len();
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
        self.upload_ids(canvas)?;
        if let Some(sc) = sc_logits {
            if sc.len() != c * v {
                return Err(Error::InvalidInput(format!(
                    "self-conditioning logits hold {} floats, the canvas needs {c} x {v}",
                    sc.len()
                )));
            }
            let narrow: Vec<bf16> = sc.iter().map(|&x| bf16::from_f32(x)).collect();
            let dst = self.ws.sc_logits.sub(0, 2 * c * v).map_err(cuda)?;
            self.exec.upload(dst, &narrow).map_err(cuda)?;
        }
        self.run_denoise(DenoiseKey { tokens: c, pos0: self.len, self_conditioning: sc_logits.is_some() })?;
        let src = self.ws.logits.sub(0, 4 * c * v).map_err(cuda)?;
        self.exec.download_bytes(src, bytemuck::cast_slice_mut(logits)).map_err(cuda)
    }
}
