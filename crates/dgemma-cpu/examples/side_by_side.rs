//! Times the CPU backend on the two operations `tools/hf_bench.py` times in transformers, for
//! the CPU side-by-side (`tools/cpu-side-by-side.sh`):
//!
//! * prefill: `reset()` (untimed, a fresh cache) then `encode(prompt)`, P prompt tokens: the
//!   encoder's causal pass that writes the KV cache;
//! * step: `denoise(canvas, Some(sc), logits)`, one decoder forward of a canvas_length canvas
//!   over the P cached positions with self-conditioning logits in (`sc` = the logits of a first
//!   pass without them, as generation feeds them back); the cache is not modified.
//!
//! Each figure is the mean of `--iters` timed calls after `--warmup` untimed ones (wall clock
//! around each call), in ms. Threads: rayon's global pool, `--threads N` (default: rayon's
//! default, `RAYON_NUM_THREADS` or the number of CPUs).
//!
//!     cargo run --release -p dgemma-cpu --example side_by_side -- \
//!         [--model DIR] [--prompt 64] [--iters 200] [--warmup 20] [--threads N] \
//!         [--precision f32|bf16|both] [--json FILE]
//!
//! Writes `{"records": [{name, value (mean), unit, median, note}]}` (tools/hf_bench.py's format), records
//! `cpu.tiny.prefill.<precision>.tokens<P>` and `cpu.tiny.step.<precision>.c1.ctx<P>`.

use dgemma_cpu::{CpuBackend, Precision};
use dgemma_model::checkpoint::Checkpoint;
use dgemma_model::weights::ModelWeights;
use dgemma_model::Backend;
use std::path::PathBuf;
use std::time::Instant;

fn main() {
    if let Err(e) = run() {
        eprintln!("side_by_side: FAILED: {e}");
        std::process::exit(2);
    }
}

/// ms per call of `f`: `warmup` untimed calls, then `iters` timed ones (`setup` untimed).
fn time<S>(
    s: &mut S,
    warmup: usize,
    iters: usize,
    setup: impl Fn(&mut S),
    mut f: impl FnMut(&mut S),
) -> Vec<f64> {
    for _ in 0..warmup {
        setup(s);
        f(s);
    }
    (0..iters)
        .map(|_| {
            setup(s);
            let t = Instant::now();
            f(s);
            t.elapsed().as_secs_f64() * 1e3
        })
        .collect()
}

/// (mean, median, "min .., median .. ms").
fn stats(ms: &[f64]) -> (f64, f64, String) {
    let mut s = ms.to_vec();
    s.sort_by(f64::total_cmp);
    let mean = s.iter().sum::<f64>() / s.len() as f64;
    let median = if s.len() % 2 == 1 {
        s[s.len() / 2]
    } else {
        (s[s.len() / 2 - 1] + s[s.len() / 2]) / 2.0
    };
    (
        mean,
        median,
        format!("min {:.3}, median {:.3} ms", s[0], median),
    )
}

/// Deterministic token ids in `0..vocab` (a 64-bit LCG), `avoid` replaced by 3 as hf_bench does.
fn ids(n: usize, vocab: usize, seed: u64, avoid: &[u32]) -> Vec<u32> {
    let mut x = seed;
    (0..n)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let id = ((x >> 33) % vocab as u64) as u32;
            if avoid.contains(&id) {
                3
            } else {
                id
            }
        })
        .collect()
}

