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
