//! The engine's scheduler: concurrent requests equal their solo runs, cancellation,
//! rejection of bad requests, queueing, shutdown.

mod common;

use common::{solo, tiny};
use dgemma_runtime::{Engine, EngineOptions, Event, Request, RuntimeError, SamplerOverrides};
use std::sync::Arc;
use std::time::Duration;

fn engine(max_concurrent: usize) -> Engine {
    Engine::load(
        tiny(),
        EngineOptions {
            max_concurrent,
            ..Default::default()
        },
    )
    .unwrap()
}

/// A request that runs for a long time: 20 canvases of 48 steps, no early stop, no EOS.
fn long_request(seed: u64) -> Request {
    Request::ids(vec![2, 5, 9])
        .seed(seed)
        .max_new_tokens(16 * 20)
        .stop_ids(vec![])
        .stream_drafts(true)
        .sampler(SamplerOverrides {
            confidence_threshold: Some(f32::NEG_INFINITY),
            ..Default::default()
        })
}

/// Everything one handle yields, checked for consistency.
struct Collected {
    drafts: usize,
    canvas_ids: Vec<u32>,
    canvas_text: String,
    last: Event,
}

fn collect(h: dgemma_runtime::RequestHandle) -> Collected {
    let mut c = Collected {
        drafts: 0,
        canvas_ids: vec![],
        canvas_text: String::new(),
        last: Event::Cancelled,
    };
    let mut next_index = 0;
    for e in h {
        match e {
            Event::Draft { .. } => c.drafts += 1,
            Event::Canvas { index, ids, text } => {
                assert_eq!(index, next_index);
                next_index += 1;
                c.canvas_ids.extend(ids);
                c.canvas_text.push_str(&text);
            }
            e => c.last = e,
        }
    }
    c
}

fn variety() -> Vec<Request> {
    vec![
        Request::chat("Hello").seed(1).max_new_tokens(48),
        Request::chat("Hello")
            .seed(2)
            .max_new_tokens(48)
            .stream_drafts(true),
        Request::chat("Hello")
            .seed(1)
            .max_new_tokens(48)
            .max_denoising_steps(3),
        Request::text("once upon a time")
            .seed(42)
            .max_new_tokens(32)
            .stop_ids(vec![]),
        Request::ids(vec![2, 100, 200, 300])
            .seed(7)
            .max_new_tokens(64)
            .stop_ids(vec![])
            .max_denoising_steps(4)
            .stream_drafts(true),
        Request::chat("Bonjour")
            .system("Réponds en français.")
            .seed(9)
            .max_new_tokens(32)
            .sampler(SamplerOverrides {
                entropy_bound: Some(1.0),
                t_max: Some(1.5),
                ..Default::default()
            }),
        Request::chat("thinking")
            .thinking(true)
            .seed(11)
            .max_new_tokens(16),
        Request::ids(vec![2, 3])
            .seed(u64::MAX)
            .max_new_tokens(20)
            .stop_ids(vec![]),
    ]
}

#[test]
fn concurrent_requests_equal_their_solo_runs() {
    let engine = Arc::new(engine(3));
    let requests = variety();
    // Submitted from several threads at once; 8 requests over 3 slots, so some queue.
    let threads: Vec<_> = requests
        .iter()
        .cloned()
        .map(|req| {
            let engine = engine.clone();
            std::thread::spawn(move || {
                let drafts = req.stream_drafts;
                (drafts, collect(engine.submit(req).unwrap()))
            })
        })
        .collect();
    for (req, t) in requests.iter().zip(threads) {
        let (drafts, got) = t.join().unwrap();
        let (want, want_rec) = solo(&engine.prepare(req).unwrap());
        let Event::Finished(done) = got.last else {
            panic!("{req:?} ended with {:?}", got.last)
        };
        assert_eq!(done.ids, want.new_ids(), "{req:?}");
        assert_eq!(done.prompt_ids, want.ids[..want.prompt_len]);
        assert_eq!(done.reason, want.finish, "{req:?}");
        assert_eq!(
            done.stats.generation.steps_per_canvas,
            want.stats.steps_per_canvas
        );
        // The stream carries exactly the committed canvases and their text.
        assert_eq!(got.canvas_ids, done.ids);
        assert_eq!(got.canvas_text, done.text);
        assert_eq!(
            done.text,
            engine.tokenizer().decode(&done.ids, true).unwrap()
        );
        assert_eq!(got.drafts, if drafts { want_rec.steps.len() } else { 0 });
    }
    let st = engine.stats();
    assert_eq!(
        (st.submitted, st.completed, st.active, st.queued),
        (8, 8, 0, 0)
    );
    assert!(st.backends <= 3);
}

