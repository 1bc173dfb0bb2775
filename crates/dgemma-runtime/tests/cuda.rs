//! The engine on the CUDA backend: every request's sequence on one shared GPU model.
//!
//! `cuda_backend_loads_or_says_why` runs everywhere: without a GPU (or a build without kernels)
//! loading must fail with the reason, on a GPU it must load and generate. The concurrency check
//! needs a GPU and is ignored elsewhere:
//!
//! ```text
//! cargo test -p dgemma-runtime --test cuda -- --include-ignored
//! ```

mod common;

use common::tiny;
use dgemma_runtime::{BackendKind, Engine, EngineOptions, Request, RuntimeError};

fn cuda_options(max_concurrent: usize) -> EngineOptions {
    EngineOptions { backend: BackendKind::Cuda, max_concurrent, context: Some(512), ..Default::default() }
}

fn requests() -> Vec<Request> {
    vec![
        Request::chat("Hello there").seed(0).max_new_tokens(48),
        Request::chat("Tell me a story").seed(12345).max_new_tokens(64).max_denoising_steps(6),
        Request::ids(vec![2, 10, 20, 30, 40]).seed(7).max_new_tokens(40),
        Request::text("raw text prompt").seed(9).max_new_tokens(16).max_denoising_steps(3),
    ]
}

#[test]
fn cuda_backend_loads_or_says_why() {
    match dgemma::cuda::open_device(0) {
        Err(why) => {
            let err = Engine::load(tiny(), cuda_options(2)).err().expect("no GPU here, yet the CUDA engine loaded");
            let RuntimeError::Load { message, .. } = &err else { panic!("{err}") };
            assert!(message.contains(&why.to_string()), "the load error should carry the reason: {err}");
        }
        Ok(device) => {
            drop(device);
            let engine = Engine::load(tiny(), cuda_options(2)).unwrap();
            let done = engine.submit(requests().remove(0)).unwrap().wait().unwrap();
            assert_eq!(done.ids.len(), 48);
            // Over the sized context: rejected up front, with the reason.
            let err = engine.submit(Request::ids(vec![2; 600]).max_new_tokens(16)).err().unwrap();
            assert!(err.to_string().contains("context"), "{err}");
        }
    }
}

/// Requests running together on one GPU model give exactly what each gives alone: separate KV
/// caches, decoder inputs and device sampler state per request.
#[test]
#[ignore = "needs a CUDA GPU"]
fn concurrent_requests_equal_their_solo_runs_on_the_gpu() {
    let alone: Vec<Vec<u32>> = {
        let engine = Engine::load(tiny(), cuda_options(1)).unwrap();
        requests().into_iter().map(|r| engine.submit(r).unwrap().wait().unwrap().ids).collect()
    };
    let engine = Engine::load(tiny(), cuda_options(4)).unwrap();
    let handles: Vec<_> = requests().into_iter().map(|r| engine.submit(r).unwrap()).collect();
    for (i, (h, want)) in handles.into_iter().zip(&alone).enumerate() {
        assert_eq!(&h.wait().unwrap().ids, want, "request {i}");
    }
    assert_eq!(engine.stats().completed, 4);
}
