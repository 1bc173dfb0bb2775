//! dgemma-cuda: the CUDA runtime of dgemma.
//!
//! * [`Device`]: opens a GPU through the driver API (cudarc, libcuda loaded at run time) and
//!   loads a kernel fatbin handed in by the caller (normally `dgemma::kernels::FATBIN`, built by
//!   the root crate's build.rs). [`Device::open`] never panics: a machine without a driver, a
//!   missing device, an empty image or an unsupported GPU are [`CudaError`]s.
//! * [`ops`]: per kernel family a pure plan function (`plan_*`: buffer checks, grid, arguments
//!   in the generated signature's order) and a typed launch wrapper. Families: RMSNorm, RoPE,
//!   embedding, GeGLU, softcap, the sampler's row statistics, the self-conditioning softmax and
//!   soft embedding, attention, dense and grouped GEMMs, the MoE router, the Gumbel-max draw and
//!   the canvas sampler step; and the HBM read-bandwidth probe (the floor of benchmarks).
//! * [`exec`]: [`Executor`]s own memory and run planned passes (lists of [`Step`]s):
//!   [`GpuExecutor`] on a device (CUDA-graph record and replay, event timers) and, with the
//!   `emulator` feature, `EmuExecutor` on the CPU kernel emulator.
//!
//! Kernel names and launch geometry come from `dgemma-codegen` (re-exported as [`codegen`]), so
//! the runtime and the generated kernels share one definition. This crate holds no model logic:
//! which spec runs which layer is the backend's business (`codegen::specs_for_model`).
//!
//! Tests: `tests/no_driver.rs` and `tests/shapes.rs` run everywhere. The kernel checks
//! (`tests/common/mod.rs`: every kernel of the table against the `dgemma-cpu` / `dgemma-sampler`
//! oracle, outputs poisoned with NaN) run two ways:
//! * on a GPU, `tests/gpu_kernels.rs`, `#[ignore]`d (and failing, not skipping, when forced
//!   without a GPU): `cargo test -p dgemma-cuda --test gpu_kernels -- --include-ignored`;
//! * on the CPU emulator (feature `emulator`, module `emu`), `tests/emulated_kernels.rs`:
//!   `cargo test -p dgemma-cuda --features emulator --test emulated_kernels`.

pub mod device;
#[cfg(feature = "emulator")]
pub mod emu;
pub mod error;
pub mod exec;
pub mod gemm_floor;
pub mod ops;
pub mod rng;

pub use cudarc;
pub use device::{Device, DeviceBuffer};
pub use dgemma_codegen as codegen;
pub use dgemma_codegen::{Arch, KernelSpec, Op};
pub use error::{CudaError, Result};
pub use rng::Rng;
#[cfg(feature = "emulator")]
pub use exec::EmuExecutor;
pub use exec::{Executor, GpuExecutor, Region, Step};
pub use half::bf16;
