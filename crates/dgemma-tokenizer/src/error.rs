use std::path::PathBuf;

/// Everything that can go wrong in this crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A required file does not exist.
    #[error("{}: file not found", path.display())]
    FileNotFound { path: PathBuf },

    /// A file exists but could not be read.
    #[error("{}: cannot read: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// A file was read but its content is not valid (bad JSON, unsupported tokenizer, bad template).
    #[error("{}: malformed: {message}", path.display())]
    Malformed { path: PathBuf, message: String },

    /// A token id that the tokenizer does not know (>= vocab size, or a hole in the vocabulary).
    #[error("unknown token id {id} (tokenizer vocab size is {vocab_size})")]
    UnknownTokenId { id: u32, vocab_size: usize },

    /// A special token the operation needs (e.g. `<bos>`) is not in the vocabulary.
    #[error("special token {token:?} is not in the tokenizer vocabulary")]
    MissingSpecialToken { token: String },

    /// The underlying `tokenizers` encoder failed.
    #[error("encode failed: {0}")]
    Encode(String),

    /// The underlying `tokenizers` decoder failed.
    #[error("decode failed: {0}")]
    Decode(String),

    /// Compiling or rendering the chat template failed (includes `raise_exception(...)` calls).
    #[error("chat template: {0}")]
    Template(String),
}

/// Alias kept for readability at call sites in other crates.
pub type TokenizerError = Error;

/// `Result` with this crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub(crate) fn read(path: &std::path::Path, source: std::io::Error) -> Self {
        if source.kind() == std::io::ErrorKind::NotFound {
            Error::FileNotFound {
                path: path.to_path_buf(),
            }
        } else {
            Error::Io {
                path: path.to_path_buf(),
                source,
            }
        }
    }

    pub(crate) fn malformed(path: &std::path::Path, message: impl std::fmt::Display) -> Self {
        Error::Malformed {
            path: path.to_path_buf(),
            message: message.to_string(),
        }
    }

    pub(crate) fn template(err: &minijinja::Error) -> Self {
        // minijinja's Display already carries kind, detail and "(in template:line)".
        let mut msg = err.to_string();
        let mut source = std::error::Error::source(err);
        while let Some(s) = source {
            msg.push_str(": ");
            msg.push_str(&s.to_string());
            source = s.source();
        }
        Error::Template(msg)
    }
}
