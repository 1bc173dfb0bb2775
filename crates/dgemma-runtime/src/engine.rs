//! [`Engine`]: loads a model once and serves many requests through a scheduler thread.

use crate::error::{Result, RuntimeError};
use dgemma_engine::{Generator, Pass};
use dgemma_sampler::SeededNoise;
use crate::request::{PreparedRequest, Prompt, Request};
use dgemma::gpu::{Executor, GpuBackend, GpuExecutor, GpuOptions, SharedBackend, SharedModel};
use dgemma_model::DeviceStepStatus;
use dgemma_cpu::CpuBackend;
use dgemma_engine::generate::{FinishReason, GenerationSettings, GenerationStats, Observer};
use dgemma_model::checkpoint::Checkpoint;
use dgemma_model::config::{ModelConfig, TextConfig};
use dgemma_model::generation::GenerationConfig;
use dgemma_model::quant::Quant;
use dgemma_model::tensor::DType;
use dgemma_model::weights::ModelWeights;
use dgemma_model::{Backend, Precision};
use dgemma_tokenizer::{chat_prompt_ids, raw_prompt_ids, ChatTemplate, StreamDecoder, Tokenizer};
use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender, TryRecvError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Checkpoints at least this large get their pages read in at load.
const PREFETCH_BYTES: u64 = 1 << 30;

/// Which executor runs the forward passes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum BackendKind {
    /// The CPU reference backend (`dgemma-cpu`).
    #[default]
    Cpu,
    /// The CUDA backend (`dgemma-gpu`) on GPU `EngineOptions::cuda_device`: the weights are
    /// uploaded once and every request gets its own KV cache on the device (bf16 only). Needs a
    /// build with the CUDA kernels and a GPU.
    Cuda,
    /// The CUDA backend's exact plans on the CPU kernel emulator (feature `emulator`): tests of
    /// the GPU serving path without a GPU. Very slow; tiny models only.
    #[cfg(feature = "emulator")]
    Emulator,
}

/// How to load and run the engine.
#[derive(Clone, Debug)]
pub struct EngineOptions {
    pub backend: BackendKind,
    /// Numeric mode; `None` picks bf16 for bf16/f16 checkpoints and float32 for float32 ones.
    pub precision: Option<Precision>,
    /// Most requests generating at once. Further requests wait in a FIFO queue (admission
    /// control queues, it never rejects for load). Each active request holds one KV cache.
    pub max_concurrent: usize,
    /// [`BackendKind::Cuda`]: the GPU ordinal.
    pub cuda_device: usize,
    /// [`BackendKind::Cuda`]: positions each request's KV cache holds (prompt plus canvases);
    /// longer requests are rejected. `None`: the model's context, capped at 8192.
    pub context: Option<usize>,
    /// [`BackendKind::Cuda`]: most requests whose denoising steps share one decoder pass (the
    /// weights are read once for all of them). The workspace holds each batched canvas's bf16
    /// logits (2 bytes per position and vocabulary entry: 134 MB for the 26B model), so it
    /// grows with this.
    pub max_batch: usize,
    /// Most prompt tokens a request encodes per scheduler round: a long prompt is prefilled in
    /// chunks, and the other requests' denoising steps run between them, so a 32K-token prompt
    /// delays them by one chunk's pass, not the whole prefill. On the CUDA backend a multiple
    /// of its own encoder chunk (512) keeps the passes identical to an unchunked prefill.
    pub prefill_chunk: usize,
    /// [`BackendKind::Cuda`]: most bytes of device memory the engine allocates (weights,
    /// workspace, the KV page pool and every request's own buffers); `None`: as much as the
    /// device has. A request whose buffers do not fit waits in the queue until a running request
    /// frees its own (it fails only when nothing else is running, so it could never fit).
    pub memory_limit: Option<usize>,
    /// [`BackendKind::Cuda`]: positions per page of the KV page pool. The full-attention layers'
    /// K/V live in pages shared by every request: a request holds the pages its prompt and
    /// canvases need (taken at admission, given back when it ends), so short and long requests
    /// share the memory. The sliding layers keep a fixed window-sized ring per request.
    pub kv_page: usize,
    /// [`BackendKind::Cuda`]: pages in the KV pool; `None`: enough for `max_concurrent` requests
    /// of the whole `context`, or what the device's free memory holds after the weights, the
    /// workspace, a headroom and `max_concurrent` requests' own buffers. A request waits in the
    /// queue until the pool has its pages free (it fails only when the whole pool could not hold
    /// it).
    pub kv_pages: Option<usize>,
    /// How the MoE experts are held: [`Quant::Fp8`] quantises bf16/f32 experts to FP8 E4M3 with
    /// per-output-channel scales at load (weight-only; activations stay bf16), halving the bytes
    /// a denoising step reads. A compressed-tensors FP8 checkpoint's experts are FP8 either way.
    pub quant: Quant,
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions {
            backend: BackendKind::Cpu,
            precision: None,
            max_concurrent: 4,
            cuda_device: 0,
            context: None,
            max_batch: 4,
            prefill_chunk: 2048,
            memory_limit: None,
            kv_page: dgemma::gpu::kv_cache::DEFAULT_PAGE,
            kv_pages: None,
            quant: Quant::None,
        }
    }
}

/// Timing and counts of one finished request.
#[derive(Clone, Debug, Default)]
pub struct RequestStats {
    /// The generation loop's own statistics (canvases, steps per canvas, pass times).
    pub generation: GenerationStats,
    /// From `submit` until the scheduler admitted the request.
    pub queue_time: Duration,
    /// From admission until the last event (includes time spent on other requests' passes).
    pub run_time: Duration,
}

/// The final result of a request.
#[derive(Clone, Debug)]
pub struct Completion {
    /// The prompt ids the request ran with.
    pub prompt_ids: Vec<u32>,
    /// Every committed canvas (pad after the first EOS), without the prompt.
    pub ids: Vec<u32>,
    /// The text of `ids` (the concatenation of every [`Event::Canvas`] text).
    pub text: String,
    pub reason: FinishReason,
    pub stats: RequestStats,
}

