//! End-to-end timings of the backend (what `dgemma bench` reports), in the records of the
//! results contract (`benches/results/README.md`): name, value, unit, floor, ratio, target.
//!
//! Every figure is timed by the executor (CUDA events on a GPU) around work queued with no host
//! sync inside: a denoising step is one replay of the recorded decoder pass (canvas with
//! self-conditioning), a prefill is the encoder over `prompt` tokens in chunks, a commit is the
//! encoder over one canvas. Steps at a long context are timed over a cache declared filled
//! ([`GpuBackend::assume_cache_len`]): attention reads the same bytes whatever the cache holds.
//!
//! The floor of a step is the bytes it must read (every weight once, plus the cached K/V it
//! attends over: every position on full layers, the last window - 1 on sliding layers) at the
//! HBM read bandwidth measured in the same run ([`read_bandwidth`], `floor.hbm_read_gbs`: a
//! read-only stream, what a weight-bound step does; [`copy_bandwidth`], which also writes, is
//! recorded beside it as `floor.copy_gbs`).

use dgemma_cuda::codegen::shapes::read_bandwidth_spec;
use dgemma_cuda::ops::{plan_read_bandwidth, READ_BANDWIDTH_SENTINEL};
use dgemma_cuda::{Executor, Region, Step};

use crate::backend::GpuBackend;
use crate::error::{cuda, Result};

/// One figure.
#[derive(Clone, Debug, PartialEq)]
pub struct Record {
    pub name: String,
    pub value: f64,
    pub unit: &'static str,
    pub floor: Option<f64>,
    pub target: Option<f64>,
    pub note: String,
}

impl Record {
    pub fn new(name: impl Into<String>, value: f64, unit: &'static str) -> Record {
        Record { name: name.into(), value, unit, floor: None, target: None, note: String::new() }
    }

    /// value / floor (> 1 = slower than the floor for times).
    pub fn ratio_to_floor(&self) -> Option<f64> {
        self.floor.map(|f| self.value / f)
    }

    /// The record as a JSON object of the results contract.
    pub fn to_json(&self) -> String {
        let num = |x: Option<f64>| x.filter(|v| v.is_finite()).map_or("null".to_string(), |v| format!("{v:.6}"));
        let passed = match (self.target, self.unit) {
            (Some(t), "ms") => format!("{}", self.value <= t),
            (Some(t), _) => format!("{}", self.value >= t),
            (None, _) => "null".into(),
        };
        format!(
            "{{\"name\": \"{}\", \"value\": {}, \"unit\": \"{}\", \"floor\": {}, \"ratio_to_floor\": {}, \"target\": {}, \
             \"passed\": {passed}, \"note\": \"{}\"}}",
            self.name,
            num(Some(self.value)),
            self.unit,
            num(self.floor),
            num(self.ratio_to_floor()),
            num(self.target),
            self.note.replace('\\', "\\\\").replace('"', "'")
        )
    }
}

/// What to time.
#[derive(Clone, Debug)]
pub struct BenchPlan {
    /// Contexts (cache positions) at which a denoising step is timed.
    pub contexts: Vec<usize>,
    /// Prompt length of the prefill and TTFT figures.
    pub prompt: usize,
    /// Timed repetitions per figure (after one warm-up).
    pub iters: usize,
    /// Denoising steps per canvas for the tokens/s and TTFT figures.
    pub steps: Vec<usize>,
    /// Canvases per batched decoder pass (each of its own sequence at context `prompt`) for
    /// the `step.bf16.c{B}` figures; at most the backend's `max_batch`.
    pub batches: Vec<usize>,
}

/// Device-to-device copy bandwidth in GB/s (bytes read + bytes written, over `bytes` each way).
pub fn copy_bandwidth<X: Executor>(exec: &mut X, bytes: usize, iters: usize) -> Result<f64> {
    let src = exec.alloc(bytes, "bandwidth probe (source)").map_err(cuda)?;
    let dst = exec.alloc(bytes, "bandwidth probe (destination)").map_err(cuda)?;
    let copy = vec![Step::Copy { src, dst }; iters.max(1)];
    // SAFETY: both regions were just allocated by this executor.
    unsafe { exec.run(&copy[..1]) }.map_err(cuda)?;
    exec.timer_start().map_err(cuda)?;
    // SAFETY: as above.
    unsafe { exec.run(&copy) }.map_err(cuda)?;
    let ms = exec.timer_stop().map_err(cuda)?;
    Ok(2.0 * bytes as f64 * copy.len() as f64 / (ms * 1e-3) / 1e9)
}

/// Grid caps [`read_bandwidth`] tries (blocks of the probe; the grid-stride loop covers the rest):
/// a few waves of a large GPU up to one block per 4 KiB of a 2 GiB buffer's first quarter.
pub const READ_BANDWIDTH_GRIDS: [usize; 3] = [1024, 8192, 65_536];

