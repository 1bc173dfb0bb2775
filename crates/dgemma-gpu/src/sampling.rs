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

/// Device buffers of the sampler for canvases of up to `canvas` positions.
pub struct SamplerBuffers {
    pub canvas: usize,
    /// [`SamplerParams`] words (u32), written by the host before each step.
    pub params: Region,
    /// `P = logits / T`, f32 `[canvas, V]` (read by the categorical draw).
    pub processed: Region,
    /// First argmax per position, i32 `[canvas]`: the draft, and the commit after the last step.
    pub argmax: Region,
    /// Entropy per position, f32 `[canvas]`.
    pub entropy: Region,
    /// The categorical draw per position, i32 `[canvas]`.
    pub sampled: Region,
    /// Acceptance mask, i32 `[canvas]`.
    pub accepted: Region,
    /// [`ops::SamplerStatus`] words, the only per-step read-back.
    pub status: Region,
}

impl SamplerBuffers {
    pub fn new(exec: &mut dyn Executor, canvas: usize, vocab: usize) -> Result<SamplerBuffers> {
        let mut alloc = |bytes: usize, what: &str| exec.alloc(bytes, what).map_err(cuda);
        Ok(SamplerBuffers {
            canvas,
            params: alloc(4 * SAMPLER_PARAMS_WORDS, "sampler params")?,
            processed: alloc(4 * canvas * vocab, "processed logits")?,
            argmax: alloc(4 * canvas, "argmax canvas")?,
            entropy: alloc(4 * canvas, "entropies")?,
            sampled: alloc(4 * canvas, "sampled canvas")?,
            accepted: alloc(4 * canvas, "acceptance mask")?,
            status: alloc(4 * SAMPLER_STATUS_WORDS, "sampler status")?,
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

/// A sequence's stability history for the device sampler: its previous argmax canvas and that
/// canvas's run length, i32 `[canvas + 1]` (owned by `sampler_canvas`).
pub fn alloc_history(exec: &mut dyn Executor, canvas: usize) -> Result<Region> {
    exec.alloc(4 * (canvas + 1), "stability history").map_err(cuda)
}

/// The sampler launches that follow a decoder pass over `tokens` canvas positions: reads
/// `ws.logits`, writes the sequence's `inputs` (bf16 P as the self-conditioning input, the next
/// canvas) and its `history`.
#[allow(clippy::too_many_arguments)]
pub fn plan_sampler_step(
    k: &Kernels,
    ws: &Workspace,
    sb: &SamplerBuffers,
    inputs: DecoderInputs,
    history: Region,
    tokens: usize,
    vocab: usize,
) -> Result<Vec<Step>> {
    let launch = |p: dgemma_cuda::Result<ops::LaunchPlan>| p.map(Step::Launch).map_err(cuda);
    let n = tokens * vocab;
    let logits = ws.logits.sub(0, 4 * n).map_err(cuda)?.b32();
    let sc = inputs.sc_logits.sub(0, 2 * n).map_err(cuda)?.b16();
    let processed = sb.processed.sub(0, 4 * n).map_err(cuda)?.b32();
    let rows = |r: Region| r.sub(0, 4 * tokens).map_err(cuda).map(Region::b32);
    let next_canvas = rows(inputs.canvas)?;
    Ok(vec![
        launch(ops::plan_row_softmax_entropy_argmax(
            &k.row_stats,
            logits,
            sb.params.b32(),
            Some(processed),
            Some(sc),
            rows(sb.argmax)?,
            rows(sb.entropy)?,
            tokens,
        ))?,
        launch(ops::plan_gumbel_sample(&k.gumbel, sb.params.b32(), processed, rows(sb.sampled)?, tokens))?,
        launch(ops::plan_sampler_canvas(
            &k.sampler_canvas,
            sb.params.b32(),
            rows(sb.entropy)?,
            rows(sb.sampled)?,
            rows(sb.argmax)?,
            next_canvas,
            rows(sb.accepted)?,
            history.b32(),
            sb.status.b32(),
            vocab,
            tokens,
        ))?,
    ])
}