/// What a [`RequestHandle`] yields. A request yields any number of `Draft` and `Canvas` events
/// and then exactly one final event: `Finished`, `Cancelled` or `Error`.
#[derive(Clone, Debug)]
pub enum Event {
    /// After every denoising step, when the request asked for drafts: the argmax canvas.
    Draft {
        block: usize,
        step: usize,
        ids: Vec<u32>,
        accepted: usize,
    },
    /// A committed canvas (pad after the first EOS) and the text that became complete with it.
    Canvas {
        index: usize,
        ids: Vec<u32>,
        text: String,
    },
    /// The request finished.
    Finished(Completion),
    /// The request was cancelled; its KV cache is freed.
    Cancelled,
    /// The request failed (or the engine shut down); other requests are not affected.
    Error(RuntimeError),
}

impl Event {
    /// True for `Finished`, `Cancelled` and `Error`.
    pub fn is_final(&self) -> bool {
        matches!(
            self,
            Event::Finished(_) | Event::Cancelled | Event::Error(_)
        )
    }
}

/// Device memory of a GPU engine ([`Engine::device_memory`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceMemory {
    /// Bytes allocated on the device now (weights, workspace, the KV page pool, the requests'
    /// own buffers built so far).
    pub allocated: usize,
    /// Bytes one more concurrent request's own buffers take (its sliding-layer KV rings, page
    /// table, canvas and self-conditioning input), besides the KV pages it holds.
    pub per_request: usize,
    /// KV pool pages free now, and in all.
    pub kv_pages_free: usize,
    pub kv_pages: usize,
    /// Positions and bytes per KV page (K and V of every full-attention layer).
    pub kv_page: usize,
    pub kv_page_bytes: usize,
}

/// Counters of an engine since it was loaded ([`Engine::stats`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EngineStats {
    /// Requests accepted by `submit`.
    pub submitted: u64,
    /// Requests `submit` refused (invalid request).
    pub rejected: u64,
    pub completed: u64,
    pub cancelled: u64,
    pub failed: u64,
    /// Requests waiting for a slot now.
    pub queued: usize,
    /// Requests generating now.
    pub active: usize,
    /// The most requests that were generating at once.
    pub peak_active: usize,
    /// Backends (KV caches) built so far; at most `max_concurrent`, reused between requests.
    pub backends: usize,
    /// Times admission stopped because a request's KV cache did not fit in device memory (the
    /// request waited in the queue for a running one to finish).
    pub memory_waits: u64,
    pub encoder_passes: u64,
    /// Encoder passes that were prompt chunks (at most `prefill_chunk` tokens each; the rest
    /// of `encoder_passes` encode committed canvases).
    pub prefill_chunks: u64,
    /// Denoising steps run, counted per request (a batched pass counts each of its canvases).
    pub decoder_passes: u64,
    /// Decoder passes that served several requests' steps at once (GPU backends).
    pub batched_passes: u64,
    /// The most requests one batched decoder pass served.
    pub largest_batch: usize,
    /// Encoder passes (a committed canvas, or a short prompt whole) that rode along a batched
    /// decoder pass instead of reading the weights again (GPU backends; counted in
    /// `encoder_passes` too).
    pub merged_encodes: u64,
    pub canvases: u64,
    /// Non-pad tokens committed by finished requests.
    pub new_tokens: u64,
    /// Time the scheduler spent running passes.
    pub busy_time: Duration,
}

/// Cancels a request from any thread (cheap to clone).
#[derive(Clone, Debug)]
pub struct CancelToken(Arc<AtomicBool>);

impl CancelToken {
    pub fn cancel(&self) {
        self.0.store(true, Ordering::Release);
    }

    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
}

/// A submitted request: its event stream and its cancel switch.
///
/// Dropping the handle before the final event cancels the request.
pub struct RequestHandle {
    id: u64,
    events: Receiver<Event>,
    cancel: CancelToken,
    done: bool,
}

impl RequestHandle {
    /// The engine-wide id of the request (1, 2, ...).
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Asks the scheduler to stop the request. It stops before its next forward pass, frees its
    /// KV cache and sends [`Event::Cancelled`] (unless it already finished).
    pub fn cancel(&self) {
        self.cancel.cancel();
    }

    /// A token that cancels this request from another thread.
    pub fn cancel_token(&self) -> CancelToken {
        self.cancel.clone()
    }

    /// The next event, waiting for it; `None` after the final event.
    pub fn next_event(&mut self) -> Option<Event> {
        if self.done {
            return None;
        }
        let e = self
            .events
            .recv()
            .unwrap_or(Event::Error(RuntimeError::ShutDown));
        self.done = e.is_final();
        Some(e)
    }

    /// The next event if one arrives within `timeout`; `Ok(None)` after the final event,
    /// `Err(())` on timeout.
    #[allow(clippy::result_unit_err)]
    pub fn next_event_timeout(
        &mut self,
        timeout: Duration,
    ) -> std::result::Result<Option<Event>, ()> {
        if self.done {
            return Ok(None);
        }
        let e = match self.events.recv_timeout(timeout) {
            Ok(e) => e,
            Err(RecvTimeoutError::Timeout) => return Err(()),
            Err(RecvTimeoutError::Disconnected) => Event::Error(RuntimeError::ShutDown),
        };
        self.done = e.is_final();
        Ok(Some(e))
    }

    /// An event that is already waiting, without blocking.
    pub fn try_next_event(&mut self) -> Option<Event> {
        if self.done {
            return None;
        }
        let e = match self.events.try_recv() {
            Ok(e) => e,
            Err(TryRecvError::Empty) => return None,
            Err(TryRecvError::Disconnected) => Event::Error(RuntimeError::ShutDown),
        };
        self.done = e.is_final();
        Some(e)
    }

    /// Waits for the end of the request, skipping the streamed events.
    pub fn wait(mut self) -> Result<Completion> {
        while let Some(e) = self.next_event() {
            match e {
                Event::Finished(c) => return Ok(c),
                Event::Cancelled => return Err(RuntimeError::Cancelled),
                Event::Error(e) => return Err(e),
                Event::Draft { .. } | Event::Canvas { .. } => {}
            }
        }
        Err(RuntimeError::ShutDown)
    }
}

