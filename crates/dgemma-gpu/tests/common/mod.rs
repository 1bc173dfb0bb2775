//! The GPU backend's checks, one body per check, run on each executor: the CPU kernel emulator
//! (`emulated_backend.rs`, every machine) and a real GPU (`gpu_backend.rs`, `#[ignore]`d).
//!
//! The oracle is the CPU backend in bf16 mode on the same checkpoint (it rounds the weights to
//! bf16 exactly as the GPU upload does), and the committed transformers cases.

#![allow(dead_code)]

use std::path::{Path, PathBuf};

use dgemma_cpu::CpuBackend;
use dgemma_engine::case::Case;
use dgemma_engine::verify::{compare_logits, verify_case, Tolerance};
use dgemma_engine::GenerationSettings;
use dgemma_gpu::{Executor, GpuBackend, GpuOptions};
use dgemma_model::checkpoint::Checkpoint;
use dgemma_model::weights::ModelWeights;
use dgemma_model::{Backend, Precision};

/// The repository root (`$DGEMMA_REPO` when set: test executables run from another checkout).
pub fn repo_root() -> PathBuf {
    match std::env::var_os("DGEMMA_REPO") {
        Some(dir) if !dir.is_empty() => dir.into(),
        _ => Path::new(env!("CARGO_MANIFEST_DIR")).join("../.."),
    }
}

pub fn model_dir(name: &str) -> PathBuf {
    repo_root().join("reference/models").join(name)
}

pub struct Model {
    pub ck: Checkpoint,
    pub weights: ModelWeights,
}

pub fn load(name: &str) -> Model {
    load_dir(&model_dir(name))
}

pub fn load_dir(dir: &Path) -> Model {
    let ck = Checkpoint::open(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    let weights = ModelWeights::load(&ck).unwrap();
    Model { ck, weights }
}

pub fn gpu_backend<X: Executor>(m: &Model, exec: X, options: GpuOptions) -> GpuBackend<X> {
    GpuBackend::new(exec, &m.ck.config.text, &m.weights, options, &mut |_, _| {}).unwrap()
}

pub fn default_options(m: &Model) -> GpuOptions {
    GpuOptions::new(m.ck.config.text.max_position_embeddings.min(1024), m.ck.config.canvas_length)
}

/// Deterministic token ids in `[3, vocab)` (no pad/eos/bos).
pub fn ids(n: usize, vocab: usize, seed: u64) -> Vec<u32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s >> 12;
            s ^= s << 25;
            s ^= s >> 27;
            3 + (s.wrapping_mul(0x2545_F491_4F6C_DD1D) % (vocab as u64 - 3)) as u32
        })
        .collect()
}

fn bf16_round(v: &[f32]) -> Vec<f32> {
    v.iter().map(|&x| half::bf16::from_f32(x).to_f32()).collect()
}

/// Runs the same pass sequence on both backends and returns (max |err|, argmax agreement)
/// per decoder pass: prompt, canvas without and with self-conditioning, a commit, and the
/// next canvas (whose sliding layers see a trimmed cache once the prompt is long enough).
pub fn compare_with_cpu<X: Executor>(model: &str, exec: X, prompt_len: usize) -> Vec<(f32, f64)> {
    let m = load(model);
    let cfg = &m.ck.config.text;
    let (v, c) = (cfg.vocab_size, m.ck.config.canvas_length);
    let mut cpu = CpuBackend::new(cfg, &m.weights, Precision::Bf16);
    let mut gpu = gpu_backend(&m, exec, default_options(&m));
    let prompt = ids(prompt_len, v, 1);
    let canvas = ids(c, v, 2);
    let mut out = Vec::new();
    let mut run = |cpu: &mut CpuBackend, gpu: &mut GpuBackend<X>, canvas: &[u32], sc: Option<&[f32]>| {
        let mut want = vec![f32::NAN; c * v];
        let mut got = vec![f32::NAN; c * v];
        cpu.denoise(canvas, sc, &mut want).unwrap();
        gpu.denoise(canvas, sc, &mut got).unwrap();
        out.push(compare_logits(&got, &want, v));
        want
    };
    cpu.encode(&prompt).unwrap();
    gpu.encode(&prompt).unwrap();
    let first = run(&mut cpu, &mut gpu, &canvas, None);
    let sc = bf16_round(&first);
    run(&mut cpu, &mut gpu, &ids(c, v, 3), Some(&sc));
    let commit = ids(c, v, 4);
    cpu.encode(&commit).unwrap();
    gpu.encode(&commit).unwrap();
    assert_eq!(gpu.cache_len(), cpu.cache_len());
    run(&mut cpu, &mut gpu, &ids(c, v, 5), Some(&sc));
    out
}

