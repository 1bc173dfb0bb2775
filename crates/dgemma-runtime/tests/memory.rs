//! Many canvases in a loop: resident memory must not grow (KV caches, logits and events are
//! freed or reused). Its own test binary, so that no other test allocates meanwhile.

use dgemma_runtime::{Engine, EngineOptions, Request};

/// Resident set size in bytes (Linux `/proc/self/statm`, field 2, in pages).
fn rss_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
}

/// `batches` rounds of `per_batch` concurrent requests, each of `canvases` canvases with one
/// denoising step; returns the canvases run.
fn run(engine: &Engine, batches: usize, per_batch: usize, canvases: usize, seed0: u64) -> u64 {
    let mut total = 0;
    for b in 0..batches {
        let handles: Vec<_> = (0..per_batch)
            .map(|i| {
                let req = Request::ids(vec![2, 17, 33, 4])
                    .seed(seed0 + (b * per_batch + i) as u64)
                    .max_new_tokens(16 * canvases)
                    .max_denoising_steps(1)
                    .stop_ids(vec![]);
                engine.submit(req).unwrap()
            })
            .collect();
        for h in handles {
            total += h.wait().unwrap().stats.generation.canvases as u64;
        }
    }
    total
}

/// Tests in this binary share the process's RSS: run them one at a time.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Runs `measured` rounds of 6 concurrent requests of 2 canvases each (one denoising step per
/// canvas) after a warm-up, and checks that resident memory stays flat.
fn check(measured_batches: usize) {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some(_) = rss_bytes() else {
        eprintln!("skipped: /proc/self/statm is not readable on this system");
        return;
    };
    let engine = Engine::load(
        dgemma_runtime::bundled_tiny_model(),
        EngineOptions {
            max_concurrent: 4,
            ..Default::default()
        },
    )
    .unwrap();
    let t = std::time::Instant::now();
    // Warm up: every backend built, allocator pools filled.
    run(&engine, 10, 6, 2, 0);
    let before = rss_bytes().unwrap();
    let canvases = run(&engine, measured_batches, 6, 2, 1_000_000);
    let after = rss_bytes().unwrap();
    let st = engine.stats();
    eprintln!(
        "{canvases} canvases in {:.1} s; RSS {:.2} MiB -> {:.2} MiB; {st:?}",
        t.elapsed().as_secs_f64(),
        before as f64 / 1048576.0,
        after as f64 / 1048576.0
    );
    assert_eq!(canvases, measured_batches as u64 * 12);
    assert_eq!((st.active, st.queued, st.failed), (0, 0, 0));
    assert!(
        st.backends <= 4,
        "{} backends built for max_concurrent 4",
        st.backends
    );
    let slack = 2 << 20;
    assert!(
        after <= before + slack,
        "resident memory grew from {before} to {after} bytes over {canvases} canvases"
    );
}

/// 1,200 canvases (about 15 s with the test profile's unoptimised CPU backend).
#[test]
fn many_canvases_do_not_grow_memory() {
    check(100);
}

/// The 10,000 canvases (about 70 s even with `--release`: ~7 ms per CPU pass on the tiny
/// model): `cargo test -p dgemma-runtime --release --test memory -- --ignored`.
#[test]
#[ignore = "slow in the dev profile; run with --release -- --ignored"]
fn ten_thousand_canvases_do_not_grow_memory() {
    check(834);
}
