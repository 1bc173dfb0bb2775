//! Whole-step behaviour: stopping through the step, block start, and input errors.

use dgemma_sampler::{
    denoise_step, Sampler, SamplerError, SamplerSettings, SeededNoise, StableAndConfident,
    TapeBlock, TapeNoise,
};

const C: usize = 8;
const V: usize = 32;

/// Confident logits: a large peak per row (entropy ~ 0 at every temperature of the schedule).
fn peaked() -> Vec<f32> {
    let mut l = vec![0.0f32; C * V];
    for p in 0..C {
        l[p * V + (p * 3) % V] = 30.0;
    }
    l
}

fn steps_until_finished(stability_threshold: usize) -> usize {
    let settings = SamplerSettings {
        stability_threshold,
        ..SamplerSettings::default()
    };
    let mut sampler = Sampler::new(settings).unwrap();
    let mut noise = SeededNoise::new(1, V);
    let mut canvas = vec![0u32; C];
    sampler.begin_block(&mut noise, 0, &mut canvas).unwrap();
    let raw = peaked();
    let mut processed = vec![0.0f32; C * V];
    for (i, cur_step) in (1..=48).rev().enumerate() {
        let out = sampler
            .step(&mut noise, 0, cur_step, &canvas, &raw, &mut processed)
            .unwrap();
        assert!(out.mean_entropy < 0.005);
        assert_eq!(out.accepted, C);
        assert_eq!(out.next_canvas, out.sampled);
        canvas = out.next_canvas;
        if out.finished {
            return i + 1;
        }
    }
    usize::MAX
}

#[test]
fn stability_history_through_the_step() {
    assert_eq!(steps_until_finished(0), 1);
    assert_eq!(steps_until_finished(1), 2);
    assert_eq!(steps_until_finished(2), 3);
}

#[test]
fn begin_block_resets_history() {
    let mut sampler = Sampler::new(SamplerSettings::default()).unwrap();
    let mut noise = SeededNoise::new(1, V);
    let raw = peaked();
    let mut processed = vec![0.0f32; C * V];
    let mut canvas = vec![0u32; C];
    sampler.begin_block(&mut noise, 0, &mut canvas).unwrap();
    assert!(
        !sampler
            .step(&mut noise, 0, 48, &canvas, &raw, &mut processed)
            .unwrap()
            .finished
    );
    assert!(
        sampler
            .step(&mut noise, 0, 47, &canvas, &raw, &mut processed)
            .unwrap()
            .finished
    );
    sampler.begin_block(&mut noise, 1, &mut canvas).unwrap();
    assert!(
        !sampler
            .step(&mut noise, 1, 48, &canvas, &raw, &mut processed)
            .unwrap()
            .finished
    );
}

#[test]
fn failed_step_does_not_touch_history() {
    let mut sampler = Sampler::new(SamplerSettings::default()).unwrap();
    let mut noise = SeededNoise::new(1, V);
    let raw = peaked();
    let mut bad = raw.clone();
    bad[3] = f32::NAN;
    let mut processed = vec![0.0f32; C * V];
    let canvas = vec![0u32; C];
    assert!(
        !sampler
            .step(&mut noise, 0, 48, &canvas, &raw, &mut processed)
            .unwrap()
            .finished
    );
    assert!(sampler
        .step(&mut noise, 0, 47, &canvas, &bad, &mut processed)
        .is_err());
    // Had the failed step been recorded, this would compare against garbage; it compares
    // against step 48's argmax and finishes.
    assert!(
        sampler
            .step(&mut noise, 0, 46, &canvas, &raw, &mut processed)
            .unwrap()
            .finished
    );
    sampler.reset();
    assert!(sampler
        .step(&mut noise, 0, 48, &canvas, &bad, &mut processed)
        .is_err());
    assert!(
        !sampler
            .step(&mut noise, 0, 47, &canvas, &raw, &mut processed)
            .unwrap()
            .finished
    );
}