/// Fills `region` with `pattern` repeated: one upload of (at most) the pattern, then on-device
/// copies doubling the filled prefix. Waits for the copies.
pub fn fill_repeating<X: Executor>(exec: &mut X, region: Region, pattern: &[u8]) -> Result<()> {
    if pattern.is_empty() {
        return Err(crate::error::backend_error("fill_repeating: an empty pattern"));
    }
    let first = region.bytes.min(pattern.len());
    exec.upload_bytes(region.sub(0, first).map_err(cuda)?, &pattern[..first]).map_err(cuda)?;
    let mut done = first;
    while done < region.bytes {
        let n = done.min(region.bytes - done);
        let step = Step::Copy { src: region.sub(0, n).map_err(cuda)?, dst: region.sub(done, n).map_err(cuda)? };
        // SAFETY: both ranges lie in `region`, an allocation of this executor, and do not overlap.
        unsafe { exec.run(&[step]) }.map_err(cuda)?;
        done += n;
    }
    exec.synchronize().map_err(cuda)
}

/// HBM read bandwidth in GB/s (bytes read, 1e9 per GB): the probe kernel
/// (`csrc/bandwidth.cuh`: 16-byte loads, a grid-stride loop, nothing written) streaming `bytes`
/// (rounded down to 16) of a pattern-filled buffer, the best of `iters` timed runs for each grid
/// of [`READ_BANDWIDTH_GRIDS`] after a warm-up each. On a GPU pass at least 2 GiB, so the 50 MB
/// L2 holds a negligible part of it. The floor of every memory-bound figure.
pub fn read_bandwidth<X: Executor>(exec: &mut X, bytes: usize, iters: usize) -> Result<f64> {
    let spec = read_bandwidth_spec();
    if !exec.has_kernel(&spec) {
        return Err(cuda(dgemma_cuda::CudaError::MissingKernel(spec.kernel_name())));
    }
    let vectors = bytes / 16;
    if vectors == 0 {
        return Err(crate::error::backend_error(format!("read_bandwidth: {bytes} bytes is not one 16-byte vector")));
    }
    let src = exec.alloc(16 * vectors, "read-bandwidth probe (source)").map_err(cuda)?;
    let out = exec.alloc(16, "read-bandwidth probe (sentinel word)").map_err(cuda)?;
    // Non-zero bytes (never time on zeros), an odd-length pattern.
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let pattern: Vec<u8> = (0..(16 << 20) - 3)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 24) as u8 | 1
        })
        .collect();
    fill_repeating(exec, src, &pattern)?;
    let mut best_ms = f64::INFINITY;
    for max_blocks in READ_BANDWIDTH_GRIDS {
        let plan = plan_read_bandwidth(&spec, src.b32(), vectors, READ_BANDWIDTH_SENTINEL, out.b32(), max_blocks)
            .map_err(cuda)?;
        let step = [Step::Launch(plan)];
        // SAFETY: the plan addresses `src` and `out`, live allocations of this executor.
        unsafe { exec.run(&step) }.map_err(cuda)?;
        for _ in 0..iters.max(1) {
            exec.timer_start().map_err(cuda)?;
            // SAFETY: as above.
            unsafe { exec.run(&step) }.map_err(cuda)?;
            best_ms = best_ms.min(exec.timer_stop().map_err(cuda)?);
        }
    }
    Ok(16.0 * vectors as f64 / (best_ms.max(1e-6) * 1e-3) / 1e9)
}

/// Mean milliseconds of `f`'s queued work over `iters` back-to-back runs after one warm-up,
/// timed by the executor (events around the whole batch: no host sync between runs).
fn mean_ms<X: Executor>(b: &mut GpuBackend<X>, iters: usize, mut f: impl FnMut(&mut GpuBackend<X>) -> Result<()>) -> Result<f64> {
    f(b)?; // warm-up (and recording)
    b.executor_mut().synchronize().map_err(cuda)?;
    b.executor_mut().timer_start().map_err(cuda)?;
    for _ in 0..iters.max(1) {
        f(b)?;
    }
    Ok(b.executor_mut().timer_stop().map_err(cuda)? / iters.max(1) as f64)
}