impl Iterator for RequestHandle {
    type Item = Event;
    fn next(&mut self) -> Option<Event> {
        self.next_event()
    }
}

impl Drop for RequestHandle {
    fn drop(&mut self) {
        if !self.done {
            self.cancel.cancel();
        }
    }
}

/// The model, loaded once and shared by every request.
struct Model {
    dir: PathBuf,
    /// The text config and the memory-mapped weights, for the CPU backend's per-request
    /// backends (`None` on a GPU: the weights live on the device).
    cpu: Option<(TextConfig, ModelWeights)>,
    tokenizer: Tokenizer,
    /// Whether committed canvases are decoded to text: false only for a synthetic model whose
    /// vocabulary is larger than the tokenizer's (its ids mean nothing; events carry no text).
    decode_text: bool,
    template: Option<ChatTemplate>,
    defaults: GenerationSettings,
    precision: Precision,
    /// The weights on the GPU ([`BackendKind::Cuda`]), shared by every request's sequence.
    gpu: Option<Box<dyn SharedBackend>>,
}

/// One request's backend, and its sequence index on the shared GPU model.
struct Slot {
    backend: Box<dyn Backend + Send>,
    seq: Option<usize>,
}

impl Model {
    /// A backend for one request. On the GPU this allocates a KV cache, which can fail: out
    /// of memory is [`NoSlot::OutOfMemory`] (the scheduler queues the request until memory is
    /// freed), anything else fails the request, never the engine.
    fn new_backend(&self) -> std::result::Result<Slot, NoSlot> {
        match &self.gpu {
            Some(gpu) => match gpu.sequence() {
                Ok((backend, seq)) => Ok(Slot { backend, seq: Some(seq) }),
                Err(e @ dgemma_model::error::Error::OutOfMemory { .. }) => Err(NoSlot::OutOfMemory(e.to_string())),
                Err(e) => Err(NoSlot::Failed(RuntimeError::Generation(e.to_string()))),
            },
            // Cheap: the big matrices stay in the shared memory map (`TensorRef` holds an `Arc`
            // of it); only the norm and router vectors are widened to f32 per backend.
            None => {
                let (text, weights) = self.cpu.as_ref().expect("a model without a GPU keeps its host weights");
                Ok(Slot { backend: Box::new(CpuBackend::new(text, weights, self.precision)), seq: None })
            }
        }
    }
}

/// Why [`Model::new_backend`] gave no backend.
enum NoSlot {
    /// The KV cache did not fit in the device memory (or the engine's memory limit).
    OutOfMemory(String),
    Failed(RuntimeError),
}

/// Refuses options no engine can run with.
fn check_options(options: &EngineOptions) -> Result<()> {
    let bad = |what: &str| Err(RuntimeError::InvalidOptions(what.into()));
    if options.max_concurrent == 0 {
        return bad("max_concurrent must be at least 1");
    }
    if options.prefill_chunk == 0 {
        return bad("prefill_chunk must be at least 1 token");
    }
    if options.backend != BackendKind::Cpu && options.max_batch == 0 {
        return bad("max_batch must be at least 1");
    }
    if options.kv_page == 0 {
        return bad("kv_page must be at least 1 position");
    }
    Ok(())
}

/// Where a GPU model's weights come from.
enum GpuWeights<'a> {
    /// A checkpoint's weights, uploaded.
    Checkpoint(&'a ModelWeights),
    /// Random weights of the config's shapes generated on the device from this seed, the
    /// experts in this format.
    Synthetic(u64, Quant),
}

/// Puts the weights on GPU `options.cuda_device` (bf16 only) for [`BackendKind::Cuda`] (or in
/// the emulator's memory for `BackendKind::Emulator`).
fn load_gpu(
    cfg: &ModelConfig,
    weights: GpuWeights<'_>,
    precision: Precision,
    options: &EngineOptions,
) -> std::result::Result<Box<dyn SharedBackend>, String> {
    if precision != Precision::Bf16 {
        return Err(format!(
            "the CUDA backend computes in bf16 only; {} was asked for",
            precision.name()
        ));
    }
    let context = options
        .context
        .unwrap_or(8192)
        .min(cfg.text.max_position_embeddings);
    let mut gpu_options = GpuOptions::new(context, cfg.canvas_length);
    gpu_options.max_batch = options.max_batch.clamp(1, options.max_concurrent);
    gpu_options.max_sequences = options.max_concurrent;
    gpu_options.kv_page = options.kv_page;
    gpu_options.kv_pages = options.kv_pages;
    gpu_options.expert_quant = options.quant;
    #[cfg(feature = "emulator")]
    if options.backend == BackendKind::Emulator {
        let mut exec = dgemma::gpu::EmuExecutor::new();
        exec.set_memory_limit(options.memory_limit);
        return build_gpu(exec, cfg, weights, gpu_options);
    }
    let device = dgemma::cuda::open_device(options.cuda_device).map_err(|e| e.to_string())?;
    let mut exec = GpuExecutor::new(device);
    exec.set_memory_limit(options.memory_limit);
    build_gpu(exec, cfg, weights, gpu_options)
}

fn build_gpu<X: Executor + Send + 'static>(
    exec: X,
    cfg: &ModelConfig,
    weights: GpuWeights<'_>,
    options: GpuOptions,
) -> std::result::Result<Box<dyn SharedBackend>, String> {
    let backend = match weights {
        GpuWeights::Checkpoint(w) => GpuBackend::new(exec, &cfg.text, w, options, &mut |_, _| {}),
        GpuWeights::Synthetic(seed, quant) => {
            GpuBackend::synthetic_quant(exec, &cfg.text, seed, quant, options, &mut |_, _| {})
        }
    };
    Ok(Box::new(SharedModel::new(backend.map_err(|e| e.to_string())?)))
}

struct Shared {
    model: Model,
    options: EngineOptions,
    stats: Mutex<EngineStats>,
    next_id: AtomicU64,
}

impl Shared {
    fn stats(&self) -> std::sync::MutexGuard<'_, EngineStats> {
        self.stats.lock().unwrap_or_else(|e| e.into_inner())
    }
}

