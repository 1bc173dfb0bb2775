//! What the GPU benches (`gpu_kernels.rs`, `gpu_step.rs`) share: opening the GPU or saying in
//! one line why they are skipped, criterion's settings, CUDA-event timing with the L2 flushed
//! before every timed run, the floors, and the one line each figure prints.
//!
//! Timing: criterion's `iter_custom` gets, for each of its `iters`, a flush of the L2 (a
//! device-to-device copy writing [`FLUSH_BYTES`], queued before the timer starts), then the
//! executor's CUDA-event timer around the queued work alone (`timer_start` / `timer_stop`, which
//! waits for it). Criterion sums those event times; the line printed after each figure gives the
//! median of every run it timed, the bytes / FLOPs moved per second and the ratio to the floor.
//!
//! Floors: bytes over the HBM read bandwidth measured in the same run (`floor.hbm_read_gbs`, the
//! read-bandwidth probe kernel over 2 GiB, best run), or FLOPs over the bf16 tensor peak
//! (`$DGEMMA_PEAK_BF16_TFLOPS`, else the datasheet figure of a known GPU), whichever is larger.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use criterion::Criterion;
use dgemma::gpu::{Device, Executor};
use dgemma_cuda::{Region, Step};

/// How this bench executable was started (criterion's own flags, read before criterion parses
/// them, so that `--list` and `--test` stay quick).
#[derive(Clone, Copy, Debug)]
pub struct Mode {
    /// `--list`: print the benchmark names only (no setup, no GPU work).
    pub list: bool,
    /// `--test` (or run without `--bench`, as `cargo test --benches` does): every benchmark once.
    pub test: bool,
}

pub fn mode() -> Mode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let has = |f: &str| args.iter().any(|a| a == f);
    let list = has("--list");
    Mode { list, test: !list && (has("--test") || !has("--bench")) }
}

/// Opens GPU 0 with this build's kernels, or prints one line saying why the bench is skipped
/// (no kernels compiled in, no driver, no device, an unsupported GPU) and returns `None`.
pub fn open_or_skip(bench: &str) -> Option<Device> {
    match dgemma::cuda::open_device(0) {
        Ok(dev) => Some(dev),
        Err(e) => {
            println!("{bench}: skipped, no GPU benchmark ran: {e}");
            None
        }
    }
}

/// Criterion with short defaults (flat sampling is set per group; the command line overrides
/// all of these): 10 samples, 20 ms warm-up and 100 ms measurement of *event* time per
/// benchmark. Every timed run also costs an L2 flush and a host sync that criterion does not
/// see, so its time targets are kept small.
pub fn criterion() -> Criterion {
    Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(20))
        .measurement_time(Duration::from_millis(100))
        .configure_from_args()
}

/// The repository root: `$DGEMMA_REPO` when set and not empty (a bench executable built on one
/// machine and run from another checkout), else the compile-time source tree.
pub fn repo_root() -> PathBuf {
    match std::env::var_os("DGEMMA_REPO") {
        Some(dir) if !dir.is_empty() => dir.into(),
        _ => Path::new(env!("CARGO_MANIFEST_DIR")).into(),
    }
}

