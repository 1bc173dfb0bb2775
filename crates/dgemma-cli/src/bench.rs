//! `dgemma bench`: end-to-end timings of the CUDA backend (dgemma_gpu::bench) on a checkpoint or
//! on synthetic weights of a model's exact shapes, printed as a table and optionally written as
//! JSON records of the results contract (`benches/results/README.md`).

use std::path::PathBuf;
use std::process::ExitCode;

use dgemma::gpu::bench::{self, BenchPlan, Record};
use dgemma::gpu::{Executor, GpuBackend, GpuExecutor, GpuOptions};
use dgemma_model::config::ModelConfig;
use dgemma::gpu::gemm_floor::{cublaslt_gemm_tflops, GemmInput};

use crate::load;
use crate::serve_bench;
use crate::progress::Progress;

#[derive(clap::Args)]
pub struct BenchArgs {
    /// Checkpoint directory (its real weights are uploaded).
    #[arg(long, conflicts_with = "synthetic")]
    pub model: Option<PathBuf>,
    /// A config.json: random weights of its exact shapes are generated on the GPU (no
    /// checkpoint needed). `26b` names reference/configs/diffusiongemma-26B-A4B/config.json.
    #[arg(long)]
    pub synthetic: Option<String>,
    /// Contexts (cached positions) at which a denoising step is timed.
    #[arg(long, value_delimiter = ',', default_value = "1024,4096,32768,131072")]
    pub contexts: Vec<usize>,
    /// Prompt length for the prefill and TTFT figures.
    #[arg(long, default_value_t = 4096)]
    pub prompt: usize,
    /// Denoising steps per canvas for tokens/s and TTFT.
    #[arg(long, value_delimiter = ',', default_value = "16,48")]
    pub steps: Vec<usize>,
    /// Timed repetitions per figure (after one warm-up).
    #[arg(long, default_value_t = 5)]
    pub iters: usize,
    /// Canvases per batched decoder pass for the step.bf16.c{B} figures (each of its own
    /// sequence at context --prompt); the workspace is sized for the largest.
    #[arg(long, value_delimiter = ',', default_value = "4,16")]
    pub batches: Vec<usize>,
    /// Concurrency levels of the serving figures (`throughput.bf16.concurrency{N}`, TTFT
    /// percentiles, peak memory): N requests at once through the runtime's scheduler on
    /// synthetic weights (see serve_bench.rs). Empty: not run.
    #[arg(long, value_delimiter = ',')]
    pub serve: Vec<usize>,
    /// Canvases each serving request generates.
    #[arg(long, default_value_t = 1)]
    pub serve_canvases: usize,
    /// Denoising steps per canvas of the serving requests (fixed: early stopping off).
    #[arg(long, default_value_t = 16)]
    pub serve_steps: usize,
    /// Most canvases per batched decoder pass in the serving figures (halved until it fits).
    #[arg(long, default_value_t = 16)]
    pub serve_batch: usize,
    /// Only the serving figures (no floors, steps, prefill).
    #[arg(long)]
    pub serve_only: bool,
    /// Write the records as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// How the MoE experts are held (`fp8`: FP8 E4M3 with per-row scales, quantised at load for
    /// --model, random codes for --synthetic). The model figures are then named `*.fp8.*`
    /// instead of `*.bf16.*`; the serving figures stay bf16.
    #[arg(long, value_enum, default_value = "none")]
    pub quant: load::QuantArg,
}

/// The backend's sizes: sequences of the longest context plus two canvases, a workspace for
/// batches of `max_batch`, and KV pages for what the figures use at once (the first sequence at
/// the longest context, the others of a batch at the prompt's), so `peak_mem_gb` counts no idle
/// pages.
fn bench_options(cfg: &dgemma_model::config::TextConfig, canvas: usize, longest: usize, prompt: usize, max_batch: usize) -> GpuOptions {
    let context = (longest + 2 * canvas).min(cfg.max_position_embeddings);
    let mut options = GpuOptions::new(context, canvas);
    options.max_batch = max_batch.max(1);
    let pages = |positions: usize| positions.min(context).div_ceil(options.kv_page);
    options.kv_pages = Some(pages(context) + (options.max_batch - 1) * pages(prompt + 2 * canvas));
    options
}

