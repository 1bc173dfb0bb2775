//! dgemma: an inference engine for Google's DiffusionGemma.
//!
//! This crate is the front door for programs that link dgemma. The work is done in the
//! workspace crates it re-exports:
//!
//! * [`model`] (`dgemma-model`): config and checkpoint loading, typed weights, the
//!   [`Backend`] interface.
//! * [`cpu`] (`dgemma-cpu`): the CPU reference backend.
//! * [`sampler`] (`dgemma-sampler`): temperature schedule, entropy-bound acceptance,
//!   stopping rule, noise sources.
//! * [`tokenizer`] (`dgemma-tokenizer`): tokenizer.json and the chat template.
//! * [`engine`] (`dgemma-engine`): the block-diffusion generation loop and reference checks.
//! * [`gpu`] (`dgemma-gpu`): the CUDA backend; [`cuda::open_device`] opens a GPU with the
//!   kernels embedded in this build ([`kernels`]).

pub use dgemma_cpu as cpu;
pub use dgemma_engine as engine;
pub use dgemma_gpu as gpu;
pub use dgemma_model as model;
pub use dgemma_sampler as sampler;
pub use dgemma_tokenizer as tokenizer;

pub use dgemma_engine::{generate, Generation, GenerationSettings, Observer};
pub use dgemma_model::{Backend, Precision};

/// The git commit this library was built from ("unknown" outside a checkout).
pub const GIT_COMMIT: &str = env!("DGEMMA_GIT_COMMIT");
pub mod cuda;
pub mod kernels;
