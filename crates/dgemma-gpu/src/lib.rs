//! dgemma-gpu: the CUDA backend of dgemma.
//!
//! * [`kernels`]: which compiled kernel runs each op of a model (the codegen heuristics table
//!   resolved against the kernel image; unknown shapes are refused by name).
//! * [`weights`]: the checkpoint uploaded to executor memory as bf16, with progress.
//! * [`kv_cache`]: each sequence's sliding-layer KV rings, and the full layers' KV pages from a
//!   pool shared by every sequence (page tables, admission by free pages).
//! * [`plan`]: the encoder and decoder passes as static step lists over preallocated buffers
//!   (the KV caches, the workspace), mirroring `dgemma-cpu`'s model line by line; a decoder
//!   pass may stack several sequences' canvases (one read of the weights for all of them).
//! * [`backend`]: [`GpuBackend`], a [`dgemma_model::Backend`] over one or more sequences that
//!   records each decoder pass once (a CUDA graph) and replays it for every denoising step,
//!   and steps batches of sequences on the device ([`GpuBackend::step_batch`]).
//! * [`sampling`]: the sampler step on the device, appended to a recorded decoder pass
//!   ([`dgemma_model::DeviceSampling`]): only a few status words come back per step.
//! * [`shared`]: one backend serving many sequences through per-request handles (servers).
//! * [`bench`]: end-to-end timings (steps per context and per batch, prefill, commit, tokens/s,
//!   TTFT) against the memory floor, in the results contract (`dgemma bench`).
//!
//! The executor is a type parameter: [`dgemma_cuda::GpuExecutor`] on a GPU, and with the
//! `emulator` feature `dgemma_cuda::EmuExecutor`, which runs the very same plans on the CPU
//! kernel emulator, so the whole backend is tested against the CPU backend without a GPU
//! (`tests/emulated_backend.rs`).

pub mod backend;
pub mod bench;
pub mod error;
pub mod kernels;
pub mod kv_cache;
pub mod plan;
pub mod sampling;
pub mod shared;
pub mod weights;

pub use backend::{GpuBackend, GpuOptions};
pub use shared::{SequenceHandle, SharedBackend, SharedMemory, SharedModel};
pub use dgemma_cuda::{gemm_floor, Device, Executor, GpuExecutor};
#[cfg(feature = "emulator")]
pub use dgemma_cuda::EmuExecutor;
