//! [`GpuBackend`]: the CUDA implementation of [`dgemma_model::Backend`], over any [`Executor`].
//!
//! Everything is allocated at construction: the weights, a workspace for passes of
//! `max_tokens` rows, the full layers' KV page pool ([`KvPool`], `kv_cache.rs`) and one sequence
//! (its sliding-layer KV rings for `context` positions, page table, decoder inputs);
//! [`GpuBackend::add_sequence`] adds more, and the [`Backend`] methods act on the selected one.
//! A sequence takes pool pages as its cache grows and gives them back when released
//! ([`GpuBackend::release_pages`]; a reset keeps them); out of pages is [`Error::OutOfMemory`] for
//! that sequence alone ([`GpuBackend::reserve`] takes them up
//! front, which is how a server admits a request only when it can finish). A decoder pass is
//! planned per (sequences, canvas length, positions, self-conditioning) and recorded (a CUDA
//! graph on a GPU) the second time that key comes (`GpuOptions::record_after`: a batch
//! composition that never comes back is not worth a capture); the steps of a canvas replay the
//! recording after copying in the canvas and the self-conditioning logits. A sequence's recordings are dropped when its cache moves (every
//! commit) or takes pages, since positions and pages are part of the plan.
//!
//! Batching: a decoder pass may take several sequences' canvases at once (up to
//! `max_batch`), stacked in the workspace rows, so the weights are read once for all of them
//! ([`GpuBackend::step_batch`], [`GpuBackend::queue_denoise_batch`]); each row's result is
//! bit-identical to a pass over its sequence alone.
//!
//! [`DeviceSampling`] (`device_sampling.rs`): with on-device sampling a recording holds the
//! decoder pass followed by each sequence's sampler launches ([`crate::sampling`]), which write
//! its next canvas and next self-conditioning input where the pass reads them; a step is a
//! 32-byte params upload per sequence, a replay and a 16-byte status read per sequence.

use std::collections::HashMap;

use dgemma_cuda::Executor;
use dgemma_model::config::TextConfig;
use dgemma_model::error::{Error, Result};
use dgemma_model::weights::ModelWeights;
use dgemma_model::quant::Quant;
use dgemma_model::{Backend, DeviceCanvas, DeviceSampling};
use half::bf16;

use crate::error::{backend_error, cuda, NAME};
use crate::kernels::Kernels;
use crate::kv_cache::{KvCache, KvPool, DEFAULT_PAGE};
use crate::plan::{DecoderInputs, DecoderSegment, Planner, Segment, Workspace};
use crate::sampling::{plan_sampler_step, SamplerBuffers, SamplerState};

mod device_sampling;
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
    /// With `record`, a decoder pass is recorded the `record_after`-th time its key (the
    /// sequences, positions, canvas lengths and self-conditioning flags of its canvases) comes,
    /// and runs launch by launch before that: a batch composition that does not come back costs
    /// no capture (1: record on first use).
    pub record_after: u32,
    /// Most canvases (sequences) one decoder pass takes; the vocab-wide buffers are sized for
    /// `max_batch * canvas` rows.
    pub max_batch: usize,
    /// Sequences the KV page pool is sized for when `kv_pages` is `None` (at least `max_batch`).
    pub max_sequences: usize,
    /// Positions per page of the full layers' KV pool.
    pub kv_page: usize,
    /// Pages in the KV pool; `None`: enough for `max_sequences` sequences of `context`
    /// positions, fewer when the executor's free memory (minus a headroom and the other
    /// sequences' fixed buffers) does not hold them.
    pub kv_pages: Option<usize>,
    /// How [`GpuBackend::new`] uploads float experts: [`Quant::Fp8`] quantises them per output
    /// row while uploading, one tensor at a time (load the checkpoint with `Quant::None` then:
    /// the host never holds every expert's codes). FP8 experts go as they are either way.
    pub expert_quant: Quant,
}

