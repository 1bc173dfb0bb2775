//! [`DeviceSampling`] for [`GpuBackend`], and batched device steps over several sequences
//! ([`GpuBackend::step_batch`]): the decoder pass over their canvases, then each one's sampler
//! launches, recorded once per batch composition and replayed; [`GpuBackend::step_mixed`] adds
//! other sequences' encoder work (prompt chunks, commits) to the same pass.

use dgemma_cuda::{ops, Executor};
use dgemma_model::error::{Error, Result};
use dgemma_model::{DeviceCanvas, DeviceSampling, DeviceStepStatus};

use super::{DeviceCanvasState, GpuBackend};
use crate::error::{backend_error, cuda};

impl<X: Executor> GpuBackend<X> {
    /// One device step for each `(sequence, step, temperature)`, all in one decoder pass (up to
    /// `max_batch` sequences, each at its cache's end, each with a canvas begun by
    /// `begin_canvas`). Returns each sequence's own result, in order: a sampler error (a NaN
    /// entropy, a non-finite logits row) is that sequence's error and ends its canvas, the others
    /// go on. The outer error is a failure of the whole pass (bad arguments, a device error).
    pub fn step_batch(&mut self, steps: &[(usize, usize, f32)]) -> Result<Vec<Result<DeviceStepStatus>>> {
        self.step_mixed(steps, &[])
    }

    /// [`step_batch`](Self::step_batch) that also encodes `encodes`, `(sequence, ids)`, each at
    /// its sequence's cache end, in the same decoder pass: a prompt chunk of up to
    /// `max(prefill_chunk, canvas)` tokens or a committed canvas, read with the canvases' one
    /// read of the weights. Each sequence's cache then holds what [`Backend::encode`] would have
    /// written, bit for bit (its canvas, if any, must be begun again). A sequence appears once
    /// in the pass; all the encoder rows together fit in `max(prefill_chunk, canvas)`.
    pub fn step_mixed(&mut self, steps: &[(usize, usize, f32)], encodes: &[(usize, &[u32])]) -> Result<Vec<Result<DeviceStepStatus>>> {
        let seqs: Vec<usize> = steps.iter().map(|s| s.0).collect();
        let mut tokens = None;
        let mut params = Vec::with_capacity(steps.len());
        for &(seq, step, temperature) in steps {
            self.check_sequence(seq)?;
            let Some(state) = self.seqs[seq].device_canvas else {
                return Err(Error::InvalidArgument(format!(
                    "device sampler: sequence {seq} has no canvas begun at its cache's end (begin_canvas after every encode)"
                )));
            };
            if *tokens.get_or_insert(state.tokens) != state.tokens {
                return Err(Error::InvalidArgument("device sampler: a batch's canvases must have one length".into()));
            }
            if !(temperature.is_finite() && temperature > 0.0) {
                return Err(Error::InvalidArgument(format!("device sampler: temperature {temperature}")));
            }
            let Some(step32) = u32::try_from(step).ok().filter(|&x| x < 1 << 24) else {
                return Err(Error::InvalidArgument(format!("device sampler: step {step} is over 2^24")));
            };
            let s = state.settings;
            params.push(ops::SamplerParams {
                seed: s.seed,
                block: s.block as u32,
                step: step32,
                temperature,
                entropy_bound: s.entropy_bound,
                confidence_threshold: s.confidence_threshold,
                stability_threshold: s.stability_threshold as u32,
            });
        }
        let Some(tokens) = tokens else {
            return match encodes {
                [] => Ok(Vec::new()),
                _ => Err(Error::InvalidArgument("a mixed pass needs at least one device step (encode alone instead)".into())),
            };
        };
        if steps.len() > self.sampler.slots {
            return Err(Error::InvalidInput(format!(
                "a decoder pass over {} canvases: this backend was sized for at most {} (GpuOptions::max_batch)",
                steps.len(),
                self.sampler.slots
            )));
        }
        let encoded = self.stage_encodes(&seqs, tokens, encodes)?;
        // One upload of every canvas's params, slot i for the i-th canvas of the pass.
        self.sampler.write_params(&mut self.exec, &params)?;
        // Step 0 has no self-conditioning input; later steps read the one the last step wrote.
        let key = self.pass_key(&seqs, tokens, |i| steps[i].1 > 0, true)?;
        self.run_pass(key, &encoded)?;
        for &(seq, n) in &encoded {
            // The cache moved: as after `encode`.
            self.seqs[seq].len += n;
            self.seqs[seq].device_canvas = None;
            self.forget_recordings_of(seq);
        }
        for (i, &seq) in seqs.iter().enumerate() {
            if let Some(state) = self.seqs[seq].device_canvas.as_mut() {
                state.argmax_row0 = Some((i * tokens, self.passes));
            }
        }
        // One read of every canvas's status.
        let statuses = self.sampler.read_status(&mut self.exec, steps.len())?;
        let mut out = Vec::with_capacity(steps.len());
        for (&(seq, step, _), status) in steps.iter().zip(statuses) {
            self.device_steps += 1;
            if status.error != 0 {
                // The canvas on the device is not a valid next canvas any more.
                let block = self.seqs[seq].device_canvas.map_or(0, |s| s.settings.block);
                self.seqs[seq].device_canvas = None;
                out.push(Err(sampler_status_error(status.error, seq, step, block)));
                continue;
            }
            out.push(Ok(DeviceStepStatus {
                finished: status.finished,
                accepted: status.accepted as usize,
                mean_entropy: status.mean_entropy,
            }));
        }
        Ok(out)
    }