/// The decoder logits of the GPU backend follow the CPU backend's within the bf16 tolerance of
/// the transformers cases.
pub fn check_logits_match_cpu<X: Executor>(make: impl Fn() -> X) {
    let tol = Tolerance::for_precision(Precision::Bf16);
    for (model, prompt_len) in [("tiny-default", 7), ("tiny-default", 40), ("tiny-sharded-f32", 11)] {
        for (pass, (err, agree)) in compare_with_cpu(model, make(), prompt_len).into_iter().enumerate() {
            eprintln!("{model} prompt {prompt_len} pass {pass}: max |err| {err:.4}, argmax agreement {agree:.4}");
            assert!(err <= tol.max_abs && agree >= tol.min_argmax_agreement, "{model} pass {pass}: err {err}, agree {agree}");
        }
    }
}

/// Encoding a prompt in chunks gives bit-identical logits: every row's computation reads the
/// same cached keys in the same order whatever the chunk size.
pub fn check_prefill_chunking_is_exact<X: Executor>(make: impl Fn() -> X) {
    let m = load("tiny-default");
    let cfg = &m.ck.config.text;
    let (v, c) = (cfg.vocab_size, m.ck.config.canvas_length);
    let prompt = ids(45, v, 7);
    let canvas = ids(c, v, 8);
    let mut logits = Vec::new();
    for chunk in [64, 16, 7] {
        let mut options = default_options(&m);
        options.prefill_chunk = chunk;
        let mut gpu = gpu_backend(&m, make(), options);
        gpu.encode(&prompt).unwrap();
        let mut out = vec![f32::NAN; c * v];
        gpu.denoise(&canvas, None, &mut out).unwrap();
        assert!(out.iter().all(|x| x.is_finite()));
        logits.push(out);
    }
    assert!(logits[0] == logits[1] && logits[1] == logits[2], "chunked prefill changed the logits");
}

/// A recorded decoder pass replays with the inputs of the moment: a new canvas, a new
/// self-conditioning input (vLLM once shipped a replay that froze them).
pub fn check_replay_sees_new_inputs<X: Executor>(make: impl Fn() -> X) {
    let m = load("tiny-default");
    let cfg = &m.ck.config.text;
    let (v, c) = (cfg.vocab_size, m.ck.config.canvas_length);
    let prompt = ids(9, v, 11);
    let (canvas_a, canvas_b) = (ids(c, v, 12), ids(c, v, 13));
    // Reference: every pass planned and run afresh.
    let fresh = |canvas: &[u32], sc: Option<&[f32]>| {
        let mut options = default_options(&m);
        options.record = false;
        let mut g = gpu_backend(&m, make(), options);
        g.encode(&prompt).unwrap();
        let mut out = vec![f32::NAN; c * v];
        g.denoise(canvas, sc, &mut out).unwrap();
        out
    };
    let mut g = gpu_backend(&m, make(), default_options(&m));
    g.encode(&prompt).unwrap();
    let mut a = vec![f32::NAN; c * v];
    let mut b = vec![f32::NAN; c * v];
    g.denoise(&canvas_a, None, &mut a).unwrap();
    g.denoise(&canvas_b, None, &mut b).unwrap();
    assert_eq!(g.replays, 2);
    assert!(a != b, "two canvases gave the same logits");
    assert!(a == fresh(&canvas_a, None), "first replay differs from a fresh pass");
    assert!(b == fresh(&canvas_b, None), "replay with a new canvas did not see it");
    // Self-conditioning: two different inputs through the same recording.
    let (sc_a, sc_b) = (bf16_round(&a), bf16_round(&b));
    let mut x = vec![f32::NAN; c * v];
    let mut y = vec![f32::NAN; c * v];
    g.denoise(&canvas_a, Some(&sc_a), &mut x).unwrap();
    g.denoise(&canvas_a, Some(&sc_b), &mut y).unwrap();
    assert_eq!(g.replays, 4);
    assert!(x != y, "two self-conditioning inputs gave the same logits");
    assert!(y == fresh(&canvas_a, Some(&sc_b)), "replay with a new self-conditioning input did not see it");
}