struct Job {
    prepared: PreparedRequest,
    events: Sender<Event>,
    cancel: CancelToken,
    submitted: Instant,
}

enum Command {
    Submit(Box<Job>),
    Shutdown,
}

/// A loaded model and its scheduler. `Engine` is `Send + Sync`: share it (e.g. in an `Arc`)
/// and call [`submit`](Self::submit) from any thread.
///
/// ```
/// use dgemma_runtime::{Engine, EngineOptions, Event, Request};
/// # let dir = dgemma_runtime::bundled_tiny_model();
/// let engine = Engine::load(dir, EngineOptions { max_concurrent: 2, ..Default::default() })?;
///
/// // Stream one request ...
/// let mut handle = engine.submit(Request::chat("Hello!").max_new_tokens(32).seed(7))?;
/// let mut streamed = String::new();
/// while let Some(event) = handle.next_event() {
///     match event {
///         Event::Canvas { text, .. } => streamed.push_str(&text),
///         Event::Finished(done) => assert_eq!(done.text, streamed),
///         Event::Draft { .. } => {}
///         Event::Cancelled | Event::Error(_) => unreachable!(),
///     }
/// }
///
/// // ... or wait for another: the same seed gives the same ids, whatever else is running.
/// let a = engine.submit(Request::chat("Hello!").max_new_tokens(32).seed(7))?;
/// let b = engine.submit(Request::chat("Bonjour").max_new_tokens(16).seed(1))?;
/// let (a, _b) = (a.wait()?, b.wait()?);
/// assert!(a.ids.len() % 16 == 0);
///
/// // Bad requests are refused up front, with the reason.
/// let err = engine.submit(Request::ids(vec![])).err().unwrap();
/// assert!(err.to_string().contains("empty"));
/// assert_eq!(engine.stats().completed, 3);
/// # Ok::<(), dgemma_runtime::RuntimeError>(())
/// ```
pub struct Engine {
    shared: Arc<Shared>,
    commands: Sender<Command>,
    worker: Option<JoinHandle<()>>,
}

impl Engine {
    /// Loads the checkpoint, weights, tokenizer and chat template in `model_dir` once and
    /// starts the scheduler thread.
    pub fn load(model_dir: impl AsRef<Path>, options: EngineOptions) -> Result<Engine> {
        let dir = model_dir.as_ref().to_path_buf();
        check_options(&options)?;
        let load_err = |m: String| RuntimeError::Load {
            path: dir.clone(),
            message: m,
        };
        let checkpoint = Checkpoint::open(&dir).map_err(|e| load_err(e.to_string()))?;
        // A GPU engine quantises float experts while uploading them, one tensor at a time
        // (`GpuOptions::expert_quant`): the host never holds every expert's FP8 codes.
        let host_quant = if options.backend == BackendKind::Cpu { options.quant } else { Quant::None };
        let weights = ModelWeights::load_with(&checkpoint, host_quant).map_err(|e| load_err(e.to_string()))?;
        if checkpoint.total_bytes() >= PREFETCH_BYTES {
            checkpoint.prefetch(&mut |_, _| {});
        }
        let tokenizer = Tokenizer::from_dir(&dir).map_err(|e| load_err(e.to_string()))?;
        let template = ChatTemplate::from_dir(&dir).map_err(|e| load_err(e.to_string()))?;
        let precision = options
            .precision
            .unwrap_or(match weights.embed_tokens.dtype {
                DType::F32 => Precision::F32,
                _ => Precision::Bf16,
            });
        let defaults = GenerationSettings::from_checkpoint(
            &checkpoint.config,
            &checkpoint.generation,
            precision,
        );
        let (cpu, gpu) = match options.backend {
            BackendKind::Cpu => (Some((checkpoint.config.text.clone(), weights)), None),
            _ => {
                let gpu = load_gpu(&checkpoint.config, GpuWeights::Checkpoint(&weights), precision, &options)
                    .map_err(load_err)?;
                // The weights are on the device now: the memory map is dropped.
                (None, Some(gpu))
            }
        };
        Engine::start(Model { dir, cpu, tokenizer, decode_text: true, template, defaults, precision, gpu }, options)
    }

    /// An engine on random weights of the exact shapes of `config` (a config.json), generated
    /// on the GPU: the full-size model without its checkpoint, for benchmarks of the serving
    /// path (`dgemma bench --serve`). Its outputs mean nothing. `tokenizer_dir` holds the
    /// tokenizer.json (and optional chat template) requests are tokenized with; when the
    /// model's vocabulary is larger than the tokenizer's, committed canvases are not decoded
    /// (events carry the ids and empty text). GPU backends only (bf16 activations; the experts in
    /// `options.quant`'s format), with transformers' default generation settings.
    pub fn load_synthetic(config: impl AsRef<Path>, tokenizer_dir: impl AsRef<Path>, seed: u64, options: EngineOptions) -> Result<Engine> {
        let path = config.as_ref().to_path_buf();
        check_options(&options)?;
        if options.backend == BackendKind::Cpu {
            return Err(RuntimeError::InvalidOptions("synthetic weights are generated on a GPU backend only".into()));
        }
        let load_err = |p: &Path, m: String| RuntimeError::Load { path: p.to_path_buf(), message: m };
        let cfg = ModelConfig::from_file(&path).map_err(|e| load_err(&path, e.to_string()))?;
        let dir = tokenizer_dir.as_ref();
        let tokenizer = Tokenizer::from_dir(dir).map_err(|e| load_err(dir, e.to_string()))?;
        let template = ChatTemplate::from_dir(dir).map_err(|e| load_err(dir, e.to_string()))?;
        let precision = options.precision.unwrap_or(Precision::Bf16);
        let defaults = GenerationSettings::from_checkpoint(&cfg, &GenerationConfig::defaults_for(&cfg), precision);
        let gpu = load_gpu(&cfg, GpuWeights::Synthetic(seed, options.quant), precision, &options)
            .map_err(|m| load_err(&path, m))?;
        let decode_text = tokenizer.vocab_size() >= cfg.text.vocab_size;
        let model = Model { dir: path, cpu: None, tokenizer, decode_text, template, defaults, precision, gpu: Some(gpu) };
        Engine::start(model, options)
    }