    /// Checks the encoder segments of a mixed pass whose decoder rows are `seqs.len()` canvases
    /// of `tokens`, and uploads their ids after those rows of `ws.ids`: (sequence, tokens) each.
    fn stage_encodes(&mut self, seqs: &[usize], tokens: usize, encodes: &[(usize, &[u32])]) -> Result<Vec<(usize, usize)>> {
        let budget = self.options.prefill_chunk.max(self.options.canvas);
        let total: usize = encodes.iter().map(|e| e.1.len()).sum();
        if total > budget {
            return Err(Error::InvalidInput(format!(
                "a mixed pass encoding {total} tokens: this backend takes at most {budget} (max(prefill_chunk, canvas)) besides its canvases"
            )));
        }
        let mut row = seqs.len() * tokens;
        let mut out = Vec::with_capacity(encodes.len());
        for (i, &(seq, ids)) in encodes.iter().enumerate() {
            self.check_sequence(seq)?;
            if seqs.contains(&seq) || encodes[..i].iter().any(|e| e.0 == seq) {
                return Err(Error::InvalidArgument(format!("sequence {seq} appears twice in one decoder pass")));
            }
            if ids.is_empty() {
                return Err(Error::InvalidInput(format!("sequence {seq}: an empty encoder segment")));
            }
            self.check_ids_of(seq, ids, "the encoder input")?;
            let dst = self.ws.ids.sub(4 * row, 4 * ids.len()).map_err(cuda)?;
            self.upload_ids(dst, ids)?;
            out.push((seq, ids.len()));
            row += ids.len();
        }
        Ok(out)
    }

    /// The argmax canvas of sequence `seq`'s last device step (readable until the next
    /// decoder pass, which reuses the sampler scratch).
    pub fn read_argmax_of(&mut self, seq: usize, out: &mut [u32]) -> Result<()> {
        self.check_sequence(seq)?;
        let Some(DeviceCanvasState { tokens: c, argmax_row0: Some((row0, pass)), .. }) = self.seqs[seq].device_canvas else {
            return Err(Error::InvalidArgument("device sampler: no device step to read the argmax of".into()));
        };
        if pass != self.passes {
            return Err(Error::InvalidArgument(
                "device sampler: a later decoder pass overwrote this sequence's argmax; read it right after its step".into(),
            ));
        }
        if out.len() != c {
            return Err(Error::InvalidInput(format!("argmax buffer holds {} ids, the canvas has {c}", out.len())));
        }
        let src = self.sampler.argmax.sub(4 * row0, 4 * c).map_err(cuda)?;
        let mut ids = vec![0i32; c];
        self.exec.download_bytes(src, bytemuck::cast_slice_mut(&mut ids)).map_err(cuda)?;
        let vocab = self.cfg.vocab_size;
        for (o, &id) in out.iter_mut().zip(&ids) {
            *o = u32::try_from(id)
                .ok()
                .filter(|&x| (x as usize) < vocab)
                .ok_or_else(|| backend_error(format!("device sampler: argmax id {id} outside the vocabulary")))?;
        }
        Ok(())
    }
}

impl<X: Executor> DeviceSampling for GpuBackend<X> {
    fn begin_canvas(&mut self, canvas: &[u32], settings: DeviceCanvas) -> Result<()> {
        self.seq_mut().device_canvas = None;
        self.check_ids(canvas, "the canvas")?;
        self.check_canvas_len(canvas.len())?;
        let bad = |what: String| Err(Error::InvalidArgument(format!("device sampler: {what}")));
        if !(settings.entropy_bound.is_finite() && settings.entropy_bound > 0.0) {
            return bad(format!("entropy_bound must be a finite float > 0, got {}", settings.entropy_bound));
        }
        if settings.confidence_threshold.is_nan() {
            return bad("confidence_threshold is NaN".into());
        }
        if u32::try_from(settings.block).is_err() || u32::try_from(settings.stability_threshold).is_err() {
            return bad(format!(
                "block {} and stability_threshold {} must fit in 32 bits",
                settings.block, settings.stability_threshold
            ));
        }
        let inputs = self.seq().inputs;
        self.upload_ids(inputs.canvas, canvas)?;
        self.seq_mut().device_canvas = Some(DeviceCanvasState { settings, tokens: canvas.len(), argmax_row0: None });
        Ok(())
    }

    fn step(&mut self, step: usize, temperature: f32) -> Result<DeviceStepStatus> {
        self.step_batch(&[(self.current, step, temperature)])?.remove(0)
    }

    fn read_argmax(&mut self, out: &mut [u32]) -> Result<()> {
        self.read_argmax_of(self.current, out)
    }
}

/// The error a sampler status word reports (the host sampler's errors, in words).
fn sampler_status_error(bits: u32, seq: usize, step: usize, block: usize) -> Error {
    let mut why = Vec::new();
    if bits & ops::SAMPLER_ERR_NAN_ENTROPY != 0 {
        why.push("an entropy is NaN");
    }
    if bits & (ops::SAMPLER_ERR_SAMPLE | ops::SAMPLER_ERR_ARGMAX) != 0 {
        why.push("a logits row holds NaN or +inf, or only -inf");
    }
    if bits & ops::SAMPLER_ERR_PARAMS != 0 {
        why.push("the sampler params are out of range");
    }
    backend_error(format!(
        "device sampler, sequence {seq} canvas {block} step {step}: {} (status bits {bits:#x})",
        why.join("; ")
    ))
}
