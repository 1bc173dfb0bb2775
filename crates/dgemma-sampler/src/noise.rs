//! Sources of randomness for the denoising loop: the three random draws HF makes per canvas.
//!
//! | HF (generation_diffusion_gemma.py) | here |
//! |---|---|
//! | `EntropyBoundSampler.initialize_canvas`: `torch.randint(0, V, [B, C])` once per canvas | [`NoiseSource::init_canvas`] |
//! | `_denoising_step`: `torch.multinomial(softmax(processed), 1)` per position | [`NoiseSource::sample`] |
//! | `EntropyBoundSampler.renoise_canvas`: `torch.randint(0, V, [B, C])` per step | [`NoiseSource::renoise`] |
//!
//! Per step HF draws the sample first, then the renoise canvas; [`crate::denoise_step`] calls
//! them in that order. `step` is the index of the executed step within the block: 0 for the first
//! step (`cur_step = N`), `N - cur_step` in general.
//!
//! HF uses torch's global Philox stream, which cannot be reproduced outside torch (spec 4.3).
//! Two replacements:
//!
//! * [`SeededNoise`]: counter-based and stateless. Every random word is
//!   `philox4x32_10(counter, key)` (see [`crate::rng`]) with `key = [seed as u32, (seed >> 32) as u32]`
//!   and the counter
//!
//!   | draw | counter `[c0, c1, c2, c3]` | words used |
//!   |---|---|---|
//!   | init   | `[0, pos, block, 1 << 24]` | `id = uniform_below(w0, w1, V)` |
//!   | sample | `[v >> 2, pos, block, (2 << 24) \| step]` for each vocab id `v` | `g_v = gumbel_from_bits(w[v & 3])` |
//!   | renoise| `[0, pos, block, (3 << 24) \| step]` | `id = uniform_below(w0, w1, V)` |
//!
//!   (`pos`, `block` < 2^32, `step` < 2^24.) `init`/`renoise` are uniform over **all** ids `0..V`
//!   (as `torch.randint`, specials included). `sample` is a Gumbel-max draw,
//!   `argmax_v (processed[v] + g_v)` with float32 addition and first-index tie-breaking, which is
//!   an exact draw from `softmax(processed)` (up to the 2^-32 resolution of the uniforms). The
//!   CPU implementation skips `v` whose `processed[v] + G_BOUND` is below the running best
//!   (`G_BOUND = gumbel_from_bits(0) + 1 >= every g`), and then those whose
//!   `processed[v] + gumbel_upper_bound(w)` is (a bound from the leading zeros of the random
//!   word, see [`crate::rng::gumbel_upper_bound`]); neither can change the result, so a GPU
//!   kernel may evaluate every `v` and get the same answer.
//! * [`TapeNoise`]: replays arrays recorded elsewhere (e.g. dumped from a torch run: the initial
//!   `randint`, and per step the `multinomial` result and the renoise `randint`), for
//!   teacher-forced comparisons. Missing entries and length mismatches are errors.

use rayon::prelude::*;

use crate::entropy::check_row;
use crate::error::{Result, SamplerError};
use crate::rng::{gumbel_from_bits, gumbel_upper_bound, philox4x32_10, uniform_below};

/// The random draws of the denoising loop (see the module docs).
pub trait NoiseSource {
    /// Initial canvas of `block`: `out.len()` token ids (HF: `randint(0, V, [C])`).
    fn init_canvas(&mut self, block: usize, out: &mut [u32]) -> Result<()>;

    /// One categorical sample per position from `softmax(processed_logits[pos])`
    /// (HF: `multinomial`). `processed_logits` is `[out.len(), vocab]`, row-major.
    fn sample(
        &mut self,
        block: usize,
        step: usize,
        processed_logits: &[f32],
        vocab: usize,
        out: &mut [u32],
    ) -> Result<()>;

    /// Fresh random canvas used for the non-accepted positions (HF: `randint(0, V, [C])`).
    fn renoise(&mut self, block: usize, step: usize, out: &mut [u32]) -> Result<()>;

    /// The seed when this source is [`SeededNoise`]'s counter-based construction, whose draws a
    /// device can reproduce from the seed alone (so sampling can stay on the device); `None`
    /// for any other source (a tape must be replayed on the host).
    fn counter_seed(&self) -> Option<u64> {
        None
    }
}

/// A borrowed noise source is a noise source (lets a generation borrow the caller's tape).
impl<N: NoiseSource + ?Sized> NoiseSource for &mut N {
    fn init_canvas(&mut self, block: usize, out: &mut [u32]) -> Result<()> {
        (**self).init_canvas(block, out)
    }
    fn sample(&mut self, block: usize, step: usize, processed_logits: &[f32], vocab: usize, out: &mut [u32]) -> Result<()> {
        (**self).sample(block, step, processed_logits, vocab, out)
    }
    fn renoise(&mut self, block: usize, step: usize, out: &mut [u32]) -> Result<()> {
        (**self).renoise(block, step, out)
    }
    fn counter_seed(&self) -> Option<u64> {
        (**self).counter_seed()
    }
}

