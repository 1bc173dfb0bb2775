//! The GPU backend on a real GPU, with the checks of `emulated_backend.rs` (`common/mod.rs`).
//! `#[ignore]`d: without a GPU they FAIL when forced (opening the device fails), never pass.
//!
//! ```text
//! cargo test -p dgemma-gpu --test gpu_backend -- --include-ignored
//! ```

mod common;

use dgemma_gpu::{Device, GpuExecutor};

fn gpu() -> GpuExecutor {
    if !dgemma::kernels::HAVE_KERNELS {
        panic!("dgemma was built without CUDA kernels ({}): set NVCC and rebuild", dgemma::kernels::NOT_BUILT_REASON);
    }
    let dev = Device::open(0, dgemma::kernels::FATBIN).unwrap_or_else(|e| panic!("this test needs a CUDA GPU: {e}"));
    GpuExecutor::new(dev)
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn logits_match_the_cpu_backend() {
    common::check_logits_match_cpu(gpu);
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn fp8_logits_match_the_cpu_backend() {
    common::check_fp8_logits_match_cpu(gpu);
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn fp8_versus_bf16_experts() {
    common::check_fp8_versus_bf16(gpu);
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn synthetic_fp8_experts_run() {
    common::check_synthetic_fp8(gpu);
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn prefill_chunking_is_exact() {
    common::check_prefill_chunking_is_exact(gpu);
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn sliding_ring_wraps_exactly() {
    common::check_sliding_ring_wraps(gpu);
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn replay_sees_new_canvas_and_self_conditioning() {
    common::check_replay_sees_new_inputs(gpu);
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn bf16_reference_cases_pass() {
    common::check_bf16_cases(gpu);
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn bad_input_is_a_clear_error() {
    common::check_bad_input(gpu);
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn synthetic_weights_and_the_bench_driver_work() {
    common::check_synthetic_bench(gpu);
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn device_sampling_follows_the_host_sampler() {
    common::check_device_sampling(gpu);
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn shared_sequences_match_their_solo_runs() {
    common::check_shared_sequences(gpu);
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn batched_steps_match_their_solo_steps() {
    common::check_batched_steps_are_exact(gpu);
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn failed_sequences_do_not_leak() {
    common::check_failed_sequences_do_not_leak(gpu);
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn kv_pages_are_taken_and_given_back() {
    common::check_kv_pages(gpu);
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn mixed_passes_equal_separate_passes() {
    common::check_mixed_passes(gpu);
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn fp8_quantised_at_upload_equals_at_load() {
    common::check_fp8_quantised_at_upload(gpu);
}