    /// Starts the scheduler thread on a loaded model.
    fn start(mut model: Model, options: EngineOptions) -> Result<Engine> {
        if let Some(gpu) = &model.gpu {
            // Requests are validated against what a sequence's cache holds.
            model.defaults.context_length = gpu.options().context;
        }
        let shared = Arc::new(Shared {
            model,
            options,
            stats: Mutex::new(EngineStats::default()),
            next_id: AtomicU64::new(1),
        });
        let (commands, rx) = mpsc::channel();
        let worker_shared = shared.clone();
        let worker = std::thread::Builder::new()
            .name("dgemma-scheduler".into())
            .spawn(move || scheduler(&worker_shared, rx))
            .map_err(|e| {
                RuntimeError::InvalidOptions(format!("cannot start the scheduler thread: {e}"))
            })?;
        Ok(Engine {
            shared,
            commands,
            worker: Some(worker),
        })
    }

    /// The model directory.
    pub fn model_dir(&self) -> &Path {
        &self.shared.model.dir
    }

    /// The numeric mode the backends run in.
    pub fn precision(&self) -> Precision {
        self.shared.model.precision
    }

    pub fn options(&self) -> &EngineOptions {
        &self.shared.options
    }

    /// The settings a request without overrides runs with (from the checkpoint).
    pub fn default_settings(&self) -> &GenerationSettings {
        &self.shared.model.defaults
    }

    /// The tokenizer (e.g. to build [`Prompt::Ids`] or decode drafts).
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.shared.model.tokenizer
    }

    /// Validates `request` and resolves it into prompt ids and complete settings, without
    /// running it. `submit` does exactly this first.
    pub fn prepare(&self, request: &Request) -> Result<PreparedRequest> {
        let m = &self.shared.model;
        let bad = |msg: String| Err(RuntimeError::InvalidRequest(msg));
        let tok_err = |e: dgemma_tokenizer::Error| {
            RuntimeError::InvalidRequest(format!("cannot tokenize the prompt: {e}"))
        };
        let vocab = m.defaults.vocab_size;
        let prompt_ids = match &request.prompt {
            Prompt::Chat {
                user,
                system,
                thinking,
            } => {
                if user.trim().is_empty() {
                    return bad("the prompt is empty: the user message has no text".into());
                }
                chat_prompt_ids(
                    &m.tokenizer,
                    m.template.as_ref(),
                    user,
                    system.as_deref(),
                    *thinking,
                )
                .map_err(tok_err)?
            }
            Prompt::Text(text) => {
                if text.is_empty() {
                    return bad("the prompt is empty: the text has no characters".into());
                }
                raw_prompt_ids(&m.tokenizer, text).map_err(tok_err)?
            }
            Prompt::Ids(ids) => {
                if ids.is_empty() {
                    return bad(
                        "the prompt is empty: no token ids (it needs at least a BOS token)".into(),
                    );
                }
                if let Some((i, id)) = ids.iter().enumerate().find(|(_, &id)| id as usize >= vocab)
                {
                    return bad(format!("prompt id {id} at position {i} is outside the vocabulary of {vocab} tokens"));
                }
                ids.clone()
            }
        };
        let mut settings = m.defaults.clone();
        if let Some(n) = request.max_new_tokens {
            settings.max_new_tokens = n;
        }
        if let Some(n) = request.max_denoising_steps {
            settings.sampler.max_denoising_steps = n;
        }
        let (o, s) = (&request.sampler, &mut settings.sampler);
        if let Some(v) = o.entropy_bound {
            s.entropy_bound = v;
        }
        if let Some(v) = o.t_min {
            s.t_min = v;
        }
        if let Some(v) = o.t_max {
            s.t_max = v;
        }
        if let Some(v) = o.stability_threshold {
            s.stability_threshold = v;
        }
        if let Some(v) = o.confidence_threshold {
            s.confidence_threshold = v;
        }
        if let Some(stop) = &request.stop_ids {
            if let Some(&id) = stop.iter().find(|&&id| id as usize >= vocab) {
                return bad(format!(
                    "stop id {id} is outside the vocabulary of {vocab} tokens"
                ));
            }
            settings.eos_token_ids = stop.clone();
        }
        // The same checks as the generation loop (settings, context length), before any compute.
        Generator::seeded(&prompt_ids, settings.clone(), request.seed).map_err(|e| match e {
            dgemma_engine::EngineError::InvalidRequest(m) => RuntimeError::InvalidRequest(m),
            other => RuntimeError::InvalidRequest(other.to_string()),
        })?;
        Ok(PreparedRequest {
            prompt_ids,
            settings,
            seed: request.seed,
            stream_drafts: request.stream_drafts,
            skip_special_tokens: request.skip_special_tokens,
        })
    }

    /// Validates `request` (see [`prepare`](Self::prepare)) and queues it. An invalid request
    /// is refused here with [`RuntimeError::InvalidRequest`]; it never reaches the scheduler.
    pub fn submit(&self, request: Request) -> Result<RequestHandle> {
        let prepared = match self.prepare(&request) {
            Ok(p) => p,
            Err(e) => {
                self.shared.stats().rejected += 1;
                return Err(e);
            }
        };
        let id = self.shared.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel();
        let cancel = CancelToken(Arc::new(AtomicBool::new(false)));
        let job = Job {
            prepared,
            events: tx,
            cancel: cancel.clone(),
            submitted: Instant::now(),
        };
        {
            let mut st = self.shared.stats();
            st.submitted += 1;
            st.queued += 1;
        }
        if self.commands.send(Command::Submit(Box::new(job))).is_err() {
            let mut st = self.shared.stats();
            st.queued -= 1;
            return Err(RuntimeError::ShutDown);
        }
        Ok(RequestHandle {
            id,
            events: rx,
            cancel,
            done: false,
        })
    }

    /// Submits and waits: the one-call way to run a single request.
    pub fn generate(&self, request: Request) -> Result<Completion> {
        self.submit(request)?.wait()
    }

    /// A snapshot of the engine's counters.
    /// On a GPU backend: the device bytes allocated now (weights, workspace, the KV caches
    /// built so far) and the bytes each further concurrent request's KV cache takes. `None` on
    /// the CPU backend. Use it to size `memory_limit` / `max_concurrent`.
    pub fn device_memory(&self) -> Option<DeviceMemory> {
        let m = self.shared.model.gpu.as_ref()?.memory();
        Some(DeviceMemory {
            allocated: m.allocated,
            per_request: m.per_sequence,
            kv_pages_free: m.free_pages,
            kv_pages: m.pages,
            kv_page: m.page,
            kv_page_bytes: m.page_bytes,
        })
    }

    pub fn stats(&self) -> EngineStats {
        self.shared.stats().clone()
    }
}

