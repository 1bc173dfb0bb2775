//! The engine's GPU serving path (a shared GPU model, one sequence per request, batched device
//! steps) run on the CPU kernel emulator: the exact plans a GPU runs, without a GPU.
//!
//! ```text
//! cargo test -p dgemma-runtime --features emulator --test emulated
//! ```
#![cfg(feature = "emulator")]

mod common;

use common::tiny;
use dgemma_runtime::{BackendKind, Engine, EngineOptions, Request};

fn options(max_concurrent: usize, max_batch: usize) -> EngineOptions {
    EngineOptions { backend: BackendKind::Emulator, max_concurrent, max_batch, context: Some(256), ..Default::default() }
}

fn requests() -> Vec<Request> {
    vec![
        Request::chat("Hello there").seed(0).max_new_tokens(32).max_denoising_steps(6),
        Request::ids(vec![2, 10, 20, 30, 40]).seed(7).max_new_tokens(16).max_denoising_steps(5),
        Request::text("raw text prompt").seed(9).max_new_tokens(48).max_denoising_steps(4).stream_drafts(true),
    ]
}

/// Requests running together, their denoising steps batched into shared decoder passes, give
/// exactly what each gives alone; drafts stream from the device path too.
#[test]
fn batched_requests_equal_their_solo_runs() {
    let alone: Vec<Vec<u32>> = {
        let engine = Engine::load(tiny(), options(1, 1)).unwrap();
        requests().into_iter().map(|r| engine.submit(r).unwrap().wait().unwrap().ids).collect()
    };
    // Memory for the weights, the workspace, a KV pool with pages for all three and one
    // request's own buffers: with room for 3 requests by count, admission waits for memory, so
    // the requests run one after another, and each still gives its solo output.
    {
        let pooled = |limit| EngineOptions { memory_limit: limit, kv_pages: Some(3), ..options(3, 3) };
        let memory = Engine::load(tiny(), pooled(None)).unwrap().device_memory().expect("a GPU engine reports its memory");
        assert!(memory.per_request > 0 && memory.allocated > memory.per_request, "{memory:?}");
        assert_eq!((memory.kv_pages, memory.kv_pages_free, memory.kv_page), (3, 3, 256), "{memory:?}");
        let limit = memory.allocated + memory.per_request / 2;
        let engine = Engine::load(tiny(), pooled(Some(limit))).unwrap();
        let handles: Vec<_> = requests().into_iter().map(|r| engine.submit(r).unwrap()).collect();
        for (i, (h, want)) in handles.into_iter().zip(&alone).enumerate() {
            assert_eq!(&h.wait().unwrap().ids, want, "request {i} under the memory limit");
        }
        let st = engine.stats();
        assert_eq!((st.completed, st.failed, st.backends, st.peak_active), (3, 0, 1, 1), "{st:?}");
        assert!(st.memory_waits >= 1, "{st:?}");
        assert!(engine.device_memory().unwrap().allocated <= limit);
        // Below the weights, loading itself fails, naming the limit.
        let e = Engine::load(tiny(), EngineOptions { memory_limit: Some(memory.per_request), ..options(1, 1) })
            .err()
            .expect("the weights do not fit");
        assert!(e.to_string().contains("memory limit"), "{e}");
    }
    // A KV pool of four 16-position pages, where the requests need 3, 2 and 4 (prompt plus
    // canvases): admission waits for pages, one request at a time, each with its solo output,
    // and every page comes back. A request the whole pool cannot hold fails, naming the pool.
    {
        let paged = |pages| EngineOptions { kv_page: 16, kv_pages: Some(pages), ..options(3, 3) };
        let engine = Engine::load(tiny(), paged(4)).unwrap();
        let handles: Vec<_> = requests().into_iter().map(|r| engine.submit(r).unwrap()).collect();
        for (i, (h, want)) in handles.into_iter().zip(&alone).enumerate() {
            assert_eq!(&h.wait().unwrap().ids, want, "request {i} with a 4-page pool");
        }
        let st = engine.stats();
        assert_eq!((st.completed, st.failed, st.peak_active), (3, 0, 1), "{st:?}");
        assert!(st.memory_waits >= 2, "{st:?}");
        let memory = engine.device_memory().unwrap();
        assert_eq!((memory.kv_pages_free, memory.kv_pages), (4, 4), "{memory:?}");
        let small = Engine::load(tiny(), paged(3)).unwrap();
        let e = small.submit(requests().pop().unwrap()).unwrap().wait().unwrap_err();
        assert!(e.to_string().contains("needs 4 KV pages"), "{e}");
        assert_eq!(small.stats().failed, 1);
    }
    let engine = Engine::load(tiny(), options(3, 3)).unwrap();
    let mut handles: Vec<_> = requests().into_iter().map(|r| engine.submit(r).unwrap()).collect();
    let mut with_drafts = handles.pop().unwrap();
    let (mut drafts, mut last) = (0, None);
    while let Some(event) = with_drafts.next_event() {
        match event {
            dgemma_runtime::Event::Draft { ids, .. } => {
                assert_eq!(ids.len(), 16, "a draft is a whole canvas");
                drafts += 1;
            }
            dgemma_runtime::Event::Finished(done) => last = Some(done.ids),
            dgemma_runtime::Event::Canvas { .. } => {}
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(last.as_ref(), Some(&alone[2]), "request 2 (streamed)");
    assert!(drafts >= 3, "drafts: {drafts}");
    for (i, (h, want)) in handles.into_iter().zip(&alone).enumerate() {
        assert_eq!(&h.wait().unwrap().ids, want, "request {i}");
    }
    let st = engine.stats();
    assert_eq!(st.completed, 3);
    assert!(st.batched_passes > 0 && st.largest_batch >= 2, "{st:?}");
}

/// Commits ride along other requests' batched denoising steps (one decoder pass also encodes
/// them) and change no output. Two requests of four canvases each, with early stopping off and
/// different step counts, so their canvases end in different rounds whatever the admission
/// timing: each commit but the lockstep ones finds the other request mid-canvas.
#[test]
fn commits_ride_along_batched_steps() {
    use dgemma_runtime::SamplerOverrides;
    let never_stop = SamplerOverrides { confidence_threshold: Some(f32::NEG_INFINITY), ..Default::default() };
    let requests = || {
        [(5, 3), (7, 4)].map(|(steps, seed)| {
            Request::ids(vec![2, 11, 12, 13, 14 + seed as u32])
                .seed(seed)
                .max_new_tokens(64)
                .max_denoising_steps(steps)
                .stop_ids(vec![])
                .sampler(never_stop.clone())
        })
    };
    let alone: Vec<Vec<u32>> = {
        let engine = Engine::load(tiny(), options(1, 1)).unwrap();
        requests().into_iter().map(|r| engine.submit(r).unwrap().wait().unwrap().ids).collect()
    };
    let engine = Engine::load(tiny(), options(2, 2)).unwrap();
    let handles: Vec<_> = requests().into_iter().map(|r| engine.submit(r).unwrap()).collect();
    for (i, (h, want)) in handles.into_iter().zip(&alone).enumerate() {
        let got = h.wait().unwrap().ids;
        assert_eq!(got.len(), 64);
        assert_eq!(&got, want, "request {i}");
    }
    let st = engine.stats();
    // 2 prefills + 3 commits each. A commit merges unless the other request is encoding too or
    // done: with 5- and 7-step canvases that is the longer request's last commit (5 of 6 merge
    // on the emulator); at least 4 whatever the admission timing.
    assert_eq!(st.encoder_passes, 8, "{st:?}");
    assert!(st.merged_encodes >= 4, "{st:?}");
}

/// An engine on synthetic weights of a config's shapes (the serving benchmark's model) runs
/// requests like any other; it needs a GPU backend.
#[test]
fn synthetic_weights_serve_requests() {
    let config = tiny().join("config.json");
    let engine = Engine::load_synthetic(&config, tiny(), 7, options(2, 2)).unwrap();
    let handles: Vec<_> = (0..2u32)
        .map(|i| {
            let r = Request::ids(vec![2, 10 + i, 20]).seed(i as u64).max_new_tokens(16).max_denoising_steps(3);
            engine.submit(r).unwrap()
        })
        .collect();
    for h in handles {
        let done = h.wait().unwrap();
        assert_eq!(done.ids.len(), 16);
        assert!(done.ids.iter().all(|&id| (id as usize) < engine.default_settings().vocab_size));
        assert_eq!(done.text, engine.tokenizer().decode(&done.ids, true).unwrap());
    }
    assert_eq!(engine.stats().completed, 2);

    // A tokenizer smaller than the model's vocabulary (the 26B shapes with the bundled tiny
    // tokenizer, in `dgemma bench --serve`): the ids are not decoded, the events carry no text.
    let dir = std::env::temp_dir().join(format!("dgemma-small-tokenizer-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("tokenizer.json"),
        r#"{"version": "1.0", "truncation": null, "padding": null, "added_tokens": [], "normalizer": null,
            "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null, "decoder": null,
            "model": {"type": "WordLevel", "vocab": {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "a": 4},
                      "unk_token": "<unk>"}}"#,
    )
    .unwrap();
    let small = Engine::load_synthetic(&config, &dir, 7, options(1, 1)).unwrap();
    let mut h = small.submit(Request::ids(vec![2, 4]).seed(1).max_new_tokens(16).max_denoising_steps(2)).unwrap();
    let mut canvases = 0;
    while let Some(event) = h.next_event() {
        match event {
            dgemma_runtime::Event::Canvas { ids, text, .. } => {
                assert_eq!(ids.len(), 16);
                assert_eq!(text, "", "a synthetic model's ids past the tokenizer are not decoded");
                canvases += 1;
            }
            dgemma_runtime::Event::Finished(done) => assert_eq!((done.ids.len(), done.text.as_str()), (16, "")),
            dgemma_runtime::Event::Draft { .. } => {}
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(canvases, 1);
    std::fs::remove_dir_all(&dir).ok();
    // FP8 experts (the serving bench's fp8 figures): a smaller model that still serves.
    let bf16_bytes = engine.device_memory().unwrap().allocated;
    let fp8 = Engine::load_synthetic(&config, tiny(), 7, EngineOptions { quant: dgemma_runtime::Quant::Fp8, ..options(2, 2) })
        .unwrap();
    let done = fp8.submit(Request::ids(vec![2, 9]).seed(3).max_new_tokens(16).max_denoising_steps(2)).unwrap().wait().unwrap();
    assert_eq!(done.ids.len(), 16);
    let fp8_bytes = fp8.device_memory().unwrap().allocated;
    assert!(fp8_bytes < bf16_bytes, "FP8 experts take less memory: {fp8_bytes} vs {bf16_bytes}");
    let cpu = EngineOptions { backend: BackendKind::Cpu, ..Default::default() };
    let e = Engine::load_synthetic(&config, tiny(), 7, cpu).err().unwrap();
    assert!(e.to_string().contains("GPU backend only"), "{e}");
}

/// A GPU engine with `quant: Fp8` on a bf16 checkpoint quantises the experts while uploading
/// them: fewer device bytes than the bf16 engine, and the same output as a CPU-side quantisation
/// at load (the GPU backend on `ModelWeights::load_with(.., Fp8)`, run by the same generation
/// loop).
#[test]
fn fp8_engines_quantise_at_upload() {
    use dgemma_runtime::Quant;
    let request = || Request::ids(vec![2, 10, 20, 30]).seed(5).max_new_tokens(32).max_denoising_steps(4);
    let bf16 = Engine::load(tiny(), options(1, 1)).unwrap();
    let fp8 = Engine::load(tiny(), EngineOptions { quant: Quant::Fp8, ..options(1, 1) }).unwrap();
    let (b, f) = (bf16.device_memory().unwrap().allocated, fp8.device_memory().unwrap().allocated);
    assert!(f < b, "FP8 experts take less device memory: {f} vs {b}");
    let got = fp8.submit(request()).unwrap().wait().unwrap().ids;

    let ck = dgemma::model::checkpoint::Checkpoint::open(tiny()).unwrap();
    let weights = dgemma::model::weights::ModelWeights::load_with(&ck, Quant::Fp8).unwrap();
    let gpu_options = dgemma::gpu::GpuOptions::new(256, ck.config.canvas_length);
    let mut backend =
        dgemma::gpu::GpuBackend::new(dgemma::gpu::EmuExecutor::new(), &ck.config.text, &weights, gpu_options, &mut |_, _| {})
            .unwrap();
    let p = fp8.prepare(&request()).unwrap();
    let want = dgemma_runtime::Generator::seeded(&p.prompt_ids, p.settings, p.seed)
        .unwrap()
        .run_to_end(&mut backend, &mut common::Record::default())
        .unwrap();
    assert_eq!(got, want.ids[want.prompt_len..].to_vec());
}