fn run() -> Result<(), String> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let mut model = root.join("reference/models/tiny-default");
    let (mut prompt_len, mut iters, mut warmup) = (64usize, 200usize, 20usize);
    let (mut threads, mut precisions, mut json) =
        (None::<usize>, "both".to_string(), None::<PathBuf>);
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || args.next().ok_or(format!("{a} needs a value"));
        let num = |s: String| s.parse::<usize>().map_err(|e| format!("{a}: {e}"));
        match a.as_str() {
            "--model" => model = val()?.into(),
            "--prompt" => prompt_len = num(val()?)?,
            "--iters" => iters = num(val()?)?,
            "--warmup" => warmup = num(val()?)?,
            "--threads" => threads = Some(num(val()?)?),
            "--precision" => precisions = val()?,
            "--json" => json = Some(val()?.into()),
            _ => {
                return Err(format!(
                    "unknown argument {a:?} (see the header of examples/side_by_side.rs)"
                ))
            }
        }
    }
    if prompt_len == 0 || iters == 0 {
        return Err("--prompt and --iters must be >= 1".into());
    }
    if let Some(n) = threads {
        rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build_global()
            .map_err(|e| e.to_string())?;
    }
    let precisions: Vec<Precision> = match precisions.as_str() {
        "both" => vec![Precision::F32, Precision::Bf16],
        "f32" => vec![Precision::F32],
        "bf16" => vec![Precision::Bf16],
        p => return Err(format!("--precision must be f32, bf16 or both, not {p:?}")),
    };

    let ck = Checkpoint::open(&model).map_err(|e| e.to_string())?;
    let w = ModelWeights::load(&ck).map_err(|e| e.to_string())?;
    let cfg = &ck.config;
    let (c, v) = (cfg.canvas_length, cfg.text.vocab_size);
    let avoid: Vec<u32> = [cfg.image_token_id, cfg.boi_token_id, cfg.eoi_token_id]
        .into_iter()
        .flatten()
        .collect();
    let prompt = ids(prompt_len, v, 1, &avoid);
    let canvas = ids(c, v, 2, &[]);
    let nthreads = rayon::current_num_threads();
    let model_name = model
        .file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let common = format!(
        "dgemma CpuBackend, {model_name} checkpoint (weights stored bf16), rayon {nthreads} thread(s); \
         mean of {iters} after {warmup} warm-up"
    );

    let mut records = Vec::new();
    for p in precisions {
        let mut b = CpuBackend::new(&cfg.text, &w, p);
        let mut err = None;
        let pre = time(
            &mut b,
            warmup,
            iters,
            |b| b.reset(),
            |b| {
                if let Err(e) = b.encode(&prompt) {
                    err.get_or_insert(e.to_string());
                }
            },
        );
        if let Some(e) = err {
            return Err(e);
        }
        // the last timed call left the P prompt positions in the cache
        if b.cache_len() != prompt_len {
            return Err(format!(
                "the cache holds {} positions after the prefill, not {prompt_len}",
                b.cache_len()
            ));
        }
        let mut sc = vec![0.0f32; c * v];
        b.denoise(&canvas, None, &mut sc)
            .map_err(|e| e.to_string())?;
        let mut logits = vec![0.0f32; c * v];
        let mut err = None;
        let step = time(
            &mut b,
            warmup,
            iters,
            |_| {},
            |b| {
                if let Err(e) = b.denoise(&canvas, Some(&sc), &mut logits) {
                    err.get_or_insert(e.to_string());
                }
            },
        );
        if let Some(e) = err {
            return Err(e);
        }
        if !logits.iter().all(|x| x.is_finite()) || b.cache_len() != prompt_len {
            return Err(
                "the step's logits are not all finite, or the step changed the cache".into(),
            );
        }
        let name = if p == Precision::Bf16 { "bf16" } else { "f32" };
        let (mean, median, spread) = stats(&pre);
        records.push((
            format!("cpu.tiny.prefill.{name}.tokens{prompt_len}"),
            mean,
            median,
            format!("encoder pass over {prompt_len} prompt tokens into a reset cache; {spread}; {common}"),
        ));
        let (mean, median, spread) = stats(&step);
        records.push((
            format!("cpu.tiny.step.{name}.c1.ctx{prompt_len}"),
            mean,
            median,
            format!(
                "one decoder forward, canvas {c}, {prompt_len} cached positions, self-conditioning logits in; \
                 {spread}; {common}"
            ),
        ));
    }

    let mut out = String::from("{\"records\": [\n");
    for (i, (name, value, median, note)) in records.iter().enumerate() {
        println!("{name}: {value:.3} ms  ({note})");
        let note = note.replace('\\', "\\\\").replace('"', "\\\"");
        let sep = if i + 1 < records.len() { "," } else { "" };
        out += &format!(" {{\"name\": \"{name}\", \"value\": {value}, \"unit\": \"ms\", \"median\": {median}, \"note\": \"{note}\"}}{sep}\n");
    }
    out += "]}\n";
    if let Some(path) = json {
        std::fs::write(&path, out).map_err(|e| format!("{}: {e}", path.display()))?;
    }
    Ok(())
}
