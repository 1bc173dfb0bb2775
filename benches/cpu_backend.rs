//! CPU backend and sampler throughput (criterion). Runs anywhere: the bundled tiny model for
//! the forward passes, the real vocabulary size for the sampler step.
//!
//!     cargo bench --bench cpu_backend

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use dgemma::cpu::CpuBackend;
use dgemma::model::checkpoint::Checkpoint;
use dgemma::model::weights::ModelWeights;
use dgemma::sampler::{denoise_step_in_place, SamplerSettings, SeededNoise, StableAndConfident};
use dgemma::{generate, Backend, GenerationSettings, Precision};
use std::hint::black_box;
use std::path::{Path, PathBuf};

/// The repository root: `$DGEMMA_REPO` when set and not empty (a bench executable built on one
/// machine and run from another checkout), else the compile-time source tree.
fn repo_root() -> PathBuf {
    match std::env::var_os("DGEMMA_REPO") {
        Some(dir) if !dir.is_empty() => dir.into(),
        _ => Path::new(env!("CARGO_MANIFEST_DIR")).into(),
    }
}

fn tiny() -> (Checkpoint, ModelWeights) {
    let dir = repo_root().join("reference/models/tiny-default");
    let ck = Checkpoint::open(&dir).expect("bundled model");
    let w = ModelWeights::load(&ck).expect("bundled weights");
    (ck, w)
}

fn forward(c: &mut Criterion) {
    let (ck, w) = tiny();
    let cfg = &ck.config;
    let (canvas_len, vocab) = (cfg.canvas_length, cfg.text.vocab_size);
    let prompt: Vec<u32> = (0..64u32).map(|i| 2 + (i * 37) % (vocab as u32 - 2)).collect();
    let canvas: Vec<u32> = (0..canvas_len as u32).map(|i| (i * 101) % vocab as u32).collect();
    let mut g = c.benchmark_group("cpu.tiny_default");
    for precision in [Precision::F32, Precision::Bf16] {
        let mut b = CpuBackend::new(&cfg.text, &w, precision);
        g.throughput(Throughput::Elements(prompt.len() as u64));
        g.bench_function(BenchmarkId::new("prefill64", precision.name()), |bench| {
            bench.iter(|| {
                b.reset();
                b.encode(black_box(&prompt)).unwrap();
            })
        });
        b.reset();
        b.encode(&prompt).unwrap();
        let mut logits = vec![0.0f32; canvas_len * vocab];
        let sc = vec![0.1f32; canvas_len * vocab];
        g.throughput(Throughput::Elements(canvas_len as u64));
        g.bench_function(BenchmarkId::new("denoise_step", precision.name()), |bench| {
            bench.iter(|| b.denoise(black_box(&canvas), Some(&sc), &mut logits).unwrap())
        });
        let mut settings = GenerationSettings::from_checkpoint(cfg, &ck.generation, precision);
        settings.max_new_tokens = 2 * canvas_len;
        g.bench_function(BenchmarkId::new("generate_2_canvases", precision.name()), |bench| {
            bench.iter(|| {
                let mut noise = SeededNoise::new(1, vocab);
                generate(&mut b, &prompt[..20], &settings, &mut noise, &mut dgemma::engine::Silent).unwrap()
            })
        });
    }
    g.finish();
}

/// One sampler step at the real model's vocabulary (262,144) for a 256-token canvas.
fn sampler(c: &mut Criterion) {
    let (canvas_len, vocab) = (256usize, 262_144usize);
    let raw: Vec<f32> = (0..canvas_len * vocab).map(|i| ((i.wrapping_mul(2_654_435_761) >> 7) % 2000) as f32 * 0.01 - 10.0).collect();
    let canvas = vec![5u32; canvas_len];
    let settings = SamplerSettings::default();
    let mut g = c.benchmark_group("cpu.sampler");
    g.sample_size(10);
    g.throughput(Throughput::Elements((canvas_len * vocab) as u64));
    g.bench_function("step.v262144.c256", |bench| {
        let mut logits = raw.clone();
        bench.iter(|| {
            logits.copy_from_slice(&raw);
            let mut stop = StableAndConfident::new(1, 0.005).unwrap();
            let mut noise = SeededNoise::new(3, vocab);
            denoise_step_in_place(&settings, &mut stop, &mut noise, 0, 48, &canvas, &mut logits).unwrap()
        })
    });
    g.finish();
}

criterion_group!(benches, forward, sampler);
criterion_main!(benches);
