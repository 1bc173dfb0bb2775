//! The CUDA backend end to end on synthetic 26B-A4B weights (criterion): one denoising step at
//! contexts 1K/4K/32K/128K, the commit of one canvas, and prefills of 1K/4K/32K tokens.
//!
//!     cargo bench --bench gpu_step               # everything (prefill.32768 runs >= 11 times)
//!     cargo bench --bench gpu_step -- step.bf16  # the steps only (criterion's name filter)
//!
//! Setup: the HBM read-bandwidth floor is measured on a probe executor (freed before the model is
//! built), then `GpuBackend::synthetic` builds the model from
//! `reference/configs/diffusiongemma-26B-A4B/config.json` with a KV cache for the longest
//! context that fits the GPU (128K + 2 canvases, else 32K, else 4K: contexts beyond it are left
//! out, with a line saying so). One encoder chunk of random token ids and one decoder pass with a
//! random canvas and random self-conditioning logits leave realistic inputs in the workspace (all
//! tokens equal would route every token to the same experts).
//!
//! Figures (names as in the results contract):
//! * `step.bf16.c1.ctx{N}`: one replay of the recorded decoder pass (canvas with
//!   self-conditioning) over a cache declared `N` positions long (`assume_cache_len`);
//! * `commit.bf16.c256.ctx4096`: one encoder pass over a canvas at position 4096;
//! * `prefill.bf16.tokens{N}`: the encoder over `N` tokens in the backend's chunks, from an
//!   empty cache.
//!
//! Each timed run: an L2 flush and any host-side bookkeeping (cache length) outside the timed
//! span, then the queued passes between CUDA events. The line printed per figure gives the
//! median, GB/s and TFLOP/s and the ratio to the floor: max(bytes / HBM read bandwidth, FLOPs /
//! bf16 peak), where bytes = every weight once plus the K/V attended (`kv_bytes_attended`) and
//! FLOPs count the matrix products (top-k experts only) and attention scores.
//!
//! Without a GPU, a driver or compiled kernels it prints one line saying it is skipped and exits
//! 0. `--test` (the GPU suite's smoke run) runs each figure once without a warm-up (the first
//! step at a context then includes recording its graph), and the prefills at most two chunks
//! each (said on their line), to stay within the suite's 120 s per bench executable.

mod gpu_common;

use criterion::{SamplingMode, Throughput};
use dgemma::gpu::{Executor, GpuBackend, GpuExecutor, GpuOptions};
use dgemma::model::config::TextConfig;
use dgemma::Backend;
use dgemma_cuda::Step;
use gpu_common::{Figure, Floors, Mode, Rng};

const BENCH: &str = "gpu_step";
const CONTEXTS: [usize; 4] = [1024, 4096, 32_768, 131_072];
const PREFILLS: [usize; 3] = [1024, 4096, 32_768];
const COMMIT_AT: usize = 4096;

type Gpu = GpuBackend<GpuExecutor>;

fn exec_of(b: &mut Gpu) -> &mut GpuExecutor {
    b.executor_mut()
}

/// Matrix-product and attention-score FLOPs of a pass of `tokens` rows at positions
/// `pos0..pos0 + tokens` (2 per multiply-add). The decoder attends bidirectionally over the cache
/// and the canvas and adds self-conditioning (softmax(sc) @ E and its MLP) and the LM head; the
/// encoder is causal (sliding layers: the window) and its last layer only projects K and V.
fn pass_flops(cfg: &TextConfig, tokens: usize, pos0: usize, decoder: bool) -> f64 {
    let (h, v) = (cfg.hidden_size as f64, cfg.vocab_size as f64);
    let t = tokens as f64;
    let mut macs = 0.0;
    let n = cfg.num_hidden_layers;
    for i in 0..n {
        let l = cfg.layer(i);
        let kv = if l.k_eq_v { 1.0 } else { 2.0 } * (l.kv_dim() as f64) * h;
        if !decoder && i + 1 == n {
            macs += t * kv;
            continue;
        }
        let proj = 2.0 * (l.q_dim() as f64) * h + kv;
        let mlp = 3.0 * (cfg.intermediate_size as f64) * h
            + (cfg.num_experts as f64) * h
            + (cfg.top_k_experts * 3 * cfg.moe_intermediate_size) as f64 * h;
        // Keys each query scores.
        let keys: f64 = if decoder {
            let cached = l.sliding_window.map_or(pos0, |w| pos0.min(w.saturating_sub(1)));
            t * (cached + tokens) as f64
        } else {
            (0..tokens).map(|j| (pos0 + j + 1).min(l.sliding_window.unwrap_or(usize::MAX)) as f64).sum()
        };
        macs += t * (proj + mlp) + 2.0 * keys * (l.q_dim() as f64);
    }
    if decoder {
        macs += t * (2.0 * v * h + 3.0 * (cfg.self_conditioning_size as f64) * h);
    }
    2.0 * macs
}

