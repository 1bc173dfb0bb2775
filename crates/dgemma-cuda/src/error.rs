//! Errors of the CUDA runtime.

use cudarc::driver::DriverError;

/// Everything that can go wrong opening a device or launching a kernel. No function of this
/// crate panics on a missing driver, device or kernel; they return one of these.
#[derive(Debug, thiserror::Error)]
pub enum CudaError {
    #[error(
        "no CUDA driver: libcuda.so could not be loaded (install the NVIDIA driver, or put libcuda.so.1 on \
         LD_LIBRARY_PATH)"
    )]
    NoDriver,
    #[error("no CUDA device with ordinal {ordinal} (the driver reports {count})")]
    NoDevice { ordinal: usize, count: usize },
    #[error(
        "the kernel image is empty: dgemma was built without nvcc (see dgemma::kernels::NOT_BUILT_REASON; \
         install with tools/install-cuda-toolchain.sh, set NVCC and rebuild)"
    )]
    NoKernels,
    #[error(
        "unsupported GPU `{name}` (compute capability {major}.{minor}): the fatbin carries sm_90a (H100/H200) and \
         sm_120 code only"
    )]
    UnsupportedArch { name: String, major: i32, minor: i32 },
    #[error("kernel `{0}` is not in the loaded fatbin (built for other model shapes?)")]
    MissingKernel(String),
    #[error(
        "out of GPU memory allocating {bytes} bytes for {what} ({free} of {total} bytes free): use a shorter \
         context, fewer canvases, or a GPU with more memory"
    )]
    OutOfMemory { what: String, bytes: usize, free: usize, total: usize },
    #[error("{op}: {msg}")]
    Args { op: &'static str, msg: String },
    #[error("CUDA driver error in {what}: {source}")]
    Driver {
        what: &'static str,
        #[source]
        source: DriverError,
    },
    #[error("the CUDA bindings panicked in {what}: {msg}")]
    Panic { what: &'static str, msg: String },
}

/// Shorthand for results of this crate.
pub type Result<T, E = CudaError> = std::result::Result<T, E>;

/// Attaches a description to a driver error.
pub(crate) trait Context<T> {
    fn ctx(self, what: &'static str) -> Result<T>;
}

impl<T> Context<T> for std::result::Result<T, DriverError> {
    fn ctx(self, what: &'static str) -> Result<T> {
        self.map_err(|source| CudaError::Driver { what, source })
    }
}

/// An argument error of `op`.
pub(crate) fn args(op: &'static str, msg: impl Into<String>) -> CudaError {
    CudaError::Args { op, msg: msg.into() }
}