/// The 26B-A4B config (`reference/configs/diffusiongemma-26B-A4B/config.json`).
pub fn config_26b() -> dgemma::model::config::ModelConfig {
    let path = repo_root().join("reference/configs/diffusiongemma-26B-A4B/config.json");
    dgemma::model::config::ModelConfig::from_file(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Dense bf16 tensor-core peak in TFLOP/s and where it comes from: `$DGEMMA_PEAK_BF16_TFLOPS`,
/// else the datasheet figure of a known GPU (no GEMM ceiling is measured yet), else `None` (the
/// floors are then memory floors only).
pub fn peak_bf16_tflops(device_name: &str) -> Option<(f64, String)> {
    if let Some(v) = std::env::var("DGEMMA_PEAK_BF16_TFLOPS").ok().and_then(|v| v.parse::<f64>().ok()) {
        return Some((v, "$DGEMMA_PEAK_BF16_TFLOPS".into()));
    }
    let n = device_name.to_ascii_lowercase();
    let sheet = if n.contains("h100") && n.contains("pcie") {
        756.0
    } else if n.contains("h100") || n.contains("h200") || n.contains("gh200") {
        989.4
    } else if n.contains("rtx 5090") {
        209.5
    } else {
        return None;
    };
    Some((sheet, format!("datasheet dense bf16 of {device_name}")))
}

/// Bytes of the L2 flush: a copy writing this many bytes (and reading as many) evicts any L2 of
/// up to half its size (H100/H200 50 MB, RTX 5090 96 MB).
pub const FLUSH_BYTES: usize = 256 << 20;

/// The L2 flush step over a scratch allocation of `2 * FLUSH_BYTES`.
pub fn flush_step<X: Executor>(exec: &mut X) -> Step {
    let scratch = exec.alloc(2 * FLUSH_BYTES, "L2 flush scratch").expect("allocating the L2 flush scratch");
    let half = |i: usize| scratch.sub(i * FLUSH_BYTES, FLUSH_BYTES).unwrap();
    Step::Copy { src: half(0), dst: half(1) }
}

/// The floors of this run.
#[derive(Clone, Debug)]
pub struct Floors {
    /// Measured HBM read bandwidth, GB/s (`floor.hbm_read_gbs`).
    pub read_gbs: f64,
    /// bf16 tensor peak and its source.
    pub peak: Option<(f64, String)>,
}

impl Floors {
    /// Measures the read bandwidth on `exec` over 2 GiB (best of 5 runs per grid), prints it.
    pub fn measure<X: Executor>(bench: &str, exec: &mut X, device_name: &str) -> Floors {
        let read_gbs = dgemma::gpu::bench::read_bandwidth(exec, 2 << 30, 5).expect("measuring the HBM read bandwidth");
        let peak = peak_bf16_tflops(device_name);
        println!(
            "{bench}: floor.hbm_read_gbs = {read_gbs:.0} GB/s (read-bandwidth probe, 2 GiB, best run); bf16 peak {}",
            peak.as_ref().map_or("unknown (memory floors only)".to_string(), |(t, s)| format!("{t} TFLOP/s ({s})"))
        );
        Floors { read_gbs, peak }
    }

    /// The floor of work moving `bytes` and doing `flops`, in ms, and which bound it is.
    pub fn floor_ms(&self, bytes: f64, flops: f64) -> (f64, &'static str) {
        let mem = bytes / (self.read_gbs * 1e9) * 1e3;
        let compute = self.peak.as_ref().map_or(0.0, |(t, _)| flops / (t * 1e12) * 1e3);
        if compute > mem {
            (compute, "compute")
        } else {
            (mem, "memory")
        }
    }
}

/// Runs `iters` timed runs of `work` on `target`: each run is an L2 flush (queued before the
/// timer), `prepare` (host-side only), then `work`'s queued GPU work between the executor's event
/// timer marks. Appends each run's milliseconds to `samples`; returns their sum for criterion.
pub fn timed_runs<T, X: Executor>(
    target: &mut T,
    exec_of: fn(&mut T) -> &mut X,
    flush: &Step,
    iters: u64,
    samples: &mut Vec<f64>,
    mut prepare: impl FnMut(&mut T),
    mut work: impl FnMut(&mut T),
) -> Duration {
    let mut total_ms = 0.0;
    for _ in 0..iters {
        // SAFETY: the flush copies between the two halves of a scratch allocation of this executor.
        unsafe { exec_of(target).run(std::slice::from_ref(flush)) }.expect("L2 flush");
        prepare(target);
        exec_of(target).timer_start().expect("timer start");
        work(target);
        let ms = exec_of(target).timer_stop().expect("timer stop");
        samples.push(ms);
        total_ms += ms;
    }
    Duration::from_secs_f64(total_ms * 1e-3)
}

/// What one figure moves and computes (the least possible: each input read once, each output
/// written once).
#[derive(Clone, Debug)]
pub struct Figure {
    pub name: String,
    pub bytes: f64,
    pub flops: f64,
    pub note: String,
}

impl Figure {
    pub fn new(name: impl Into<String>, bytes: f64, flops: f64) -> Figure {
        Figure { name: name.into(), bytes, flops, note: String::new() }
    }
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    if n % 2 == 1 {
        s[n / 2]
    } else {
        0.5 * (s[n / 2 - 1] + s[n / 2])
    }
}

/// Prints the figure's line from the runs timed for it (nothing when none ran: `--list`, or a
/// filter that left it out).
pub fn report(bench: &str, fig: &Figure, samples: &[f64], floors: &Floors, mode: Mode) {
    if samples.is_empty() {
        return;
    }
    let ms = median(samples);
    let min = samples.iter().copied().fold(f64::INFINITY, f64::min);
    let (floor, bound) = floors.floor_ms(fig.bytes, fig.flops);
    let s = ms * 1e-3;
    let mut line = format!(
        "{bench}: {}: {ms:.4} ms (median of {}, min {min:.4}) | {:.1} GB/s",
        fig.name,
        samples.len(),
        fig.bytes / s / 1e9
    );
    if fig.flops > 0.0 {
        line += &format!(", {:.2} TFLOP/s", fig.flops / s / 1e12);
    }
    line += &format!(" | floor {floor:.4} ms ({bound}) | {:.2}x floor", ms / floor);
    if !fig.note.is_empty() {
        line += &format!(" | {}", fig.note);
    }
    if mode.test {
        line += " | test mode: one untimed-quality run, not a measurement";
    }
    println!("{line}");
    if !mode.test {
        append_figure_json(fig, ms, min, samples.len(), floor, bound, floors);
    }
}

/// With `$DGEMMA_BENCH_RECORDS` set, appends the figure's measurement to that file as one JSON
/// line (tools/gpu-suite.sh turns them into result records: the per-kernel figures and the
/// issue targets built from them). Names are plain ASCII without quotes, so no escaping.
fn append_figure_json(fig: &Figure, ms: f64, min: f64, n: usize, floor: f64, bound: &str, floors: &Floors) {
    let Some(path) = std::env::var_os("DGEMMA_BENCH_RECORDS") else { return };
    let peak = floors.peak.as_ref().map_or("null".to_string(), |(t, _)| format!("{t}"));
    let line = format!(
        "{{\"figure\": \"{}\", \"ms\": {ms}, \"min_ms\": {min}, \"samples\": {n}, \"bytes\": {}, \"flops\": {}, \
         \"floor_ms\": {floor}, \"bound\": \"{bound}\", \"read_gbs\": {}, \"peak_tflops\": {peak}}}\n",
        fig.name, fig.bytes, fig.flops, floors.read_gbs
    );
    use std::io::Write as _;
    let written = std::fs::OpenOptions::new().create(true).append(true).open(&path).and_then(|mut f| f.write_all(line.as_bytes()));
    if let Err(e) = written {
        println!("figure records: cannot append to {}: {e}", std::path::Path::new(&path).display());
    }
}

/// A region filled with `pattern` repeated (an upload of one copy, then on-device doubling).
pub fn region_with<X: Executor>(exec: &mut X, bytes: usize, pattern: &[u8], what: &str) -> Region {
    let r = exec.alloc(bytes, what).unwrap_or_else(|e| panic!("{what}: {e}"));
    dgemma::gpu::bench::fill_repeating(exec, r, pattern).unwrap_or_else(|e| panic!("{what}: {e}"));
    r
}

/// Deterministic bench data (xorshift64*).
pub use dgemma_cuda::Rng;

/// Bytes of `n` bf16 values uniform in [-scale, scale) (pick an odd `n`, so repeats do not
/// line up with rows).
pub fn bf16_pattern(n: usize, scale: f32, seed: u64) -> Vec<u8> {
    let mut rng = Rng::new(seed);
    (0..n).flat_map(|_| dgemma_cuda::bf16::from_f32(rng.uniform() * scale).to_le_bytes()).collect()
}

/// A region holding exactly `v` (ids, routing, params).
pub fn region_of<X: Executor, T: dgemma_cuda::exec::Pod>(exec: &mut X, v: &[T], what: &str) -> Region {
    exec.alloc_from(v, what).unwrap_or_else(|e| panic!("{what}: {e}"))
}
