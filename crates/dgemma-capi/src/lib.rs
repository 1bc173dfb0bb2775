//! dgemma-capi: the C ABI of the dgemma runtime (`libdgemma_capi.so` + `include/dgemma.h`).
//!
//! The header is hand-written; `tests/header.rs` checks that every `#[no_mangle]` function of
//! this file is declared there with the same number of parameters, that the status codes
//! agree, and (with gcc) that the structs have the same layout on both sides.
//!
//! Rules kept by every exported function:
//! * no panic crosses the boundary: bodies run under `catch_unwind`, a panic becomes
//!   `DGEMMA_ERR_PANIC` with a message;
//! * every pointer argument is checked for NULL (`DGEMMA_ERR_INVALID_ARGUMENT`), strings must
//!   be UTF-8;
//! * on failure the reason is kept for [`dgemma_last_error_message`] (per thread);
//! * memory handed to C (`DgemmaResult` contents, engines) is released only by the matching
//!   `dgemma_*_free` function.

#![allow(clippy::missing_safety_doc)]

use dgemma_runtime::{
    BackendKind, Engine, EngineOptions, Event, FinishReason, Prompt, Request, RuntimeError, SamplerOverrides,
};
use std::cell::RefCell;
use std::ffi::{c_char, c_int, c_void, CStr};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::ptr;

/// Result code of every fallible function (`DgemmaStatus` in the header).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DgemmaStatus {
    Ok = 0,
    InvalidArgument = 1,
    Load = 2,
    InvalidRequest = 3,
    Cancelled = 4,
    Generation = 5,
    ShutDown = 6,
    Panic = 7,
}

impl DgemmaStatus {
    pub const ALL: [DgemmaStatus; 8] = [
        DgemmaStatus::Ok,
        DgemmaStatus::InvalidArgument,
        DgemmaStatus::Load,
        DgemmaStatus::InvalidRequest,
        DgemmaStatus::Cancelled,
        DgemmaStatus::Generation,
        DgemmaStatus::ShutDown,
        DgemmaStatus::Panic,
    ];

    /// The constant's name in `dgemma.h`.
    pub fn c_name(self) -> &'static str {
        match self {
            DgemmaStatus::Ok => "DGEMMA_OK",
            DgemmaStatus::InvalidArgument => "DGEMMA_ERR_INVALID_ARGUMENT",
            DgemmaStatus::Load => "DGEMMA_ERR_LOAD",
            DgemmaStatus::InvalidRequest => "DGEMMA_ERR_INVALID_REQUEST",
            DgemmaStatus::Cancelled => "DGEMMA_ERR_CANCELLED",
            DgemmaStatus::Generation => "DGEMMA_ERR_GENERATION",
            DgemmaStatus::ShutDown => "DGEMMA_ERR_SHUT_DOWN",
            DgemmaStatus::Panic => "DGEMMA_ERR_PANIC",
        }
    }

    fn c_name_nul(self) -> &'static CStr {
        match self {
            DgemmaStatus::Ok => c"DGEMMA_OK",
            DgemmaStatus::InvalidArgument => c"DGEMMA_ERR_INVALID_ARGUMENT",
            DgemmaStatus::Load => c"DGEMMA_ERR_LOAD",
            DgemmaStatus::InvalidRequest => c"DGEMMA_ERR_INVALID_REQUEST",
            DgemmaStatus::Cancelled => c"DGEMMA_ERR_CANCELLED",
            DgemmaStatus::Generation => c"DGEMMA_ERR_GENERATION",
            DgemmaStatus::ShutDown => c"DGEMMA_ERR_SHUT_DOWN",
            DgemmaStatus::Panic => c"DGEMMA_ERR_PANIC",
        }
    }
}

/// `DgemmaFinish` in the header.
pub const DGEMMA_FINISH_NONE: i32 = 0;
pub const DGEMMA_FINISH_EOS: i32 = 1;
pub const DGEMMA_FINISH_MAX_NEW_TOKENS: i32 = 2;

/// `DgemmaBackend` in the header.
pub const DGEMMA_BACKEND_CPU: u32 = 0;
pub const DGEMMA_BACKEND_CUDA: u32 = 1;

