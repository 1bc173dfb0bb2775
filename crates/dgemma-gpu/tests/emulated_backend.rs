//! The GPU backend's plans run on the CPU kernel emulator, checked against the CPU backend and
//! the transformers cases (the bodies live in `common/mod.rs`, shared with `gpu_backend.rs`):
//!
//! ```text
//! cargo test -p dgemma-gpu --features emulator --test emulated_backend
//! ```
#![cfg(feature = "emulator")]

mod common;

use dgemma_gpu::EmuExecutor;

#[test]
fn logits_match_the_cpu_backend() {
    common::check_logits_match_cpu(EmuExecutor::new);
}

#[test]
fn fp8_logits_match_the_cpu_backend() {
    common::check_fp8_logits_match_cpu(EmuExecutor::new);
}

#[test]
fn fp8_versus_bf16_experts() {
    common::check_fp8_versus_bf16(EmuExecutor::new);
}

#[test]
fn synthetic_fp8_experts_run() {
    common::check_synthetic_fp8(EmuExecutor::new);
}

#[test]
fn prefill_chunking_is_exact() {
    common::check_prefill_chunking_is_exact(EmuExecutor::new);
}

#[test]
fn sliding_ring_wraps_exactly() {
    common::check_sliding_ring_wraps(EmuExecutor::new);
}

#[test]
fn replay_sees_new_canvas_and_self_conditioning() {
    common::check_replay_sees_new_inputs(EmuExecutor::new);
}

#[test]
fn bf16_reference_cases_pass() {
    common::check_bf16_cases(EmuExecutor::new);
}

#[test]
fn bad_input_is_a_clear_error() {
    common::check_bad_input(EmuExecutor::new);
}

#[test]
fn synthetic_weights_and_the_bench_driver_work() {
    common::check_synthetic_bench(EmuExecutor::new);
}

#[test]
fn device_sampling_follows_the_host_sampler() {
    common::check_device_sampling(EmuExecutor::new);
}

#[test]
fn shared_sequences_match_their_solo_runs() {
    common::check_shared_sequences(EmuExecutor::new);
}

#[test]
fn batched_steps_match_their_solo_steps() {
    common::check_batched_steps_are_exact(EmuExecutor::new);
}

#[test]
fn failed_sequences_do_not_leak() {
    common::check_failed_sequences_do_not_leak(EmuExecutor::new);
}

#[test]
fn kv_pages_are_taken_and_given_back() {
    common::check_kv_pages(EmuExecutor::new);
}

#[test]
fn mixed_passes_equal_separate_passes() {
    common::check_mixed_passes(EmuExecutor::new);
}

#[test]
fn fp8_quantised_at_upload_equals_at_load() {
    common::check_fp8_quantised_at_upload(EmuExecutor::new);
}
