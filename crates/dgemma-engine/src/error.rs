//! The engine's error type: wraps the lower crates' errors and adds request and case errors.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Model(#[from] dgemma_model::error::Error),
    #[error(transparent)]
    Sampler(#[from] dgemma_sampler::SamplerError),
    #[error(transparent)]
    Tokenizer(#[from] dgemma_tokenizer::Error),
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    #[error("case file {path}: {message}")]
    Case { path: PathBuf, message: String },
}

pub type Result<T> = std::result::Result<T, EngineError>;