impl GpuOptions {
    pub fn new(context: usize, canvas: usize) -> GpuOptions {
        GpuOptions {
            context,
            canvas,
            prefill_chunk: canvas.max(512),
            record: true,
            record_after: 2,
            max_batch: 1,
            max_sequences: 1,
            kv_page: DEFAULT_PAGE,
            kv_pages: None,
            expert_quant: Quant::None,
        }
    }
}

/// Device memory the automatic pool sizing leaves free (CUDA graphs, library workspaces).
const POOL_HEADROOM: usize = 1 << 30;

fn check_options(cfg: &TextConfig, options: &GpuOptions) -> Result<()> {
    if options.canvas == 0
        || options.prefill_chunk == 0
        || options.context == 0
        || options.max_batch == 0
        || options.kv_page == 0
    {
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

/// One sequence's part of a recorded decoder pass.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct SegmentKey {
    seq: usize,
    tokens: usize,
    pos0: usize,
    self_conditioning: bool,
}

/// Key of a recorded decoder pass: its sequences in row order, and whether the sampler
/// launches follow (on-device sampling).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct PassKey {
    segments: Vec<SegmentKey>,
    sample: bool,
}

/// A decoder pass key's state ([`GpuOptions::record_after`]).
#[derive(Clone, Copy, Debug)]
enum Recording {
    /// Ran this many times launch by launch.
    Seen(u32),
    /// Recorded: the executor's handle.
    Graph(usize),
}

/// What one sequence keeps on the executor: its KV cache, its decoder inputs and sampler state.
struct Sequence {
    kv: KvCache,
    len: usize,
    inputs: DecoderInputs,
    sampler: SamplerState,
    /// The canvas being denoised on the device and the workspace row its last step's argmax
    /// starts at (set by `begin_canvas`, cleared whenever the cache or the decoder inputs change
    /// underneath it).
    device_canvas: Option<DeviceCanvasState>,
}

#[derive(Clone, Copy, Debug)]
struct DeviceCanvasState {
    settings: DeviceCanvas,
    tokens: usize,
    /// Row of the last step's argmax in the sampler scratch and the pass that wrote it (None
    /// before the first step). A later pass overwrites the scratch.
    argmax_row0: Option<(usize, u64)>,
}

impl Sequence {
    fn new(cfg: &TextConfig, exec: &mut dyn Executor, pool: &KvPool, options: &GpuOptions) -> Result<Sequence> {
        // The ring holds what one pass of this sequence writes (a prompt chunk or a canvas).
        let pass_tokens = options.prefill_chunk.max(options.canvas);
        Ok(Sequence {
            kv: KvCache::new(cfg, exec, pool, options.context, pass_tokens)?,
            len: 0,
            inputs: DecoderInputs::new(cfg, exec, options.canvas)?,
            sampler: SamplerState::new(exec, options.canvas)?,
            device_canvas: None,
        })
    }

    /// Bytes [`Sequence::new`] allocates (its rings, page table, decoder inputs, sampler
    /// history; no pages).
    fn fixed_bytes(cfg: &TextConfig, options: &GpuOptions) -> usize {
        let pass_tokens = options.prefill_chunk.max(options.canvas);
        KvCache::ring_bytes(cfg, options.context, pass_tokens)
            + KvCache::table_bytes(cfg, options.context, options.kv_page)
            + DecoderInputs::bytes(cfg, options.canvas)
            + SamplerState::bytes(options.canvas)
    }
}