impl Drop for Engine {
    /// Stops the scheduler: requests still queued or running end with
    /// [`RuntimeError::ShutDown`].
    fn drop(&mut self) {
        let _ = self.commands.send(Command::Shutdown);
        if let Some(w) = self.worker.take() {
            let _ = w.join();
        }
    }
}

/// Buffers what the generator reports during one pass.
#[derive(Default)]
struct Collect {
    drafts: bool,
    steps: Vec<(usize, usize, Vec<u32>, usize)>,
    canvases: Vec<(usize, Vec<u32>)>,
}

impl Observer for Collect {
    fn on_step(&mut self, block: usize, step: usize, draft: &[u32], accepted: usize) {
        if self.drafts {
            self.steps.push((block, step, draft.to_vec(), accepted));
        }
    }
    fn wants_drafts(&self) -> bool {
        self.drafts
    }
    fn on_canvas(&mut self, block: usize, tokens: &[u32]) {
        self.canvases.push((block, tokens.to_vec()));
    }
}

/// A request holding a backend.
struct Active<'m> {
    job: Job,
    gen: Generator<SeededNoise>,
    slot: Slot,
    /// The text decoder (None: the model does not decode text, see `Model::decode_text`).
    decoder: Option<StreamDecoder<'m>>,
    text: String,
    admitted: Instant,
    /// What this round's batched device step did for this request (then it skips its own pass).
    batched: Option<Outcome>,
}

enum Outcome {
    Running,
    Finished,
    Cancelled,
    Failed,
}

impl Active<'_> {
    /// One forward pass and the events it produced.
    fn step(&mut self, logits: &mut Vec<f32>, stats: &Mutex<EngineStats>) -> Outcome {
        let mut obs = self.collector();
        let prefill = self.gen.prefill_remaining() > 0;
        let t = Instant::now();
        let pass = self.gen.advance(self.slot.backend.as_mut(), logits, &mut obs);
        {
            let mut st = stats.lock().unwrap_or_else(|e| e.into_inner());
            st.busy_time += t.elapsed();
            match pass {
                Ok(Pass::Encode) => {
                    st.encoder_passes += 1;
                    st.prefill_chunks += u64::from(prefill);
                }
                Ok(Pass::Denoise) => st.decoder_passes += 1,
                _ => {}
            }
            st.canvases += obs.canvases.len() as u64;
        }
        self.deliver(pass.map(|_| ()).map_err(|e| e.to_string()), obs)
    }

    fn collector(&self) -> Collect {
        Collect { drafts: self.job.prepared.stream_drafts, ..Default::default() }
    }

    /// The next device step of this request for a batched pass, when its next pass is one.
    fn device_step(&mut self) -> std::result::Result<Option<(usize, usize, f32)>, String> {
        let Some(seq) = self.slot.seq else { return Ok(None) };
        let Some(device) = self.slot.backend.device_sampling() else { return Ok(None) };
        match self.gen.device_step(device) {
            Ok(Some((step, temperature))) => Ok(Some((seq, step, temperature))),
            Ok(None) => Ok(None),
            Err(e) => Err(e.to_string()),
        }
    }

    /// This request's next encoder pass when it can ride along a batched decoder pass of up to
    /// `room` encoder tokens: a committed canvas, or the whole rest of a short prompt (a long
    /// one keeps its own chunked passes, so its prefill is not cut to the room a batch leaves).
    fn mergeable_encode(&self, room: usize) -> Option<Vec<u32>> {
        self.slot.seq?;
        let ids = self.gen.pending_encode(room)?;
        let prefill = self.gen.prefill_remaining();
        (prefill == 0 || ids.len() == prefill).then(|| ids.to_vec())
    }

    /// Applies the result of a batched pass that encoded this request's `tokens`.
    fn finish_encode(&mut self, pass: std::result::Result<(), String>, tokens: usize, share: Duration) -> Outcome {
        let done = pass.and_then(|()| self.gen.finish_encode(tokens, share).map(|_| ()).map_err(|e| e.to_string()));
        self.deliver(done, self.collector())
    }

    /// Applies this request's result of a batched device step and delivers its events.
    fn finish_device_step(
        &mut self,
        status: std::result::Result<DeviceStepStatus, String>,
        share: std::time::Duration,
        stats: &Mutex<EngineStats>,
    ) -> Outcome {
        let mut obs = self.collector();
        self.gen.add_denoise_time(share);
        let done = status.and_then(|st| {
            let device = self.slot.backend.device_sampling().ok_or("the backend lost its device sampler")?;
            self.gen.finish_device_step(device, st, &mut obs).map_err(|e| e.to_string())
        });
        stats.lock().unwrap_or_else(|e| e.into_inner()).canvases += obs.canvases.len() as u64;
        self.deliver(done, obs)
    }

    /// Sends what a pass produced to the request's listener.
    fn deliver(&mut self, pass: std::result::Result<(), String>, obs: Collect) -> Outcome {
        if let Err(e) = pass {
            let _ = self.job.events.send(Event::Error(RuntimeError::Generation(e)));
            return Outcome::Failed;
        }
        let mut delivered = true;
        for (block, step, ids, accepted) in obs.steps {
            delivered &= self
                .job
                .events
                .send(Event::Draft {
                    block,
                    step,
                    ids,
                    accepted,
                })
                .is_ok();
        }
        let last = obs.canvases.len().saturating_sub(1);
        for (i, (index, ids)) in obs.canvases.into_iter().enumerate() {
            let text = match self.decoder.as_mut() {
                None => Ok(String::new()),
                Some(decoder) => decoder.push(&ids).and_then(|mut t| {
                    if self.gen.is_done() && i == last {
                        t.push_str(&decoder.finish()?);
                    }
                    Ok(t)
                }),
            };
            let text = match text {
                Ok(t) => t,
                Err(e) => {
                    let _ = self
                        .job
                        .events
                        .send(Event::Error(RuntimeError::Generation(format!(
                            "decoding canvas {index}: {e}"
                        ))));
                    return Outcome::Failed;
                }
            };
            self.text.push_str(&text);
            delivered &= self
                .job
                .events
                .send(Event::Canvas { index, ids, text })
                .is_ok();
        }
        if !delivered {
            // Nobody listens any more: same as a cancel.
            return Outcome::Cancelled;
        }
        if !self.gen.is_done() {
            return Outcome::Running;
        }
        Outcome::Finished
    }
}

