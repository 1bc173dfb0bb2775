//! The state machine gives exactly what `dgemma_engine::generate` gives: same ids, finish
//! reason, steps per canvas and the same observer callbacks, on the tiny model.

mod common;

use common::{cpu_backend, solo, tiny, Record};
use dgemma_runtime::{Engine, EngineOptions, Generator, Precision, Request, SamplerOverrides};

fn cases() -> Vec<Request> {
    vec![
        Request::chat("Hello there").seed(0).max_new_tokens(48),
        Request::chat("Hello there").seed(1).max_new_tokens(48),
        Request::chat("Tell me a story")
            .seed(12345)
            .max_new_tokens(64)
            .max_denoising_steps(6),
        Request::text("raw text prompt")
            .seed(7)
            .max_new_tokens(16)
            .max_denoising_steps(2),
        Request::ids(vec![2, 10, 20, 30, 40])
            .seed(u64::MAX)
            .max_new_tokens(40)
            .stop_ids(vec![]),
        Request::chat("sampler overrides")
            .system("Be brief.")
            .thinking(true)
            .seed(99)
            .max_new_tokens(32)
            .sampler(SamplerOverrides {
                entropy_bound: Some(0.5),
                t_min: Some(0.1),
                t_max: Some(1.2),
                stability_threshold: Some(2),
                confidence_threshold: Some(0.5),
            }),
        Request::chat("no early stop")
            .seed(3)
            .max_new_tokens(32)
            .max_denoising_steps(5)
            .sampler(SamplerOverrides {
                confidence_threshold: Some(f32::NEG_INFINITY),
                ..Default::default()
            }),
    ]
}

#[test]
fn state_machine_equals_generate() {
    let (mut multi_canvas, mut eos, mut early_stop) = (false, false, false);
    for precision in [Precision::Bf16, Precision::F32] {
        let engine = Engine::load(
            tiny(),
            EngineOptions {
                precision: Some(precision),
                ..Default::default()
            },
        )
        .unwrap();
        for req in cases() {
            let p = engine.prepare(&req).unwrap();
            let (want, want_rec) = solo(&p);
            let mut backend = cpu_backend(precision);
            let mut rec = Record::default();
            let got = Generator::seeded(&p.prompt_ids, p.settings.clone(), p.seed)
                .unwrap()
                .run_to_end(&mut backend, &mut rec)
                .unwrap();
            assert_eq!(got.ids, want.ids, "{precision:?} {req:?}");
            assert_eq!(got.finish, want.finish, "{precision:?} {req:?}");
            assert_eq!(
                got.stats.steps_per_canvas, want.stats.steps_per_canvas,
                "{precision:?} {req:?}"
            );
            assert_eq!(got.stats.new_tokens, want.stats.new_tokens);
            assert_eq!(rec, want_rec, "{precision:?} {req:?}");
            multi_canvas |= want.stats.canvases > 1;
            eos |= matches!(want.finish, dgemma_runtime::FinishReason::Eos(_));
            early_stop |= want
                .stats
                .steps_per_canvas
                .iter()
                .any(|&s| s < p.settings.sampler.max_denoising_steps);
        }
    }
    // The cases cover every branch of the loop: re-encoding, EOS, early stopping.
    assert!(
        multi_canvas && eos && early_stop,
        "multi-canvas {multi_canvas}, eos {eos}, early stop {early_stop}"
    );
}

/// Different requests interleaved pass by pass on one thread, sharing the logits scratch,
/// each on its own backend: each still equals its solo run.
#[test]
fn interleaved_generators_equal_solo_runs() {
    let engine = Engine::load(tiny(), EngineOptions::default()).unwrap();
    let prepared: Vec<_> = cases().iter().map(|r| engine.prepare(r).unwrap()).collect();
    let mut running: Vec<_> = prepared
        .iter()
        .map(|p| {
            (
                Generator::seeded(&p.prompt_ids, p.settings.clone(), p.seed).unwrap(),
                cpu_backend(p.settings.precision),
                Record::default(),
            )
        })
        .collect();
    let mut logits = Vec::new();
    while running.iter().any(|(g, _, _)| !g.is_done()) {
        for (g, b, r) in running.iter_mut().rev() {
            if !g.is_done() {
                g.advance(b, &mut logits, r).unwrap();
            }
        }
    }
    for ((g, _, rec), p) in running.into_iter().zip(&prepared) {
        let (want, want_rec) = solo(p);
        let got = g.into_generation().unwrap();
        assert_eq!(got.ids, want.ids);
        assert_eq!(rec, want_rec);
    }
}

#[test]
fn the_same_seed_gives_the_same_output_and_seeds_matter() {
    let engine = Engine::load(tiny(), EngineOptions::default()).unwrap();
    let run = |seed| {
        engine
            .generate(Request::chat("Hi").seed(seed).max_new_tokens(32))
            .unwrap()
            .ids
    };
    assert_eq!(run(5), run(5));
    let distinct: std::collections::HashSet<_> = (0..6).map(run).collect();
    assert!(distinct.len() > 1, "six seeds all gave the same output");
}
