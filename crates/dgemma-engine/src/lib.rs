//! The dgemma engine: the block-diffusion generation loop over any
//! [`dgemma_model::Backend`], the statistics and streaming hooks around it, and the checks
//! that compare a backend with transformers' reference cases.

pub mod case;
pub mod error;
pub mod generate;
pub mod generator;
pub mod verify;

pub use error::{EngineError, Result};
pub use generator::{Generator, Pass};
pub use generate::{generate, FinishReason, Generation, GenerationSettings, GenerationStats, Observer, Silent};
