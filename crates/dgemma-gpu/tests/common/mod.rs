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
use dgemma_model::quant::Quant;
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
    load_dir_quant(dir, Quant::None)
}

/// The model with its experts held as `quant` says (FP8: quantised at load).
pub fn load_dir_quant(dir: &Path, quant: Quant) -> Model {
    let ck = Checkpoint::open(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    let weights = ModelWeights::load_with(&ck, quant).unwrap();
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
    let mut rng = dgemma_cuda::Rng::new(seed);
    (0..n).map(|_| 3 + rng.below(vocab - 3) as u32).collect()
}

fn bf16_round(v: &[f32]) -> Vec<f32> {
    v.iter().map(|&x| half::bf16::from_f32(x).to_f32()).collect()
}

/// One decoder pass's logits on the GPU, the CPU in bf16 and the CPU in float32.
pub struct PassLogits {
    pub gpu: Vec<f32>,
    pub cpu: Vec<f32>,
    pub truth: Vec<f32>,
}

/// Runs the same pass sequence on the GPU backend and the CPU backend in bf16 and in float32:
/// prompt, canvas without and with self-conditioning, a commit, and the next canvas (whose
/// sliding layers see a trimmed cache once the prompt is long enough). The CPU backends get
/// the same weights (for FP8 experts, the dequantised values).
pub fn compare_model_with_cpu<X: Executor>(m: &Model, exec: X, prompt_len: usize) -> Vec<PassLogits> {
    let cfg = &m.ck.config.text;
    let (v, c) = (cfg.vocab_size, m.ck.config.canvas_length);
    let mut cpu = CpuBackend::new(cfg, &m.weights, Precision::Bf16);
    let mut f32_run = CpuBackend::new(cfg, &m.weights, Precision::F32);
    let mut gpu = gpu_backend(m, exec, default_options(m));
    let prompt = ids(prompt_len, v, 1);
    let canvas = ids(c, v, 2);
    let mut out = Vec::new();
    let mut run = |cpu: &mut CpuBackend, f32_run: &mut CpuBackend, gpu: &mut GpuBackend<X>, canvas: &[u32], sc: Option<&[f32]>| {
        let mut pass = PassLogits { gpu: vec![f32::NAN; c * v], cpu: vec![f32::NAN; c * v], truth: vec![f32::NAN; c * v] };
        cpu.denoise(canvas, sc, &mut pass.cpu).unwrap();
        f32_run.denoise(canvas, sc, &mut pass.truth).unwrap();
        gpu.denoise(canvas, sc, &mut pass.gpu).unwrap();
        let sc_next = bf16_round(&pass.cpu);
        out.push(pass);
        sc_next
    };
    for b in [&mut cpu, &mut f32_run] {
        b.encode(&prompt).unwrap();
    }
    gpu.encode(&prompt).unwrap();
    let sc = run(&mut cpu, &mut f32_run, &mut gpu, &canvas, None);
    run(&mut cpu, &mut f32_run, &mut gpu, &ids(c, v, 3), Some(&sc));
    let commit = ids(c, v, 4);
    for b in [&mut cpu, &mut f32_run] {
        b.encode(&commit).unwrap();
    }
    gpu.encode(&commit).unwrap();
    assert_eq!(gpu.cache_len(), cpu.cache_len());
    run(&mut cpu, &mut f32_run, &mut gpu, &ids(c, v, 5), Some(&sc));
    out
}

/// The decoder logits of the GPU backend against the CPU backend's: within the bf16 tolerance
/// of the transformers cases on the first pass (7 to 40 positions, where a flipped rounding has
/// not cascaded yet), and on every pass as close to the float32 run as the CPU's own bf16 run
/// ([`assert_bf16_drift`]).
pub fn check_logits_match_cpu<X: Executor>(make: impl Fn() -> X) {
    for (model, prompt_len) in [("tiny-default", 7), ("tiny-default", 40), ("tiny-sharded-f32", 11)] {
        check_passes(&load(model), make(), prompt_len, model);
    }
}

fn check_passes<X: Executor>(m: &Model, exec: X, prompt_len: usize, what: &str) {
    let tol = Tolerance::for_precision(Precision::Bf16);
    let v = m.ck.config.text.vocab_size;
    for (pass, p) in compare_model_with_cpu(m, exec, prompt_len).into_iter().enumerate() {
        let (err, agree) = compare_logits(&p.gpu, &p.cpu, v);
        let name = format!("{what} prompt {prompt_len} pass {pass}");
        eprintln!("{name}: GPU vs CPU bf16 max |err| {err:.4}, argmax agreement {agree:.4}");
        if pass == 0 {
            assert!(err <= tol.max_abs && agree >= tol.min_argmax_agreement, "{name}: err {err}, agree {agree}");
        }
        assert_bf16_drift(&p.gpu, &p.cpu, &p.truth, v, &name);
    }
}

/// FP8 experts (quantised at load): the GPU backend's logits follow the CPU backend on the same
/// weights (the CPU runs the dequantised values, `bf16(f32(e4m3) * scale)`, as transformers'
/// bf16 model holding them would) as [`check_logits_match_cpu`] checks the unquantised model.
pub fn check_fp8_logits_match_cpu<X: Executor>(make: impl Fn() -> X) {
    for (model, prompt_len) in [("tiny-default", 7), ("tiny-default", 40), ("tiny-sharded-f32", 11)] {
        let m = load_dir_quant(&model_dir(model), Quant::Fp8);
        assert!(m.weights.layers.iter().all(|l| l.experts_gate_up.is_fp8() && l.experts_down.is_fp8()));
        check_passes(&m, make(), prompt_len, &format!("FP8 {model}"));
    }
}

/// FP8 quantisation while uploading (`GpuOptions::expert_quant`, float experts loaded as they
/// are) gives the device the very bytes quantisation at load gives: the same allocation and the
/// same logits bit for bit, on the bf16 and the f32 tiny models.
pub fn check_fp8_quantised_at_upload<X: Executor>(make: impl Fn() -> X) {
    for model in ["tiny-default", "tiny-sharded-f32"] {
        let at_load = load_dir_quant(&model_dir(model), Quant::Fp8);
        let float = load(model);
        assert!(float.weights.layers.iter().all(|l| !l.experts_gate_up.is_fp8()));
        let cfg = &float.ck.config.text;
        let (v, c) = (cfg.vocab_size, float.ck.config.canvas_length);
        let mut a = gpu_backend(&at_load, make(), default_options(&at_load));
        let mut b = gpu_backend(&float, make(), GpuOptions { expert_quant: Quant::Fp8, ..default_options(&float) });
        assert_eq!(a.weight_bytes(), b.weight_bytes(), "{model}: device bytes of the weights");
        assert_eq!(
            dgemma_gpu::weights::DeviceWeights::bytes_needed(&float.weights, Quant::Fp8),
            b.weight_bytes(),
            "{model}: the upload's own size estimate"
        );
        let prompt = ids(9, v, 3);
        a.encode(&prompt).unwrap();
        b.encode(&prompt).unwrap();
        let canvas = ids(c, v, 4);
        let (mut x, mut y) = (vec![f32::NAN; c * v], vec![f32::NAN; c * v]);
        a.denoise(&canvas, None, &mut x).unwrap();
        b.denoise(&canvas, None, &mut y).unwrap();
        assert!(x.iter().all(|t| t.is_finite()));
        assert!(x.iter().zip(&y).all(|(p, q)| p.to_bits() == q.to_bits()), "{model}: logits differ");
    }
}

/// What FP8 experts cost in accuracy on the bundled tiny model (random weights with transformers'
/// initialiser): the GPU backend with FP8 experts against the GPU backend with the bf16 ones, the
/// same passes as [`compare_model_with_cpu`] (prompt, canvas without and with self-conditioning, a
/// commit, the next canvas). Printed; the bound is loose (measured: see the report in the test
/// output), the exactness is [`check_fp8_logits_match_cpu`]'s.
pub fn check_fp8_versus_bf16<X: Executor>(make: impl Fn() -> X) {
    for (model, prompt_len) in [("tiny-default", 7), ("tiny-default", 40), ("tiny-sharded-f32", 11)] {
        let fp8 = load_dir_quant(&model_dir(model), Quant::Fp8);
        let bf16 = load(model);
        let cfg = &bf16.ck.config.text;
        let (v, c) = (cfg.vocab_size, bf16.ck.config.canvas_length);
        let mut a = gpu_backend(&fp8, make(), default_options(&fp8));
        let mut b = gpu_backend(&bf16, make(), default_options(&bf16));
        let prompt = ids(prompt_len, v, 1);
        a.encode(&prompt).unwrap();
        b.encode(&prompt).unwrap();
        let (mut worst, mut agree_sum, mut n) = (0f32, 0f64, 0);
        let mut sc: Option<Vec<f32>> = None;
        for (pass, (seed, commit)) in [(2, false), (3, true), (5, false)].into_iter().enumerate() {
            let canvas = ids(c, v, seed);
            let mut got = vec![f32::NAN; c * v];
            let mut want = vec![f32::NAN; c * v];
            // Both runs see the bf16 run's self-conditioning input, so only the experts differ.
            a.denoise(&canvas, sc.as_deref(), &mut got).unwrap();
            b.denoise(&canvas, sc.as_deref(), &mut want).unwrap();
            assert!(got.iter().all(|x| x.is_finite()));
            let (err, agree) = compare_logits(&got, &want, v);
            eprintln!("FP8 vs BF16 experts, {model} prompt {prompt_len} pass {pass}: max |logit diff| {err:.4}, argmax agreement {agree:.4}");
            worst = worst.max(err);
            agree_sum += agree;
            n += 1;
            sc = Some(bf16_round(&want));
            if commit {
                a.encode(&canvas).unwrap();
                b.encode(&canvas).unwrap();
            }
        }
        let agree = agree_sum / n as f64;
        eprintln!("FP8 vs BF16 experts, {model} prompt {prompt_len}: worst max |logit diff| {worst:.4}, mean argmax agreement {agree:.4}");
        assert!(worst > 0.0, "{model}: FP8 changed nothing");
        assert!(worst < 1.0 && agree >= 0.95, "{model}: FP8 moved the logits by {worst}, argmax agreement {agree}");
    }
}

/// Synthetic FP8 experts (the benchmarks' `--quant fp8 --synthetic`): finite logits, and the
/// weights take the bf16 ones' bytes less one byte per expert weight, plus 4 per expert row.
pub fn check_synthetic_fp8<X: Executor>(make: impl Fn() -> X) {
    let m = load("tiny-default");
    let cfg = &m.ck.config.text;
    let (v, c) = (cfg.vocab_size, m.ck.config.canvas_length);
    let options = GpuOptions::new(128, c);
    let bf16 = GpuBackend::synthetic(make(), cfg, 3, options, &mut |_, _| {}).unwrap();
    let mut fp8 = GpuBackend::synthetic_quant(make(), cfg, 3, Quant::Fp8, options, &mut |_, _| {}).unwrap();
    let (e, moe, h, layers) = (cfg.num_experts, cfg.moe_intermediate_size, cfg.hidden_size, cfg.num_hidden_layers);
    let saved = layers * (e * 3 * moe * h - 4 * e * (2 * moe + h));
    assert_eq!(bf16.weight_bytes() - fp8.weight_bytes(), saved);
    fp8.encode(&ids(20, v, 1)).unwrap();
    let mut out = vec![f32::NAN; c * v];
    fp8.denoise(&ids(c, v, 2), None, &mut out).unwrap();
    assert!(out.iter().all(|x| x.is_finite()));
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

/// Sliding layers keep a ring of `window - 1 + max_tokens` rows (position p in row p % rows).
/// With a small prefill chunk the ring of the tiny model (window 16, canvas 16: 31 rows) wraps
/// many times over a 120-token prompt, and encoder and decoder passes whose rows run past the
/// ring's end go through the staging buffers. The same backend's full layers take 8-position
/// pages that alternate with another sequence's (no two of its pages adjacent), so their new
/// rows are copied run by run and attention reads them through a scattered page table. The
/// logits are bit-identical to a backend whose rings never wrap (a 512-token chunk: 527 rows)
/// and whose pages are adjacent 256-position ones, and follow the CPU backend within the bf16
/// tolerance.
pub fn check_sliding_ring_wraps<X: Executor>(make: impl Fn() -> X) {
    let m = load("tiny-default");
    let cfg = &m.ck.config.text;
    let (v, c) = (cfg.vocab_size, m.ck.config.canvas_length);
    let window = cfg.sliding_window;
    let wide_options = default_options(&m);
    let mut ring_options = wide_options;
    ring_options.prefill_chunk = 7;
    ring_options.kv_page = 8;
    let ring_rows = window - 1 + c.max(ring_options.prefill_chunk);
    let wide_rows = window - 1 + wide_options.prefill_chunk.max(c);
    assert!(
        ring_rows < 120 && wide_rows > 120 + 3 * c,
        "the test's sizes no longer make one ring wrap and not the other"
    );
    let mut ring = gpu_backend(&m, make(), ring_options);
    let mut wide = gpu_backend(&m, make(), wide_options);
    let mut cpu = CpuBackend::new(cfg, &m.weights, Precision::Bf16);
    // The allocation: R rows on sliding layers; full layers hold no page before the cache grows.
    let sliding = |i: usize| cfg.layer(i).sliding_window.is_some();
    for (b, rows, chunk) in
        [(&ring, ring_rows, ring_options.prefill_chunk), (&wide, wide_rows, wide_options.prefill_chunk)]
    {
        let want: Vec<usize> = (0..cfg.num_hidden_layers).map(|i| if sliding(i) { rows } else { 0 }).collect();
        assert_eq!(b.kv_rows(), want.as_slice(), "KV ring rows with a prefill chunk of {chunk}");
        let bytes: usize = (0..cfg.num_hidden_layers).map(|i| 2 * 2 * want[i] * cfg.layer(i).kv_dim()).sum();
        assert_eq!(b.kv_bytes(), bytes);
    }
    // Interleave the ring backend's pages with another sequence's: page by page, each takes the
    // pool's lowest free one, so sequence 0 holds pages 1, 3, 5, ...
    let page = ring_options.kv_page;
    let other = ring.add_sequence().unwrap();
    for j in 1..=(152 + c).div_ceil(page) {
        for seq in [other, 0] {
            ring.select_sequence(seq).unwrap();
            ring.reserve(j * page).unwrap();
        }
    }
    ring.select_sequence(0).unwrap();
    let pages = ring.kv_page_list().to_vec();
    assert!(pages.len() >= 21 && pages.iter().enumerate().all(|(i, &p)| p as usize == 2 * i + 1), "{pages:?}");

    // Over 120+ positions the GPU and the CPU's bf16 run drift apart by ordinary bf16 noise
    // (see `assert_bf16_drift`), so the GPU is held to the f32 run: no farther from it than the
    // CPU's own bf16 run. The ring's own check is the bit-for-bit one against `wide`.
    let mut f32_run = CpuBackend::new(cfg, &m.weights, Precision::F32);
    let prompt = ids(120, v, 21);
    ring.encode(&prompt).unwrap();
    wide.encode(&prompt).unwrap();
    cpu.encode(&prompt).unwrap();
    f32_run.encode(&prompt).unwrap();
    let mut sc: Option<Vec<f32>> = None;
    let mut wrapped = 0;
    // (canvas seed, self-conditioning, commit after): the first canvas (positions 120..136)
    // wraps the 31-row ring, the commit after it too, the next canvas (136..) does not, the
    // last one (152..) does.
    let passes = [(141, false, false), (142, true, true), (143, true, true), (144, true, false)];
    for (pass, (seed, with_sc, commit)) in passes.into_iter().enumerate() {
        let pos0 = ring.cache_len();
        if pos0 % ring_rows + c > ring_rows {
            wrapped += 1;
        }
        let canvas = ids(c, v, seed);
        let sc_in = if with_sc { sc.as_deref() } else { None };
        let mut got = vec![f32::NAN; c * v];
        let mut exact = vec![f32::NAN; c * v];
        let mut want = vec![f32::NAN; c * v];
        let mut truth = vec![f32::NAN; c * v];
        ring.denoise(&canvas, sc_in, &mut got).unwrap();
        wide.denoise(&canvas, sc_in, &mut exact).unwrap();
        cpu.denoise(&canvas, sc_in, &mut want).unwrap();
        f32_run.denoise(&canvas, sc_in, &mut truth).unwrap();
        assert!(got.iter().all(|x| x.is_finite()), "pass {pass} at {pos0}: non-finite logits");
        let same = got.iter().zip(&exact).all(|(a, b)| a.to_bits() == b.to_bits());
        assert!(same, "pass {pass} at position {pos0}: the wrapped ring changed the logits");
        assert_bf16_drift(&got, &want, &truth, v, &format!("ring pass {pass} at position {pos0}"));
        sc = Some(bf16_round(&got));
        if commit {
            ring.encode(&canvas).unwrap();
            wide.encode(&canvas).unwrap();
            cpu.encode(&canvas).unwrap();
            f32_run.encode(&canvas).unwrap();
        }
    }
    assert_eq!(ring.cache_len(), 152);
    assert!(wrapped >= 2, "only {wrapped} decoder passes wrapped the ring");
    assert_eq!(ring.kv_page_list(), pages.as_slice(), "the reserved pages were enough");
    // The full layers' logical rows are the pages held; the wide backend took one 256-row page.
    let full_rows = |b: &GpuBackend<X>| (0..cfg.num_hidden_layers).filter(|&i| !sliding(i)).map(|i| b.kv_rows()[i]).collect::<Vec<_>>();
    assert!(full_rows(&ring).iter().all(|&r| r == pages.len() * page));
    assert!(full_rows(&wide).iter().all(|&r| r == 256));
}

/// The GPU's bf16 logits `got` against the same pass of the CPU backend in bf16 (`cpu`) and in
/// float32 (`truth`), over many positions. Two bf16 runs that sum in different orders flip a
/// rounding now and then, and on the tiny model's random weights a flip cascades: after 120+
/// positions they differ by up to 0.18 (measured on the emulator over prompt seeds 21, 31, 41,
/// 51, 61, with the SIMT and the tensor-core expert GEMMs alike), past the 0.15 of the short
/// cases, while each is 0.16 to 0.37 from the float32 run. What matters is how close the GPU is
/// to the computation both approximate: its max and mean |error| against `truth` are those of
/// the CPU's bf16 run within 10% (measured: 0.96 to 1.04 of them, both kernels, every seed),
/// and its argmax agrees with `truth` on at least as many positions but one.
pub fn assert_bf16_drift(got: &[f32], cpu: &[f32], truth: &[f32], vocab: usize, what: &str) {
    let mean = |x: &[f32]| x.iter().zip(truth).map(|(a, b)| (a - b).abs() as f64).sum::<f64>() / x.len() as f64;
    let ((max_gpu, agree_gpu), (max_cpu, agree_cpu)) = (compare_logits(got, truth, vocab), compare_logits(cpu, truth, vocab));
    let (mean_gpu, mean_cpu) = (mean(got), mean(cpu));
    let (between, _) = compare_logits(got, cpu, vocab);
    let rows = (got.len() / vocab) as f64;
    eprintln!(
        "{what}: vs f32 max |err| GPU {max_gpu:.4} CPU bf16 {max_cpu:.4}, mean {mean_gpu:.5} / {mean_cpu:.5}, argmax {agree_gpu:.4} / \
         {agree_cpu:.4}; GPU vs CPU bf16 max {between:.4}"
    );
    assert!(got.iter().all(|x| x.is_finite()), "{what}: non-finite logits");
    assert!(max_gpu <= 1.1 * max_cpu + 1e-3, "{what}: max |err| vs f32 {max_gpu} against the CPU bf16 run's {max_cpu}");
    assert!(mean_gpu <= 1.1 * mean_cpu, "{what}: mean |err| vs f32 {mean_gpu} against the CPU bf16 run's {mean_cpu}");
    assert!(agree_gpu >= agree_cpu - 1.0 / rows - 1e-9, "{what}: argmax agreement with f32 {agree_gpu} against {agree_cpu}");
}

/// The full layers' KV pages: a sequence takes them as its cache grows, keeps them through a
/// reset (a server's reservation must survive the generation loop's reset before its prefill) and
/// gives them back when released; a pool without enough free pages refuses the sequence that needs them (out of memory,
/// nothing taken, its cache unchanged) while the others run on, and once pages are freed it goes
/// on with the logits of a backend that never ran short.
pub fn check_kv_pages<X: Executor>(make: impl Fn() -> X) {
    let m = load("tiny-default");
    let cfg = &m.ck.config.text;
    let (v, c) = (cfg.vocab_size, m.ck.config.canvas_length);
    let mut options = default_options(&m);
    options.kv_page = 16;
    options.kv_pages = Some(8);
    let mut g = gpu_backend(&m, make(), options);
    let mut fresh = gpu_backend(&m, make(), default_options(&m));
    assert_eq!(g.kv_pages().0, 8);
    // The pool sizing's estimate of a sequence's own buffers is what one allocates (up to the
    // emulator's rounding of each allocation to 8 bytes).
    let (estimate, actual) = (GpuBackend::<X>::sequence_bytes_for(cfg, &options), g.sequence_bytes());
    assert!(estimate <= actual && actual - estimate < 8 * (2 * cfg.num_hidden_layers + 4), "{estimate} vs {actual}");
    let prompt = ids(40, v, 5);
    g.encode(&prompt).unwrap();
    fresh.encode(&prompt).unwrap();
    assert_eq!((g.kv_pages().0, g.kv_page_list()), (5, &[0, 1, 2][..]), "40 positions take 3 pages");
    // Another sequence asks for more than is free: refused, nothing taken.
    let other = g.add_sequence().unwrap();
    g.select_sequence(other).unwrap();
    let oom = |e: dgemma_model::error::Error| {
        let text = e.to_string();
        assert!(matches!(e, dgemma_model::error::Error::OutOfMemory { .. }) && text.contains("free pages"), "{text}");
    };
    oom(g.reserve(6 * 16).unwrap_err());
    assert_eq!((g.kv_pages().0, g.kv_page_list().len()), (5, 0));
    g.encode(&ids(80, v, 6)).unwrap();
    assert_eq!(g.kv_pages().0, 0);
    // Sequence 0's canvas needs a fourth page: out of memory for it, its cache unchanged.
    g.select_sequence(0).unwrap();
    let canvas = ids(c, v, 7);
    let mut got = vec![f32::NAN; c * v];
    oom(g.denoise(&canvas, None, &mut got).unwrap_err());
    assert_eq!((g.cache_len(), g.kv_page_list()), (40, &[0, 1, 2][..]));
    // The other sequence finishes: its pages go back, and sequence 0 goes on.
    g.select_sequence(other).unwrap();
    g.reset();
    assert_eq!(g.kv_pages().0, 0, "a reset keeps the pages (a reservation survives the prefill's reset)");
    g.release_pages();
    assert_eq!(g.kv_pages().0, 5);
    g.select_sequence(0).unwrap();
    g.denoise(&canvas, None, &mut got).unwrap();
    let mut want = vec![f32::NAN; c * v];
    fresh.denoise(&canvas, None, &mut want).unwrap();
    assert!(got.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()), "the logits after running short differ");
    assert_eq!(g.kv_page_list(), &[0, 1, 2, 3][..]);
    g.release_pages();
    assert_eq!(g.kv_pages().0, 8, "a released sequence gives every page back");
    // A pool of no pages: refused at construction, naming the pool.
    let e = GpuBackend::new(make(), cfg, &m.weights, GpuOptions { kv_pages: Some(0), ..options }, &mut |_, _| {})
        .err()
        .expect("no pages");
    assert!(matches!(e, dgemma_model::error::Error::OutOfMemory { .. }) && e.to_string().contains("KV page pool"), "{e}");
}

/// A recorded decoder pass replays with the inputs of the moment: a new canvas, a new
/// self-conditioning input (vLLM once shipped a replay that froze them). With the default
/// `record_after` (2) a pass key runs launch by launch the first time and is recorded the second;
/// with 1, on first use.
pub fn check_replay_sees_new_inputs<X: Executor>(make: impl Fn() -> X) {
    check_replay_sees_new_inputs_after(&make, 1);
    check_replay_sees_new_inputs_after(&make, 2);
}

fn check_replay_sees_new_inputs_after<X: Executor>(make: impl Fn() -> X, record_after: u32) {
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
    let mut g = gpu_backend(&m, make(), GpuOptions { record_after, ..default_options(&m) });
    g.encode(&prompt).unwrap();
    let mut a = vec![f32::NAN; c * v];
    let mut b = vec![f32::NAN; c * v];
    let unrecorded = record_after as usize - 1;
    g.denoise(&canvas_a, None, &mut a).unwrap();
    assert_eq!((g.replays, g.executor().recordings()), (1 - unrecorded, 1 - unrecorded));
    g.denoise(&canvas_b, None, &mut b).unwrap();
    assert_eq!((g.replays, g.executor().recordings()), (2 - unrecorded, 1));
    assert!(a != b, "two canvases gave the same logits");
    assert!(a == fresh(&canvas_a, None), "first replay differs from a fresh pass");
    assert!(b == fresh(&canvas_b, None), "replay with a new canvas did not see it");
    // Self-conditioning: two different inputs through the same recording.
    let (sc_a, sc_b) = (bf16_round(&a), bf16_round(&b));
    let mut x = vec![f32::NAN; c * v];
    let mut y = vec![f32::NAN; c * v];
    g.denoise(&canvas_a, Some(&sc_a), &mut x).unwrap();
    g.denoise(&canvas_a, Some(&sc_b), &mut y).unwrap();
    assert_eq!(g.replays, 4 - 2 * unrecorded);
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
    // The read-bandwidth probe (the floor of the step figures) runs through the same executor.
    let read = dgemma_gpu::bench::read_bandwidth(&mut exec, (1 << 16) + 8, 2).unwrap();
    assert!(read.is_finite() && read > 0.0, "{read}");
    let gbs = read;
    let mut options = GpuOptions::new(256, c);
    options.prefill_chunk = 32;
    options.max_batch = 2;
    let mut g = GpuBackend::synthetic(exec, cfg, 3, options, &mut |_, _| {}).unwrap();
    assert!(g.weight_bytes() > 0);
    g.encode(&ids(20, v, 1)).unwrap();
    let mut out = vec![f32::NAN; c * v];
    g.denoise(&ids(c, v, 2), None, &mut out).unwrap();
    assert!(out.iter().all(|x| x.is_finite()), "synthetic weights gave non-finite logits");
    let plan = dgemma_gpu::bench::BenchPlan {
        contexts: vec![32, 128, 1000],
        prompt: 64,
        iters: 1,
        steps: vec![16],
        batches: vec![2, 3],
    };
    let records = dgemma_gpu::bench::run(&mut g, &plan, gbs).unwrap();
    let names: Vec<&str> = records.iter().map(|r| r.name.as_str()).collect();
    for want in ["prefill.bf16.tokens64", "commit.bf16.c16", "step.bf16.c1.ctx32", "step.bf16.c1.ctx128", "tokens_per_s.bf16.steps16", "ttft.bf16.prompt64.steps16"] {
        let r = records.iter().find(|r| r.name == want).unwrap_or_else(|| panic!("no {want} in {names:?}"));
        assert!(r.value.is_finite() && r.value > 0.0, "{r:?}");
    }
    // Batched steps: two canvases of two sequences in one pass; three do not fit max_batch.
    let r = records.iter().find(|r| r.name == "step.bf16.c2.ctx64").unwrap_or_else(|| panic!("no c2 step in {names:?}"));
    assert!(r.value.is_finite() && r.value > 0.0 && r.floor.is_some_and(|f| f > 0.0), "{r:?}");
    let r = records.iter().find(|r| r.name == "step.bf16.c3.ctx64").unwrap();
    assert!(r.value.is_nan() && r.note.contains("not run"), "{r:?}");
    assert!(records.iter().any(|r| r.name == "peak_mem_gb.bf16.c2" && r.value > 0.0));
    for want in ["graph_record.bf16.c1.ctx64", "step_unrecorded.bf16.c1.ctx64"] {
        let r = records.iter().find(|r| r.name == want).unwrap_or_else(|| panic!("no {want} in {names:?}"));
        assert!(r.value.is_finite() && r.value > 0.0, "{r:?}");
    }
    // The largest batch that ran (2) also times a step of one canvas with another's commit.
    let r = records.iter().find(|r| r.name == "step_with_commit.bf16.c1.ctx64").unwrap_or_else(|| panic!("{names:?}"));
    assert!(r.value.is_finite() && r.value > 0.0 && r.note.contains("the commit adds"), "{r:?}");
    assert_eq!(g.sequences(), 2);
    // A context beyond the cache is reported as not run, not timed.
    let r = records.iter().find(|r| r.name == "step.bf16.c1.ctx1000").unwrap();
    assert!(r.value.is_nan() && r.note.contains("not run"), "{r:?}");
    assert!(r.to_json().contains("\"value\": null"), "{}", r.to_json());
}

/// Sampler settings for the device-sampling checks: the checkpoint's, with few steps and
/// stopping that can trigger on the tiny model (any stable canvas), so both the finished flag
/// and the step limit are exercised.
fn sampling_settings(m: &Model, max_new_tokens: usize) -> GenerationSettings {
    let mut s = GenerationSettings::from_checkpoint(&m.ck.config, &m.ck.generation, Precision::Bf16);
    s.max_new_tokens = max_new_tokens;
    s.sampler.max_denoising_steps = 6;
    s.sampler.confidence_threshold = f32::INFINITY;
    s
}

/// On-device sampling follows the host sampler step by step: the same decoder logits (the
/// host path reads them back) through `dgemma_sampler` give the argmax canvas, the accepted
/// count and the finished flag the device reports, and the canvas and self-conditioning input
/// the device keeps give the same next step. Then whole generations agree with the host path,
/// the device path reads no logits back, and misuse is a clear error.
pub fn check_device_sampling<X: Executor>(make: impl Fn() -> X) {
    use dgemma_model::{DeviceCanvas, DeviceSampling};
    use dgemma_sampler::{denoise_step_in_place, NoiseSource, SeededNoise, StableAndConfident};

    let m = load("tiny-default");
    let cfg = &m.ck.config.text;
    let (v, c) = (cfg.vocab_size, m.ck.config.canvas_length);
    let settings = sampling_settings(&m, c);
    let s = settings.sampler;
    let prompt = ids(13, v, 21);
    let seed = 1234;

    // Step by step, one canvas.
    let mut dev = gpu_backend(&m, make(), default_options(&m));
    let mut host = gpu_backend(&m, make(), default_options(&m));
    dev.encode(&prompt).unwrap();
    host.encode(&prompt).unwrap();
    let mut noise = SeededNoise::new(seed, v);
    let mut canvas = vec![0u32; c];
    noise.init_canvas(0, &mut canvas).unwrap();
    let dc = DeviceCanvas {
        seed,
        block: 0,
        entropy_bound: s.entropy_bound,
        confidence_threshold: s.confidence_threshold,
        stability_threshold: s.stability_threshold,
    };
    DeviceSampling::begin_canvas(&mut dev, &canvas, dc).unwrap();
    let mut stopping = StableAndConfident::new(s.stability_threshold, s.confidence_threshold).unwrap();
    let mut sc: Option<Vec<f32>> = None;
    let mut logits = vec![f32::NAN; c * v];
    let mut finished_at = None;
    for step in 0..s.max_denoising_steps {
        let cur_step = s.max_denoising_steps - step;
        let t = dgemma_sampler::temperature_on(s.device, cur_step, s.max_denoising_steps, s.t_min, s.t_max).unwrap();
        let got = DeviceSampling::step(&mut dev, step, t).unwrap();
        let mut got_argmax = vec![u32::MAX; c];
        dev.read_argmax(&mut got_argmax).unwrap();

        host.denoise(&canvas, sc.as_deref(), &mut logits).unwrap();
        let want = denoise_step_in_place(&s, &mut stopping, &mut noise, 0, cur_step, &canvas, &mut logits).unwrap();
        eprintln!(
            "step {step}: device accepted {} mean H {} finished {}; host accepted {} mean H {} finished {}",
            got.accepted, got.mean_entropy, got.finished, want.accepted, want.mean_entropy, want.finished
        );
        assert_eq!(got_argmax, want.argmax_canvas, "step {step}: argmax canvas");
        assert_eq!(got.accepted, want.accepted, "step {step}: accepted count");
        assert_eq!(got.finished, want.finished, "step {step}: finished flag");
        let tol = 1e-5 * want.mean_entropy.abs() + 1e-6;
        assert!((got.mean_entropy - want.mean_entropy).abs() <= tol, "step {step}: mean entropy");
        sc = Some(bf16_round(&logits));
        canvas = want.next_canvas;
        if want.finished {
            finished_at = Some(step);
            break;
        }
    }
    eprintln!("canvas finished at step {finished_at:?} of {}", s.max_denoising_steps);

    // Whole generations (two canvases, so a commit and a second canvas's begin run too).
    let run = |device_sampling: bool| {
        let mut g = gpu_backend(&m, make(), default_options(&m));
        let mut st = sampling_settings(&m, 2 * c);
        st.device_sampling = device_sampling;
        let mut noise = SeededNoise::new(seed, v);
        let out = dgemma_engine::generate::generate(&mut g, &prompt, &st, &mut noise, &mut dgemma_engine::generate::Silent)
            .unwrap();
        (out, g.device_steps)
    };
    let (on_device, device_steps) = run(true);
    let (on_host, host_device_steps) = run(false);
    assert_eq!(on_device.ids, on_host.ids, "device and host sampling generated different ids");
    assert_eq!(on_device.stats.steps_per_canvas, on_host.stats.steps_per_canvas);
    assert_eq!(device_steps, on_device.stats.decoder_passes(), "every decoder pass sampled on the device");
    assert_eq!(host_device_steps, 0);

    // Misuse.
    let mut g = gpu_backend(&m, make(), default_options(&m));
    g.encode(&prompt).unwrap();
    let err = DeviceSampling::step(&mut g, 0, 0.8).unwrap_err().to_string();
    assert!(err.contains("no canvas begun"), "{err}");
    let err = DeviceSampling::begin_canvas(&mut g, &canvas, DeviceCanvas { entropy_bound: f32::NAN, ..dc })
        .unwrap_err()
        .to_string();
    assert!(err.contains("entropy_bound"), "{err}");
    DeviceSampling::begin_canvas(&mut g, &canvas, dc).unwrap();
    let err = DeviceSampling::step(&mut g, 0, f32::INFINITY).unwrap_err().to_string();
    assert!(err.contains("temperature"), "{err}");
    g.encode(&canvas).unwrap();
    let err = DeviceSampling::step(&mut g, 0, 0.8).unwrap_err().to_string();
    assert!(err.contains("no canvas begun"), "an encode must end the device canvas: {err}");
}

/// Several sequences on one backend (a [`dgemma_gpu::SharedModel`], as a server holds it),
/// stepped in turn, each generate exactly what they generate alone on a backend of their own:
/// their KV caches, decoder inputs, sampler histories and recordings are separate. A dropped
/// handle's sequence is reused, emptied.
pub fn check_shared_sequences<X: Executor>(make: impl Fn() -> X) {
    use dgemma_engine::generate::Silent;
    use dgemma_engine::{Generator, Pass};

    let m = load("tiny-default");
    let cfg = &m.ck.config.text;
    let (v, c) = (cfg.vocab_size, m.ck.config.canvas_length);
    let requests: Vec<(Vec<u32>, u64, usize)> =
        vec![(ids(11, v, 51), 7, 2 * c), (ids(29, v, 52), 8, c), (ids(5, v, 53), 9, 3 * c)];
    let settings = |n: usize| sampling_settings(&m, n);

    let alone: Vec<Vec<u32>> = requests
        .iter()
        .map(|(prompt, seed, n)| {
            let mut g = gpu_backend(&m, make(), default_options(&m));
            let gen = Generator::seeded(prompt, settings(*n), *seed).unwrap();
            gen.run_to_end(&mut g, &mut Silent).unwrap().ids
        })
        .collect();

    let shared = dgemma_gpu::SharedModel::new(gpu_backend(&m, make(), default_options(&m)));
    let mut handles: Vec<_> = requests.iter().map(|_| shared.sequence().unwrap()).collect();
    assert_eq!(shared.sequences(), requests.len());
    let mut gens: Vec<_> =
        requests.iter().map(|(prompt, seed, n)| Generator::seeded(prompt, settings(*n), *seed).unwrap()).collect();
    let mut logits = Vec::new();
    let mut passes = 0;
    // Round robin, one pass each, until all are done.
    while gens.iter().any(|g| !g.is_done()) {
        for (gen, h) in gens.iter_mut().zip(handles.iter_mut()) {
            if gen.advance(h, &mut logits, &mut Silent).unwrap() != Pass::None {
                passes += 1;
            }
        }
    }
    let device_steps = shared.with_backend(|b| b.device_steps);
    let denoise_passes: usize = gens.iter().map(|g| g.stats().decoder_passes()).sum();
    assert_eq!(device_steps, denoise_passes, "every decoder pass sampled on the device");
    eprintln!("{passes} passes interleaved over {} sequences", requests.len());
    for (i, (gen, want)) in gens.into_iter().zip(&alone).enumerate() {
        let got = gen.into_generation().unwrap().ids;
        assert_eq!(&got, want, "request {i}: interleaved on a shared backend differs from alone");
    }

    // A dropped handle's sequence is reused, and starts empty.
    let reused = handles.remove(1).index();
    let h = shared.sequence().unwrap();
    assert_eq!(h.index(), reused);
    assert_eq!(h.cache_len(), 0);
    assert_eq!(shared.sequences(), requests.len(), "no new sequence while one was free");
}

/// A batched decoder pass (several sequences' canvases stacked, one read of the weights) gives
/// every sequence exactly what a pass over it alone gives, with the device sampler after it:
/// the same argmax canvases, accepted counts, finished flags and entropies, step after step,
/// also when the batch mixes first steps (no self-conditioning) with later ones, and for
/// sequences at different positions.
pub fn check_batched_steps_are_exact<X: Executor>(make: impl Fn() -> X) {
    use dgemma_model::{DeviceCanvas, DeviceSampling};
    use dgemma_sampler::{NoiseSource, SeededNoise};

    let m = load("tiny-default");
    let cfg = &m.ck.config.text;
    let (v, c) = (cfg.vocab_size, m.ck.config.canvas_length);
    let s = sampling_settings(&m, c).sampler;
    let prompts = [ids(7, v, 61), ids(20, v, 62), ids(13, v, 63)];
    let seeds = [5u64, 6, 7];
    let canvas = |seed: u64| {
        let mut out = vec![0u32; c];
        SeededNoise::new(seed, v).init_canvas(0, &mut out).unwrap();
        out
    };
    let settings = |seed: u64| DeviceCanvas {
        seed,
        block: 0,
        entropy_bound: s.entropy_bound,
        confidence_threshold: f32::NEG_INFINITY, // never stop: every step is compared
        stability_threshold: s.stability_threshold,
    };
    let temperature = |step: usize| {
        dgemma_sampler::temperature_on(s.device, s.max_denoising_steps - step, s.max_denoising_steps, s.t_min, s.t_max).unwrap()
    };
    // Sequence i starts its canvas at round start[i]; rounds run steps of every started one.
    let start = [0usize, 0, 1];
    let rounds = 4;

    // Alone: one backend per sequence.
    let mut alone = Vec::new();
    for i in 0..3 {
        let mut g = gpu_backend(&m, make(), default_options(&m));
        g.encode(&prompts[i]).unwrap();
        DeviceSampling::begin_canvas(&mut g, &canvas(seeds[i]), settings(seeds[i])).unwrap();
        let mut per_step = Vec::new();
        for step in 0..rounds - start[i] {
            let st = DeviceSampling::step(&mut g, step, temperature(step)).unwrap();
            let mut am = vec![0u32; c];
            g.read_argmax(&mut am).unwrap();
            per_step.push((st, am));
        }
        alone.push(per_step);
    }

    // Batched: one backend, three sequences, max_batch 3.
    let mut options = default_options(&m);
    options.max_batch = 3;
    let mut g = gpu_backend(&m, make(), options);
    for i in 0..3 {
        if i > 0 {
            assert_eq!(g.add_sequence().unwrap(), i);
        }
        g.select_sequence(i).unwrap();
        g.encode(&prompts[i]).unwrap();
        DeviceSampling::begin_canvas(&mut g, &canvas(seeds[i]), settings(seeds[i])).unwrap();
    }
    for round in 0..rounds {
        let batch: Vec<(usize, usize, f32)> =
            (0..3).filter(|&i| round >= start[i]).map(|i| (i, round - start[i], temperature(round - start[i]))).collect();
        let statuses = g.step_batch(&batch).unwrap();
        for (&(i, step, _), st) in batch.iter().zip(statuses) {
            let st = st.unwrap();
            let mut am = vec![0u32; c];
            g.read_argmax_of(i, &mut am).unwrap();
            let (want_st, want_am) = &alone[i][step];
            assert_eq!(&am, want_am, "round {round}, sequence {i}, step {step}: argmax canvas");
            assert_eq!(st, *want_st, "round {round}, sequence {i}, step {step}: status");
        }
    }
    // Too many canvases for the workspace, or one sequence twice: clear errors.
    let err = g.step_batch(&[(0, 4, 0.5), (0, 4, 0.5)]).unwrap_err().to_string();
    assert!(err.contains("twice"), "{err}");
    let mut small = gpu_backend(&m, make(), default_options(&m));
    small.add_sequence().unwrap();
    let err = small.queue_denoise_batch(&[0, 1], c, false).unwrap_err().to_string();
    assert!(err.contains("max_batch"), "{err}");
}

/// A sequence that does not fit (out of memory half way through its buffers) gives back what it
/// got: retrying it does not leak, and once memory is there it succeeds.
pub fn check_failed_sequences_do_not_leak<X: Executor>(make: impl Fn() -> X) {
    let m = load("tiny-default");
    let mut g = gpu_backend(&m, make(), default_options(&m));
    let base = g.allocated_bytes();
    let per = g.sequence_bytes();
    // Room for half a sequence: its KV cache fits in part, the rest does not.
    g.executor_mut().set_memory_limit(Some(base + per / 2));
    for attempt in 0..3 {
        let e = g.add_sequence().unwrap_err();
        assert!(matches!(e, dgemma_model::error::Error::OutOfMemory { .. }), "attempt {attempt}: {e}");
        assert_eq!(g.allocated_bytes(), base, "attempt {attempt}: a failed sequence kept memory");
        assert_eq!(g.sequences(), 1);
    }
    g.executor_mut().set_memory_limit(Some(base + per));
    assert_eq!(g.add_sequence().unwrap(), 1);
    assert_eq!(g.allocated_bytes(), base + per);
}

/// A mixed pass: two sequences' device steps and, in the same decoder pass, a third sequence's
/// prompt chunk and a fourth's committed canvas encoded (`GpuBackend::step_mixed`). Against one
/// backend that runs the same work as separate passes (`step_batch`, then `encode` per
/// sequence): the steps' statuses and argmax canvases are identical, the encoded sequences' caches
/// reach the same lengths, and their next decoder passes give the same logits bit for bit. Bad
/// mixes (a sequence twice, too many encoder tokens, no device step) are clear errors.
pub fn check_mixed_passes<X: Executor>(make: impl Fn() -> X) {
    use dgemma_model::{DeviceCanvas, DeviceSampling};
    use dgemma_sampler::{NoiseSource, SeededNoise};

    let m = load("tiny-default");
    let cfg = &m.ck.config.text;
    let (v, c) = (cfg.vocab_size, m.ck.config.canvas_length);
    let s = sampling_settings(&m, c).sampler;
    let settings = |seed: u64| DeviceCanvas {
        seed,
        block: 0,
        entropy_bound: s.entropy_bound,
        confidence_threshold: f32::NEG_INFINITY,
        stability_threshold: s.stability_threshold,
    };
    let temperature = |step: usize| {
        dgemma_sampler::temperature_on(s.device, s.max_denoising_steps - step, s.max_denoising_steps, s.t_min, s.t_max).unwrap()
    };
    let canvas = |seed: u64| {
        let mut out = vec![0u32; c];
        SeededNoise::new(seed, v).init_canvas(0, &mut out).unwrap();
        out
    };
    // Sequences 0 and 1 denoise; 2 prefills its prompt in two chunks (the second in the mixed
    // pass); 3 has its prompt encoded and commits a canvas in the mixed pass.
    let prompts = [ids(9, v, 71), ids(17, v, 72), ids(30, v, 73), ids(12, v, 74)];
    let (chunk_a, chunk_b) = prompts[2].split_at(11);
    let commit = ids(c, v, 75);
    let mut options = default_options(&m);
    options.max_batch = 2;
    let setup = || {
        let mut g = gpu_backend(&m, make(), options);
        for i in 1..4 {
            assert_eq!(g.add_sequence().unwrap(), i);
        }
        for (i, p) in [(0, &prompts[0][..]), (1, &prompts[1][..]), (2, chunk_a), (3, &prompts[3][..])] {
            g.select_sequence(i).unwrap();
            g.encode(p).unwrap();
            if i < 2 {
                DeviceSampling::begin_canvas(&mut g, &canvas(80 + i as u64), settings(80 + i as u64)).unwrap();
            }
        }
        g
    };
    let mut sep = setup();
    let mut mix = setup();
    let read = |g: &mut GpuBackend<X>, seq: usize| {
        let mut am = vec![0u32; c];
        g.read_argmax_of(seq, &mut am).unwrap();
        am
    };
    // Step 0 alone in both (no self-conditioning yet), then step 1 with the encoder work.
    for g in [&mut sep, &mut mix] {
        let st = g.step_batch(&[(0, 0, temperature(0)), (1, 0, temperature(0))]).unwrap();
        assert!(st.iter().all(|r| r.is_ok()));
    }
    let steps = [(0, 1, temperature(1)), (1, 1, temperature(1))];
    let want = sep.step_batch(&steps).unwrap();
    let want_am = [read(&mut sep, 0), read(&mut sep, 1)];
    for (seq, ids) in [(2, chunk_b), (3, &commit[..])] {
        sep.select_sequence(seq).unwrap();
        sep.encode(ids).unwrap();
    }
    let got = mix.step_mixed(&steps, &[(2, chunk_b), (3, &commit)]).unwrap();
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert_eq!(g.as_ref().unwrap(), w.as_ref().unwrap(), "sequence {i}: the step's status in a mixed pass");
    }
    assert_eq!([read(&mut mix, 0), read(&mut mix, 1)], want_am, "the argmax canvases in a mixed pass");
    for seq in [2, 3] {
        for g in [&mut sep, &mut mix] {
            g.select_sequence(seq).unwrap();
        }
        assert_eq!(mix.cache_len(), sep.cache_len(), "sequence {seq}: cache length after the mixed pass");
        let next = canvas(90 + seq as u64);
        let (mut a, mut b) = (vec![f32::NAN; c * v], vec![f32::NAN; c * v]);
        sep.denoise(&next, None, &mut a).unwrap();
        mix.denoise(&next, None, &mut b).unwrap();
        assert!(a.iter().all(|x| x.is_finite()));
        assert!(a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()), "sequence {seq}: logits after its mixed encode");
    }
    // Bad mixes.
    let err = |r: dgemma_model::error::Result<Vec<dgemma_model::error::Result<dgemma_model::DeviceStepStatus>>>| {
        r.map(|_| ()).unwrap_err().to_string()
    };
    let e = err(mix.step_mixed(&[(0, 2, temperature(2))], &[(0, &commit)]));
    assert!(e.contains("twice"), "{e}");
    let e = err(mix.step_mixed(&[(0, 2, temperature(2))], &[(2, &commit), (2, &commit)]));
    assert!(e.contains("twice"), "{e}");
    let long = ids(options.prefill_chunk.max(c) + 1, v, 76);
    let e = err(mix.step_mixed(&[(0, 2, temperature(2))], &[(2, &long)]));
    assert!(e.contains("at most"), "{e}");
    let e = err(mix.step_mixed(&[], &[(2, &commit)]));
    assert!(e.contains("at least one device step"), "{e}");
}