#[test]
fn cancel_mid_canvas_frees_the_request_and_others_continue() {
    let engine = engine(2);
    let mut long = engine.submit(long_request(1)).unwrap();
    let other_req = Request::chat("still served").seed(3).max_new_tokens(32);
    let other = engine.submit(other_req.clone()).unwrap();
    // Wait until the long request is inside its first canvas, then cancel it.
    match long.next_event() {
        Some(Event::Draft { block: 0, .. }) => {}
        e => panic!("expected a draft of canvas 0, got {e:?}"),
    }
    long.cancel();
    let mut canvases = 0;
    let last = loop {
        match long.next_event().expect("a final event") {
            Event::Draft { .. } => {}
            Event::Canvas { .. } => canvases += 1,
            e => break e,
        }
    };
    assert!(matches!(last, Event::Cancelled), "{last:?}");
    assert!(canvases < 20);
    assert!(long.next_event().is_none());
    // The other request is unaffected.
    let done = other.wait().unwrap();
    let (want, _) = solo(&engine.prepare(&other_req).unwrap());
    assert_eq!(done.ids, want.new_ids());
    // And the engine keeps serving: the freed slot is reused.
    let again = engine
        .generate(Request::chat("after the cancel").seed(4).max_new_tokens(16))
        .unwrap();
    assert!(!again.ids.is_empty());
    let st = engine.stats();
    assert_eq!(
        (st.cancelled, st.completed, st.active, st.queued, st.failed),
        (1, 2, 0, 0, 0)
    );
    assert!(st.backends <= 2);
}