/// `DgemmaQuant` in the header: how the MoE experts are held.
pub const DGEMMA_QUANT_NONE: u32 = 0;
pub const DGEMMA_QUANT_FP8: u32 = 1;

/// ABI version of this library (`DGEMMA_ABI_VERSION` in the header). 2: engine options
/// ([`DgemmaEngineOptions`]) and more engine counters. 3: `DgemmaEngineOptions::quant`.
/// 4: `DgemmaEngineOptions::kv_page` and `kv_pages` (the KV page pool), and
/// `DgemmaEngineStats::merged_encodes`, `kv_pages_free`, `kv_pages`, `kv_page`.
pub const DGEMMA_ABI_VERSION: u32 = 4;

/// How to load an engine. Fill with [`dgemma_engine_options_init`], then change what you need.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct DgemmaEngineOptions {
    /// `DGEMMA_BACKEND_CPU` or `DGEMMA_BACKEND_CUDA`.
    pub backend: u32,
    /// Most requests generating at once; more wait in a queue.
    pub max_concurrent: u32,
    /// CUDA: the GPU ordinal.
    pub cuda_device: u32,
    /// CUDA: positions each request's KV cache holds (0: the model's context, capped at 8192).
    pub context: u32,
    /// CUDA: most requests whose denoising steps share one decoder pass.
    pub max_batch: u32,
    /// Most prompt tokens a request prefills per scheduler round.
    pub prefill_chunk: u32,
    /// CUDA: most device bytes the engine allocates (0: no limit); a request whose KV cache
    /// does not fit waits for a running one to finish.
    pub memory_limit: u64,
    /// `DGEMMA_QUANT_NONE` (experts as stored) or `DGEMMA_QUANT_FP8` (FP8 E4M3 experts with
    /// per-output-channel scales, quantised at load; weight-only).
    pub quant: u32,
    /// CUDA: positions per page of the KV page pool the full-attention layers share.
    pub kv_page: u32,
    /// CUDA: pages in the KV pool (0: sized from `max_concurrent`, the context and the
    /// device's free memory); a request waits until its pages are free.
    pub kv_pages: u32,
}

/// Per-request parameters. Fill with [`dgemma_params_init`], then change what you need.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct DgemmaParams {
    /// Tokens to generate, rounded up to whole canvases; 0 = the checkpoint's default.
    pub max_new_tokens: u32,
    /// Most denoising steps per canvas; 0 = the checkpoint's default.
    pub max_denoising_steps: u32,
    pub seed: u64,
    /// System prompt (UTF-8) or NULL.
    pub system_prompt: *const c_char,
    /// Nonzero: thinking mode in the chat template.
    pub thinking: c_int,
    /// Nonzero: encode the prompt as raw text after `<bos>`, without the chat template.
    pub raw_prompt: c_int,
    /// Nonzero (default): leave special tokens out of the text.
    pub skip_special_tokens: c_int,
    /// Sampler overrides: NaN (default) keeps the checkpoint's value.
    pub entropy_bound: f32,
    pub confidence_threshold: f32,
    pub t_min: f64,
    pub t_max: f64,
    /// Negative (default): the checkpoint's value.
    pub stability_threshold: i32,
    /// NULL (default): the checkpoint's EOS ids. Otherwise these `n_stop_ids` ids (0 ids:
    /// never stop before `max_new_tokens`).
    pub stop_ids: *const u32,
    pub n_stop_ids: usize,
}

/// The result of [`dgemma_generate`]; release with [`dgemma_result_free`].
#[repr(C)]
#[derive(Debug)]
pub struct DgemmaResult {
    /// UTF-8 text of the generated ids, NUL-terminated (`text_len` bytes before the NUL).
    pub text: *mut c_char,
    pub text_len: usize,
    /// Generated ids (every committed canvas, pad after the first EOS), without the prompt.
    pub ids: *mut u32,
    pub n_ids: usize,
    pub prompt_tokens: u32,
    pub canvases: u32,
    pub decoder_passes: u32,
    /// Non-pad generated tokens.
    pub new_tokens: u32,
    /// `DGEMMA_FINISH_*`.
    pub finish_reason: i32,
    /// The EOS id when `finish_reason == DGEMMA_FINISH_EOS`.
    pub eos_token: u32,
    /// Wall time from submission to the end, in seconds.
    pub seconds: f64,
}