/// Everything the timed runs need, built once (never in `--list` mode).
struct State {
    backend: Gpu,
    flush: Step,
    floors: Floors,
    /// Positions the cache holds.
    capacity: usize,
    chunk: usize,
    canvas: usize,
}

impl State {
    fn new(cfg: &dgemma::model::config::ModelConfig) -> Result<State, String> {
        let canvas = cfg.canvas_length;
        let dev = dgemma::cuda::open_device(0).map_err(|e| e.to_string())?;
        let name = dev.name().to_string();
        let floors = {
            let mut probe = GpuExecutor::new(dev);
            Floors::measure(BENCH, &mut probe, &name)
        }; // the probe's 2 GiB are freed here
        let longest = CONTEXTS.iter().chain(&PREFILLS).copied().max().unwrap_or(0);
        let mut last_err = String::new();
        for want in [longest, 32_768, COMMIT_AT] {
            let capacity = want + 2 * canvas;
            let exec = GpuExecutor::new(dgemma::cuda::open_device(0).map_err(|e| e.to_string())?);
            let t0 = std::time::Instant::now();
            match GpuBackend::synthetic(exec, &cfg.text, 1, GpuOptions::new(capacity, canvas), &mut |_, _| {}) {
                Ok(mut backend) => {
                    let chunk = backend.options().prefill_chunk;
                    println!(
                        "{BENCH}: {} | synthetic 26B-A4B: {:.2} GB of weights, a cache of {capacity} positions, {:.2} GB \
                         allocated, built in {:.1} s",
                        backend.executor().describe(),
                        backend.weight_bytes() as f64 / 1e9,
                        backend.executor().allocated_bytes() as f64 / 1e9,
                        t0.elapsed().as_secs_f64()
                    );
                    let flush = gpu_common::flush_step(backend.executor_mut());
                    // Realistic inputs in the workspace: random prompt ids (one chunk) and a random
                    // canvas with random self-conditioning logits.
                    let mut rng = Rng::new(0x5EED);
                    let v = cfg.text.vocab_size;
                    let ids: Vec<u32> = (0..chunk).map(|_| rng.below(v) as u32).collect();
                    backend.encode(&ids).map_err(|e| e.to_string())?;
                    let canvas_ids: Vec<u32> = (0..canvas).map(|_| rng.below(v) as u32).collect();
                    let sc: Vec<f32> = (0..canvas * v).map(|_| 8.0 * rng.uniform()).collect();
                    let mut logits = vec![0.0f32; canvas * v];
                    backend.denoise(&canvas_ids, Some(&sc), &mut logits).map_err(|e| e.to_string())?;
                    if !logits.iter().all(|x| x.is_finite()) {
                        return Err("the synthetic model gave non-finite logits".into());
                    }
                    backend.reset();
                    // Timed steps run the device sampler too: give it valid params.
                    backend.bench_sampler_params().map_err(|e| e.to_string())?;
                    return Ok(State { backend, flush, floors, capacity, chunk, canvas });
                }
                Err(e) => {
                    println!(
                        "{BENCH}: a cache of {capacity} positions does not fit or failed ({e}); trying a smaller one"
                    );
                    last_err = e.to_string();
                }
            }
        }
        Err(format!("the 26B-A4B model does not fit this GPU: {last_err}"))
    }
}

/// One figure: its name, what it needs from the cache, and how to run it.
enum Work {
    Step { ctx: usize },
    Commit { at: usize },
    Prefill { tokens: usize },
}

impl Work {
    fn positions(&self, canvas: usize) -> usize {
        match *self {
            Work::Step { ctx } => ctx + canvas,
            Work::Commit { at } => at + canvas,
            Work::Prefill { tokens } => tokens,
        }
    }
}

