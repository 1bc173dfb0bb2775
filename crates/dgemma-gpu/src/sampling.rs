//! The denoising step's sampler on the device (model-spec 4, `csrc/sampler.cuh`,
//! `csrc/row_softmax.cuh`): three launches appended to a decoder pass, so that a recorded step
//! runs the forward, the sampler and the next step's inputs with nothing read back but
//! [`SAMPLER_STATUS_WORDS`] words.
//!
//! ```text
//! x = LM head output [C, V] bf16; every kernel below recomputes P = softcap(x) / T (T = params[4])
//! --row_softmax_entropy_argmax--> argmax [C], entropy [C], softmax statistics of bf16(P) [C, 2]
//! --gumbel_sample(seed, block, step)--> sampled [C]           (SeededNoise::sample)
//! --sampler_canvas--> canvas = next canvas (the sequence's next decoder input), accepted
//!                     mask, the sequence's stability history, status [finished, accepted,
//!                     mean entropy, error]
//! --soft_embedding--> soft = round(round(softmax(bf16(P))) @ E) * round(sqrt(H)) [C, hidden],
//!                     the next step's self-conditioning input, into the sequence's DecoderInputs
//!                     (three launches: the probabilities into a one-canvas scratch, a split-K
//!                     tensor-core GEMM, a fixed-order reduction; csrc/soft_embedding.cuh)
//! ```
//!
//! No per-canvas `[C, V]` buffer but the bf16 logits exists: a canvas in flight costs 2 bytes per
//! vocabulary entry and position (134 MB for the 26B model) plus its 1.4 MB soft embedding, not
//! the fp32 logits, processed logits, bf16 copies and probabilities (about 0.8 GB) of a
//! straightforward implementation. The soft embedding's probabilities (bf16, 134 MB) live in one
//! workspace scratch shared by every sequence, since soft embeddings run one sequence at a time.
//!
//! Everything that changes between steps (block, step, temperature) and between requests
//! (seed, thresholds) is read on the device from the params buffer, so one recording per
//! (canvas length, position, self-conditioning) serves every step of a canvas.
//!
//! Params and status live in per-slot arrays, slot i for the i-th canvas of a batched pass:
//! a step of B canvases is one upload of B x 32 bytes, a replay, and one read of B x 16 bytes,
//! whatever B is (two host synchronisations per batched step, not 2B).

use dgemma_cuda::ops::{self, SamplerParams, SAMPLER_PARAMS_WORDS, SAMPLER_STATUS_WORDS};
use dgemma_cuda::{Executor, Region, Step};

use crate::error::{cuda, Result};
use crate::plan::{DecoderInputs, Planner};

/// The sampler's scratch for decoder passes of up to `rows` canvas positions (all the
/// canvases of a batched pass, side by side); each sequence's own state is [`SamplerState`].
pub struct SamplerBuffers {
    pub rows: usize,
    /// First argmax per position, i32 `[canvas]`: the draft, and the commit after the last step.
    pub argmax: Region,
    /// Entropy per position, f32 `[canvas]`.
    pub entropy: Region,
    /// The categorical draw per position, i32 `[canvas]`.
    pub sampled: Region,
    /// Acceptance mask, i32 `[rows]`.
    pub accepted: Region,
    /// Batch slots (the most canvases one pass holds).
    pub slots: usize,
    /// [`SamplerParams`] words (u32) `[slots, SAMPLER_PARAMS_WORDS]`, written by the host
    /// before each step; slot i belongs to the pass's i-th canvas.
    pub params: Region,
    /// [`ops::SamplerStatus`] words `[slots, SAMPLER_STATUS_WORDS]`: the only per-step read-back.
    pub status: Region,
}

impl SamplerBuffers {
    pub fn new(exec: &mut dyn Executor, rows: usize, slots: usize) -> Result<SamplerBuffers> {
        let mut alloc = |bytes: usize, what: &str| exec.alloc(bytes, what).map_err(cuda);
        Ok(SamplerBuffers {
            slots,
            params: alloc(4 * SAMPLER_PARAMS_WORDS * slots, "sampler params")?,
            status: alloc(4 * SAMPLER_STATUS_WORDS * slots, "sampler status")?,
            rows,
            argmax: alloc(4 * rows, "argmax canvas")?,
            entropy: alloc(4 * rows, "entropies")?,
            sampled: alloc(4 * rows, "sampled canvas")?,
            accepted: alloc(4 * rows, "acceptance mask")?,
        })
    }
}