/// Times `plan` on `backend` (a fresh one: the cache is reset). `bandwidth_gbs` is the measured
/// bandwidth the floors use: the HBM read bandwidth ([`read_bandwidth`]) on a GPU.
/// Fills the workspace inputs the timed passes read (`queue_*` reuse whatever they hold) with
/// random token ids and a random self-conditioning input: all-zero ids would route every token
/// to the same few experts and make the MoE look cheaper than it is. Leaves the cache empty.
fn seed_inputs<X: Executor>(backend: &mut GpuBackend<X>, seed: u64) -> Result<()> {
    use dgemma_model::Backend;
    let (v, c) = (backend.config().vocab_size, backend.options().canvas);
    let mut rng = dgemma_cuda::Rng::new(seed);
    let mut next = move || rng.next_u64();
    let chunk = backend.options().prefill_chunk.min(backend.options().context.saturating_sub(c)).max(1);
    let prompt: Vec<u32> = (0..chunk).map(|_| (next() % v as u64) as u32).collect();
    let canvas: Vec<u32> = (0..c).map(|_| (next() % v as u64) as u32).collect();
    let sc: Vec<f32> = (0..c * v).map(|_| (next() % 2001) as f32 / 100.0 - 10.0).collect();
    let mut logits = vec![0f32; c * v];
    backend.reset();
    backend.encode(&prompt)?;
    backend.denoise(&canvas, Some(&sc), &mut logits)?;
    backend.reset();
    Ok(())
}

pub fn run<X: Executor>(backend: &mut GpuBackend<X>, plan: &BenchPlan, bandwidth_gbs: f64) -> Result<Vec<Record>> {
    let canvas = backend.options().canvas;
    let weight_bytes = backend.weight_bytes() as f64;
    let floor_ms = |bytes: f64| bytes / (bandwidth_gbs * 1e9) * 1e3;
    let mut out = Vec::new();

    // Prefill of the prompt, then the commit of one canvas after it.
    use dgemma_model::Backend;
    backend.select_sequence(0)?;
    seed_inputs(backend, 0x5EED)?;
    backend.bench_sampler_params()?;
    let prompt = plan.prompt.min(backend.options().context.saturating_sub(2 * canvas));
    let prefill = mean_ms(backend, plan.iters, |b| {
        b.reset();
        b.queue_encode(prompt.min(b.options().prefill_chunk))?;
        let mut left = prompt - prompt.min(b.options().prefill_chunk);
        while left > 0 {
            let n = left.min(b.options().prefill_chunk);
            b.queue_encode(n)?;
            left -= n;
        }
        Ok(())
    })?;
    let mut r = Record::new(format!("prefill.bf16.tokens{prompt}"), prefill, "ms");
    r.floor = Some(floor_ms(weight_bytes));
    r.note = format!("{prompt} tokens in chunks of {}", backend.options().prefill_chunk);
    out.push(r);
    let commit = mean_ms(backend, plan.iters, |b| {
        b.assume_cache_len(prompt)?;
        b.queue_encode(canvas)
    })?;
    let mut r = Record::new(format!("commit.bf16.c{canvas}"), commit, "ms");
    r.floor = Some(floor_ms(weight_bytes));
    out.push(r);

    // One denoising step (with self-conditioning) at each context.
    let mut step_at_prompt = None;
    for &ctx in &plan.contexts {
        if ctx + canvas > backend.options().context {
            let mut r = Record::new(format!("step.bf16.c1.ctx{ctx}"), f64::NAN, "ms");
            r.note = format!("not run: the cache was sized for {} positions", backend.options().context);
            out.push(r);
            continue;
        }
        backend.assume_cache_len(ctx)?;
        let ms = mean_ms(backend, plan.iters, |b| b.queue_denoise(canvas, true))?;
        let mut r = Record::new(format!("step.bf16.c1.ctx{ctx}"), ms, "ms");
        r.floor = Some(floor_ms(weight_bytes + backend.kv_bytes_attended(ctx) as f64));
        r.note = "one denoising step of one canvas (decoder pass with self-conditioning, device sampler, next soft embedding), replayed recording".into();
        if ctx == prompt {
            step_at_prompt = Some(ms);
        }
        out.push(r);
    }
    // What a recording costs against running the same pass launch by launch: the trade-off
    // behind GpuOptions::record_after.
    backend.assume_cache_len(prompt)?;
    let (plan_ms, record_ms) = backend.record_cost_ms(canvas, true)?;
    let mut r = Record::new(format!("graph_record.bf16.c1.ctx{prompt}"), record_ms, "ms");
    r.note = format!(
        "host time to capture and instantiate one decoder pass as a CUDA graph (planning it took {plan_ms:.3} ms more); \
         paid once per batch composition that comes back"
    );
    out.push(r);
    backend.set_recording(false);
    let direct = mean_ms(backend, plan.iters, |b| b.queue_denoise(canvas, true));
    backend.set_recording(true);
    let mut r = Record::new(format!("step_unrecorded.bf16.c1.ctx{prompt}"), direct?, "ms");
    r.floor = Some(floor_ms(weight_bytes + backend.kv_bytes_attended(prompt) as f64));
    r.note = "the c1 step run launch by launch (planned afresh each time, no CUDA graph)".into();
    out.push(r);
    let step = match step_at_prompt {
        Some(ms) => ms,
        None => {
            backend.assume_cache_len(prompt)?;
            mean_ms(backend, plan.iters, |b| b.queue_denoise(canvas, true))?
        }
    };
    for &steps in &plan.steps {
        let canvas_ms = steps as f64 * step + commit;
        let mut r = Record::new(format!("tokens_per_s.bf16.steps{steps}"), canvas as f64 / canvas_ms * 1e3, "tokens/s");
        r.note = format!("{canvas} tokens per canvas, {steps} steps of {step:.3} ms + commit {commit:.3} ms, context {prompt}");
        out.push(r);
        let mut r = Record::new(format!("ttft.bf16.prompt{prompt}.steps{steps}"), prefill + canvas_ms, "ms");
        r.note = "prefill + the first canvas's steps + its commit".into();
        out.push(r);
    }
    backend.reset();
    out.extend(batched_steps(backend, plan, prompt, floor_ms)?);
    Ok(out)
}

