//! The kernels compiled into the fatbin cover the tiny reference models.
//!
//! `dgemma-codegen` carries the tiny models' shape as a constant (`ModelShape::TINY`), because it
//! cannot read configs (it has no dependencies). This test reads every
//! `reference/models/*/config.json` that exists and fails if a model needs a kernel the build
//! does not compile, naming the kernels to add (update `ModelShape::TINY` or `SUPPORTED_MODELS`).

use dgemma_codegen::{specs_for_model, supported_specs, LayerAttention, ModelShape};
use dgemma_model::config::ModelConfig;

/// The repository root: `$DGEMMA_REPO` when set and not empty (test executables built on one
/// machine and run from another checkout), else the compile-time source tree.
fn repo_root() -> std::path::PathBuf {
    match std::env::var_os("DGEMMA_REPO") {
        Some(dir) if !dir.is_empty() => dir.into(),
        _ => std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../.."),
    }
}

/// The kernel-relevant shape of a config (what a CUDA backend will compute at load time).
fn shape_of(cfg: &ModelConfig) -> ModelShape {
    let t = &cfg.text;
    let u = |v: usize| u32::try_from(v).expect("dimension fits u32");
    ModelShape {
        vocab: u(t.vocab_size),
        hidden: u(t.hidden_size),
        heads: u(t.num_attention_heads),
        sliding: LayerAttention {
            head_dim: u(t.head_dim),
            kv_heads: u(t.num_key_value_heads),
            rotary_pairs: u(t.rope_sliding.rotary_pairs(t.head_dim)),
        },
        full: LayerAttention {
            head_dim: u(t.global_head_dim),
            kv_heads: u(t.num_global_key_value_heads),
            rotary_pairs: u(t.rope_full.rotary_pairs(t.global_head_dim)),
        },
        experts: u(t.num_experts),
        top_k: u(t.top_k_experts),
        moe_width: u(t.moe_intermediate_size),
        dense_width: u(t.intermediate_size),
        self_cond_width: u(t.self_conditioning_size),
    }
}

#[test]
fn reference_models_are_covered() {
    let dir = repo_root().join("reference/models");
    let entries = std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("cannot read {}: {e}", dir.display()));
    let built = supported_specs();
    let mut checked = 0;
    for entry in entries.flatten() {
        let config = entry.path().join("config.json");
        if !config.exists() {
            continue;
        }
        let cfg = ModelConfig::from_file(&config).unwrap_or_else(|e| panic!("{}: {e}", config.display()));
        let shape = shape_of(&cfg);
        let missing: Vec<String> =
            specs_for_model(&shape).iter().filter(|s| !built.contains(s)).map(|s| s.kernel_name()).collect();
        assert!(
            missing.is_empty(),
            "{} has shape {shape:?}, which needs kernels the build does not compile: {missing:?}. \
             Add the shape to dgemma_codegen::SUPPORTED_MODELS (or fix ModelShape::TINY).",
            config.display()
        );
        checked += 1;
    }
    assert!(checked >= 2, "expected the committed reference models in {}, checked {checked}", dir.display());
}

#[test]
fn the_big_model_shape_matches_model_spec() {
    let s = ModelShape::DIFFUSION_GEMMA_26B_A4B;
    // model-spec 1.2: full layers use proportional RoPE with factor 0.25 on head_dim 512.
    let rope = dgemma_model::config::RopeSpec::FULL_DEFAULT;
    assert_eq!(rope.rotary_pairs(512), s.full.rotary_pairs as usize);
    assert_eq!(dgemma_model::config::RopeSpec::SLIDING_DEFAULT.rotary_pairs(256), s.sliding.rotary_pairs as usize);
    let tiny = ModelShape::TINY;
    assert_eq!(rope.rotary_pairs(tiny.full.head_dim as usize), tiny.full.rotary_pairs as usize);
}