#[test]
fn not_confident_never_finishes() {
    let mut sampler = Sampler::new(SamplerSettings::default()).unwrap();
    let mut noise = SeededNoise::new(1, V);
    let raw = vec![0.0f32; C * V];
    let mut processed = vec![0.0f32; C * V];
    let canvas = vec![0u32; C];
    for cur_step in (1..=48).rev() {
        let out = sampler
            .step(&mut noise, 0, cur_step, &canvas, &raw, &mut processed)
            .unwrap();
        assert!(!out.finished);
        assert_eq!(out.argmax_canvas, vec![0; C]);
        // Uniform rows: every entropy is ln(32) ~ 3.47 > 0.1, so exactly one is accepted.
        assert_eq!(out.accepted, 1);
        assert!(out.accepted_mask[0]);
    }
}

#[test]
fn input_errors() {
    let s = SamplerSettings::default();
    let mut stop = StableAndConfident::new(1, 0.005).unwrap();
    let mut noise = SeededNoise::new(1, V);
    let raw = peaked();
    let mut processed = vec![0.0f32; C * V];
    let canvas = vec![0u32; C];
    let mut run =
        |s: &SamplerSettings, cur: usize, canvas: &[u32], raw: &[f32], processed: &mut [f32]| {
            denoise_step(s, &mut stop, &mut noise, 0, cur, canvas, raw, processed)
        };
    assert!(matches!(
        run(&s, 0, &canvas, &raw, &mut processed),
        Err(SamplerError::StepOutOfRange { .. })
    ));
    assert!(matches!(
        run(&s, 49, &canvas, &raw, &mut processed),
        Err(SamplerError::StepOutOfRange { .. })
    ));
    assert!(matches!(
        run(&s, 48, &[], &raw, &mut processed),
        Err(SamplerError::Empty(_))
    ));
    assert!(matches!(
        run(&s, 48, &canvas[..3], &raw, &mut processed),
        Err(SamplerError::LengthMismatch { .. })
    ));
    assert!(matches!(
        run(&s, 48, &canvas, &raw[1..], &mut processed),
        Err(SamplerError::LengthMismatch { .. })
    ));
    let bad = [
        SamplerSettings {
            entropy_bound: 0.0,
            ..s
        },
        SamplerSettings {
            entropy_bound: f32::NAN,
            ..s
        },
        SamplerSettings { t_min: -0.1, ..s },
        SamplerSettings { t_max: 0.3, ..s },
        SamplerSettings {
            t_max: f64::INFINITY,
            ..s
        },
        SamplerSettings {
            max_denoising_steps: 0,
            ..s
        },
        SamplerSettings {
            confidence_threshold: f32::NAN,
            ..s
        },
    ];
    for b in bad {
        assert!(
            matches!(
                run(&b, 1, &canvas, &raw, &mut processed),
                Err(SamplerError::InvalidSettings(_))
            ),
            "{b:?}"
        );
        assert!(Sampler::new(b).is_err());
    }
    // All -inf row.
    let mut r = raw.clone();
    r[V..2 * V].fill(f32::NEG_INFINITY);
    assert_eq!(
        run(&s, 48, &canvas, &r, &mut processed),
        Err(SamplerError::NoFiniteLogit { position: 1 })
    );
    // Overflow to +inf after dividing by T is caught as well.
    let mut r = raw.clone();
    r[5] = f32::MAX;
    assert!(matches!(
        run(&s, 1, &canvas, &r, &mut processed),
        Err(SamplerError::NonFiniteLogit {
            position: 0,
            index: 5,
            ..
        })
    ));
}

#[test]
fn tape_driven_step_checks_tokens() {
    let settings = SamplerSettings::default();
    let mut stop = StableAndConfident::new(1, 0.005).unwrap();
    let raw = peaked();
    let mut processed = vec![0.0f32; C * V];
    let canvas = vec![0u32; C];
    let mut tape = TapeNoise::new(vec![TapeBlock {
        init: vec![0; C],
        steps: vec![(vec![1; C], vec![V as u32; C])], // renoise token out of range
    }]);
    assert_eq!(
        denoise_step(
            &settings,
            &mut stop,
            &mut tape,
            0,
            48,
            &canvas,
            &raw,
            &mut processed
        ),
        Err(SamplerError::TokenOutOfRange {
            position: 0,
            token: V as u32,
            vocab: V
        })
    );
    // Step 47 = index 1 is not on the tape.
    assert!(matches!(
        denoise_step(
            &settings,
            &mut stop,
            &mut tape,
            0,
            47,
            &canvas,
            &raw,
            &mut processed
        ),
        Err(SamplerError::TapeMissing {
            what: "sample",
            block: 0,
            step: Some(1)
        })
    ));
}