const TAG_INIT: u32 = 1;
const TAG_SAMPLE: u32 = 2;
const TAG_RENOISE: u32 = 3;
const STEP_LIMIT: usize = 1 << 24;

/// Counter-based seeded noise (see the module docs for the exact construction).
#[derive(Debug, Clone)]
pub struct SeededNoise {
    seed: u64,
    vocab_size: usize,
}

impl SeededNoise {
    /// `vocab_size` is the range of `init_canvas`/`renoise` and must equal the logits' vocab in
    /// `sample` (checked on use: an empty or > u32::MAX vocabulary is an error there).
    pub fn new(seed: u64, vocab_size: usize) -> Self {
        Self { seed, vocab_size }
    }

    /// The seed.
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// The vocabulary size.
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    fn key(&self) -> [u32; 2] {
        [self.seed as u32, (self.seed >> 32) as u32]
    }

    fn vocab_u32(&self) -> Result<u32> {
        if self.vocab_size == 0 {
            return Err(SamplerError::Empty("vocabulary"));
        }
        u32::try_from(self.vocab_size).map_err(|_| {
            SamplerError::CounterOverflow(format!("vocab size {} exceeds u32", self.vocab_size))
        })
    }

    fn block_u32(block: usize) -> Result<u32> {
        u32::try_from(block)
            .map_err(|_| SamplerError::CounterOverflow(format!("block {block} exceeds u32")))
    }

    fn step_word(tag: u32, step: usize) -> Result<u32> {
        if step >= STEP_LIMIT {
            return Err(SamplerError::CounterOverflow(format!(
                "step {step} >= 2^24"
            )));
        }
        Ok((tag << 24) | step as u32)
    }

    fn check_positions(n: usize) -> Result<()> {
        if n > u32::MAX as usize {
            return Err(SamplerError::CounterOverflow(format!(
                "{n} positions exceed u32"
            )));
        }
        Ok(())
    }

    fn uniform_canvas(&self, block: usize, c3: u32, out: &mut [u32]) -> Result<()> {
        let vocab = self.vocab_u32()?;
        let block = Self::block_u32(block)?;
        Self::check_positions(out.len())?;
        let key = self.key();
        for (pos, o) in out.iter_mut().enumerate() {
            let w = philox4x32_10([0, pos as u32, block, c3], key);
            *o = uniform_below(w[0], w[1], vocab);
        }
        Ok(())
    }

    /// The Gumbel variate `g` used for vocab id `v` at (`block`, `step`, `pos`). Exposed for
    /// cross-checking a GPU port.
    pub fn gumbel(&self, block: usize, step: usize, pos: usize, v: usize) -> Result<f32> {
        let c3 = Self::step_word(TAG_SAMPLE, step)?;
        let block = Self::block_u32(block)?;
        let pos = u32::try_from(pos)
            .map_err(|_| SamplerError::CounterOverflow(format!("position {pos} exceeds u32")))?;
        let grp = u32::try_from(v >> 2)
            .map_err(|_| SamplerError::CounterOverflow(format!("vocab id {v} too large")))?;
        let w = philox4x32_10([grp, pos, block, c3], self.key());
        Ok(gumbel_from_bits(w[v & 3]))
    }
}

/// Gumbel-max over one validated row. See the module docs.
fn gumbel_argmax(
    row: &[f32],
    key: [u32; 2],
    pos: u32,
    block: u32,
    c3: u32,
    position: usize,
) -> Result<u32> {
    let (vstar, _) = check_row(row, position)?;
    let g_bound = gumbel_from_bits(0) + 1.0f32;
    let draw = |v: usize| {
        let w = philox4x32_10([(v >> 2) as u32, pos, block, c3], key);
        gumbel_from_bits(w[v & 3])
    };
    let mut best_idx = vstar;
    let mut best = row[vstar] + draw(vstar);
    // One philox block serves 4 consecutive ids; test whole groups first (fewer branches).
    for (grp, chunk) in row.chunks(4).enumerate() {
        let group_max = chunk.iter().fold(f32::NEG_INFINITY, |m, &p| m.max(p));
        // fl(p + g) <= fl(p + g_bound) < best: nobody in the group can win (also skips -inf).
        if group_max + g_bound < best {
            continue;
        }
        let words = philox4x32_10([grp as u32, pos, block, c3], key);
        // The bound is largest for the smallest word: one test for the whole group.
        let min_word = words[0].min(words[1]).min(words[2]).min(words[3]);
        if group_max + gumbel_upper_bound(min_word) < best {
            continue;
        }
        for (j, &p) in chunk.iter().enumerate() {
            let w = words[j];
            // Same argument with a per-word bound: skips the logarithms for almost every id.
            if p + gumbel_upper_bound(w) < best {
                continue;
            }
            let v = grp * 4 + j;
            let s = p + gumbel_from_bits(w);
            if s > best || (s == best && v < best_idx) {
                best = s;
                best_idx = v;
            }
        }
    }
    Ok(best_idx as u32)
}

