//! The generation loop's bookkeeping (model-spec sections 4.5 and 5) on a scripted backend:
//! what is encoded when, how canvases are committed, EOS and pad handling, stopping and seeds.

use dgemma_engine::generate::{generate, FinishReason, GenerationSettings, Observer};
use dgemma_model::error::Result;
use dgemma_model::{Backend, Precision};
use dgemma_sampler::{SamplerSettings, SeededNoise, TapeBlock, TapeNoise, TorchDevice};

const V: usize = 64;
const C: usize = 8;

/// Predicts `script(block, position)` with a huge margin (so every step is confident and
/// the canvas converges), records what it is asked to encode.
struct Scripted {
    cache: usize,
    encoded: Vec<(usize, Vec<u32>)>,
    denoise_positions: Vec<usize>,
    script: fn(usize, usize) -> u32,
    sc_seen: Vec<bool>,
}

impl Scripted {
    fn new(script: fn(usize, usize) -> u32) -> Scripted {
        Scripted { cache: 0, encoded: vec![], denoise_positions: vec![], script, sc_seen: vec![] }
    }
}

impl Backend for Scripted {
    fn name(&self) -> &str {
        "scripted"
    }
    fn cache_len(&self) -> usize {
        self.cache
    }
    fn reset(&mut self) {
        self.cache = 0;
        self.encoded.clear();
    }
    fn encode(&mut self, ids: &[u32]) -> Result<()> {
        self.encoded.push((self.cache, ids.to_vec()));
        self.cache += ids.len();
        Ok(())
    }
    fn denoise(&mut self, canvas: &[u32], sc: Option<&[f32]>, logits: &mut [f32]) -> Result<()> {
        self.denoise_positions.push(self.cache);
        self.sc_seen.push(sc.is_some());
        let block = self.encoded.len() - 1;
        for (p, row) in logits.chunks_mut(V).enumerate() {
            row.fill(-30.0);
            row[(self.script)(block, p) as usize] = 30.0;
        }
        assert_eq!(canvas.len(), C);
        Ok(())
    }
}

fn settings(max_new_tokens: usize) -> GenerationSettings {
    GenerationSettings {
        max_new_tokens,
        canvas_length: C,
        vocab_size: V,
        sampler: SamplerSettings { max_denoising_steps: 6, device: TorchDevice::Cpu, ..SamplerSettings::default() },
        eos_token_ids: vec![1, 50],
        pad_token_id: 0,
        precision: Precision::F32,
        context_length: 1000,
        device_sampling: true,
    }
}

#[derive(Default)]
struct Record {
    steps: Vec<(usize, usize)>,
    canvases: Vec<Vec<u32>>,
}
impl Observer for Record {
    fn on_step(&mut self, block: usize, step: usize, _draft: &[u32], _accepted: usize) {
        self.steps.push((block, step));
    }
    fn on_canvas(&mut self, _block: usize, tokens: &[u32]) {
        self.canvases.push(tokens.to_vec());
    }
}

#[test]
fn commits_are_reencoded_at_their_own_positions_and_the_last_is_not() {
    let mut b = Scripted::new(|block, p| (10 + block * C + p) as u32);
    let prompt = [2u32, 5, 6];
    let mut rec = Record::default();
    let gen = generate(&mut b, &prompt, &settings(3 * C), &mut SeededNoise::new(7, V), &mut rec).unwrap();
    assert_eq!(gen.finish, FinishReason::MaxNewTokens);
    assert_eq!(gen.ids.len(), 3 + 3 * C);
    let want: Vec<u32> = (0..3 * C as u32).map(|i| 10 + i).collect();
    assert_eq!(gen.new_ids(), want.as_slice());
    // Prompt at 0, canvas 0 committed at 3, canvas 1 at 3 + C; canvas 2 is never encoded.
    assert_eq!(b.encoded.len(), 3);
    assert_eq!(b.encoded[0], (0, prompt.to_vec()));
    assert_eq!(b.encoded[1], (3, want[..C].to_vec()));
    assert_eq!(b.encoded[2], (3 + C, want[C..2 * C].to_vec()));
    // Every canvas is denoised at the positions it is later committed at.
    let mut starts = b.denoise_positions.clone();
    starts.dedup();
    assert_eq!(starts, vec![3, 3 + C, 3 + 2 * C]);
    // A confident, stable canvas stops at its second step (first step is never stable),
    // and self-conditioning is absent exactly on the first step of each canvas.
    assert_eq!(gen.stats.steps_per_canvas, vec![2, 2, 2]);
    assert_eq!(b.sc_seen, vec![false, true, false, true, false, true]);
    assert_eq!(rec.canvases.len(), 3);
    assert_eq!(gen.stats.new_tokens, 3 * C);
    assert!((gen.stats.tokens_per_forward() - 4.0).abs() < 1e-9);
}