impl DgemmaResult {
    const EMPTY: DgemmaResult = DgemmaResult {
        text: ptr::null_mut(),
        text_len: 0,
        ids: ptr::null_mut(),
        n_ids: 0,
        prompt_tokens: 0,
        canvases: 0,
        decoder_passes: 0,
        new_tokens: 0,
        finish_reason: DGEMMA_FINISH_NONE,
        eos_token: 0,
        seconds: 0.0,
    };
}

/// Engine counters ([`dgemma_engine_stats`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct DgemmaEngineStats {
    pub submitted: u64,
    pub rejected: u64,
    pub completed: u64,
    pub cancelled: u64,
    pub failed: u64,
    pub queued: u64,
    pub active: u64,
    pub encoder_passes: u64,
    pub decoder_passes: u64,
    pub new_tokens: u64,
    /// The most requests that ran at once.
    pub peak_active: u64,
    /// Decoder passes that served several requests' steps (GPU), and the most in one.
    pub batched_passes: u64,
    pub largest_batch: u64,
    /// Encoder passes that were prompt chunks.
    pub prefill_chunks: u64,
    /// Times admission waited because a KV cache (its pages, its own buffers) did not fit.
    pub memory_waits: u64,
    /// Commits and short prompts encoded inside a batched decoder pass (GPU; ABI 4).
    pub merged_encodes: u64,
    /// The GPU's KV page pool: pages free now and in all, positions per page (0 on the CPU;
    /// ABI 4).
    pub kv_pages_free: u64,
    pub kv_pages: u64,
    pub kv_page: u64,
}

/// Called on the calling thread of [`dgemma_generate`] after every committed canvas, with the
/// text that became complete (NUL-terminated, `text_len` bytes) and the canvas ids. Return 0
/// to go on, nonzero to cancel the request. The pointers are valid during the call only.
pub type DgemmaCanvasCallback = Option<
    unsafe extern "C" fn(
        user_data: *mut c_void,
        index: u32,
        text: *const c_char,
        text_len: usize,
        ids: *const u32,
        n_ids: usize,
    ) -> c_int,
>;

/// Opaque engine handle.
pub struct DgemmaEngine {
    engine: Engine,
}

thread_local! {
    static LAST_ERROR: RefCell<Vec<u8>> = RefCell::new(vec![0]);
}

/// `s` as NUL-terminated bytes (an interior NUL, possible in decoded text, is kept: C sees
/// the text up to it, `text_len` gives the whole length).
fn nul_terminated(s: &str) -> Vec<u8> {
    let mut v = Vec::with_capacity(s.len() + 1);
    v.extend_from_slice(s.as_bytes());
    v.push(0);
    v
}

fn set_error(msg: &str) {
    LAST_ERROR.with(|e| *e.borrow_mut() = nul_terminated(&msg.replace('\0', " ")));
}

fn fail(status: DgemmaStatus, msg: impl AsRef<str>) -> DgemmaStatus {
    set_error(msg.as_ref());
    status
}

fn status_of(e: &RuntimeError) -> DgemmaStatus {
    match e {
        RuntimeError::Load { .. } => DgemmaStatus::Load,
        RuntimeError::InvalidOptions(_) => DgemmaStatus::InvalidArgument,
        RuntimeError::InvalidRequest(_) => DgemmaStatus::InvalidRequest,
        RuntimeError::Cancelled => DgemmaStatus::Cancelled,
        RuntimeError::Generation(_) => DgemmaStatus::Generation,
        RuntimeError::ShutDown => DgemmaStatus::ShutDown,
    }
}

fn from_runtime(e: RuntimeError) -> DgemmaStatus {
    fail(status_of(&e), e.to_string())
}

