//! Property tests (proptest).

use dgemma_sampler::{
    accept_mask, apply_temperature, argmax, denoise_step, denoise_step_in_place, entropy,
    temperature, AcceptScratch, NoiseSource, SamplerError, SamplerSettings, SeededNoise,
    StableAndConfident,
};
use proptest::prelude::*;

/// Positions sorted by (entropy, position): the order the acceptance rule ranks them in.
fn rank_order(h: &[f32]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..h.len()).collect();
    order.sort_by(|&a, &b| h[a].partial_cmp(&h[b]).unwrap().then(a.cmp(&b)));
    order
}

/// Entropies as they occur: exact zeros, tiny values, anything up to ln(262144), duplicates.
fn entropy_value() -> impl Strategy<Value = f32> {
    prop_oneof![
        Just(0.0f32),
        0.0f32..1e-3,
        0.0f32..0.2,
        0.0f32..12.48,
        Just(0.0778),
        Just(9.2103),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    /// For bounds >= 1e-3 (entropies <= ln V, canvas <= 256) the accepted set is a non-empty
    /// prefix of the entropy order (see `accept` module docs for why this needs a domain).
    #[test]
    fn accepted_set_is_a_nonempty_prefix(h in prop::collection::vec(entropy_value(), 1..=256), bound in 1e-3f32..10.0) {
        let mut mask = vec![false; h.len()];
        let n = accept_mask(&h, bound, &mut mask, &mut AcceptScratch::default()).unwrap();
        prop_assert!(n >= 1);
        prop_assert_eq!(n, mask.iter().filter(|&&m| m).count());
        let order = rank_order(&h);
        for (rank, &p) in order.iter().enumerate() {
            prop_assert_eq!(mask[p], rank < n, "rank {} position {}", rank, p);
        }
    }

    /// Whatever the (positive) bound and entropies, the lowest-ranked position is accepted.
    #[test]
    fn lowest_is_always_accepted(h in prop::collection::vec(0.0f32..1e3, 1..=300), bound in 1e-30f32..1e3) {
        let mut mask = vec![false; h.len()];
        let n = accept_mask(&h, bound, &mut mask, &mut AcceptScratch::default()).unwrap();
        prop_assert!(n >= 1);
        prop_assert!(mask[rank_order(&h)[0]]);
    }

    /// A NaN (or +inf) anywhere in the logits is an error naming its place, never a silent result.
    #[test]
    fn non_finite_logits_are_errors(
        c in 1usize..12, v in 1usize..40, seed in any::<u64>(), frac in 0.0f64..1.0, pos_inf in any::<bool>()
    ) {
        let mut raw: Vec<f32> = (0..c * v).map(|i| ((i as u64 ^ seed) % 97) as f32 * 0.3 - 10.0).collect();
        let at = ((c * v) as f64 * frac) as usize % (c * v);
        raw[at] = if pos_inf { f32::INFINITY } else { f32::NAN };
        let settings = SamplerSettings::default();
        let mut stop = StableAndConfident::new(0, 1e9).unwrap(); // would finish at once if it ran
        let mut noise = SeededNoise::new(seed, v);
        let mut processed = vec![0.0f32; c * v];
        let canvas = vec![0u32; c];
        let r = denoise_step(&settings, &mut stop, &mut noise, 0, 48, &canvas, &raw, &mut processed);
        match r {
            Err(SamplerError::NonFiniteLogit { position, index, .. }) => {
                prop_assert_eq!(position, at / v);
                prop_assert_eq!(index, at % v);
            }
            other => prop_assert!(false, "expected NonFiniteLogit, got {:?}", other),
        }
        let mut in_place = raw.clone();
        prop_assert!(denoise_step_in_place(&settings, &mut stop, &mut noise, 0, 48, &canvas, &mut in_place).is_err());
        prop_assert!(entropy(&raw[(at / v) * v..(at / v + 1) * v]).is_err());
    }

    /// The step is consistent with its parts: processed = raw / T bitwise, argmax/entropy per row,
    /// acceptance mask, next canvas = sample where accepted else renoise; in-place variant equal.
    #[test]
    fn step_is_consistent_with_its_parts(
        c in 1usize..20, v in 2usize..64, seed in any::<u64>(), scale in 0.0f32..40.0,
        cur_step in 1usize..=48, bound in 1e-3f32..2.0, neg_inf_every in 0usize..5
    ) {
        let mut raw: Vec<f32> = (0..c * v)
            .map(|i| (((i as u64).wrapping_mul(2654435761) ^ seed) % 1000) as f32 / 1000.0 * scale - scale / 2.0)
            .collect();
        if neg_inf_every > 1 {
            for p in 0..c {
                for j in (1..v).step_by(neg_inf_every) {
                    raw[p * v + j] = f32::NEG_INFINITY;
                }
            }
        }
        let settings = SamplerSettings { entropy_bound: bound, ..SamplerSettings::default() };
        let mut stop = StableAndConfident::new(1, 0.005).unwrap();
        let mut noise = SeededNoise::new(seed, v);
        let mut processed = vec![0.0f32; c * v];
        let canvas = vec![1u32; c];
        let out = denoise_step(&settings, &mut stop, &mut noise, 2, cur_step, &canvas, &raw, &mut processed).unwrap();

        let t = temperature(cur_step, 48, 0.4, 0.8).unwrap();
        prop_assert_eq!(out.temperature, t);
        let mut expect = raw.clone();
        apply_temperature(&mut expect, t).unwrap();
        prop_assert!(expect.iter().zip(&processed).all(|(a, b)| a.to_bits() == b.to_bits()));
        for p in 0..c {
            let row = &processed[p * v..(p + 1) * v];
            prop_assert_eq!(out.argmax_canvas[p] as usize, argmax(row).unwrap());
            prop_assert_eq!(out.entropies[p].to_bits(), entropy(row).unwrap().to_bits());
        }
        let mut mask = vec![false; c];
        let n = accept_mask(&out.entropies, bound, &mut mask, &mut AcceptScratch::default()).unwrap();
        prop_assert_eq!(n, out.accepted);
        prop_assert_eq!(&mask, &out.accepted_mask);
        let step = 48 - cur_step;
        let mut sample = vec![0u32; c];
        noise.sample(2, step, &processed, v, &mut sample).unwrap();
        let mut rnd = vec![0u32; c];
        noise.renoise(2, step, &mut rnd).unwrap();
        prop_assert_eq!(&sample, &out.sampled);
        for p in 0..c {
            prop_assert_eq!(out.next_canvas[p], if mask[p] { sample[p] } else { rnd[p] });
            prop_assert!((out.next_canvas[p] as usize) < v);
        }
        prop_assert!(!out.finished, "first step of a canvas is never stable");

        let mut stop2 = StableAndConfident::new(1, 0.005).unwrap();
        let mut logits = raw.clone();
        let out2 = denoise_step_in_place(&settings, &mut stop2, &mut noise, 2, cur_step, &canvas, &mut logits).unwrap();
        prop_assert_eq!(out2, out);
        prop_assert!(logits.iter().zip(&processed).all(|(a, b)| a.to_bits() == b.to_bits()));
    }
}