/// Pages of the KV pool when the options leave it to the backend: `max_sequences` sequences of
/// `context` positions, or what the free memory holds after a headroom and the other sequences'
/// fixed buffers.
fn pool_pages(cfg: &TextConfig, exec: &dyn Executor, options: &GpuOptions) -> usize {
    if let Some(n) = options.kv_pages {
        return n;
    }
    let sequences = options.max_sequences.max(options.max_batch);
    let want = sequences * options.context.div_ceil(options.kv_page);
    let page_bytes = KvPool::page_bytes(cfg, options.kv_page).max(1);
    match exec.available_bytes() {
        None => want,
        Some(free) => {
            let fixed = sequences * Sequence::fixed_bytes(cfg, options);
            let headroom = POOL_HEADROOM.min(free / 8);
            (free.saturating_sub(headroom + fixed) / page_bytes).min(want)
        }
    }
}

/// The model on an executor and one or more sequences, each with its own KV cache: the
/// [`Backend`] methods act on the selected one ([`GpuBackend::select_sequence`]). Weights,
/// workspace and sampler scratch are shared, so the executor runs one pass at a time (which
/// may hold several sequences' canvases).
pub struct GpuBackend<X: Executor> {
    exec: X,
    cfg: TextConfig,
    kernels: Kernels,
    weights: DeviceWeights,
    ws: Workspace,
    /// The full layers' KV pages, shared by the sequences.
    pool: KvPool,
    seqs: Vec<Sequence>,
    /// Bytes the first sequence took ([`GpuBackend::sequence_bytes`]).
    sequence_bytes: usize,
    current: usize,
    options: GpuOptions,
    sampler: SamplerBuffers,
    /// Each decoder pass key seen since its sequences last moved: how often it ran unrecorded,
    /// or its recording.
    recorded: HashMap<PassKey, Recording>,
    /// Decoder passes run so far (what the sampler scratch was last written by).
    passes: u64,
    /// Decoder passes run by replaying a recording (for tests and stats).
    pub replays: usize,
    /// Denoising steps sampled on the device, counted per sequence.
    pub device_steps: usize,
}

impl<X: Executor> GpuBackend<X> {
    /// Uploads `weights` and allocates the cache and workspace. Refuses a model whose kernels
    /// were not compiled, and sizes that do not fit the model.
    pub fn new(mut exec: X, cfg: &TextConfig, weights: &ModelWeights, options: GpuOptions, progress: Progress) -> Result<Self> {
        check_options(cfg, &options)?;
        let kernels = Kernels::resolve(cfg, &exec)?;
        let weights = DeviceWeights::upload(cfg, weights, &mut exec, options.expert_quant, progress)?;
        Self::with_weights(exec, cfg, kernels, weights, options)
    }

    /// A backend on random weights of `cfg`'s shapes, generated in executor memory (benchmarks:
    /// the full-size model without a checkpoint). Its outputs mean nothing.
    pub fn synthetic(exec: X, cfg: &TextConfig, seed: u64, options: GpuOptions, progress: Progress) -> Result<Self> {
        Self::synthetic_quant(exec, cfg, seed, Quant::None, options, progress)
    }

    /// [`GpuBackend::synthetic`] with the experts held as `quant` says (FP8: random e4m3 codes
    /// and row scales; the FP8 grouped GEMMs run them).
    pub fn synthetic_quant(
        mut exec: X,
        cfg: &TextConfig,
        seed: u64,
        quant: Quant,
        options: GpuOptions,
        progress: Progress,
    ) -> Result<Self> {
        check_options(cfg, &options)?;
        let kernels = Kernels::resolve(cfg, &exec)?;
        let weights = DeviceWeights::synthetic_quant(cfg, &mut exec, seed, quant, progress)?;
        Self::with_weights(exec, cfg, kernels, weights, options)
    }