#[test]
fn eos_pads_the_rest_of_the_canvas_and_stops() {
    // Canvas 1 holds EOS 50 at position 3 and EOS 1 at position 5: the first EOS wins.
    let mut b = Scripted::new(|block, p| match (block, p) {
        (1, 3) => 50,
        (1, 5) => 1,
        _ => 20 + p as u32,
    });
    let gen = generate(&mut b, &[2], &settings(4 * C), &mut SeededNoise::new(1, V), &mut Record::default()).unwrap();
    assert_eq!(gen.finish, FinishReason::Eos(50));
    assert_eq!(gen.stats.canvases, 2);
    let last = &gen.ids[1 + C..];
    assert_eq!(last, &[20, 21, 22, 50, 0, 0, 0, 0]);
    assert_eq!(gen.stats.new_tokens, C + 4);
}

#[test]
fn max_new_tokens_rounds_up_to_whole_canvases() {
    let mut b = Scripted::new(|_, p| 30 + p as u32);
    let gen = generate(&mut b, &[2], &settings(C + 1), &mut SeededNoise::new(3, V), &mut Record::default()).unwrap();
    assert_eq!(gen.stats.canvases, 2);
    assert_eq!(gen.ids.len(), 1 + 2 * C);
}

#[test]
fn the_same_seed_gives_the_same_draws_and_a_tape_replays_them() {
    // An uncertain model (flat logits): the draws decide everything.
    struct Flat(usize);
    impl Backend for Flat {
        fn name(&self) -> &str {
            "flat"
        }
        fn cache_len(&self) -> usize {
            self.0
        }
        fn reset(&mut self) {
            self.0 = 0;
        }
        fn encode(&mut self, ids: &[u32]) -> Result<()> {
            self.0 += ids.len();
            Ok(())
        }
        fn denoise(&mut self, canvas: &[u32], _: Option<&[f32]>, logits: &mut [f32]) -> Result<()> {
            for (p, row) in logits.chunks_mut(V).enumerate() {
                for (v, x) in row.iter_mut().enumerate() {
                    *x = ((canvas[p] as usize * 7 + v * 13) % 11) as f32 * 0.3;
                }
            }
            Ok(())
        }
    }
    let mut s = settings(2 * C);
    s.eos_token_ids = vec![63]; // never this model's argmax
    let run = |seed| generate(&mut Flat(0), &[2], &s, &mut SeededNoise::new(seed, V), &mut Record::default()).unwrap().ids;
    assert_eq!(run(11), run(11));
    assert_ne!(run(11), run(12));
    // A tape whose every draw is token 9: canvases converge to the model's argmax of 9s.
    let blocks = (0..2).map(|_| TapeBlock { init: vec![9; C], steps: vec![(vec![9; C], vec![9; C]); 6] }).collect();
    let gen = generate(&mut Flat(0), &[2], &s, &mut TapeNoise::new(blocks), &mut Record::default()).unwrap();
    assert_eq!(gen.stats.steps_per_canvas, vec![6, 6], "flat logits never become confident");
}

#[test]
fn bad_requests_are_rejected() {
    let mut b = Scripted::new(|_, p| p as u32);
    let err = generate(&mut b, &[], &settings(C), &mut SeededNoise::new(0, V), &mut Record::default()).unwrap_err();
    assert!(err.to_string().contains("empty"), "{err}");
    let mut s = settings(0);
    assert!(generate(&mut b, &[2], &s, &mut SeededNoise::new(0, V), &mut Record::default()).is_err());
    s = settings(C);
    s.sampler.t_min = f64::NAN;
    assert!(generate(&mut b, &[2], &s, &mut SeededNoise::new(0, V), &mut Record::default()).is_err());
    s = settings(C);
    s.sampler.max_denoising_steps = 0;
    assert!(generate(&mut b, &[2], &s, &mut SeededNoise::new(0, V), &mut Record::default()).is_err());
    // A prompt that cannot fit with its canvases is refused before any compute.
    s = settings(2 * C);
    s.context_length = 20;
    let err = generate(&mut b, &[2; 5], &s, &mut SeededNoise::new(0, V), &mut Record::default()).unwrap_err();
    assert!(err.to_string().contains("context of 20"), "{err}");
    assert!(b.encoded.is_empty(), "nothing may be encoded for a refused request");
}