impl NoiseSource for SeededNoise {
    fn init_canvas(&mut self, block: usize, out: &mut [u32]) -> Result<()> {
        self.uniform_canvas(block, TAG_INIT << 24, out)
    }

    fn sample(
        &mut self,
        block: usize,
        step: usize,
        processed_logits: &[f32],
        vocab: usize,
        out: &mut [u32],
    ) -> Result<()> {
        if vocab == 0 {
            return Err(SamplerError::Empty("vocabulary"));
        }
        if vocab != self.vocab_size {
            return Err(SamplerError::VocabMismatch {
                expected: self.vocab_size,
                got: vocab,
            });
        }
        self.vocab_u32()?;
        let expected = out
            .len()
            .checked_mul(vocab)
            .ok_or(SamplerError::CounterOverflow(
                "canvas * vocab overflows".into(),
            ))?;
        if processed_logits.len() != expected {
            return Err(SamplerError::LengthMismatch {
                what: "processed logits",
                expected,
                got: processed_logits.len(),
            });
        }
        Self::check_positions(out.len())?;
        let c3 = Self::step_word(TAG_SAMPLE, step)?;
        let block = Self::block_u32(block)?;
        let key = self.key();
        let results: Vec<Result<u32>> = processed_logits
            .par_chunks(vocab)
            .enumerate()
            .map(|(pos, row)| gumbel_argmax(row, key, pos as u32, block, c3, pos))
            .collect();
        for (o, r) in out.iter_mut().zip(results) {
            *o = r?;
        }
        Ok(())
    }

    fn renoise(&mut self, block: usize, step: usize, out: &mut [u32]) -> Result<()> {
        let c3 = Self::step_word(TAG_RENOISE, step)?;
        self.uniform_canvas(block, c3, out)
    }
    fn counter_seed(&self) -> Option<u64> {
        Some(self.seed)
    }
}

/// Recorded draws for one block (canvas).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TapeBlock {
    /// The initial canvas.
    pub init: Vec<u32>,
    /// Per executed step (index 0 = first step): `(sample, renoise)`.
    pub steps: Vec<(Vec<u32>, Vec<u32>)>,
}

/// Replays recorded draws (see the module docs). The logits passed to `sample` are ignored
/// apart from their shape; recorded samples must lie inside `0..vocab`.
#[derive(Debug, Clone, Default)]
pub struct TapeNoise {
    blocks: Vec<TapeBlock>,
}

impl TapeNoise {
    /// A tape with one entry per block.
    pub fn new(blocks: Vec<TapeBlock>) -> Self {
        Self { blocks }
    }

    /// The recorded blocks.
    pub fn blocks(&self) -> &[TapeBlock] {
        &self.blocks
    }

    fn step_entry(
        &self,
        what: &'static str,
        block: usize,
        step: usize,
    ) -> Result<&(Vec<u32>, Vec<u32>)> {
        self.blocks
            .get(block)
            .and_then(|b| b.steps.get(step))
            .ok_or(SamplerError::TapeMissing {
                what,
                block,
                step: Some(step),
            })
    }
}

fn copy_recorded(what: &'static str, src: &[u32], out: &mut [u32]) -> Result<()> {
    if src.len() != out.len() {
        return Err(SamplerError::LengthMismatch {
            what,
            expected: out.len(),
            got: src.len(),
        });
    }
    out.copy_from_slice(src);
    Ok(())
}

impl NoiseSource for TapeNoise {
    fn init_canvas(&mut self, block: usize, out: &mut [u32]) -> Result<()> {
        let b = self.blocks.get(block).ok_or(SamplerError::TapeMissing {
            what: "init",
            block,
            step: None,
        })?;
        copy_recorded("tape init canvas", &b.init, out)
    }

    fn sample(
        &mut self,
        block: usize,
        step: usize,
        processed_logits: &[f32],
        vocab: usize,
        out: &mut [u32],
    ) -> Result<()> {
        if vocab == 0 {
            return Err(SamplerError::Empty("vocabulary"));
        }
        let expected = out
            .len()
            .checked_mul(vocab)
            .ok_or(SamplerError::CounterOverflow(
                "canvas * vocab overflows".into(),
            ))?;
        if processed_logits.len() != expected {
            return Err(SamplerError::LengthMismatch {
                what: "processed logits",
                expected,
                got: processed_logits.len(),
            });
        }
        let (sample, _) = self.step_entry("sample", block, step)?;
        if let Some((position, &token)) = sample
            .iter()
            .enumerate()
            .find(|(_, &t)| t as usize >= vocab)
        {
            return Err(SamplerError::TokenOutOfRange {
                position,
                token,
                vocab,
            });
        }
        copy_recorded("tape sample", sample, out)
    }

    fn renoise(&mut self, block: usize, step: usize, out: &mut [u32]) -> Result<()> {
        let (_, renoise) = self.step_entry("renoise", block, step)?;
        copy_recorded("tape renoise canvas", renoise, out)
    }
}