/// One batched denoising step for every active request (not cancelled) whose next pass is a
/// device step, in decoder passes of up to the GPU model's `max_batch` canvases; each request's
/// outcome waits in `Active::batched` for the round. Requests whose next pass is an encoder pass
/// that fits (a commit, a short prompt) ride along those decoder passes, up to the backend's
/// encoder rows per pass, instead of running a pass of their own.
fn batched_round(gpu: &dyn SharedBackend, active: &mut [Active], stats: &Mutex<EngineStats>) {
    let options = gpu.options();
    let room = options.prefill_chunk.max(options.canvas);
    let mut ready = Vec::new();
    let mut encoders: Vec<(usize, Vec<u32>)> = Vec::new();
    for (i, a) in active.iter_mut().enumerate() {
        if a.job.cancel.is_cancelled() {
            continue;
        }
        match a.device_step() {
            Ok(Some(step)) => ready.push((i, step)),
            Ok(None) => encoders.extend(a.mergeable_encode(room).map(|ids| (i, ids))),
            Err(e) => a.batched = Some(a.deliver(Err(e), Collect::default())),
        }
    }
    for chunk in ready.chunks(options.max_batch) {
        let steps: Vec<(usize, usize, f32)> = chunk.iter().map(|&(_, s)| s).collect();
        // The encoder work that fits this pass's rows, first come first served.
        let mut left = room;
        let mut merged = Vec::new();
        encoders.retain(|(i, ids)| {
            let fits = ids.len() <= left;
            if fits {
                left -= ids.len();
                merged.push((*i, ids.clone()));
            }
            !fits
        });
        let encodes: Vec<(usize, &[u32])> =
            merged.iter().map(|(i, ids)| (active[*i].slot.seq.expect("mergeable"), ids.as_slice())).collect();
        let t = Instant::now();
        let result = gpu.step_mixed(&steps, &encodes);
        let elapsed = t.elapsed();
        {
            let mut st = stats.lock().unwrap_or_else(|e| e.into_inner());
            st.busy_time += elapsed;
            st.decoder_passes += chunk.len() as u64;
            st.batched_passes += 1;
            st.largest_batch = st.largest_batch.max(chunk.len());
            st.merged_encodes += merged.len() as u64;
            st.encoder_passes += merged.len() as u64;
            st.prefill_chunks += merged.iter().filter(|(i, _)| active[*i].gen.prefill_remaining() > 0).count() as u64;
        }
        let share = elapsed / (chunk.len() + merged.len()) as u32;
        for (i, ids) in &merged {
            let pass = result.as_ref().map(|_| ()).map_err(|e| e.to_string());
            active[*i].batched = Some(active[*i].finish_encode(pass, ids.len(), share));
        }
        for (k, &(i, _)) in chunk.iter().enumerate() {
            // A sampler error fails only its own request; a failed pass fails the chunk.
            let status = match &result {
                Ok(statuses) => statuses[k].as_ref().copied().map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            };
            active[i].batched = Some(active[i].finish_device_step(status, share, stats));
        }
    }
}