/// `dgemma verify` on every bf16 case (logits and traces). float32 cases are the CPU backend's:
/// this backend computes in bf16 only.
pub fn check_bf16_cases<X: Executor>(make: impl Fn() -> X) {
    let dir = repo_root().join("reference/cases");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    files.sort();
    let mut ran = 0;
    let mut failures = Vec::new();
    for path in files {
        let case = Case::open(&path).unwrap();
        if case.precision != Precision::Bf16 {
            continue;
        }
        let dir = case.model_dir(&repo_root().join("reference/models")).unwrap();
        let m = load_dir(&dir);
        let mut gpu = gpu_backend(&m, make(), default_options(&m));
        let settings = GenerationSettings::from_checkpoint(&m.ck.config, &m.ck.generation, Precision::Bf16);
        for check in verify_case(&case, &mut gpu, &settings).unwrap() {
            eprintln!("{} {}: {:?} {:?} {}", path.display(), check.name, check.max_abs_err, check.argmax_agreement, check.detail);
            if !check.passed {
                failures.push(format!("{}: {} ({})", path.display(), check.name, check.detail));
            }
        }
        ran += 1;
    }
    assert!(ran >= 3, "expected several bf16 cases, ran {ran}");
    assert!(failures.is_empty(), "failed:\n{}", failures.join("\n"));
}

/// Bad input is an error naming the problem, and leaves the backend usable.
pub fn check_bad_input<X: Executor>(make: impl Fn() -> X) {
    let m = load("tiny-default");
    let cfg = &m.ck.config.text;
    let (v, c) = (cfg.vocab_size, m.ck.config.canvas_length);
    let mut options = default_options(&m);
    options.context = 64;
    let mut g = gpu_backend(&m, make(), options);
    let err = g.encode(&[1, 2, v as u32]).unwrap_err().to_string();
    assert!(err.contains("outside the vocabulary"), "{err}");
    let err = g.encode(&ids(65, v, 1)).unwrap_err().to_string();
    assert!(err.contains("over the context"), "{err}");
    g.encode(&ids(60, v, 1)).unwrap();
    let mut out = vec![0.0; c * v];
    let err = g.denoise(&ids(c, v, 2), None, &mut out).unwrap_err().to_string();
    assert!(err.contains("over the context"), "{err}");
    g.reset();
    let err = g.denoise(&ids(c + 1, v, 2), None, &mut vec![0.0; (c + 1) * v]).unwrap_err().to_string();
    assert!(err.contains("sized for"), "{err}");
    let err = g.denoise(&ids(c, v, 2), None, &mut [0.0; 3]).unwrap_err().to_string();
    assert!(err.contains("logits buffer"), "{err}");
    g.encode(&ids(5, v, 3)).unwrap();
    g.denoise(&ids(c, v, 2), None, &mut out).unwrap();
    assert!(out.iter().all(|x| x.is_finite()));
}

/// Synthetic weights of the tiny model's shapes give finite logits, and the benchmark driver
/// produces every record with a finite value and floor.
pub fn check_synthetic_bench<X: Executor>(make: impl Fn() -> X) {
    let m = load("tiny-default");
    let cfg = &m.ck.config.text;
    let (v, c) = (cfg.vocab_size, m.ck.config.canvas_length);
    let mut exec = make();
    let gbs = dgemma_gpu::bench::copy_bandwidth(&mut exec, 1 << 16, 2).unwrap();
    assert!(gbs.is_finite() && gbs > 0.0, "{gbs}");
    let mut options = GpuOptions::new(256, c);
    options.prefill_chunk = 32;
    let mut g = GpuBackend::synthetic(exec, cfg, 3, options, &mut |_, _| {}).unwrap();
    assert!(g.weight_bytes() > 0);
    g.encode(&ids(20, v, 1)).unwrap();
    let mut out = vec![f32::NAN; c * v];
    g.denoise(&ids(c, v, 2), None, &mut out).unwrap();
    assert!(out.iter().all(|x| x.is_finite()), "synthetic weights gave non-finite logits");
    let plan = dgemma_gpu::bench::BenchPlan { contexts: vec![32, 128, 1000], prompt: 64, iters: 1, steps: vec![16] };
    let records = dgemma_gpu::bench::run(&mut g, &plan, gbs).unwrap();
    let names: Vec<&str> = records.iter().map(|r| r.name.as_str()).collect();
    for want in ["prefill.bf16.tokens64", "commit.bf16.c16", "step.bf16.c1.ctx32", "step.bf16.c1.ctx128", "tokens_per_s.bf16.steps16", "ttft.bf16.prompt64.steps16"] {
        let r = records.iter().find(|r| r.name == want).unwrap_or_else(|| panic!("no {want} in {names:?}"));
        assert!(r.value.is_finite() && r.value > 0.0, "{r:?}");
    }
    // A context beyond the cache is reported as not run, not timed.
    let r = records.iter().find(|r| r.name == "step.bf16.c1.ctx1000").unwrap();
    assert!(r.value.is_nan() && r.note.contains("not run"), "{r:?}");
    assert!(r.to_json().contains("\"value\": null"), "{}", r.to_json());
}
