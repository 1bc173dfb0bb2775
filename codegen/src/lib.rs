//! dgemma-codegen: generates dgemma's specialised CUDA kernels from typed specs.
//!
//! The split follows DeepGEMM and llama.cpp's template instances:
//!
//! * **Templates** (`csrc/*.cuh`, hand-written): one readable device template per op family,
//!   each opening with the algorithm and the exact bf16 rounding points of the CPU oracle
//!   (`dgemma-cpu`).
//! * **Specs** ([`spec`]): a [`KernelSpec`] fixes an op family's compile-time parameters
//!   (widths, head dims, mask, GEMM epilogue, tile sizes), the dtype and the target arch.
//!   [`KernelSpec::kernel_name`] encodes every parameter.
//! * **Emission** ([`emit()`]): a spec becomes a tiny deterministic `.cu` file that includes the
//!   template and instantiates it as an `extern "C"` kernel.
//! * **Heuristics** ([`shapes`]): [`specs_for_model`] maps a [`ModelShape`] to the kernels it
//!   needs; [`supported_specs`] is the union over the shapes build.rs compiles.
//!
//! The root crate's build.rs writes [`emit()`]'s output for [`supported_specs`] to `OUT_DIR`
//! and compiles it with nvcc into one fatbin (sm_90a + sm_120 + compute_120 PTX); the runtime
//! (`dgemma-cuda`) uses the same specs for kernel names and launch geometry.

pub mod emit;
pub mod shapes;
pub mod spec;

pub use emit::{emit, emit_unity, file_name, params, Param, FATBIN_ARCHS, GENCODES};
pub use shapes::{specs_for_model, supported_specs, LayerAttention, ModelShape, SAMPLER_MAX_CANVAS, SUPPORTED_MODELS};
pub use spec::{
    Arch, Attention, Dtype, Embedding, Family, GemmEngine, GemmFuse, GroupedGemm, GumbelSample, KernelSpec, Linear,
    LinearEngine, MaskKind,
    MoeCombine, MoeSort, Op, ReadBandwidth, RmsNorm, Rope, Router, RowSoftmaxEntropyArgmax, SamplerCanvas,
    SoftEmbedding, SoftEmbeddingProbs, SoftEmbeddingReduce, Target, WeightFormat,
};
