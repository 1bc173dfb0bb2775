//! The runtime's error type.

use std::path::PathBuf;

/// Everything that can go wrong when loading an engine, submitting a request or generating.
///
/// Errors are plain data (messages, not sources) so that they can be cloned, sent across threads
/// and handed through the C ABI unchanged.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RuntimeError {
    /// The model directory could not be loaded (missing or malformed file, bad tensor, ...).
    #[error("cannot load the model from {}: {message}", path.display())]
    Load { path: PathBuf, message: String },
    /// Engine options that cannot work (e.g. `max_concurrent = 0`, an unavailable backend).
    #[error("invalid engine options: {0}")]
    InvalidOptions(String),
    /// The request was rejected before any compute: empty or too long prompt, invalid settings.
    /// Other requests are not affected.
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// The request was cancelled ([`crate::RequestHandle::cancel`]) before it finished.
    #[error("the request was cancelled")]
    Cancelled,
    /// The backend, sampler or tokenizer failed while generating this request.
    #[error("generation failed: {0}")]
    Generation(String),
    /// The engine was shut down (dropped) before the request finished.
    #[error("the engine was shut down before the request finished")]
    ShutDown,
}

/// `Result` with [`RuntimeError`].
pub type Result<T> = std::result::Result<T, RuntimeError>;