    fn with_weights(mut exec: X, cfg: &TextConfig, kernels: Kernels, weights: DeviceWeights, options: GpuOptions) -> Result<Self> {
        let decoder_rows = options.max_batch * options.canvas;
        // An encoder pass of a prompt chunk, or a batch of canvases with one sequence's chunk
        // (or commits) encoded in the same pass (`step_mixed`).
        let max_tokens = options.prefill_chunk.max(options.canvas) + decoder_rows;
        let ws = Workspace::new(cfg, &mut exec, max_tokens, decoder_rows, options.canvas, options.context)?;
        let pages = pool_pages(cfg, &exec, &options);
        if pages == 0 && KvPool::page_bytes(cfg, options.kv_page) > 0 {
            return Err(Error::OutOfMemory {
                backend: NAME.into(),
                msg: format!(
                    "no memory is left for the KV page pool after the weights and the workspace ({} bytes allocated, {} \
                     available): lower max_batch / max_sequences or the context, or set kv_pages",
                    exec.allocated_bytes(),
                    exec.available_bytes().map_or("unbounded".into(), |b| b.to_string())
                ),
            });
        }
        let pool = KvPool::new(cfg, &mut exec, options.kv_page, pages)?;
        let before = exec.allocated_bytes();
        let first = Sequence::new(cfg, &mut exec, &pool, &options)?;
        let sequence_bytes = exec.allocated_bytes() - before;
        let sampler = SamplerBuffers::new(&mut exec, decoder_rows, options.max_batch)?;
        Ok(GpuBackend {
            exec,
            cfg: cfg.clone(),
            kernels,
            weights,
            ws,
            pool,
            seqs: vec![first],
            sequence_bytes,
            current: 0,
            options,
            sampler,
            recorded: HashMap::new(),
            passes: 0,
            replays: 0,
            device_steps: 0,
        })
    }

    /// Adds a sequence (its KV rings and page table for `options.context` positions, decoder
    /// inputs and sampler state; pool pages come as its cache grows) and returns its index; the
    /// selection does not change. Out of memory is an error naming the buffer.
    pub fn add_sequence(&mut self) -> Result<usize> {
        self.add_sequence_with_context(self.options.context)
    }

    /// [`add_sequence`](Self::add_sequence) with a cache for `context` positions (at most
    /// `options.context`): short requests, or benchmarks, need less memory.
    pub fn add_sequence_with_context(&mut self, context: usize) -> Result<usize> {
        if context == 0 || context > self.options.context {
            return Err(Error::InvalidArgument(format!(
                "a sequence of {context} positions: this backend was sized for 1..={}",
                self.options.context
            )));
        }
        let options = GpuOptions { context, ..self.options };
        let mark = self.exec.allocation_mark();
        match Sequence::new(&self.cfg, &mut self.exec, &self.pool, &options) {
            Ok(seq) => {
                self.seqs.push(seq);
                Ok(self.seqs.len() - 1)
            }
            Err(e) => {
                // Out of memory half way: give back the buffers this sequence got, so a server
                // that retries once memory is freed does not leak them.
                // SAFETY: nothing refers to the failed sequence's regions (never returned).
                unsafe { self.exec.release_since(mark) };
                Err(e)
            }
        }
    }

    /// Makes sequence `index` the one the [`Backend`] methods act on.
    pub fn select_sequence(&mut self, index: usize) -> Result<()> {
        self.check_sequence(index)?;
        self.current = index;
        Ok(())
    }

    fn check_sequence(&self, index: usize) -> Result<()> {
        if index >= self.seqs.len() {
            return Err(Error::InvalidArgument(format!(
                "sequence {index} does not exist (this backend holds {})",
                self.seqs.len()
            )));
        }
        Ok(())
    }

    /// Device bytes one more sequence takes besides its pool pages (its KV rings, page table,
    /// decoder inputs and sampler state): what [`add_sequence`](Self::add_sequence) allocates.
    pub fn sequence_bytes(&self) -> usize {
        self.sequence_bytes
    }

    /// Device bytes [`add_sequence`](Self::add_sequence) allocates under `options`, computed
    /// without allocating (what the automatic KV pool sizing sets aside per sequence).
    pub fn sequence_bytes_for(cfg: &TextConfig, options: &GpuOptions) -> usize {
        Sequence::fixed_bytes(cfg, options)
    }

