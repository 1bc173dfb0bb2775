//! Errors: the backend reports through `dgemma_model::Error::Backend { backend: "cuda", .. }`,
//! so the engine handles every backend's failures alike.

pub use dgemma_model::error::{Error, Result};

/// The backend's name in errors and logs.
pub const NAME: &str = "cuda";

pub fn backend_error(msg: impl Into<String>) -> Error {
    Error::Backend { backend: NAME.into(), msg: msg.into() }
}

/// Converts a CUDA runtime error (out of memory stays recognisable: [`Error::OutOfMemory`]).
pub fn cuda(e: dgemma_cuda::CudaError) -> Error {
    match e {
        dgemma_cuda::CudaError::OutOfMemory { .. } => Error::OutOfMemory { backend: NAME.into(), msg: e.to_string() },
        e => backend_error(e.to_string()),
    }
}
