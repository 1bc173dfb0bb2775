//! dgemma-runtime: an embeddable DiffusionGemma runtime.
//!
//! Load a model once with [`Engine::load`], then [`Engine::submit`] any number of
//! [`Request`]s from any thread. Each request has its own prompt, settings and seed, and its
//! own event stream ([`RequestHandle`]): optional per-step drafts, every committed canvas with
//! its text, then one final [`Event::Finished`], [`Event::Cancelled`] or [`Event::Error`].
//! [`RequestHandle::cancel`] stops a request before its next forward pass and frees its KV
//! cache. Invalid requests (empty or too long prompt, invalid settings) are refused by
//! `submit` with [`RuntimeError::InvalidRequest`] and never disturb the others.
//!
//! # Scheduling
//!
//! One scheduler thread owns every backend. At most [`EngineOptions::max_concurrent`] requests
//! are active; the rest wait in a FIFO queue. Each round runs **one** forward pass (prefill,
//! one denoising step, or the re-encode of a committed canvas) of every active request, so
//! requests progress together, a finished or cancelled request leaves at once and a queued one
//! is admitted in the next round. A request is stepped by [`Generator`], dgemma-engine's
//! generation loop as a state machine (`dgemma_engine::generate` runs the same machine to the
//! end), and the noise is counter-based (keyed by seed,
//! block, step and position), so a request's output does not depend on what else runs.
//!
//! **Batching.** On the CPU backend each active request runs its own forward passes on its own
//! backend (one KV cache each, sharing the memory-mapped weights). On the GPU
//! ([`BackendKind::Cuda`]) the weights are uploaded once and every request gets a sequence on
//! the shared model; each round, the requests whose next pass is a denoising step share decoder
//! passes of up to [`EngineOptions::max_batch`] canvases (the weights are read once for all of
//! them), with the sampler on the device, and the requests whose next pass is a commit (or a
//! prompt short enough to go whole) ride along in those same passes instead of reading the
//! weights again ([`EngineStats::merged_encodes`]); a long prompt keeps its own passes of
//! [`EngineOptions::prefill_chunk`] tokens, one per round. Every row of such a pass is
//! bit-identical to a pass over its request alone, so batching changes no output. Backends are
//! built lazily, at most `max_concurrent` of them, and reused (their cache is cleared between
//! requests).
//!
//! **Memory.** A GPU request's full-attention KV lives in pages of a pool shared by every
//! request ([`EngineOptions::kv_page`], [`EngineOptions::kv_pages`], sized from the free device
//! memory by default): a request takes the pages its prompt and canvases need when it is
//! admitted and gives them back when it ends or is cancelled; its sliding-window layers keep a
//! fixed window-sized ring. A request whose pages (or own buffers) do not fit waits in the
//! queue until a running request gives its own back ([`EngineStats::memory_waits`]); one that
//! the whole pool could not hold fails with an error naming the pool, never disturbing the
//! others. [`Engine::device_memory`] reports the pool.
//!
//! ```no_run
//! use dgemma_runtime::{Engine, EngineOptions, Event, Request};
//! let engine = Engine::load("path/to/model", EngineOptions::default())?;
//! let mut handle = engine.submit(Request::chat("Write a haiku").max_new_tokens(256).seed(1))?;
//! for event in &mut handle {
//!     match event {
//!         Event::Canvas { text, .. } => print!("{text}"),
//!         Event::Finished(done) => println!("\n{} tokens", done.stats.generation.new_tokens),
//!         Event::Error(e) => eprintln!("{e}"),
//!         _ => {}
//!     }
//! }
//! # Ok::<(), dgemma_runtime::RuntimeError>(())
//! ```
//! (A runnable version on the bundled tiny model is on [`Engine`] and in
//! `examples/stream.rs`.)

mod engine;
mod error;
mod request;

pub use engine::{
    BackendKind, DeviceMemory, CancelToken, Completion, Engine, EngineOptions, EngineStats, Event, RequestHandle,
    RequestStats,
};
pub use error::{Result, RuntimeError};
pub use dgemma_engine::{Generator, Pass};
pub use request::{PreparedRequest, Prompt, Request, SamplerOverrides};

pub use dgemma_engine::generate::{FinishReason, GenerationSettings, GenerationStats};
pub use dgemma_model::Precision;
pub use dgemma_model::Quant;

/// The bundled tiny model (random weights, vocab 512, canvas 16) in this source tree, for
/// examples and tests: `reference/models/tiny-default` under `$DGEMMA_REPO` (the repository root)
/// when that is set and not empty, else under the source tree this crate was compiled from.
pub fn bundled_tiny_model() -> std::path::PathBuf {
    repo_root().join("reference/models/tiny-default")
}

/// The repository root: `$DGEMMA_REPO` when set and not empty (executables built on one machine
/// and run from another checkout), else the compile-time source tree.
fn repo_root() -> std::path::PathBuf {
    match std::env::var_os("DGEMMA_REPO") {
        Some(dir) if !dir.is_empty() => dir.into(),
        _ => std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../.."),
    }
}
