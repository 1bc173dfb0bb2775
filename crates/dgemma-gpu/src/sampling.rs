//! The denoising step's sampler on the device (model-spec 4, `csrc/sampler.cuh`,
//! `csrc/row_softmax.cuh`): three launches appended to a decoder pass, so that a recorded step
//! runs the forward, the sampler and the next step's inputs with nothing read back but
//! [`SAMPLER_STATUS_WORDS`] words.
//!
//! ```text
//! logits [C, V] f32 (softcapped) --row_softmax_entropy_argmax(T = params[4])-->
//!     processed P = logits / T [C, V] f32, sc_logits = bf16(P) (the next step's
//!     self-conditioning input, written into the sequence's DecoderInputs), argmax [C],
//!     entropy [C]
//! --gumbel_sample(seed, block, step)--> sampled [C]           (SeededNoise::sample)
//! --sampler_canvas--> canvas = next canvas (the sequence's next decoder input), accepted
//!                     mask, the sequence's stability history, status [finished, accepted,
//!                     mean entropy, error]
//! ```
//!
//! Everything that changes between steps (block, step, temperature) and between requests
//! (seed, thresholds) is read on the device from the params buffer, so one recording per
//! (canvas length, position, self-conditioning) serves every step of a canvas.

use dgemma_cuda::ops::{self, SamplerParams, SAMPLER_PARAMS_WORDS, SAMPLER_STATUS_WORDS};
use dgemma_cuda::{Executor, Region, Step};

use crate::error::{cuda, Result};
use crate::kernels::Kernels;
use crate::plan::{DecoderInputs, Workspace};

/// The sampler's scratch for decoder passes of up to `rows` canvas positions (all the
/// canvases of a batched pass, side by side); each sequence's own state is [`SamplerState`].
pub struct SamplerBuffers {
    pub rows: usize,
    /// `P = logits / T`, f32 `[rows, V]` (read by the categorical draw).
    pub processed: Region,
    /// First argmax per position, i32 `[canvas]`: the draft, and the commit after the last step.
    pub argmax: Region,
    /// Entropy per position, f32 `[canvas]`.
    pub entropy: Region,
    /// The categorical draw per position, i32 `[canvas]`.
    pub sampled: Region,
    /// Acceptance mask, i32 `[rows]`.
    pub accepted: Region,
}

impl SamplerBuffers {
    pub fn new(exec: &mut dyn Executor, rows: usize, vocab: usize) -> Result<SamplerBuffers> {
        let mut alloc = |bytes: usize, what: &str| exec.alloc(bytes, what).map_err(cuda);
        Ok(SamplerBuffers {
            rows,
            processed: alloc(4 * rows * vocab, "processed logits")?,
            argmax: alloc(4 * rows, "argmax canvas")?,
            entropy: alloc(4 * rows, "entropies")?,
            sampled: alloc(4 * rows, "sampled canvas")?,
            accepted: alloc(4 * rows, "acceptance mask")?,
        })
    }
}

/// One sequence's sampler state on the device.
#[derive(Clone, Copy, Debug)]
pub struct SamplerState {
    /// [`SamplerParams`] words (u32), written by the host before each step.
    pub params: Region,
    /// [`ops::SamplerStatus`] words, the only per-step read-back.
    pub status: Region,
    /// Previous argmax canvas and its run length, i32 `[canvas + 1]` (owned by the kernel).
    pub history: Region,
}

impl SamplerState {
    pub fn new(exec: &mut dyn Executor, canvas: usize) -> Result<SamplerState> {
        let mut alloc = |bytes: usize, what: &str| exec.alloc(bytes, what).map_err(cuda);
        Ok(SamplerState {
            params: alloc(4 * SAMPLER_PARAMS_WORDS, "sampler params")?,
            status: alloc(4 * SAMPLER_STATUS_WORDS, "sampler status")?,
            history: alloc(4 * (canvas + 1), "stability history")?,
        })
    }

    /// Writes the step's params (an ordinary upload, ordered before the next replay).
    pub fn write_params(&self, exec: &mut dyn Executor, p: &SamplerParams) -> Result<()> {
        exec.upload_bytes(self.params, bytemuck::cast_slice(&p.to_words())).map_err(cuda)
    }

    /// Reads the status of the last step (synchronises with the device).
    pub fn read_status(&self, exec: &mut dyn Executor) -> Result<ops::SamplerStatus> {
        let mut w = [0u32; SAMPLER_STATUS_WORDS];
        exec.download_bytes(self.status, bytemuck::cast_slice_mut(&mut w)).map_err(cuda)?;
        Ok(ops::SamplerStatus::from_words(w))
    }
}

/// The sampler launches for one sequence whose canvas is rows `row0 .. row0 + tokens` of the
/// decoder pass just planned: reads those `ws.logits` rows, writes the sequence's `inputs` (bf16
/// P as the self-conditioning input, the next canvas) and its `state` (status, history).
#[allow(clippy::too_many_arguments)]
pub fn plan_sampler_step(
    k: &Kernels,
    ws: &Workspace,
    sb: &SamplerBuffers,
    inputs: DecoderInputs,
    state: SamplerState,
    row0: usize,
    tokens: usize,
    vocab: usize,
) -> Result<Vec<Step>> {
    let launch = |p: dgemma_cuda::Result<ops::LaunchPlan>| p.map(Step::Launch).map_err(cuda);
    let n = tokens * vocab;
    let logits = ws.logits.sub(4 * row0 * vocab, 4 * n).map_err(cuda)?.b32();
    let sc = inputs.sc_logits.sub(0, 2 * n).map_err(cuda)?.b16();
    let processed = sb.processed.sub(4 * row0 * vocab, 4 * n).map_err(cuda)?.b32();
    let rows = |r: Region| r.sub(4 * row0, 4 * tokens).map_err(cuda).map(Region::b32);
    let next_canvas = inputs.canvas.sub(0, 4 * tokens).map_err(cuda)?.b32();
    let history = state.history;
    let params = state.params.b32();
    Ok(vec![
        launch(ops::plan_row_softmax_entropy_argmax(
            &k.row_stats,
            logits,
            params,
            Some(processed),
            Some(sc),
            rows(sb.argmax)?,
            rows(sb.entropy)?,
            tokens,
        ))?,
        launch(ops::plan_gumbel_sample(&k.gumbel, params, processed, rows(sb.sampled)?, tokens))?,
        launch(ops::plan_sampler_canvas(
            &k.sampler_canvas,
            params,
            rows(sb.entropy)?,
            rows(sb.sampled)?,
            rows(sb.argmax)?,
            next_canvas,
            rows(sb.accepted)?,
            history.b32(),
            state.status.b32(),
            vocab,
            tokens,
        ))?,
    ])
}
