//! Golden tests: the emitted source of a few kernels, and the whole kernel table (through the
//! unity file), compared with the files under `codegen/tests/golden/`.
//!
//! After an intended change, re-bless with
//! `DGEMMA_BLESS=1 cargo test -p dgemma-codegen --test golden` and review the diff.

use std::path::PathBuf;

use dgemma_codegen::{emit, emit_unity, supported_specs, KernelSpec};

/// Kernels whose emitted source is pinned: one per family and fusion/target flavour.
const PINNED: &[&str] = &[
    "rmsnorm_w2816_scale_resadd_bf16",
    "rmsnorm_w2816_scale_inadd_resadd_lscalar_bf16",
    "rmsnorm_w64_noscale_inadd_bf16",
    "rope_d512_p64_bf16",
    "embedding_h2816_bf16",
    "geglu_bf16",
    "softcap_bf16",
    "row_softmax_entropy_argmax_v262144_bf16",
    "attention_d256_q16_kv8_sliding_t64x64x64_w2x4_bf16",
    "attention_d512_q16_kv2_bidir_t64x64x64_w2x4_bf16",
    "attention_d512_q16_kv2_bidir_t64x64x64_w4x2_wgmma_bf16_sm90a",
    "linear_n262144_k2816_t64x128x32_w32x32_bf16",
    "linear_n2816_k4096_t32x64x32_w32x32_bf16",
    "grouped_gemm_n1408_k2816_geglu_r32_c32_bf16_sm90a",
    "grouped_gemm_n2816_k704_down_r32_c64_bf16_sm120",
    "grouped_gemm_n1408_k2816_geglu_r32_c32_e4m3_bf16_sm90a",
    "grouped_gemm_n2816_k704_down_r32_c64_e4m3_bf16_sm120",
    "grouped_gemm_n1408_k2816_geglu_mma_t64x64x32_w8_bf16_sm90a",
    "grouped_gemm_n2816_k704_down_mma_t64x128x32_w8_bf16_sm120",
    "grouped_gemm_n1408_k2816_geglu_wgmma_t128x64x64_s3_bf16_sm90a",
    "grouped_gemm_n2816_k704_down_wgmma_t128x128x64_s3_e4m3_bf16_sm90a",
    "linear_n262144_k2816_wgmma_t128x128x64_s3_bf16_sm90a",
    "grouped_gemm_n1408_k2816_geglu_mma_t64x64x32_w8_e4m3_bf16_sm90a",
    "grouped_gemm_n2816_k704_down_mma_t64x128x32_w8_e4m3_bf16_sm120",
    "moe_sort_e128_bf16",
    "moe_combine_h2816_bf16",
    "router_h2816_e128_k8_bf16",
    "soft_embedding_probs_v262144_bf16",
    "soft_embedding_h2816_v262144_t256x128x32_w64x64_s6_bf16",
    "soft_embedding_h2816_v262144_t256x128x64_wgmma3_s6_bf16_sm90a",
    "soft_embedding_reduce_h2816_s6_bf16",
    "gumbel_sample_v262144_bf16",
    "sampler_canvas_c256_bf16",
    "read_bandwidth_t256_u4_bf16",
];

/// `codegen/` in the repository: under `$DGEMMA_REPO` when set and not empty (test executables
/// built on one machine and run from another checkout), else the compile-time source tree.
fn crate_dir() -> PathBuf {
    match std::env::var_os("DGEMMA_REPO") {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir).join("codegen"),
        _ => PathBuf::from(env!("CARGO_MANIFEST_DIR")),
    }
}

fn golden_dir() -> PathBuf {
    crate_dir().join("tests/golden")
}

fn bless() -> bool {
    std::env::var("DGEMMA_BLESS").is_ok_and(|v| !v.is_empty() && v != "0")
}

fn check(file: &str, actual: &str) {
    let path = golden_dir().join(file);
    if bless() {
        std::fs::create_dir_all(golden_dir()).unwrap();
        std::fs::write(&path, actual).unwrap();
        return;
    }
    let expected = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (run with DGEMMA_BLESS=1 to create it)", path.display()));
    if expected != actual {
        let line = expected.lines().zip(actual.lines()).position(|(a, b)| a != b).map_or(
            format!("lengths differ ({} vs {} lines)", expected.lines().count(), actual.lines().count()),
            |i| format!("first difference at line {}", i + 1),
        );
        panic!(
            "{} is out of date: {line}.\n--- expected\n{expected}\n--- actual\n{actual}\n\
             If the change is intended: DGEMMA_BLESS=1 cargo test -p dgemma-codegen --test golden",
            path.display()
        );
    }
}

fn spec(name: &str) -> KernelSpec {
    supported_specs()
        .into_iter()
        .find(|s| s.kernel_name() == name)
        .unwrap_or_else(|| panic!("{name} is no longer in the kernel table"))
}

#[test]
fn pinned_kernels_emit_their_golden_source() {
    for name in PINNED {
        check(&format!("{name}.cu"), &emit(&spec(name)));
    }
}

#[test]
fn the_kernel_table_is_pinned() {
    // The unity file lists every kernel build.rs compiles, in order.
    check("all_kernels.cu", &emit_unity(&supported_specs()));
}

#[test]
fn emission_does_not_depend_on_anything_but_the_spec() {
    let all = supported_specs();
    let again = supported_specs();
    assert_eq!(all, again);
    for (a, b) in all.iter().zip(&again) {
        assert_eq!(emit(a), emit(b));
    }
}