pub fn bench(a: BenchArgs) -> Result<ExitCode, Box<dyn std::error::Error>> {
    let dev = dgemma::cuda::open_device(0)?;
    let device_name = dev.name().to_string();
    let config_path = match a.synthetic.as_deref() {
        None | Some("26b") => load::repo_root().join("reference/configs/diffusiongemma-26B-A4B/config.json"),
        Some(p) => PathBuf::from(p),
    };
    let mut records = if a.serve_only { Vec::new() } else { model_figures(&a, dev, &config_path)? };
    if !a.serve.is_empty() {
        if a.model.is_some() {
            return Err("--serve runs on synthetic weights: use it with --synthetic, not --model".into());
        }
        let plan = serve_bench::ServePlan {
            levels: a.serve.clone(),
            prompt: a.prompt,
            canvases: a.serve_canvases.max(1),
            steps: a.serve_steps.max(1),
            max_batch: a.serve_batch.max(1),
            quant: a.quant.into(),
        };
        records.extend(serve_bench::run(&config_path, &load::repo_root().join("reference/tokenizer"), &plan));
    }
    println!("| record | value | unit | floor | ratio | note |");
    println!("| --- | ---: | --- | ---: | ---: | --- |");
    for r in &records {
        let f = |x: Option<f64>| x.map_or(String::new(), |v| format!("{v:.3}"));
        println!("| {} | {:.3} | {} | {} | {} | {} |", r.name, r.value, r.unit, f(r.floor), f(r.ratio_to_floor()), r.note);
    }
    if let Some(path) = &a.json {
        let what = match &a.model {
            Some(dir) => format!("checkpoint {}", dir.display()),
            None => format!("synthetic weights of {}", config_path.display()),
        };
        let body: Vec<String> = records.iter().map(|r| format!("  {}", r.to_json())).collect();
        let doc = format!(
            "{{\"device\": \"{device_name}\", \"commit\": \"{}\", \"what\": \"{}\", \"records\": [\n{}\n]}}\n",
            dgemma::GIT_COMMIT,
            what.replace('"', "'"),
            body.join(",\n")
        );
        std::fs::write(path, doc).map_err(|e| format!("{}: {e}", path.display()))?;
    }
    Ok(ExitCode::SUCCESS)
}