/// `step.bf16.c{B}.ctx{prompt}`: one decoder pass over B canvases of B sequences, each with
/// `prompt` cached positions (and its own random canvas and self-conditioning input); the
/// floor is the weights once plus every sequence's attended cache. Then the allocation total,
/// and for the largest B, `step_with_commit.bf16.c{B-1}`: B - 1 canvases' step with the B-th
/// sequence's commit in the same pass.
fn batched_steps<X: Executor>(
    backend: &mut GpuBackend<X>,
    plan: &BenchPlan,
    ctx: usize,
    floor_ms: impl Fn(f64) -> f64,
) -> Result<Vec<Record>> {
    use dgemma_model::Backend;
    let canvas = backend.options().canvas;
    let mut out = Vec::new();
    for &b in plan.batches.iter().filter(|&&b| b > 1) {
        let name = format!("step.bf16.c{b}.ctx{ctx}");
        if b > backend.options().max_batch {
            let mut r = Record::new(name, f64::NAN, "ms");
            r.note = format!("not run: the backend was sized for batches of {}", backend.options().max_batch);
            out.push(r);
            continue;
        }
        let mut grown = Ok(());
        while grown.is_ok() && backend.sequences() < b {
            grown = backend.add_sequence_with_context(ctx + 2 * canvas).map(|_| ());
        }
        if let Err(e) = grown {
            // Out of memory for more sequences: report it, keep the figures already taken.
            let mut r = Record::new(name, f64::NAN, "ms");
            r.note = format!("not run: {e}");
            out.push(r);
            break;
        }
        let seqs: Vec<usize> = (0..b).collect();
        for &i in &seqs {
            backend.select_sequence(i)?;
            seed_inputs(backend, 0x5EED + i as u64)?;
            backend.assume_cache_len(ctx)?;
        }
        let ms = mean_ms(backend, plan.iters, |bk| bk.queue_denoise_batch(&seqs, canvas, true))?;
        let mut r = Record::new(name, ms, "ms");
        r.floor = Some(floor_ms(backend.weight_bytes() as f64 + (b * backend.kv_bytes_attended(ctx)) as f64));
        r.note = format!("{b} canvases of {b} sequences in one denoising step (one decoder pass, then each canvas's sampler)");
        out.push(r);
        if b == plan.batches.iter().copied().filter(|&x| x <= backend.options().max_batch).max().unwrap_or(0) {
            // The same step over b - 1 canvases, alone and with sequence b - 1's commit in the
            // pass: what a commit costs when it rides along (the runtime's merged encodes)
            // against `commit.bf16.c{canvas}`, a pass of its own.
            let rest = &seqs[..b - 1];
            let alone = mean_ms(backend, plan.iters, |bk| bk.queue_denoise_batch(rest, canvas, true))?;
            let mixed = mean_ms(backend, plan.iters, |bk| bk.queue_denoise_mixed(rest, canvas, true, (b - 1, canvas)))?;
            let mut r = Record::new(format!("step_with_commit.bf16.c{}.ctx{ctx}", b - 1), mixed, "ms");
            r.note = format!(
                "{} canvases' denoising step with another sequence's {canvas}-token commit in the same pass (planned afresh, not \
                 replayed); the step alone: {alone:.3} ms, so the commit adds {:.3} ms (compare commit.bf16.c{canvas})",
                b - 1,
                mixed - alone
            );
            out.push(r);
        }
        let mut r = Record::new(format!("peak_mem_gb.bf16.c{b}"), backend.executor().allocated_bytes() as f64 / 1e9, "GB");
        r.note = "bytes the backend allocated (weights, caches, workspace for the batch); excludes the CUDA context".into();
        out.push(r);
        for &i in &seqs {
            backend.select_sequence(i)?;
            backend.reset();
        }
    }
    backend.select_sequence(0)?;
    Ok(out)
}
