//! Sampler unit checks of `docs/model-spec.md` section 9 (from HF's
//! `test_generation_diffusion_gemma.py`): vocab 10000, canvas 256.
//! Expected entropies computed with torch 2.15 `Categorical(logits=...).entropy()`:
//! peak 18 -> 0.0028933195862919092, peak 14.5 -> 0.07778722047805786, zeros -> 9.210342407226562.

use dgemma_sampler::{
    accept_mask, entropy, temperature, AcceptScratch, SamplerSettings, StableAndConfident,
    TapeBlock, TapeNoise,
};

const V: usize = 10_000;
const C: usize = 256;

fn peak_row(value: f32) -> Vec<f32> {
    let mut r = vec![0.0f32; V];
    r[123] = value;
    r
}

#[test]
fn entropies_of_the_spec_rows() {
    let h18 = entropy(&peak_row(18.0)).unwrap();
    let h145 = entropy(&peak_row(14.5)).unwrap();
    let h0 = entropy(&vec![0.0f32; V]).unwrap();
    approx::assert_relative_eq!(h18, 0.002_893_319_6, max_relative = 1e-5);
    approx::assert_relative_eq!(h145, 0.077_787_22, max_relative = 1e-5);
    approx::assert_relative_eq!(h0, 9.210_342, max_relative = 1e-6);
    approx::assert_relative_eq!(h0, (V as f32).ln(), max_relative = 1e-6);
}

/// Raw logits [C, V]: three low-entropy positions (18, 14.5, 14.5) at scattered places, the rest zero.
fn three_low_canvas() -> (Vec<f32>, [usize; 3]) {
    let mut logits = vec![0.0f32; C * V];
    let pos = [200usize, 5, 77];
    for (&p, &val) in pos.iter().zip(&[18.0f32, 14.5, 14.5]) {
        logits[p * V + (p * 31) % V] = val;
    }
    (logits, pos)
}

fn entropies_of(logits: &[f32]) -> Vec<f32> {
    logits.chunks(V).map(|r| entropy(r).unwrap()).collect()
}

#[test]
fn bound_0_1_accepts_three_and_0_01_accepts_two() {
    let (logits, pos) = three_low_canvas();
    let h = entropies_of(&logits);
    let mut mask = vec![false; C];
    let mut s = AcceptScratch::default();

    assert_eq!(accept_mask(&h, 0.1, &mut mask, &mut s).unwrap(), 3);
    for p in pos {
        assert!(mask[p]);
    }
    // The 4th-ranked position would see 0.0029 + 0.078 + 0.078 = 0.159 > 0.1.

    assert_eq!(accept_mask(&h, 0.01, &mut mask, &mut s).unwrap(), 2);
    assert!(mask[200], "lowest entropy (0.0029)");
    // Rank 2 (0.078 > bound) is accepted because only the strictly lower-ranked sum (0.0029)
    // is compared; of the tied 14.5 positions the lower index wins.
    assert!(mask[5]);
    assert!(!mask[77]);
}

#[test]
fn nine_zero_entropy_positions_accept_ten() {
    let mut logits = vec![0.0f32; C * V];
    for p in 0..9usize {
        let q = 10 + p * 20;
        logits[q * V + 1] = 1000.0; // exp(-1000) underflows: entropy exactly 0
    }
    let h = entropies_of(&logits);
    assert_eq!(h.iter().filter(|&&x| x == 0.0).count(), 9);
    let mut mask = vec![false; C];
    assert_eq!(
        accept_mask(&h, 0.1, &mut mask, &mut AcceptScratch::default()).unwrap(),
        10
    );
    // The 10th is the first (lowest index) of the ln(V) positions.
    assert!(mask[0]);
}

#[test]
fn temperature_schedule_values() {
    assert_eq!(temperature(48, 48, 0.4, 0.8).unwrap(), 0.8);
    assert_eq!(temperature(24, 48, 0.4, 0.8).unwrap(), 0.6);
    // Spec 4.1: 0.4 + 1/120 at the last step.
    approx::assert_relative_eq!(
        temperature(1, 48, 0.4, 0.8).unwrap(),
        0.408_333_3,
        max_relative = 1e-6
    );
}

#[test]
fn stability_threshold_one_needs_two_identical_argmax_canvases() {
    let mut s = StableAndConfident::new(1, 0.005).unwrap();
    let a = vec![3u32; C];
    let h = vec![0.0f32; C];
    assert!(!s.update(&a, &h).unwrap().0);
    assert!(s.update(&a, &h).unwrap().0);
}

/// The same three-low-entropy canvas through the whole step with T = 1 (t_min = t_max = 1, so
/// processed == raw), replayed noise: accepted positions take the sample, others the renoise.
#[test]
fn full_step_on_the_spec_canvas() {
    let (logits, pos) = three_low_canvas();
    let settings = SamplerSettings {
        t_min: 1.0,
        t_max: 1.0,
        entropy_bound: 0.1,
        ..SamplerSettings::default()
    };
    let sample: Vec<u32> = (0..C as u32).map(|i| i + 1000).collect();
    let renoise: Vec<u32> = (0..C as u32).map(|i| i + 5000).collect();
    let mut tape = TapeNoise::new(vec![TapeBlock {
        init: vec![0; C],
        steps: vec![(sample.clone(), renoise.clone())],
    }]);
    let mut stop = StableAndConfident::new(1, 0.005).unwrap();
    let mut processed = vec![0.0f32; C * V];
    let canvas = vec![7u32; C];
    let out = dgemma_sampler::denoise_step(
        &settings,
        &mut stop,
        &mut tape,
        0,
        48,
        &canvas,
        &logits,
        &mut processed,
    )
    .unwrap();
    assert_eq!(out.temperature, 1.0);
    assert_eq!(processed, logits);
    assert_eq!(out.accepted, 3);
    for p in 0..C {
        let want = if pos.contains(&p) {
            sample[p]
        } else {
            renoise[p]
        };
        assert_eq!(out.next_canvas[p], want, "position {p}");
    }
    assert!(!out.finished);
    // argmax of an all-zero row is index 0 (first maximum).
    assert_eq!(out.argmax_canvas[0], 0);
    assert_eq!(out.argmax_canvas[200], ((200 * 31) % V) as u32);
}