    /// Makes the selected sequence's positions `0..positions` addressable now, taking the pool
    /// pages they need: a server calls it when it admits a request, so that the request cannot
    /// run out of pages half way. Out of pages is [`Error::OutOfMemory`] (nothing is taken).
    pub fn reserve(&mut self, positions: usize) -> Result<()> {
        self.ensure_positions(self.current, positions)
    }

    /// Empties the selected sequence's cache and gives its pool pages back (a server does when a
    /// request ends; [`Backend::reset`] keeps them).
    pub fn release_pages(&mut self) {
        Backend::reset(self);
        let seq = &mut self.seqs[self.current];
        seq.kv.release(&mut self.pool);
    }

    /// Sequence `seq`'s cache holds positions `0..end` (pages taken as needed; its recordings
    /// are dropped when pages were, their plans named the old page list).
    fn ensure_positions(&mut self, seq: usize, end: usize) -> Result<()> {
        let s = &mut self.seqs[seq];
        if s.kv.grow(&mut self.exec, &mut self.pool, end)? {
            self.forget_recordings_of(seq);
        }
        Ok(())
    }

    /// The pool pages the selected sequence holds, in position order.
    pub fn kv_page_list(&self) -> &[u32] {
        self.seq().kv.pages()
    }

    /// The KV pool: (free pages, pages, positions per page, bytes per page).
    pub fn kv_pages(&self) -> (usize, usize, usize, usize) {
        let p = &self.pool;
        (p.free_pages(), p.pages, p.page, KvPool::page_bytes(&self.cfg, p.page))
    }

    /// Device bytes allocated so far (weights, workspace, every sequence).
    pub fn allocated_bytes(&self) -> usize {
        self.exec.allocated_bytes()
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
        Planner { cfg: &self.cfg, kernels: &self.kernels, weights: &self.weights, ws: &self.ws }
    }

    fn check_ids(&self, ids: &[u32], what: &str) -> Result<()> {
        self.check_ids_of(self.current, ids, what)
    }

    /// `ids` are in the vocabulary and fit sequence `seq`'s context after its cache.
    fn check_ids_of(&self, seq: usize, ids: &[u32], what: &str) -> Result<()> {
        if let Some(&bad) = ids.iter().find(|&&id| id as usize >= self.cfg.vocab_size) {
            return Err(Error::InvalidInput(format!(
                "{what} holds token id {bad}, outside the vocabulary of {} tokens",
                self.cfg.vocab_size
            )));
        }
        let (len, context) = (self.seqs[seq].len, self.seqs[seq].kv.context);
        let end = len + ids.len();
        if end > context {
            return Err(Error::InvalidInput(format!(
                "{what} would reach position {end}, over the context of {context} positions this backend was sized for \
                 ({len} already in the cache, {} new)",
                ids.len()
            )));
        }
        Ok(())
    }

