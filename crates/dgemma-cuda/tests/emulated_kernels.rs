//! Every kernel, compiled for the CPU emulator (`emu/cuda_emu.hpp`), against the CPU oracle: the
//! same checks as `gpu_kernels.rs` (`common/mod.rs`), runnable on machines without a GPU:
//!
//! ```text
//! cargo test -p dgemma-cuda --features emulator --test emulated_kernels
//! ```
//!
//! The emulator runs the sm_90a and portable kernels (single-threaded, fibers for CUDA threads),
//! so the largest shapes (the 26B LM head, big expert GEMMs) are skipped: `DGEMMA_EMU_MAX_WORK`
//! raises the limit. It checks kernel logic (indexing, masks, reductions, rounding points), not
//! GPU behaviour: glibc's expf/tanhf stand in for CUDA's, and there are no real concurrency
//! hazards.
#![cfg(feature = "emulator")]

mod common;

use common::{Exec, Host};
use dgemma_codegen::Arch;
use dgemma_cuda::ops::{Buf, LaunchPlan};

struct Emu;

impl Exec for Emu {
    fn arch(&self) -> Arch {
        dgemma_cuda::emu::ARCH
    }
    fn max_work(&self) -> usize {
        std::env::var("DGEMMA_EMU_MAX_WORK").ok().and_then(|v| v.parse().ok()).unwrap_or(500_000_000)
    }
    fn launch(&self, bufs: &mut [Host], plan: &dyn Fn(&[Buf]) -> LaunchPlan) {
        let addrs: Vec<Buf> = bufs
            .iter_mut()
            .map(|h| match h {
                Host::Bf16(v) => Buf { ptr: v.as_mut_ptr() as u64, len: v.len() },
                Host::F32(v) => Buf { ptr: v.as_mut_ptr() as u64, len: v.len() },
                Host::I32(v) => Buf { ptr: v.as_mut_ptr() as u64, len: v.len() },
                Host::U8(v) => Buf { ptr: v.as_mut_ptr() as u64, len: v.len() },
            })
            .collect();
        let plan = plan(&addrs);
        // SAFETY: the plan functions checked every buffer against what the kernel touches, and
        // the addresses are live host vectors for the duration of the call.
        unsafe { dgemma_cuda::emu::run(&plan) }.unwrap_or_else(|e| panic!("{}: {e}", plan.spec.kernel_name()));
    }
}

#[test]
fn rms_norm_matches_cpu() {
    common::check_rms_norm(&Emu);
}

#[test]
fn rope_matches_cpu_bitwise() {
    common::check_rope(&Emu);
}

#[test]
fn embedding_matches_cpu_bitwise() {
    common::check_embedding(&Emu);
}

#[test]
fn geglu_matches_cpu() {
    common::check_geglu(&Emu);
}

#[test]
fn softcap_matches_cpu() {
    common::check_softcap(&Emu);
}

#[test]
fn row_softmax_entropy_argmax_matches_sampler() {
    common::check_row_softmax_entropy_argmax(&Emu);
}

#[test]
fn attention_matches_cpu() {
    common::check_attention(&Emu);
}

#[test]
fn linear_matches_cpu() {
    common::check_linear(&Emu);
}

#[test]
fn grouped_gemm_geglu_matches_cpu() {
    common::check_grouped_gemm_geglu(&Emu);
}

#[test]
fn moe_sort_matches_cpu_exactly() {
    common::check_moe_sort(&Emu);
}

#[test]
fn grouped_gemm_down_matches_cpu() {
    common::check_grouped_gemm_down(&Emu);
}

#[test]
fn moe_experts_match_cpu() {
    common::check_moe_experts(&Emu);
}

#[test]
fn router_matches_cpu_exactly() {
    common::check_router(&Emu);
}

#[test]
fn soft_embedding_matches_cpu() {
    common::check_soft_embedding(&Emu);
}

#[test]
fn the_emulator_refuses_other_arch_kernels() {
    // An sm_120-only variant of a (portable) linear: the arch check refuses it before the
    // kernel table is consulted.
    let portable = dgemma_codegen::shapes::linear_spec(64, 64);
    let spec = dgemma_codegen::KernelSpec { target: dgemma_codegen::Target::Only(Arch::Sm120), ..portable };
    // Never dereferenced: the arch check comes first.
    let fake = Buf { ptr: 16, len: usize::MAX / 4 };
    let plan = dgemma_cuda::ops::plan_linear(&spec, fake, fake, fake, 1).unwrap();
    let err = unsafe { dgemma_cuda::emu::run(&plan) }.unwrap_err();
    assert!(err.to_string().contains("no body"), "{err}");
}

#[test]
fn gumbel_sample_matches_sampler_bitwise() {
    common::check_gumbel_sample(&Emu);
}

#[test]
fn sampler_canvas_matches_sampler_bitwise() {
    common::check_sampler_canvas(&Emu);
}

#[test]
fn device_sampler_matches_denoise_step() {
    common::check_sampler_end_to_end(&Emu);
}

#[test]
fn read_bandwidth_reads_every_vector_once() {
    common::check_read_bandwidth(&Emu);
}
