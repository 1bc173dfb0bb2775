//! The interface between the generation engine and a model executor (CPU now, CUDA later).
//!
//! A backend owns one sequence's KV cache and runs the two kinds of forward pass of
//! DiffusionGemma (model-spec sections 3.6 and 3.7):
//!
//! * `encode`: the causal encoder over clean tokens (the prompt, then each committed canvas).
//!   It appends K/V to the cache at positions `cache_len() .. cache_len() + ids.len()`.
//! * `denoise`: the bidirectional decoder over one canvas at positions
//!   `cache_len() .. cache_len() + canvas.len()`. It reads the cache and never writes it, and
//!   returns the softcapped float32 logits `[C, V]` (before temperature).
//!
//! The sampler stays outside the backend so every backend is checked against the same one.
//! A backend on an accelerator may also offer [`DeviceSampling`]: the decoder pass and the
//! sampler step of counter-based noise run together on the device, and only a few status words
//! come back per step instead of the `[C, V]` logits (the engine uses it when it can and checks
//! it against the host sampler in tests).

use crate::error::Result;

/// Numeric mode of a forward pass.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Precision {
    /// Weights widened to float32, every intermediate in float32 (transformers' float32 run).
    F32,
    /// Rounds to bfloat16 wherever transformers' bfloat16 run stores a tensor.
    Bf16,
}

impl Precision {
    /// Parses the `dtype` string a reference case file carries (`"float32"` or `"bfloat16"`).
    pub fn from_dtype_name(name: &str) -> Option<Precision> {
        match name {
            "float32" | "f32" | "fp32" => Some(Precision::F32),
            "bfloat16" | "bf16" => Some(Precision::Bf16),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Precision::F32 => "float32",
            Precision::Bf16 => "bfloat16",
        }
    }
}

/// A model executor holding the KV cache of one sequence.
pub trait Backend {
    /// Short name for logs and errors ("cpu", "cuda").
    fn name(&self) -> &str;

    /// Tokens already in the KV cache (the next position to be written).
    fn cache_len(&self) -> usize;

    /// Drops the KV cache.
    fn reset(&mut self);

    /// Encoder pass: appends `ids` to the cache at positions `cache_len()..`.
    fn encode(&mut self, ids: &[u32]) -> Result<()>;

    /// Decoder pass over `canvas` at positions `cache_len()..`. `sc_logits` are the previous
    /// step's processed logits `[C, V]` (already rounded to the embedding dtype), or `None` on
    /// the first step of a canvas. Writes softcapped float32 logits `[C, V]` into `logits`.
    fn denoise(&mut self, canvas: &[u32], sc_logits: Option<&[f32]>, logits: &mut [f32]) -> Result<()>;

    /// The on-device sampler, when this backend has one (`None`: sample on the host).
    fn device_sampling(&mut self) -> Option<&mut dyn DeviceSampling> {
        None
    }
}

/// Per-canvas settings of an on-device sampler step: the counter-based noise key and the
/// sampler thresholds (dgemma-sampler's `SeededNoise` and `SamplerSettings`, model-spec 4).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DeviceCanvas {
    /// `SeededNoise`'s seed.
    pub seed: u64,
    /// Canvas (block) index: the noise counter's block word.
    pub block: usize,
    pub entropy_bound: f32,
    pub confidence_threshold: f32,
    pub stability_threshold: usize,
}

/// What one on-device step reports (the only values read back per step).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DeviceStepStatus {
    /// Stable and confident: the canvas stops after this step.
    pub finished: bool,
    /// Positions accepted this step.
    pub accepted: usize,
    /// float32 mean entropy of the step (the confidence statistic).
    pub mean_entropy: f32,
}

/// A denoising loop kept on the device: the canvas, the self-conditioning input and the
/// stability history never leave it. Reproduces the host sampler with `SeededNoise` and
/// `TorchDevice::Cuda` arithmetic bit for bit given the same entropies (which the device computes
/// to ~1e-6 relative of the host's).
pub trait DeviceSampling {
    /// Starts a canvas at the cache's end: `canvas` is its initial noise (the host's
    /// `SeededNoise::init_canvas`).
    fn begin_canvas(&mut self, canvas: &[u32], settings: DeviceCanvas) -> Result<()>;

    /// Step `step` of the current canvas (0 = the first, which has no self-conditioning input)
    /// at temperature `temperature`: the decoder pass, the sampler step (sample, accept,
    /// renoise, stopping) and the next step's canvas and self-conditioning input, all on the
    /// device. A sampler error (NaN entropy, a non-finite logits row) is an error.
    fn step(&mut self, step: usize, temperature: f32) -> Result<DeviceStepStatus>;

    /// The argmax canvas of the last step (what a commit writes), `[C]`.
    fn read_argmax(&mut self, out: &mut [u32]) -> Result<()>;
}
