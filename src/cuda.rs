//! Opening a GPU with the kernels embedded in this build.

use dgemma_gpu::Device;

/// Opens CUDA device `ordinal` and loads this build's kernel fatbin. Every failure is an error
/// saying what to do: a build without nvcc, no driver, no device, an unsupported GPU.
pub fn open_device(ordinal: usize) -> Result<Device, dgemma_gpu::error::Error> {
    if !crate::kernels::HAVE_KERNELS {
        return Err(dgemma_gpu::error::backend_error(format!(
            "this build has no CUDA kernels ({}); install the toolchain with tools/install-cuda-toolchain.sh, set \
             NVCC and rebuild, or use --backend cpu",
            crate::kernels::NOT_BUILT_REASON
        )));
    }
    Device::open(ordinal, crate::kernels::FATBIN).map_err(dgemma_gpu::error::cuda)
}