    fn check_canvas_len(&self, c: usize) -> Result<()> {
        if c == 0 || c > self.options.canvas {
            return Err(Error::InvalidInput(format!(
                "a canvas of {c} tokens: this backend was sized for 1..={}",
                self.options.canvas
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

    /// The steps of a decoder pass (and of each sequence's sampler after it), with the encoder
    /// segments `encodes` (sequence, tokens at its cache's end) in the same pass.
    fn pass_steps(&self, key: &PassKey, encodes: &[(usize, usize)]) -> Result<Vec<dgemma_cuda::Step>> {
        let dsegs: Vec<DecoderSegment> = key
            .segments
            .iter()
            .map(|g| {
                let seq = &self.seqs[g.seq];
                DecoderSegment {
                    seg: Segment { kv: &seq.kv, pos0: g.pos0, tokens: g.tokens },
                    inputs: seq.inputs,
                    self_conditioning: g.self_conditioning,
                }
            })
            .collect();
        let esegs: Vec<Segment> = encodes
            .iter()
            .map(|&(seq, tokens)| Segment { kv: &self.seqs[seq].kv, pos0: self.seqs[seq].len, tokens })
            .collect();
        // A host-sampled pass reads fp32 logits back; a device-sampled one keeps the bf16 ones.
        let mut steps = self.planner().mixed(&dsegs, &esegs, !key.sample)?;
        if key.sample {
            let mut row0 = 0;
            for (slot, g) in key.segments.iter().enumerate() {
                let seq = &self.seqs[g.seq];
                steps.extend(plan_sampler_step(&self.planner(), &self.sampler, seq.inputs, seq.sampler, slot, row0, g.tokens)?);
                row0 += g.tokens;
            }
        }
        Ok(steps)
    }

    /// Runs a decoder pass whose inputs are already in the sequences' buffers (and the encoder
    /// ids of `encodes`, if any, in `ws.ids` after the canvases' rows: such a pass is planned
    /// and run afresh, its composition rarely repeats).
    fn run_pass(&mut self, key: PassKey, encodes: &[(usize, usize)]) -> Result<()> {
        if key.segments.len() > self.options.max_batch {
            return Err(Error::InvalidInput(format!(
                "a decoder pass over {} canvases: this backend was sized for at most {} (GpuOptions::max_batch)",
                key.segments.len(),
                self.options.max_batch
            )));
        }
        for g in &key.segments {
            self.ensure_positions(g.seq, g.pos0 + g.tokens)?;
        }
        for &(seq, tokens) in encodes {
            self.ensure_positions(seq, self.seqs[seq].len + tokens)?;
        }
        self.passes += 1;
        if !self.options.record || !encodes.is_empty() {
            let steps = self.pass_steps(&key, encodes)?;
            // SAFETY: the planner only addresses regions of this backend, alive as long as `self`.
            return unsafe { self.exec.run(&steps) }.map_err(cuda);
        }
        let graph = match self.recorded.get(&key).copied() {
            Some(Recording::Graph(g)) => g,
            seen => {
                let runs = match seen {
                    Some(Recording::Seen(n)) => n,
                    _ => 0,
                };
                let steps = self.pass_steps(&key, &[])?;
                if runs + 1 < self.options.record_after {
                    self.recorded.insert(key, Recording::Seen(runs + 1));
                    // SAFETY: as above.
                    return unsafe { self.exec.run(&steps) }.map_err(cuda);
                }
                // SAFETY: as above; recordings are dropped before the regions (with `self`).
                let g = unsafe { self.exec.record(&steps) }.map_err(cuda)?;
                self.recorded.insert(key, Recording::Graph(g));
                g
            }
        };
        self.replays += 1;
        self.exec.replay(graph).map_err(cuda)
    }

    /// The key of a decoder pass over `seqs` (each at its cache's end, `tokens` rows).
    fn pass_key(&self, seqs: &[usize], tokens: usize, self_conditioning: impl Fn(usize) -> bool, sample: bool) -> Result<PassKey> {
        let mut segments = Vec::with_capacity(seqs.len());
        for (i, &seq) in seqs.iter().enumerate() {
            self.check_sequence(seq)?;
            if seqs[..i].contains(&seq) {
                return Err(Error::InvalidArgument(format!("sequence {seq} appears twice in one decoder pass")));
            }
            segments.push(SegmentKey { seq, tokens, pos0: self.seqs[seq].len, self_conditioning: self_conditioning(i) });
        }
        Ok(PassKey { segments, sample })
    }

    /// Drops the recordings that involve the selected sequence (their positions are stale
    /// once its cache moves) and its device canvas.
    fn forget_recordings(&mut self) {
        self.seqs[self.current].device_canvas = None;
        self.forget_recordings_of(self.current);
    }

    /// Drops the recordings that involve sequence `seq`.
    fn forget_recordings_of(&mut self, seq: usize) {
        let exec = &mut self.exec;
        self.recorded.retain(|key, r| {
            let keep = key.segments.iter().all(|s| s.seq != seq);
            if let (false, Recording::Graph(g)) = (keep, r) {
                exec.forget(*g);
            }
            keep
        });
    }

    /// Benchmarks: queues one decoder pass of `tokens` rows of the selected sequence over
    /// whatever its inputs hold (no upload, no download, no sync), recording it on first use.
    pub fn queue_denoise(&mut self, tokens: usize, self_conditioning: bool) -> Result<()> {
        self.queue_denoise_batch(&[self.current], tokens, self_conditioning)
    }

    /// Benchmarks: queues one batched denoising step over the canvases (`tokens` rows each) of
    /// the sequences `seqs`, each at its cache's end, recording it on first use: the decoder
    /// pass and the device sampler after it (row statistics, draw, next canvas, the next step's
    /// soft embedding), what a step of generation runs. Call [`bench_sampler_params`]
    /// (Self::bench_sampler_params) first: the sampler reads its params from the batch slots.
    pub fn queue_denoise_batch(&mut self, seqs: &[usize], tokens: usize, self_conditioning: bool) -> Result<()> {
        let key = self.pass_key(seqs, tokens, |_| self_conditioning, true)?;
        self.run_pass(key, &[])
    }

    /// Benchmarks: [`queue_denoise_batch`](Self::queue_denoise_batch) with sequence `encode.0`'s
    /// next `encode.1` positions encoded in the same pass (a commit riding along a batched step,
    /// as `step_mixed` runs it: planned afresh, not recorded), over whatever `ws.ids` holds after
    /// the canvases' rows. The encoding sequence's cache does not advance, so it can repeat.
    pub fn queue_denoise_mixed(&mut self, seqs: &[usize], tokens: usize, self_conditioning: bool, encode: (usize, usize)) -> Result<()> {
        self.check_sequence(encode.0)?;
        if seqs.contains(&encode.0) || encode.1 == 0 || encode.1 > self.options.prefill_chunk.max(self.options.canvas) {
            return Err(Error::InvalidArgument(format!("a mixed bench pass encoding {encode:?} next to {seqs:?}")));
        }
        let key = self.pass_key(seqs, tokens, |_| self_conditioning, true)?;
        self.run_pass(key, &[encode])
    }

    /// Benchmarks: host milliseconds to plan one decoder pass (with the sampler) of the selected
    /// sequence's canvas at its cache's end, and to record it (a CUDA graph: capture and
    /// instantiation); the recording is dropped. What a pass key costs the first time it is
    /// recorded ([`GpuOptions::record_after`]).
    pub fn record_cost_ms(&mut self, tokens: usize, self_conditioning: bool) -> Result<(f64, f64)> {
        let key = self.pass_key(&[self.current], tokens, |_| self_conditioning, true)?;
        self.ensure_positions(self.current, self.seq().len + tokens)?;
        self.exec.synchronize().map_err(cuda)?;
        let t = std::time::Instant::now();
        let steps = self.pass_steps(&key, &[])?;
        let plan = t.elapsed().as_secs_f64() * 1e3;
        let t = std::time::Instant::now();
        // SAFETY: the planner only addresses regions of this backend; the recording is dropped
        // right away.
        let g = unsafe { self.exec.record(&steps) }.map_err(cuda)?;
        let record = t.elapsed().as_secs_f64() * 1e3;
        self.exec.forget(g);
        Ok((plan, record))
    }

    /// Benchmarks: turns recording on or off ([`GpuOptions::record`]): off, every decoder pass
    /// runs launch by launch.
    pub fn set_recording(&mut self, on: bool) {
        self.options.record = on;
    }

    /// Benchmarks: fills every batch slot's sampler params with a valid mid-canvas step
    /// (transformers' default thresholds, T = 0.5, early stopping off), so timed steps run the
    /// sampler on real values.
    pub fn bench_sampler_params(&mut self) -> Result<()> {
        let p = dgemma_cuda::ops::SamplerParams {
            seed: 0x5EED,
            block: 0,
            step: 1,
            temperature: 0.5,
            entropy_bound: 0.1,
            confidence_threshold: f32::NEG_INFINITY,
            stability_threshold: 1,
        };
        let all = vec![p; self.sampler.slots];
        self.sampler.write_params(&mut self.exec, &all)
    }

    /// Benchmarks: queues one encoder pass of `tokens` rows of `ws.ids` at the selected
    /// sequence's cache end and advances it (no upload, no sync).
    pub fn queue_encode(&mut self, tokens: usize) -> Result<()> {
        self.ensure_positions(self.current, self.seq().len + tokens)?;
        let steps = self.planner().encode(&self.seq().kv, tokens, self.seq().len)?;
        // SAFETY: the planner only addresses regions of this backend.
        unsafe { self.exec.run(&steps) }.map_err(cuda)?;
        self.seq_mut().len += tokens;
        self.forget_recordings();
        Ok(())
    }

    /// Benchmarks: declares the selected sequence's first `len` cache positions filled (with
    /// whatever they hold), so a step at a long context can be timed without encoding it first.
    pub fn assume_cache_len(&mut self, len: usize) -> Result<()> {
        self.ensure_positions(self.current, len)?;
        self.seq_mut().len = len;
        self.forget_recordings();
        Ok(())
    }

    /// Bytes of K and V the selected sequence holds: its sliding rings and its pool pages.
    pub fn kv_bytes(&self) -> usize {
        self.seq().kv.held_bytes()
    }

    /// Logical rows of each layer's KV ring for the selected sequence: the fixed ring on
    /// sliding layers, the pages held x page on full layers.
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

    /// Empties the selected sequence's cache. Its pool pages stay with it (a reservation
    /// survives the generation loop's reset before a prefill); [`release_pages`]
    /// (GpuBackend::release_pages) gives them back.
    fn reset(&mut self) {
        self.seq_mut().len = 0;
        self.forget_recordings();
    }

    fn encode(&mut self, ids: &[u32]) -> Result<()> {
        self.check_ids(ids, "the encoder input")?;
        self.ensure_positions(self.current, self.seq().len + ids.len())?;
        let chunk_len = self.options.prefill_chunk.max(self.options.canvas);
        for chunk in ids.chunks(chunk_len) {
            self.upload_ids(self.ws.ids, chunk)?;
            let steps = self.planner().encode(&self.seq().kv, chunk.len(), self.seq().len)?;
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
        self.check_canvas_len(c)?;
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
            // Staged as bf16 in the LM head's output rows (free until this pass's LM head),
            // then turned into the sequence's soft embedding by the device path's own kernels.
            let narrow: Vec<bf16> = sc.iter().map(|&x| bf16::from_f32(x)).collect();
            let dst = self.ws.logits_bf16.sub(0, 2 * c * v).map_err(cuda)?;
            self.exec.upload(dst, &narrow).map_err(cuda)?;
            let steps = self.planner().soft_from_host_logits(c, inputs.soft)?;
            // SAFETY: the planner only addresses regions of this backend.
            unsafe { self.exec.run(&steps) }.map_err(cuda)?;
        }
        // The host path overwrites the canvas and self-conditioning inputs of a device canvas.
        self.seq_mut().device_canvas = None;
        let key = self.pass_key(&[self.current], c, |_| sc_logits.is_some(), false)?;
        self.run_pass(key, &[])?;
        let src = self.ws.logits.sub(0, 4 * c * v).map_err(cuda)?;
        self.exec.download_bytes(src, bytemuck::cast_slice_mut(logits)).map_err(cuda)
    }

    fn device_sampling(&mut self) -> Option<&mut dyn DeviceSampling> {
        Some(self)
    }
}
