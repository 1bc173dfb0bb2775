//! dgemma-model: the DiffusionGemma checkpoint.
//!
//! * [`config`]: `config.json` (both schemas transformers writes) -> [`ModelConfig`] /
//!   [`TextConfig`] with per-layer [`LayerSpec`]s and bit-exact RoPE inverse frequencies.
//! * [`generation`]: `generation_config.json` -> [`GenerationConfig`] with transformers' defaults.
//! * [`tensor`]: [`TensorRef`], a zero-copy view into a memory-mapped safetensors file.
//! * [`checkpoint`]: [`Checkpoint`], a validated checkpoint directory (single file or sharded).
//! * [`weights`]: [`ModelWeights`], every text tensor looked up and checked (name, shape, dtype).
//! * [`fp8`] and [`quant`]: FP8 E4M3 codes, per-row scales, FP8 experts ([`Quant`]).
//! * [`synthetic`]: random checkpoints of any small config for tests and benchmarks.
//! * [`backend`]: the [`Backend`] trait model executors implement.
//!
//! Errors are [`Error`]; every one names the file, field or tensor at fault.

pub mod backend;
pub mod checkpoint;
pub mod config;
pub mod error;
pub mod fp8;
pub mod generation;
pub mod quant;
pub mod synthetic;
pub mod tensor;
pub mod weights;

mod json;
mod sleef;

pub use backend::{Backend, DeviceCanvas, DeviceSampling, DeviceStepStatus, Precision};
pub use checkpoint::{Checkpoint, SafetensorsFile, TensorInfo};
pub use config::{
    BidirectionalAttention, ConfigSchema, LayerKind, LayerSpec, ModelConfig, RopeKind, RopeSpec,
    TextConfig, TorchCpuKernel,
};
pub use error::{Error, Result};
pub use generation::GenerationConfig;
pub use synthetic::{write_synthetic_checkpoint, SyntheticSpec};
pub use tensor::{DType, TensorRef};
pub use quant::{ExpertTensor, Fp8Experts, Quant};
pub use weights::{LayerWeights, ModelWeights};