/// The scheduler: admits queued requests up to `max_concurrent`, then runs one forward pass of
/// every active request per round (round-robin), so a finished request leaves at once and the
/// next queued one starts in the next round.
fn scheduler(shared: &Shared, rx: Receiver<Command>) {
    let model = &shared.model;
    let max = shared.options.max_concurrent;
    let mut free: Vec<Slot> = Vec::new();
    let mut queue: VecDeque<Job> = VecDeque::new();
    let mut active: Vec<Active<'_>> = Vec::new();
    // One logits buffer for every request: passes run one at a time on this thread.
    let mut logits: Vec<f32> = Vec::new();
    let mut shutdown = false;
    // A KV cache allocation failed for lack of memory; cleared when a request leaves.
    let mut memory_full = false;

    let stats = || shared.stats();
    'outer: loop {
        // Intake: block only when there is nothing to run.
        if active.is_empty() && queue.is_empty() {
            // Nothing in flight: drop the scratch (the memory of a whole canvas of logits).
            logits = Vec::new();
            match rx.recv() {
                Ok(Command::Submit(job)) => queue.push_back(*job),
                Ok(Command::Shutdown) | Err(_) => break 'outer,
            }
        }
        loop {
            match rx.try_recv() {
                Ok(Command::Submit(job)) => queue.push_back(*job),
                Ok(Command::Shutdown) | Err(TryRecvError::Disconnected) => {
                    shutdown = true;
                    break;
                }
                Err(TryRecvError::Empty) => break,
            }
        }
        if shutdown {
            break 'outer;
        }
        // Requests cancelled while queued leave without ever taking a slot.
        queue.retain(|job| {
            if job.cancel.is_cancelled() {
                let _ = job.events.send(Event::Cancelled);
                let mut st = stats();
                st.queued -= 1;
                st.cancelled += 1;
                false
            } else {
                true
            }
        });
        // Admission (after an out-of-memory, only once a request has freed its cache).
        while active.len() < max && !memory_full {
            let Some(job) = queue.pop_front() else { break };
            let gen = match Generator::seeded(
                &job.prepared.prompt_ids,
                job.prepared.settings.clone(),
                job.prepared.seed,
            )
            .and_then(|g| g.with_prefill_chunk(shared.options.prefill_chunk))
            {
                Ok(g) => g,
                Err(e) => {
                    // `submit` validated the request, so this is not expected; report it anyway.
                    let _ = job
                        .events
                        .send(Event::Error(RuntimeError::InvalidRequest(e.to_string())));
                    let mut st = stats();
                    st.queued -= 1;
                    st.failed += 1;
                    continue;
                }
            };
            // The KV pages the request can ever need (its prompt and every canvas), taken now so
            // that it cannot run out half way: when the pool lacks them, wait for a running
            // request to give its pages back, unless nothing runs (then they never will).
            let positions = job.prepared.prompt_ids.len() + job.prepared.settings.canvases() * job.prepared.settings.canvas_length;
            if let Some(gpu) = &model.gpu {
                if !gpu.kv_fits(positions) {
                    if !active.is_empty() {
                        queue.push_front(job);
                        stats().memory_waits += 1;
                        memory_full = true;
                        break;
                    }
                    let m = gpu.memory();
                    let e = RuntimeError::Generation(format!(
                        "the request needs {} KV pages of {} positions ({positions} positions) and the engine's pool holds {} \
                         (EngineOptions::kv_pages, memory_limit)",
                        positions.div_ceil(m.page),
                        m.page,
                        m.pages
                    ));
                    let _ = job.events.send(Event::Error(e));
                    let mut st = stats();
                    st.queued -= 1;
                    st.failed += 1;
                    continue;
                }
            }
            let slot = match free.pop() {
                Some(b) => b,
                None => match model.new_backend() {
                    Ok(b) => {
                        stats().backends += 1;
                        b
                    }
                    // The device is full: wait for a running request to free its cache (the
                    // request keeps its place at the head of the queue), unless nothing runs.
                    Err(NoSlot::OutOfMemory(_)) if !active.is_empty() => {
                        queue.push_front(job);
                        stats().memory_waits += 1;
                        memory_full = true;
                        break;
                    }
                    Err(e) => {
                        let e = match e {
                            NoSlot::OutOfMemory(msg) => RuntimeError::Generation(format!(
                                "the request's KV cache does not fit even with no other request running: {msg}"
                            )),
                            NoSlot::Failed(e) => e,
                        };
                        let _ = job.events.send(Event::Error(e));
                        let mut st = stats();
                        st.queued -= 1;
                        st.failed += 1;
                        continue;
                    }
                },
            };
            if let (Some(gpu), Some(seq)) = (&model.gpu, slot.seq) {
                if let Err(e) = gpu.reserve(seq, positions) {
                    // Counted free above, so not expected; the request fails, the slot stays.
                    let _ = job.events.send(Event::Error(RuntimeError::Generation(e.to_string())));
                    free.push(slot);
                    let mut st = stats();
                    st.queued -= 1;
                    st.failed += 1;
                    continue;
                }
            }
            let decoder = model
                .decode_text
                .then(|| StreamDecoder::new(&model.tokenizer, job.prepared.skip_special_tokens));
            {
                let mut st = stats();
                st.queued -= 1;
                st.active += 1;
                st.peak_active = st.peak_active.max(st.active);
            }
            active.push(Active {
                job,
                gen,
                slot,
                decoder,
                text: String::new(),
                admitted: Instant::now(),
                batched: None,
            });
        }
        // On the GPU, the requests whose next pass is a denoising step share decoder passes.
        if let Some(gpu) = &model.gpu {
            batched_round(gpu.as_ref(), &mut active, &shared.stats);
        }
        // One round: one pass per active request (those not served by a batched pass).
        let mut i = 0;
        while i < active.len() {
            let a = &mut active[i];
            let outcome = if a.job.cancel.is_cancelled() {
                Outcome::Cancelled
            } else if let Some(o) = a.batched.take() {
                o
            } else {
                a.step(&mut logits, &shared.stats)
            };
            if let Outcome::Running = outcome {
                i += 1;
                continue;
            }
            let mut a = active.swap_remove(i);
            // Free the KV cache (its pages go back to the pool) before the final event, so a
            // client that sees it finished sees its memory free; the (empty) backend is kept
            // for the next request. (A reset alone keeps a GPU sequence's reserved pages: the
            // generation loop resets before its prefill.)
            a.slot.backend.reset();
            if let (Some(gpu), Some(seq)) = (&model.gpu, a.slot.seq) {
                let _ = gpu.release(seq);
            }
            let mut st = stats();
            st.active -= 1;
            match outcome {
                Outcome::Running => unreachable!(),
                Outcome::Cancelled => {
                    let _ = a.job.events.send(Event::Cancelled);
                    st.cancelled += 1;
                }
                Outcome::Failed => st.failed += 1,
                Outcome::Finished => {
                    let gen = a.gen.into_generation().expect("finished");
                    st.completed += 1;
                    st.new_tokens += gen.stats.new_tokens as u64;
                    let completion = Completion {
                        ids: gen.ids[gen.prompt_len..].to_vec(),
                        prompt_ids: a.job.prepared.prompt_ids,
                        text: std::mem::take(&mut a.text),
                        reason: gen.finish,
                        stats: RequestStats {
                            generation: gen.stats,
                            queue_time: a.admitted - a.job.submitted,
                            run_time: a.admitted.elapsed(),
                        },
                    };
                    let _ = a.job.events.send(Event::Finished(completion));
                }
            }
            drop(st);
            free.push(a.slot);
            memory_full = false;
            // swap_remove moved the last request to `i`: do not advance.
        }
    }
    // Shut down: whatever is still queued or running ends with an error.
    let mut st = stats();
    for job in queue.drain(..) {
        let _ = job.events.send(Event::Error(RuntimeError::ShutDown));
        st.queued -= 1;
        st.failed += 1;
    }
    for a in active.drain(..) {
        let _ = a.job.events.send(Event::Error(RuntimeError::ShutDown));
        st.active -= 1;
        st.failed += 1;
    }
}