/// Runs `f`, turning a panic into `DGEMMA_ERR_PANIC`.
fn guard(f: impl FnOnce() -> DgemmaStatus) -> DgemmaStatus {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(s) => s,
        Err(p) => {
            let msg = p
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| p.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic payload".into());
            fail(
                DgemmaStatus::Panic,
                format!("internal error (panic): {msg}"),
            )
        }
    }
}

/// A UTF-8 string argument; `what` names it in the error.
unsafe fn str_arg<'a>(p: *const c_char, what: &str) -> Result<&'a str, DgemmaStatus> {
    if p.is_null() {
        return Err(fail(
            DgemmaStatus::InvalidArgument,
            format!("{what} is NULL"),
        ));
    }
    CStr::from_ptr(p).to_str().map_err(|e| {
        fail(
            DgemmaStatus::InvalidArgument,
            format!("{what} is not valid UTF-8: {e}"),
        )
    })
}

/// The library's ABI version (`DGEMMA_ABI_VERSION`).
#[no_mangle]
pub extern "C" fn dgemma_abi_version() -> u32 {
    DGEMMA_ABI_VERSION
}

/// The reason of the last failure on this thread (never NULL; "" if none). Valid until the
/// next dgemma call that fails on the same thread.
#[no_mangle]
pub extern "C" fn dgemma_last_error_message() -> *const c_char {
    LAST_ERROR.with(|e| e.borrow().as_ptr() as *const c_char)
}

/// The name of a status code ("DGEMMA_OK", ...), or "DGEMMA_UNKNOWN_STATUS".
#[no_mangle]
pub extern "C" fn dgemma_status_name(status: c_int) -> *const c_char {
    DgemmaStatus::ALL
        .iter()
        .find(|s| **s as c_int == status)
        .map_or(c"DGEMMA_UNKNOWN_STATUS".as_ptr(), |s| {
            s.c_name_nul().as_ptr()
        })
}

/// Fills `params` with the defaults (checkpoint settings, seed 0, chat template, special
/// tokens skipped).
#[no_mangle]
pub unsafe extern "C" fn dgemma_params_init(params: *mut DgemmaParams) -> DgemmaStatus {
    guard(|| {
        if params.is_null() {
            return fail(DgemmaStatus::InvalidArgument, "params is NULL");
        }
        params.write(DgemmaParams {
            max_new_tokens: 0,
            max_denoising_steps: 0,
            seed: 0,
            system_prompt: ptr::null(),
            thinking: 0,
            raw_prompt: 0,
            skip_special_tokens: 1,
            entropy_bound: f32::NAN,
            confidence_threshold: f32::NAN,
            t_min: f64::NAN,
            t_max: f64::NAN,
            stability_threshold: -1,
            stop_ids: ptr::null(),
            n_stop_ids: 0,
        });
        DgemmaStatus::Ok
    })
}

/// Loads the model in `model_dir` (config.json, safetensors, tokenizer.json, chat template) on
/// the CPU backend. `max_concurrent` bounds the requests generating at once (0: 4); more
/// wait in a queue. On success `*out_engine` is the engine, to be released with
/// [`dgemma_engine_free`].
#[no_mangle]
pub unsafe extern "C" fn dgemma_engine_load(
    model_dir: *const c_char,
    max_concurrent: u32,
    out_engine: *mut *mut DgemmaEngine,
) -> DgemmaStatus {
    load_with(model_dir, out_engine, EngineOptions { max_concurrent: concurrency(max_concurrent), ..Default::default() })
}

/// Loads the model in `model_dir` on CUDA GPU `device` (bf16): the weights are uploaded once
/// and each request gets its own KV cache of `context` positions on the GPU (0: the model's
/// context, capped at 8192). `max_concurrent` as in [`dgemma_engine_load`]. Without a GPU, or in
/// a build without the CUDA kernels, the status is an error whose message says why.
#[no_mangle]
pub unsafe extern "C" fn dgemma_engine_load_cuda(
    model_dir: *const c_char,
    max_concurrent: u32,
    device: u32,
    context: u32,
    out_engine: *mut *mut DgemmaEngine,
) -> DgemmaStatus {
    let options = EngineOptions {
        backend: BackendKind::Cuda,
        max_concurrent: concurrency(max_concurrent),
        cuda_device: device as usize,
        context: (context != 0).then_some(context as usize),
        ..Default::default()
    };
    load_with(model_dir, out_engine, options)
}

