//! `dgemma bench`: end-to-end timings of the CUDA backend (dgemma_gpu::bench) on a checkpoint or
//! on synthetic weights of a model's exact shapes, printed as a table and optionally written as
//! JSON records of the results contract (`benches/results/README.md`).

use std::path::PathBuf;
use std::process::ExitCode;

use dgemma::gpu::bench::{self, BenchPlan, Record};
use dgemma::gpu::{Executor, GpuBackend, GpuExecutor, GpuOptions};
use dgemma_model::config::ModelConfig;

use crate::load;
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
    /// Write the records as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

pub fn bench(a: BenchArgs) -> Result<ExitCode, Box<dyn std::error::Error>> {
    let dev = dgemma::cuda::open_device(0)?;
    let device_name = dev.name().to_string();
    let mut exec = GpuExecutor::new(dev);
    let copy_gbs = bench::copy_bandwidth(&mut exec, 1 << 30, 10)?;
    let read_gbs = bench::read_bandwidth(&mut exec, 2 << 30, 5)?;
    let longest = a.contexts.iter().copied().max().unwrap_or(0).max(a.prompt);
    let mut bar = Progress::new("weights");
    let mut progress = |done: usize, total: usize| bar.update(done as u64, total as u64);
    let (mut backend, what) = match (&a.model, &a.synthetic) {
        (Some(dir), _) => {
            let loaded = load::open(dir)?;
            let cfg = &loaded.checkpoint.config;
            let options = GpuOptions::new((longest + 2 * cfg.canvas_length).min(cfg.text.max_position_embeddings), cfg.canvas_length);
            let b = GpuBackend::new(exec, &cfg.text, &loaded.weights, options, &mut progress)?;
            (b, format!("checkpoint {}", dir.display()))
        }
        (None, name) => {
            let path = match name.as_deref() {
                None | Some("26b") => load::repo_root().join("reference/configs/diffusiongemma-26B-A4B/config.json"),
                Some(p) => PathBuf::from(p),
            };
            let cfg = ModelConfig::from_file(&path)?;
            let options = GpuOptions::new((longest + 2 * cfg.canvas_length).min(cfg.text.max_position_embeddings), cfg.canvas_length);
            let b = GpuBackend::synthetic(exec, &cfg.text, 0, options, &mut progress)?;
            (b, format!("synthetic weights of {}", path.display()))
        }
    };
    eprintln!(
        "dgemma bench: {device_name} | {what} | {:.2} GB weights, {:.2} GB allocated | HBM read {read_gbs:.0} GB/s, copy {copy_gbs:.0} GB/s",
        backend.weight_bytes() as f64 / 1e9,
        backend.executor().allocated_bytes() as f64 / 1e9
    );
    let plan = BenchPlan { contexts: a.contexts.clone(), prompt: a.prompt, iters: a.iters, steps: a.steps.clone() };
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
    records.extend(bench::run(&mut backend, &plan, read_gbs)?);
    records.push(Record {
        name: "peak_mem_gb.bf16.c1".into(),
        value: backend.executor().allocated_bytes() as f64 / 1e9,
        unit: "GB",
        floor: None,
        target: None,
        note: "bytes allocated by the backend (weights, cache, workspace, probe buffers)".into(),
    });
    println!("| record | value | unit | floor | ratio | note |");
    println!("| --- | ---: | --- | ---: | ---: | --- |");
    for r in &records {
        let f = |x: Option<f64>| x.map_or(String::new(), |v| format!("{v:.3}"));
        println!("| {} | {:.3} | {} | {} | {} | {} |", r.name, r.value, r.unit, f(r.floor), f(r.ratio_to_floor()), r.note);
    }
    if let Some(path) = &a.json {
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