fn figure(cfg: &dgemma::model::config::ModelConfig, st: Option<&State>, work: &Work, mode: Mode) -> Figure {
    let canvas = cfg.canvas_length;
    let text = &cfg.text;
    let weights = st.map_or(0.0, |s| s.backend.weight_bytes() as f64);
    let attended = |len: usize| st.map_or(0.0, |s| s.backend.kv_bytes_attended(len) as f64);
    match *work {
        Work::Step { ctx } => {
            let mut f = Figure::new(
                format!("step.bf16.c1.ctx{ctx}"),
                weights + attended(ctx),
                pass_flops(text, canvas, ctx, true),
            );
            f.note = "one denoising step of one canvas (decoder pass with self-conditioning, device sampler), recorded and replayed".into();
            f
        }
        Work::Commit { at } => Figure::new(
            format!("commit.bf16.c{canvas}.ctx{at}"),
            weights + attended(at),
            pass_flops(text, canvas, at, false),
        ),
        Work::Prefill { tokens } => {
            let chunk = st.map_or(512, |s| s.chunk);
            let run = if mode.test { tokens.min(2 * chunk) } else { tokens };
            let flops =
                (0..run.div_ceil(chunk)).map(|c| pass_flops(text, chunk.min(run - c * chunk), c * chunk, false)).sum();
            let mut f = Figure::new(format!("prefill.bf16.tokens{tokens}"), weights + attended(run), flops);
            f.note = format!("{} encoder passes of {chunk} tokens", run.div_ceil(chunk));
            if run < tokens {
                f.note += &format!("; test mode: {run} of the {tokens} tokens");
            }
            f
        }
    }
}

/// Host-side cache bookkeeping before a timed run (untimed). A step keeps its cache length, and
/// with it its recording (`assume_cache_len` drops recordings): it is set once, in the warm-up.
fn prepare(b: &mut Gpu, work: &Work) {
    match *work {
        Work::Step { ctx } => {
            if b.cache_len() != ctx {
                b.assume_cache_len(ctx).expect("cache length")
            }
        }
        Work::Commit { at } => b.assume_cache_len(at).expect("cache length"),
        Work::Prefill { .. } => b.reset(),
    }
}

/// Queues `work`'s passes (no host sync).
fn queue(b: &mut Gpu, work: &Work, chunk: usize, canvas: usize, mode: Mode) {
    match *work {
        Work::Step { .. } => b.queue_denoise(canvas, true).expect("decoder pass"),
        Work::Commit { .. } => b.queue_encode(canvas).expect("commit pass"),
        Work::Prefill { tokens } => {
            let mut left = if mode.test { tokens.min(2 * chunk) } else { tokens };
            while left > 0 {
                let n = left.min(chunk);
                b.queue_encode(n).expect("encoder pass");
                left -= n;
            }
        }
    }
}

fn main() {
    let mode = gpu_common::mode();
    if gpu_common::open_or_skip(BENCH).is_none() {
        return;
    }
    let cfg = gpu_common::config_26b();
    let canvas = cfg.canvas_length;
    let mut state = if mode.list {
        None
    } else {
        match State::new(&cfg) {
            Ok(s) => Some(s),
            Err(e) => {
                println!("{BENCH}: skipped, no GPU benchmark ran: {e}");
                return;
            }
        }
    };

    let mut works: Vec<Work> = CONTEXTS.iter().map(|&ctx| Work::Step { ctx }).collect();
    works.push(Work::Commit { at: COMMIT_AT });
    works.extend(PREFILLS.iter().map(|&tokens| Work::Prefill { tokens }));

    let mut c = gpu_common::criterion();
    let mut g = c.benchmark_group(BENCH);
    g.sampling_mode(SamplingMode::Flat);
    for work in &works {
        if let Some(st) = &state {
            if work.positions(canvas) > st.capacity {
                let fig = figure(&cfg, Some(st), work, mode);
                println!(
                    "{BENCH}: {}: left out: needs {} cache positions, this GPU fit {}",
                    fig.name,
                    work.positions(canvas),
                    st.capacity
                );
                continue;
            }
        }
        let fig = figure(&cfg, state.as_ref(), work, mode);
        if fig.bytes > 0.0 {
            g.throughput(Throughput::Bytes(fig.bytes as u64));
        }
        let mut samples: Vec<f64> = Vec::new();
        let mut warm = false;
        g.bench_function(fig.name.as_str(), |b| {
            let st = state.as_mut().expect("built unless --list");
            let (chunk, canvas) = (st.chunk, st.canvas);
            if !warm {
                // Records the decoder pass of this context and touches everything once (in test
                // mode, where nothing is measured, the single run does that itself).
                prepare(&mut st.backend, work);
                if !mode.test {
                    queue(&mut st.backend, work, chunk, canvas, mode);
                    st.backend.executor_mut().synchronize().expect("warm-up");
                }
                warm = true;
            }
            let flush = st.flush.clone();
            b.iter_custom(|iters| {
                gpu_common::timed_runs(
                    &mut st.backend,
                    exec_of,
                    &flush,
                    iters,
                    &mut samples,
                    |b| prepare(b, work),
                    |b| queue(b, work, chunk, canvas, mode),
                )
            });
        });
        if let Some(st) = &state {
            gpu_common::report(BENCH, &fig, &samples, &st.floors, mode);
        }
    }
    g.finish();
    c.final_summary();
    if let Some(st) = &mut state {
        st.backend.reset();
    }
}