/// Fills `*options` with the defaults: the CPU backend, 4 concurrent requests, GPU 0, the
/// model's context capped at 8192, batches of 4, prefill chunks of 2048 tokens, no memory limit.
#[no_mangle]
pub unsafe extern "C" fn dgemma_engine_options_init(options: *mut DgemmaEngineOptions) -> DgemmaStatus {
    guard(|| {
        if options.is_null() {
            return fail(DgemmaStatus::InvalidArgument, "options is NULL");
        }
        let d = EngineOptions::default();
        options.write(DgemmaEngineOptions {
            backend: DGEMMA_BACKEND_CPU,
            max_concurrent: d.max_concurrent as u32,
            cuda_device: d.cuda_device as u32,
            context: 0,
            max_batch: d.max_batch as u32,
            prefill_chunk: d.prefill_chunk as u32,
            memory_limit: 0,
            quant: DGEMMA_QUANT_NONE,
            kv_page: d.kv_page as u32,
            kv_pages: 0,
        });
        DgemmaStatus::Ok
    })
}

/// Loads the model in `model_dir` with `*options` (NULL: the defaults of
/// [`dgemma_engine_options_init`]). An unknown backend or a zero count is
/// `DGEMMA_ERR_INVALID_ARGUMENT`; on success `*out_engine` is the engine.
#[no_mangle]
pub unsafe extern "C" fn dgemma_engine_load_with_options(
    model_dir: *const c_char,
    options: *const DgemmaEngineOptions,
    out_engine: *mut *mut DgemmaEngine,
) -> DgemmaStatus {
    let mut o = EngineOptions::default();
    if !options.is_null() {
        let c = *options;
        o.backend = match c.backend {
            DGEMMA_BACKEND_CPU => BackendKind::Cpu,
            DGEMMA_BACKEND_CUDA => BackendKind::Cuda,
            b => return fail(DgemmaStatus::InvalidArgument, format!("options.backend {b}: not a DgemmaBackend")),
        };
        o.max_concurrent = c.max_concurrent as usize;
        o.cuda_device = c.cuda_device as usize;
        o.context = (c.context != 0).then_some(c.context as usize);
        o.max_batch = c.max_batch as usize;
        o.prefill_chunk = c.prefill_chunk as usize;
        o.memory_limit = (c.memory_limit != 0).then(|| usize::try_from(c.memory_limit).unwrap_or(usize::MAX));
        o.quant = match c.quant {
            DGEMMA_QUANT_NONE => dgemma_runtime::Quant::None,
            DGEMMA_QUANT_FP8 => dgemma_runtime::Quant::Fp8,
            q => return fail(DgemmaStatus::InvalidArgument, format!("options.quant {q}: not a DgemmaQuant")),
        };
        o.kv_page = c.kv_page as usize;
        o.kv_pages = (c.kv_pages != 0).then_some(c.kv_pages as usize);
    }
    load_with(model_dir, out_engine, o)
}

fn concurrency(max_concurrent: u32) -> usize {
    if max_concurrent == 0 {
        4
    } else {
        max_concurrent as usize
    }
}

unsafe fn load_with(model_dir: *const c_char, out_engine: *mut *mut DgemmaEngine, options: EngineOptions) -> DgemmaStatus {
    guard(|| {
        if out_engine.is_null() {
            return fail(DgemmaStatus::InvalidArgument, "out_engine is NULL");
        }
        out_engine.write(ptr::null_mut());
        let dir = match str_arg(model_dir, "model_dir") {
            Ok(d) => d,
            Err(s) => return s,
        };
        match Engine::load(dir, options) {
            Ok(engine) => {
                out_engine.write(Box::into_raw(Box::new(DgemmaEngine { engine })));
                DgemmaStatus::Ok
            }
            Err(e) => from_runtime(e),
        }
    })
}

