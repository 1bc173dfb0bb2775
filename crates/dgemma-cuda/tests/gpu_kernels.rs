//! Every kernel of the fatbin on the GPU against the CPU oracle (the checks live in
//! `common/mod.rs`, shared with the CPU-emulator tests).
//!
//! These tests need a CUDA GPU (H100/H200, or an sm_120 card) and a build with nvcc:
//!
//! ```text
//! tools/install-cuda-toolchain.sh && export NVCC=$PWD/.tools/cuda/nvidia/cu13/bin/nvcc
//! cargo test -p dgemma-cuda --test gpu_kernels -- --include-ignored
//! ```
//!
//! They are `#[ignore]`d so that `cargo test` passes on machines without a GPU. Run with
//! `--include-ignored` on such a machine they FAIL (opening the device fails); they never pass
//! silently.

mod common;

use common::{Exec, Host};
use cudarc::driver::{CudaSlice, DevicePtr};
use dgemma_codegen::{supported_specs, Arch};
use dgemma_cuda::ops::{self, Buf, LaunchPlan};
use dgemma_cuda::{bf16, Device};

fn device() -> Device {
    if !dgemma::kernels::HAVE_KERNELS {
        panic!("dgemma was built without CUDA kernels ({}): set NVCC and rebuild", dgemma::kernels::NOT_BUILT_REASON);
    }
    Device::open(0, dgemma::kernels::FATBIN).unwrap_or_else(|e| panic!("this test needs a CUDA GPU: {e}"))
}

struct Gpu(Device);

enum Mem {
    Bf16(CudaSlice<bf16>),
    F32(CudaSlice<f32>),
    I32(CudaSlice<i32>),
    U8(CudaSlice<u8>),
}

impl Exec for Gpu {
    fn arch(&self) -> Arch {
        self.0.arch()
    }
    fn max_work(&self) -> usize {
        usize::MAX
    }
    fn launch(&self, bufs: &mut [Host], plan: &dyn Fn(&[Buf]) -> LaunchPlan) {
        let dev = &self.0;
        let mems: Vec<Mem> = bufs
            .iter()
            .map(|h| match h {
                Host::Bf16(v) => Mem::Bf16(dev.upload(v).unwrap()),
                Host::F32(v) => Mem::F32(dev.upload(v).unwrap()),
                Host::I32(v) => Mem::I32(dev.upload(v).unwrap()),
                Host::U8(v) => Mem::U8(dev.upload(v).unwrap()),
            })
            .collect();
        // One stream: launches and copies are ordered, so the pointers can be used directly.
        let stream = dev.stream();
        let addrs: Vec<Buf> = mems
            .iter()
            .map(|m| match m {
                Mem::Bf16(s) => Buf { ptr: s.device_ptr(stream).0, len: s.len() },
                Mem::F32(s) => Buf { ptr: s.device_ptr(stream).0, len: s.len() },
                Mem::I32(s) => Buf { ptr: s.device_ptr(stream).0, len: s.len() },
                Mem::U8(s) => Buf { ptr: s.device_ptr(stream).0, len: s.len() },
            })
            .collect();
        let plan = plan(&addrs);
        // SAFETY: the addresses are the live device buffers above, with their lengths.
        unsafe { ops::run(dev, &plan) }.unwrap_or_else(|e| panic!("{}: {e}", plan.spec.kernel_name()));
        for (h, m) in bufs.iter_mut().zip(&mems) {
            *h = match m {
                Mem::Bf16(s) => Host::Bf16(dev.download(s).unwrap()),
                Mem::F32(s) => Host::F32(dev.download(s).unwrap()),
                Mem::I32(s) => Host::I32(dev.download(s).unwrap()),
                Mem::U8(s) => Host::U8(dev.download(s).unwrap()),
            };
        }
    }
}

fn gpu() -> Gpu {
    Gpu(device())
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn every_indexed_kernel_loads() {
    let dev = device();
    eprintln!("{dev:?}");
    assert_eq!(dgemma::kernels::KERNEL_NAMES.len(), supported_specs().len());
    for name in dgemma::kernels::KERNEL_NAMES {
        assert!(dev.has_kernel(name), "{name} is in the index but not in the module");
    }
    assert!(!dev.has_kernel("no_such_kernel"));
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn kernels_of_another_arch_are_refused() {
    let dev = device();
    let other = supported_specs().into_iter().find(|s| !s.target.runs_on(dev.arch())).expect("an arch-specific spec");
    let err = dev.function(&other).unwrap_err();
    assert!(err.to_string().contains("has no body"), "{err}");
    // Its twin for this arch (or the portable spec) is what `resolve` picks.
    let resolved = dev.resolve(other.op).unwrap();
    assert!(resolved.target.runs_on(dev.arch()), "{resolved:?}");
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn rms_norm_matches_cpu() {
    common::check_rms_norm(&gpu());
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn rope_matches_cpu_bitwise() {
    common::check_rope(&gpu());
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn embedding_matches_cpu_bitwise() {
    common::check_embedding(&gpu());
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn geglu_matches_cpu() {
    common::check_geglu(&gpu());
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn softcap_matches_cpu() {
    common::check_softcap(&gpu());
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn row_softmax_entropy_argmax_matches_sampler() {
    common::check_row_softmax_entropy_argmax(&gpu());
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn attention_matches_cpu() {
    common::check_attention(&gpu());
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn linear_matches_cpu() {
    common::check_linear(&gpu());
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn grouped_gemm_geglu_matches_cpu() {
    common::check_grouped_gemm_geglu(&gpu());
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn moe_sort_matches_cpu_exactly() {
    common::check_moe_sort(&gpu());
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn grouped_gemm_down_matches_cpu() {
    common::check_grouped_gemm_down(&gpu());
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn moe_experts_match_cpu() {
    common::check_moe_experts(&gpu());
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn router_matches_cpu_exactly() {
    common::check_router(&gpu());
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn soft_embedding_matches_cpu() {
    common::check_soft_embedding(&gpu());
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn gumbel_sample_matches_sampler_bitwise() {
    common::check_gumbel_sample(&gpu());
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn sampler_canvas_matches_sampler_bitwise() {
    common::check_sampler_canvas(&gpu());
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn device_sampler_matches_denoise_step() {
    common::check_sampler_end_to_end(&gpu());
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn read_bandwidth_reads_every_vector_once() {
    common::check_read_bandwidth(&gpu());
}

/// The cuBLASLt GEMM floors of the benchmarks run and give a plausible rate: bf16 on every
/// GPU, e4m3 where cuBLASLt has FP8 GEMMs (sm_89 and later: both of the fatbin's archs).
#[test]
#[ignore = "needs a CUDA GPU"]
fn cublaslt_gemm_floors_run() {
    use dgemma_cuda::gemm_floor::{cublaslt_gemm_tflops, GemmInput};
    let dev = device();
    for input in [GemmInput::Bf16, GemmInput::Fp8E4m3] {
        let t = cublaslt_gemm_tflops(&dev, 2048, input, 3).unwrap_or_else(|e| panic!("{input:?}: {e}"));
        // Any tensor-core GPU of the fatbin's archs does far more than 10 TFLOP/s at 2048^3, and
        // none reaches 10,000.
        assert!(t.is_finite() && t > 10.0 && t < 10_000.0, "{input:?}: {t} TFLOP/s");
    }
    assert!(cublaslt_gemm_tflops(&dev, 1000, GemmInput::Bf16, 1).is_err(), "n must be a multiple of 16");
}
