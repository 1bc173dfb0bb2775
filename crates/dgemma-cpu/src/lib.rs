//! The CPU reference backend of dgemma.
//!
//! Every operator of DiffusionGemma written for clarity, in two numeric modes: float32
//! throughout, and a bf16 mode that rounds exactly where transformers' bfloat16 run stores a
//! tensor. It is the oracle every GPU kernel is tested against, and it is itself checked
//! against transformers' dumps (`reference/cases`).
//!
//! Layout:
//! * [`ops`]: one module per operator family, each with its tests.
//! * [`weights`]: the checkpoint's tensors as the operators read them.
//! * [`cache`]: the per-layer KV cache with the sliding-window retention of transformers'
//!   DynamicCache.
//! * [`model`]: the forward passes (encoder, decoder), written straight through.
//! * [`CpuBackend`]: the [`dgemma_model::Backend`] implementation.

pub mod ops;
pub mod precision;

pub use precision::Precision;
pub mod backend;
pub mod cache;
pub mod model;
pub mod weights;

pub use backend::CpuBackend;