/// Releases an engine (NULL is ignored). No other call may be using it.
#[no_mangle]
pub unsafe extern "C" fn dgemma_engine_free(engine: *mut DgemmaEngine) {
    let _ = guard(|| {
        if !engine.is_null() {
            drop(Box::from_raw(engine));
        }
        DgemmaStatus::Ok
    });
}

/// The engine's counters.
#[no_mangle]
pub unsafe extern "C" fn dgemma_engine_stats(
    engine: *const DgemmaEngine,
    out_stats: *mut DgemmaEngineStats,
) -> DgemmaStatus {
    guard(|| {
        if engine.is_null() || out_stats.is_null() {
            return fail(DgemmaStatus::InvalidArgument, "engine or out_stats is NULL");
        }
        let s = (*engine).engine.stats();
        let pool = (*engine).engine.device_memory();
        out_stats.write(DgemmaEngineStats {
            submitted: s.submitted,
            rejected: s.rejected,
            completed: s.completed,
            cancelled: s.cancelled,
            failed: s.failed,
            queued: s.queued as u64,
            active: s.active as u64,
            encoder_passes: s.encoder_passes,
            decoder_passes: s.decoder_passes,
            new_tokens: s.new_tokens,
            peak_active: s.peak_active as u64,
            batched_passes: s.batched_passes,
            largest_batch: s.largest_batch as u64,
            prefill_chunks: s.prefill_chunks,
            memory_waits: s.memory_waits,
            merged_encodes: s.merged_encodes,
            kv_pages_free: pool.map_or(0, |m| m.kv_pages_free as u64),
            kv_pages: pool.map_or(0, |m| m.kv_pages as u64),
            kv_page: pool.map_or(0, |m| m.kv_page as u64),
        });
        DgemmaStatus::Ok
    })
}

unsafe fn build_request(prompt: &str, p: &DgemmaParams) -> Result<Request, DgemmaStatus> {
    let system = if p.system_prompt.is_null() {
        None
    } else {
        Some(str_arg(p.system_prompt, "params.system_prompt")?.to_string())
    };
    let prompt = if p.raw_prompt != 0 {
        Prompt::Text(prompt.to_string())
    } else {
        Prompt::Chat {
            user: prompt.to_string(),
            system,
            thinking: p.thinking != 0,
        }
    };
    let mut r = Request::new(prompt);
    r.seed = p.seed;
    r.skip_special_tokens = p.skip_special_tokens != 0;
    if p.max_new_tokens != 0 {
        r.max_new_tokens = Some(p.max_new_tokens as usize);
    }
    if p.max_denoising_steps != 0 {
        r.max_denoising_steps = Some(p.max_denoising_steps as usize);
    }
    let f32_opt = |x: f32| (!x.is_nan()).then_some(x);
    let f64_opt = |x: f64| (!x.is_nan()).then_some(x);
    r.sampler = SamplerOverrides {
        entropy_bound: f32_opt(p.entropy_bound),
        t_min: f64_opt(p.t_min),
        t_max: f64_opt(p.t_max),
        stability_threshold: (p.stability_threshold >= 0).then_some(p.stability_threshold as usize),
        confidence_threshold: f32_opt(p.confidence_threshold),
    };
    if !p.stop_ids.is_null() {
        r.stop_ids = Some(std::slice::from_raw_parts(p.stop_ids, p.n_stop_ids).to_vec());
    }
    Ok(r)
}

