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
}