/// The floors and the CUDA backend's own figures (steps, prefill, commit, tokens/s, batches).
fn model_figures(a: &BenchArgs, dev: dgemma::gpu::Device, config_path: &std::path::Path) -> Result<Vec<Record>, Box<dyn std::error::Error>> {
    // The floors on an executor of their own, dropped (its 4 GiB of probe buffers freed)
    // before the model is allocated.
    // cuBLASLt's GEMM rate at 8192^3: the compute floor (a failure, e.g. no libcublasLt, is a
    // record saying why, not the end of the run).
    let gemm_floors: Vec<Record> = [
        (GemmInput::Bf16, "floor.bf16_gemm_tflops"),
        (GemmInput::Fp8E4m3, "floor.fp8_gemm_tflops"),
    ]
    .into_iter()
    .map(|(input, name)| {
        let (value, note) = match cublaslt_gemm_tflops(&dev, 8192, input, 10) {
            Ok(v) => (v, "cuBLASLt D = A^T B, 8192^3, fp32 accumulation, bf16 output, fastest heuristic algorithm".to_string()),
            Err(e) => (f64::NAN, format!("not run: {e}")),
        };
        Record { name: name.into(), value, unit: "TFLOP/s", floor: None, target: None, note }
    })
    .collect();
    let (copy_gbs, read_gbs) = {
        let mut probe = GpuExecutor::new(dev);
        (bench::copy_bandwidth(&mut probe, 1 << 30, 10)?, bench::read_bandwidth(&mut probe, 2 << 30, 5)?)
    };
    let longest = a.contexts.iter().copied().max().unwrap_or(0).max(a.prompt);
    let quant: dgemma_model::quant::Quant = a.quant.into();
    let loaded = a.model.as_ref().map(|dir| load::open(dir, quant, true)).transpose()?;
    let cfg = match &loaded {
        Some(l) => l.checkpoint.config.clone(),
        None => ModelConfig::from_file(config_path)?,
    };
    let what = match &a.model {
        Some(dir) => format!("checkpoint {}", dir.display()),
        None => format!("synthetic weights of {}", config_path.display()),
    };
    // The largest batch that fits: halve it on out-of-memory (the figures of larger batches are
    // then reported as not run).
    let largest = a.batches.iter().copied().max().unwrap_or(1);
    let mut options = bench_options(&cfg.text, cfg.canvas_length, longest, a.prompt, largest);
    let mut backend = loop {
        let exec = GpuExecutor::new(dgemma::cuda::open_device(0)?);
        let mut bar = Progress::new("weights");
        let mut progress = |done: usize, total: usize| bar.update(done as u64, total as u64);
        let built = match &loaded {
            Some(l) => GpuBackend::new(exec, &cfg.text, &l.weights, GpuOptions { expert_quant: l.upload_quant, ..options }, &mut progress),
            None => GpuBackend::synthetic_quant(exec, &cfg.text, 0, quant, options, &mut progress),
        };
        match built {
            Ok(b) => break b,
            Err(e @ dgemma_model::error::Error::OutOfMemory { .. }) if options.max_batch > 1 => {
                eprintln!("dgemma bench: batches of {} do not fit ({e}); trying {}", options.max_batch, options.max_batch / 2);
                options = bench_options(&cfg.text, cfg.canvas_length, longest, a.prompt, options.max_batch / 2);
            }
            Err(e) => return Err(e.into()),
        }
    };
    eprintln!(
        "dgemma bench: {} | {what} | {:.2} GB weights, {:.2} GB allocated | HBM read {read_gbs:.0} GB/s, copy {copy_gbs:.0} GB/s",
        backend.executor().describe(),
        backend.weight_bytes() as f64 / 1e9,
        backend.executor().allocated_bytes() as f64 / 1e9
    );
    let plan = BenchPlan {
        contexts: a.contexts.clone(),
        prompt: a.prompt,
        iters: a.iters,
        steps: a.steps.clone(),
        batches: a.batches.clone(),
    };
    let floor = |name: &str, value: f64, note: &str| Record {
        name: name.into(),
        value,
        unit: "GB/s",
        floor: None,
        target: None,
        note: note.into(),
    };
    let mut records = vec![
        floor(
            "floor.hbm_read_gbs",
            read_gbs,
            "read-only stream of 2 GiB (read_bandwidth kernel, best run): the floor of the step figures",
        ),
        floor("floor.copy_gbs", copy_gbs, "device-to-device copy of 1 GiB, read + written bytes"),
    ];
    records.extend(gemm_floors);
    records.extend(bench::run(&mut backend, &plan, read_gbs)?);
    records.push(Record {
        name: "peak_mem_gb.bf16.c1".into(),
        value: backend.executor().allocated_bytes() as f64 / 1e9,
        unit: "GB",
        floor: None,
        target: None,
        note: "bytes allocated by the backend (weights, cache, workspace, probe buffers)".into(),
    });
    if quant == dgemma_model::quant::Quant::Fp8 {
        for r in &mut records {
            r.name = r.name.replace(".bf16.", ".fp8.");
        }
    }
    Ok(records)
}
