//! Times one full sampler step at the model's size (C = 256, V = 262144).
//! `cargo run --release -p dgemma-sampler --example step_timing`

use std::time::Instant;

use dgemma_sampler::{Sampler, SamplerSettings, SeededNoise};

fn main() {
    let (c, v) = (256usize, 262_144usize);
    let mut s = 0x9E37_79B9_7F4A_7C15u64;
    // Softcapped-looking logits in (-30, 30); half the rows peaked (late steps), half flat (early).
    let raw: Vec<f32> = (0..c * v)
        .map(|i| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            let u = (s >> 40) as f32 / (1u64 << 24) as f32;
            let row = i / v;
            if row % 2 == 0 {
                (u * 2.0 - 1.0) * 30.0
            } else {
                u * 4.0
            }
        })
        .collect();
    let mut processed = vec![0.0f32; c * v];
    let mut sampler = Sampler::new(SamplerSettings::default()).unwrap();
    let mut noise = SeededNoise::new(1, v);
    let mut canvas = vec![0u32; c];
    sampler.begin_block(&mut noise, 0, &mut canvas).unwrap();
    println!("rayon threads: {}", rayon::current_num_threads());
    for cur_step in [48usize, 47, 46] {
        let t0 = Instant::now();
        let out = sampler
            .step(&mut noise, 0, cur_step, &canvas, &raw, &mut processed)
            .unwrap();
        println!(
            "cur_step {cur_step}: {:.1} ms, accepted {}, mean H {:.4}",
            t0.elapsed().as_secs_f64() * 1e3,
            out.accepted,
            out.mean_entropy
        );
        canvas = out.next_canvas;
    }
}