#[test]
fn cancel_while_queued_and_drop_handle_cancel_too() {
    let engine = engine(1);
    let running = engine.submit(long_request(1)).unwrap();
    let queued = engine.submit(long_request(2)).unwrap();
    let dropped = engine.submit(long_request(3)).unwrap();
    queued.cancel();
    drop(dropped);
    assert!(matches!(queued.wait(), Err(RuntimeError::Cancelled)));
    running.cancel();
    assert!(matches!(running.wait(), Err(RuntimeError::Cancelled)));
    // The dropped one is cancelled as well: wait until the scheduler has noticed.
    for _ in 0..500 {
        if engine.stats().cancelled == 3 {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let st = engine.stats();
    assert_eq!(
        (st.cancelled, st.active, st.queued, st.backends),
        (3, 0, 0, 1)
    );
}

#[test]
fn bad_requests_are_rejected_with_clear_errors_while_others_run() {
    let engine = engine(2);
    let good_req = Request::chat("a valid request").seed(5).max_new_tokens(32);
    let good = engine.submit(good_req.clone()).unwrap();
    let context = engine.default_settings().context_length;
    let bad: Vec<(Request, &str)> = vec![
        (Request::chat(""), "the prompt is empty"),
        (Request::chat("  \n"), "the prompt is empty"),
        (Request::text(""), "the prompt is empty"),
        (Request::ids(vec![]), "the prompt is empty"),
        (
            Request::ids(vec![2, 512]),
            "prompt id 512 at position 1 is outside the vocabulary of 512 tokens",
        ),
        (Request::ids(vec![2; context]), "over the model's context"),
        (
            Request::chat("hi").max_new_tokens(context),
            "over the model's context",
        ),
        (
            Request::chat("hi").max_new_tokens(0),
            "max_new_tokens must be at least 1",
        ),
        (
            Request::chat("hi").max_denoising_steps(0),
            "max_denoising_steps must be at least 1",
        ),
        (
            Request::chat("hi").stop_ids(vec![1, 9999]),
            "stop id 9999 is outside the vocabulary",
        ),
        (
            Request::chat("hi").sampler(SamplerOverrides {
                entropy_bound: Some(f32::NAN),
                ..Default::default()
            }),
            "entropy_bound must be a finite float > 0",
        ),
        (
            Request::chat("hi").sampler(SamplerOverrides {
                t_min: Some(0.9),
                t_max: Some(0.5),
                ..Default::default()
            }),
            "t_max must be finite, > 0 and >= t_min",
        ),
        (
            Request::chat("hi").sampler(SamplerOverrides {
                confidence_threshold: Some(f32::NAN),
                ..Default::default()
            }),
            "confidence_threshold is NaN",
        ),
    ];
    for (req, want) in &bad {
        match engine.submit(req.clone()) {
            Err(RuntimeError::InvalidRequest(msg)) => {
                assert!(msg.contains(want), "{req:?}: {msg:?} lacks {want:?}")
            }
            Err(e) => panic!("{req:?}: wrong error {e:?}"),
            Ok(_) => panic!("{req:?} was accepted"),
        }
    }
    let done = good.wait().unwrap();
    let (want, _) = solo(&engine.prepare(&good_req).unwrap());
    assert_eq!(done.ids, want.new_ids());
    let st = engine.stats();
    assert_eq!(
        (st.rejected, st.submitted, st.completed, st.failed),
        (bad.len() as u64, 1, 1, 0)
    );
    // The error text names the problem.
    let e = engine.submit(Request::chat("")).err().unwrap();
    assert_eq!(
        e.to_string(),
        "invalid request: the prompt is empty: the user message has no text"
    );
}

#[test]
fn invalid_options_and_missing_model_are_load_errors() {
    let e = Engine::load(
        tiny(),
        EngineOptions {
            max_concurrent: 0,
            ..Default::default()
        },
    )
    .err()
    .unwrap();
    assert!(
        e.to_string().contains("max_concurrent must be at least 1"),
        "{e}"
    );
    let e = Engine::load("/nonexistent/model", EngineOptions::default())
        .err()
        .unwrap();
    assert!(matches!(e, RuntimeError::Load { .. }), "{e:?}");
    assert!(e.to_string().contains("/nonexistent/model"), "{e}");
}

#[test]
fn queue_admits_in_order_with_one_slot() {
    let engine = engine(1);
    let reqs: Vec<_> = (0..4)
        .map(|s| {
            Request::chat("queued")
                .seed(s)
                .max_new_tokens(16)
                .max_denoising_steps(3)
        })
        .collect();
    let handles: Vec<_> = reqs
        .iter()
        .map(|r| engine.submit(r.clone()).unwrap())
        .collect();
    let results: Vec<_> = handles.into_iter().map(|h| h.wait().unwrap()).collect();
    for (r, done) in reqs.iter().zip(&results) {
        assert_eq!(done.ids, solo(&engine.prepare(r).unwrap()).0.new_ids());
    }
    // With one slot, each waited for the ones before it.
    assert!(results[3].stats.queue_time >= results[1].stats.queue_time);
    assert_eq!(engine.stats().backends, 1);
}

#[test]
fn dropping_the_engine_ends_running_requests_with_shutdown() {
    let engine = engine(1);
    let mut running = engine.submit(long_request(1)).unwrap();
    let queued = engine.submit(long_request(2)).unwrap();
    assert!(matches!(running.next_event(), Some(Event::Draft { .. })));
    drop(engine);
    let last = running.find(Event::is_final).unwrap();
    assert!(
        matches!(last, Event::Error(RuntimeError::ShutDown)),
        "{last:?}"
    );
    assert!(matches!(queued.wait(), Err(RuntimeError::ShutDown)));
}

#[test]
fn long_prompts_are_prefilled_in_chunks_between_other_requests_passes() {
    let engine = Engine::load(
        tiny(),
        EngineOptions {
            max_concurrent: 2,
            prefill_chunk: 4,
            ..Default::default()
        },
    )
    .unwrap();
    // A 38-token prompt goes in as 10 chunks, one per round, while a 3-token one (1 chunk)
    // denoises beside it; both still generate exactly their solo (one-pass prefill) output.
    let long_prompt: Vec<u32> = (0..38).map(|i| 2 + (i * 7) % 200).collect();
    let requests = [
        Request::ids(vec![2, 5, 9]).seed(3).max_new_tokens(32).stop_ids(vec![]),
        Request::ids(long_prompt).seed(4).max_new_tokens(16).stop_ids(vec![]),
    ];
    let handles: Vec<_> = requests.iter().map(|r| engine.submit(r.clone()).unwrap()).collect();
    for (req, h) in requests.iter().zip(handles) {
        let done = h.wait().unwrap();
        let (want, _) = solo(&engine.prepare(req).unwrap());
        assert_eq!(done.ids, want.new_ids(), "{req:?}");
        assert_eq!(done.stats.generation.steps_per_canvas, want.stats.steps_per_canvas);
    }
    let st = engine.stats();
    assert_eq!(st.prefill_chunks, 10 + 1);
    // Each request's committed canvases are re-encoded except its last: 2 + 1 canvases.
    assert_eq!(st.encoder_passes, st.prefill_chunks + 1);
    let e = Engine::load(tiny(), EngineOptions { prefill_chunk: 0, ..Default::default() }).err().unwrap();
    assert!(e.to_string().contains("prefill_chunk must be at least 1"), "{e}");
}