/// Generates for one prompt and blocks until it ends. May be called from several threads at
/// once on the same engine: the requests run concurrently (up to `max_concurrent`) and each
/// gives exactly what it gives alone.
///
/// * `prompt`: the user message (UTF-8), or raw text with `params->raw_prompt`.
/// * `params`: NULL for the defaults.
/// * `callback`: NULL, or called after every committed canvas (return nonzero to cancel).
/// * `out_result`: NULL, or filled on `DGEMMA_OK` (release with [`dgemma_result_free`]); it
///   is zeroed on failure.
///
/// Returns `DGEMMA_ERR_INVALID_REQUEST` for an empty or too long prompt or invalid settings,
/// `DGEMMA_ERR_CANCELLED` when the callback cancelled.
#[no_mangle]
pub unsafe extern "C" fn dgemma_generate(
    engine: *const DgemmaEngine,
    prompt: *const c_char,
    params: *const DgemmaParams,
    callback: DgemmaCanvasCallback,
    user_data: *mut c_void,
    out_result: *mut DgemmaResult,
) -> DgemmaStatus {
    guard(|| {
        if !out_result.is_null() {
            out_result.write(DgemmaResult::EMPTY);
        }
        if engine.is_null() {
            return fail(DgemmaStatus::InvalidArgument, "engine is NULL");
        }
        let prompt = match str_arg(prompt, "prompt") {
            Ok(p) => p,
            Err(s) => return s,
        };
        let mut defaults = std::mem::MaybeUninit::<DgemmaParams>::uninit();
        let params = if params.is_null() {
            dgemma_params_init(defaults.as_mut_ptr());
            defaults.assume_init_ref()
        } else {
            &*params
        };
        let request = match build_request(prompt, params) {
            Ok(r) => r,
            Err(s) => return s,
        };
        let start = std::time::Instant::now();
        let mut handle = match (*engine).engine.submit(request) {
            Ok(h) => h,
            Err(e) => return from_runtime(e),
        };
        let mut stopped = false;
        while let Some(event) = handle.next_event() {
            match event {
                Event::Draft { .. } => {}
                Event::Canvas { index, ids, text } => {
                    if let (Some(cb), false) = (callback, stopped) {
                        let text = nul_terminated(&text);
                        let stop = cb(
                            user_data,
                            index as u32,
                            text.as_ptr() as *const c_char,
                            text.len() - 1,
                            ids.as_ptr(),
                            ids.len(),
                        );
                        if stop != 0 {
                            stopped = true;
                            handle.cancel();
                        }
                    }
                }
                Event::Finished(done) => {
                    if !out_result.is_null() {
                        let text = nul_terminated(&done.text).into_boxed_slice();
                        let ids = done.ids.into_boxed_slice();
                        let g = &done.stats.generation;
                        let (finish_reason, eos_token) = match done.reason {
                            FinishReason::Eos(id) => (DGEMMA_FINISH_EOS, id),
                            FinishReason::MaxNewTokens => (DGEMMA_FINISH_MAX_NEW_TOKENS, 0),
                        };
                        out_result.write(DgemmaResult {
                            text_len: text.len() - 1,
                            text: Box::into_raw(text) as *mut c_char,
                            n_ids: ids.len(),
                            ids: Box::into_raw(ids) as *mut u32,
                            prompt_tokens: g.prompt_tokens as u32,
                            canvases: g.canvases as u32,
                            decoder_passes: g.decoder_passes() as u32,
                            new_tokens: g.new_tokens as u32,
                            finish_reason,
                            eos_token,
                            seconds: start.elapsed().as_secs_f64(),
                        });
                    }
                    return DgemmaStatus::Ok;
                }
                Event::Cancelled => {
                    return fail(
                        DgemmaStatus::Cancelled,
                        "the request was cancelled by the callback",
                    )
                }
                Event::Error(e) => return from_runtime(e),
            }
        }
        from_runtime(RuntimeError::ShutDown)
    })
}

/// Releases what a [`DgemmaResult`] holds and zeroes it (NULL and zeroed results are ignored).
#[no_mangle]
pub unsafe extern "C" fn dgemma_result_free(result: *mut DgemmaResult) {
    let _ = guard(|| {
        if result.is_null() {
            return DgemmaStatus::Ok;
        }
        let r = &mut *result;
        if !r.text.is_null() {
            drop(Box::from_raw(ptr::slice_from_raw_parts_mut(
                r.text as *mut u8,
                r.text_len + 1,
            )));
        }
        if !r.ids.is_null() {
            drop(Box::from_raw(ptr::slice_from_raw_parts_mut(r.ids, r.n_ids)));
        }
        result.write(DgemmaResult::EMPTY);
        DgemmaStatus::Ok
    });
}
