//! The crate's error type. Every variant names the file, field or tensor that is wrong.

use std::path::PathBuf;

pub type Result<T> = std::result::Result<T, Error>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file or directory could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// A JSON file is not valid JSON.
    #[error("{}: malformed JSON: {source}", file.display())]
    Json {
        file: PathBuf,
        #[source]
        source: serde_json::Error,
    },

    /// config.json / generation_config.json is valid JSON but not a usable configuration
    /// (missing required field, wrong type, inconsistent or unsupported values).
    #[error("{}: {msg}", file.display())]
    Config { file: PathBuf, msg: String },

    /// A safetensors file (or the shard index) is malformed or truncated.
    #[error("{}: {msg}", file.display())]
    Safetensors { file: PathBuf, msg: String },

    /// A tensor the model needs is absent from the checkpoint.
    #[error("tensor {name} is missing from the checkpoint in {} ({why})", dir.display())]
    MissingTensor {
        name: String,
        dir: PathBuf,
        why: String,
    },

    /// A tensor has the wrong shape or dtype, or is read out of range. `msg` is a verb phrase
    /// ("has shape [64, 64], expected [32, 64]").
    #[error("tensor {name} in {} {msg}", file.display())]
    Tensor {
        name: String,
        file: PathBuf,
        msg: String,
    },

    /// Several problems found while validating a checkpoint's weights (all listed).
    #[error("{} problems with the checkpoint weights:\n{}", errors.len(), list_errors(errors))]
    Many { errors: Vec<Error> },

    /// Invalid argument passed by the caller (e.g. a synthetic-checkpoint spec).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),

    /// Invalid input to a forward pass or other API call (wrong lengths, ids out of range, ...).
    #[error("invalid input: {0}")]
    InvalidInput(String),

    /// A backend (model executor) failed.
    #[error("{backend} backend: {msg}")]
    Backend { backend: String, msg: String },

    /// A backend could not allocate device memory (the device is full, or the memory limit it
    /// was given is reached). A server may queue the work and retry once memory is freed.
    #[error("{backend} backend: {msg}")]
    OutOfMemory { backend: String, msg: String },
}

fn list_errors(errors: &[Error]) -> String {
    errors
        .iter()
        .map(|e| format!("  - {e}"))
        .collect::<Vec<_>>()
        .join("\n")
}

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Error {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    pub(crate) fn config(file: impl Into<PathBuf>, msg: impl Into<String>) -> Error {
        Error::Config {
            file: file.into(),
            msg: msg.into(),
        }
    }

    pub(crate) fn safetensors(file: impl Into<PathBuf>, msg: impl Into<String>) -> Error {
        Error::Safetensors {
            file: file.into(),
            msg: msg.into(),
        }
    }

    pub(crate) fn tensor(
        name: impl Into<String>,
        file: impl Into<PathBuf>,
        msg: impl Into<String>,
    ) -> Error {
        Error::Tensor {
            name: name.into(),
            file: file.into(),
            msg: msg.into(),
        }
    }

    /// Helper for backends: `Error::backend("cpu", "canvas length 0")`.
    pub fn backend(backend: impl Into<String>, msg: impl Into<String>) -> Error {
        Error::Backend {
            backend: backend.into(),
            msg: msg.into(),
        }
    }

    /// Collapses a list of problems: `Ok` when empty, the error itself when there is one.
    pub(crate) fn from_list(mut errors: Vec<Error>) -> Result<()> {
        match errors.len() {
            0 => Ok(()),
            1 => Err(errors.pop().unwrap()),
            _ => Err(Error::Many { errors }),
        }
    }
}