impl SamplerBuffers {
    /// Writes the params of slots `0..params.len()` in one upload (ordered before the next
    /// replay).
    pub fn write_params(&self, exec: &mut dyn Executor, params: &[SamplerParams]) -> Result<()> {
        let words: Vec<u32> = params.iter().flat_map(|p| p.to_words()).collect();
        let dst = self.params.sub(0, 4 * words.len()).map_err(cuda)?;
        exec.upload_bytes(dst, bytemuck::cast_slice(&words)).map_err(cuda)
    }

    /// Reads the status of slots `0..n` of the last step in one download (synchronises with
    /// the device).
    pub fn read_status(&self, exec: &mut dyn Executor, n: usize) -> Result<Vec<ops::SamplerStatus>> {
        let mut words = vec![0u32; SAMPLER_STATUS_WORDS * n];
        let src = self.status.sub(0, 4 * words.len()).map_err(cuda)?;
        exec.download_bytes(src, bytemuck::cast_slice_mut(&mut words)).map_err(cuda)?;
        Ok(words
            .chunks_exact(SAMPLER_STATUS_WORDS)
            .map(|w| ops::SamplerStatus::from_words(w.try_into().expect("chunks of SAMPLER_STATUS_WORDS")))
            .collect())
    }

    fn slot(&self, region: Region, words: usize, slot: usize) -> Result<ops::Buf> {
        region.sub(4 * words * slot, 4 * words).map_err(cuda).map(Region::b32)
    }
}

/// One sequence's sampler state on the device.
#[derive(Clone, Copy, Debug)]
pub struct SamplerState {
    /// Previous argmax canvas and its run length, i32 `[canvas + 1]` (owned by the kernel).
    pub history: Region,
}

impl SamplerState {
    pub fn new(exec: &mut dyn Executor, canvas: usize) -> Result<SamplerState> {
        Ok(SamplerState { history: exec.alloc(Self::bytes(canvas), "stability history").map_err(cuda)? })
    }

    /// Bytes [`SamplerState::new`] allocates.
    pub fn bytes(canvas: usize) -> usize {
        4 * (canvas + 1)
    }
}

/// The sampler launches for one sequence whose canvas is rows `row0 .. row0 + tokens` of the
/// decoder pass just planned and batch slot `slot`: reads those `ws.logits_bf16` rows and the
/// slot's params, writes the sequence's `inputs` (the next canvas, and the soft embedding of
/// bf16(P) as the next step's self-conditioning input), its `state` (history) and the slot's
/// status.
pub fn plan_sampler_step(
    p: &Planner,
    sb: &SamplerBuffers,
    inputs: DecoderInputs,
    state: SamplerState,
    slot: usize,
    row0: usize,
    tokens: usize,
) -> Result<Vec<Step>> {
    let launch = |p: dgemma_cuda::Result<ops::LaunchPlan>| p.map(Step::Launch).map_err(cuda);
    let (k, ws, vocab) = (p.kernels, p.ws, p.cfg.vocab_size);
    let params = sb.slot(sb.params, SAMPLER_PARAMS_WORDS, slot)?;
    let status = sb.slot(sb.status, SAMPLER_STATUS_WORDS, slot)?;
    let x = ops::ProcessedLogits {
        logits: ws.logits_bf16.sub(2 * row0 * vocab, 2 * tokens * vocab).map_err(cuda)?.b16(),
        cap: p.softcap()?,
        params: Some(params),
    };
    let rows = |r: Region| r.sub(4 * row0, 4 * tokens).map_err(cuda).map(Region::b32);
    let sc_stats = ws.sc_stats.sub(4 * 2 * row0, 4 * 2 * tokens).map_err(cuda)?.b32();
    let next_canvas = inputs.canvas.sub(0, 4 * tokens).map_err(cuda)?.b32();
    let mut steps = vec![
        launch(ops::plan_row_softmax_entropy_argmax(
            &k.row_stats,
            x,
            Some(rows(sb.argmax)?),
            Some(rows(sb.entropy)?),
            Some(sc_stats),
            tokens,
        ))?,
        launch(ops::plan_gumbel_sample(&k.gumbel, x, rows(sb.sampled)?, tokens))?,
        launch(ops::plan_sampler_canvas(
            &k.sampler_canvas,
            params,
            rows(sb.entropy)?,
            rows(sb.sampled)?,
            rows(sb.argmax)?,
            next_canvas,
            rows(sb.accepted)?,
            state.history.b32(),
            status,
            vocab,
            tokens,
        ))?,
    ];
    steps.extend(p.soft_embedding(x, row0, tokens, inputs.soft)?);
    Ok(steps)
}
