//! `dgemma bench --serve 1,4,16,32`: the serving path under load. For each concurrency N, an
//! engine (`dgemma-runtime`, the scheduler servers link) on synthetic weights of the model's
//! exact shapes gets N requests at once, each a `--prompt`-token random prompt generating
//! `--serve-canvases` canvases of exactly `--serve-steps` denoising steps (early stopping off,
//! no stop ids: the fixed-step setting of vLLM's published figure). Measured from the moment
//! all N are submitted:
//!
//! Records are named `bf16`, or `fp8` with `--quant fp8` (FP8 E4M3 experts).
//!
//! * `throughput.bf16.concurrency{N}`: committed tokens of all N / wall time until the last ends
//!   (prefills included: every request brings its own prompt);
//! * `ttft_p50.bf16.concurrency{N}`, `ttft_p99...`: submit to first committed canvas, per request;
//! * `peak_mem_gb.bf16.concurrency{N}`: device bytes the engine allocated (weights, workspace,
//!   the KV page pool, each request's sliding-layer rings), and in the note how many requests actually ran at once (admission waits for
//!   memory when the caches do not fit) and the batch size the workspace was built for.

use std::path::Path;
use std::time::{Duration, Instant};

use dgemma::gpu::bench::Record;
use dgemma_runtime::{BackendKind, Engine, EngineOptions, Event, Quant, Request, RuntimeError, SamplerOverrides};

/// The serving benchmark's settings.
pub struct ServePlan {
    pub levels: Vec<usize>,
    pub prompt: usize,
    pub canvases: usize,
    pub steps: usize,
    /// Most canvases per batched decoder pass (halved while the workspace does not fit).
    pub max_batch: usize,
    /// The experts' format (`--quant`): the records say `bf16` or `fp8`.
    pub quant: Quant,
}

impl ServePlan {
    fn dtype(&self) -> &'static str {
        match self.quant {
            Quant::Fp8 => "fp8",
            _ => "bf16",
        }
    }
}

pub fn run(config: &Path, tokenizer_dir: &Path, plan: &ServePlan) -> Vec<Record> {
    let mut out = Vec::new();
    for &n in &plan.levels {
        match level(config, tokenizer_dir, plan, n) {
            Ok(records) => out.extend(records),
            Err(e) => {
                let mut r = Record::new(format!("throughput.{}.concurrency{n}", plan.dtype()), f64::NAN, "tok/s");
                r.note = format!("not run: {e}");
                out.push(r);
            }
        }
    }
    out
}

fn level(config: &Path, tokenizer_dir: &Path, plan: &ServePlan, n: usize) -> Result<Vec<Record>, String> {
    let mut batch = plan.max_batch.min(n).max(1);
    let engine = loop {
        let options = EngineOptions {
            backend: BackendKind::Cuda,
            max_concurrent: n,
            max_batch: batch,
            context: Some(plan.prompt + plan.canvases * 256 + 256),
            quant: plan.quant,
            ..Default::default()
        };
        match Engine::load_synthetic(config, tokenizer_dir, 0, options) {
            Ok(e) => break e,
            Err(RuntimeError::Load { message, .. }) if batch > 1 && message.contains("out of GPU memory") => {
                eprintln!("dgemma bench --serve: a workspace for batches of {batch} does not fit; trying {}", batch / 2);
                batch /= 2;
            }
            Err(e) => return Err(e.to_string()),
        }
    };
    let settings = engine.default_settings().clone();
    let vocab = settings.vocab_size as u64;
    let requests: Vec<Request> = (0..n as u64)
        .map(|i| {
            // Random ids above the special tokens (a cheap LCG: the content does not matter).
            let mut x = 0x9E37_79B9_7F4A_7C15u64 ^ i;
            let ids: Vec<u32> = (0..plan.prompt)
                .map(|_| {
                    x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                    (16 + (x >> 33) % (vocab - 16)) as u32
                })
                .collect();
            Request::ids(ids)
                .seed(i)
                .max_new_tokens(plan.canvases * settings.canvas_length)
                .max_denoising_steps(plan.steps)
                .stop_ids(vec![])
                .sampler(SamplerOverrides { confidence_threshold: Some(f32::NEG_INFINITY), ..Default::default() })
        })
        .collect();
    let t0 = Instant::now();
    let handles = requests.into_iter().map(|r| engine.submit(r)).collect::<Result<Vec<_>, _>>().map_err(|e| e.to_string())?;
    let waiters: Vec<_> = handles
        .into_iter()
        .map(|mut h| {
            std::thread::spawn(move || -> Result<(Duration, usize), String> {
                let mut first = None;
                while let Some(event) = h.next_event() {
                    match event {
                        Event::Canvas { .. } => {
                            first.get_or_insert_with(|| t0.elapsed());
                        }
                        Event::Finished(done) => return Ok((first.unwrap_or_else(|| t0.elapsed()), done.ids.len())),
                        Event::Error(e) => return Err(e.to_string()),
                        Event::Cancelled => return Err("cancelled".into()),
                        _ => {}
                    }
                }
                Err("the stream ended without a result".into())
            })
        })
        .collect();
    let mut ttft = Vec::new();
    let mut tokens = 0;
    for w in waiters {
        let (first, n_tokens) = w.join().map_err(|_| "a request thread panicked".to_string())??;
        ttft.push(first.as_secs_f64() * 1e3);
        tokens += n_tokens;
    }
    let wall = t0.elapsed().as_secs_f64();
    let st = engine.stats();
    let memory = engine.device_memory();
    let mem = memory.map_or(f64::NAN, |m| m.allocated as f64 / 1e9);
    let pool = memory.map_or(String::new(), |m| {
        format!("a KV pool of {} pages of {} positions, {:.1} MB each", m.kv_pages, m.kv_page, m.kv_page_bytes as f64 / 1e6)
    });
    ttft.sort_by(f64::total_cmp);
    let pct = |p: f64| ttft[((p * (ttft.len() - 1) as f64).round() as usize).min(ttft.len() - 1)];
    let what = format!(
        "{n} requests of {}-token prompts, {} canvas(es) of {} steps each; up to {} running at once, \
         batches of up to {batch} canvases (largest {}), {} encoder passes merged into them, {} memory waits, {:.1} s wall",
        plan.prompt, plan.canvases, plan.steps, st.peak_active, st.largest_batch, st.merged_encodes, st.memory_waits, wall
    );
    let dt = plan.dtype();
    let mut throughput = Record::new(format!("throughput.{dt}.concurrency{n}"), tokens as f64 / wall, "tok/s");
    throughput.note = format!("committed tokens / wall time, prefills included: {what}");
    let mut p50 = Record::new(format!("ttft_p50.{dt}.concurrency{n}"), pct(0.5), "ms");
    p50.note = "submit to the first committed canvas, median over the requests".into();
    let mut p99 = Record::new(format!("ttft_p99.{dt}.concurrency{n}"), pct(0.99), "ms");
    p99.note = "submit to the first committed canvas, 99th percentile over the requests".into();
    let mut peak = Record::new(format!("peak_mem_gb.{dt}.concurrency{n}"), mem, "GB");
    peak.note = format!("device bytes the engine allocated (weights, workspace, {pool}, {} requests' KV rings)", st.backends);
    Ok(vec![throughput, p50, p99, peak])
}