#[test]
fn a_chunked_prefill_fills_the_cache_in_order_one_pass_per_chunk() {
    use dgemma_engine::generator::{Generator, Pass};
    let prompt = [2u32, 5, 6, 7, 8];
    let run = |chunk: Option<usize>| {
        let mut b = Scripted::new(|_, p| 30 + p as u32);
        let mut gen = Generator::seeded(&prompt, settings(2 * C), 9).unwrap();
        if let Some(n) = chunk {
            gen = gen.with_prefill_chunk(n).unwrap();
        }
        let mut passes = Vec::new();
        let mut logits = Vec::new();
        let mut rec = Record::default();
        while !gen.is_done() {
            let remaining = gen.prefill_remaining();
            passes.push((gen.advance(&mut b, &mut logits, &mut rec).unwrap(), remaining));
        }
        (gen.into_generation().unwrap(), b.encoded, passes)
    };
    let (whole, whole_encoded, _) = run(None);
    let (chunked, encoded, passes) = run(Some(2));
    // The prompt goes in as [2, 5], [6, 7], [8] at positions 0, 2, 4, one pass each; then the
    // canvases exactly as with a single prefill pass.
    assert_eq!(&encoded[..3], &[(0, vec![2, 5]), (2, vec![6, 7]), (4, vec![8])]);
    assert_eq!(&encoded[3..], &whole_encoded[1..]);
    assert_eq!(whole_encoded[0], (0, prompt.to_vec()));
    assert_eq!(passes[..4].iter().map(|p| p.1).collect::<Vec<_>>(), vec![5, 3, 1, 0]);
    assert!(passes[..3].iter().all(|p| p.0 == Pass::Encode));
    assert_eq!(passes[3].0, Pass::Denoise);
    assert_eq!(chunked.ids, whole.ids);
    assert_eq!(chunked.stats.steps_per_canvas, whole.stats.steps_per_canvas);
    // A chunk of zero tokens is refused.
    assert!(Generator::seeded(&prompt, settings(C), 9).unwrap().with_prefill_chunk(0).is_err());
}

/// A scheduler that runs the encoder work itself (`pending_encode` / `finish_encode`, as the
/// GPU runtime does inside batched decoder passes) gets the same generation as `advance`: the
/// prompt in chunks of at most `max` tokens, each committed canvas whole, and nothing when the
/// next pass is a denoising step or the canvas does not fit; a count that does not match the
/// pending encoder pass is refused.
#[test]
fn encoder_passes_run_by_the_scheduler_give_the_same_generation() {
    use dgemma_engine::generator::{Generator, Pass};
    use std::time::Duration;
    let prompt = [2u32, 5, 6, 7, 8];
    let whole = {
        let mut b = Scripted::new(|_, p| 30 + p as u32);
        let gen = Generator::seeded(&prompt, settings(3 * C), 9).unwrap();
        (gen.run_to_end(&mut b, &mut Record::default()).unwrap(), b.encoded)
    };
    let mut b = Scripted::new(|_, p| 30 + p as u32);
    let mut gen = Generator::seeded(&prompt, settings(3 * C), 9).unwrap().with_prefill_chunk(4).unwrap();
    let (mut logits, mut rec) = (Vec::new(), Record::default());
    // Before the prefill: refused counts change nothing.
    assert!(gen.finish_encode(0, Duration::ZERO).is_err());
    assert!(gen.finish_encode(6, Duration::ZERO).is_err());
    let mut chunks = Vec::new();
    while !gen.is_done() {
        // At most 3 tokens per pass: the prompt as 3 + 2, canvases (8 tokens) never fit.
        if let Some(ids) = gen.pending_encode(3).map(<[u32]>::to_vec) {
            b.encode(&ids).unwrap();
            assert_eq!(gen.finish_encode(ids.len(), Duration::from_millis(1)).unwrap(), Pass::Encode);
            chunks.push(ids);
            continue;
        }
        // With room for a canvas, the commit is offered whole (and nothing mid-canvas).
        match gen.pending_encode(C) {
            Some(ids) => {
                assert_eq!(ids.len(), C);
                let ids = ids.to_vec();
                assert!(gen.finish_encode(C - 1, Duration::ZERO).is_err());
                b.encode(&ids).unwrap();
                gen.finish_encode(C, Duration::ZERO).unwrap();
                chunks.push(ids);
            }
            None => assert_eq!(gen.advance(&mut b, &mut logits, &mut rec).unwrap(), Pass::Denoise),
        }
    }
    assert_eq!(&chunks[..2], &[vec![2, 5, 6], vec![7, 8]]);
    assert_eq!(chunks.len(), 4, "the prompt in two chunks, then two committed canvases re-encoded");
    let got = gen.into_generation().unwrap();
    assert_eq!(got.ids, whole.0.ids);
    assert_eq!(&b.encoded[2..], &whole.1[1..], "the canvases were encoded at the same positions");
    assert!(got.stats.prefill_time >= Duration::from_millis(2));
}
