//! Error type of the sampler. Every public entry point validates its input and returns one of
//! these instead of panicking.

/// Result alias used across the crate.
pub type Result<T, E = SamplerError> = std::result::Result<T, E>;

/// Everything that can go wrong in the sampler.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SamplerError {
    /// A setting is out of its valid range (see [`crate::SamplerSettings::validate`]).
    #[error("invalid sampler settings: {0}")]
    InvalidSettings(String),

    /// `cur_step` must count down `max_steps..=1`.
    #[error("cur_step {cur_step} is outside 1..={max_steps}")]
    StepOutOfRange { cur_step: usize, max_steps: usize },

    /// The temperature came out non-finite or not positive.
    #[error("temperature {0} is not a finite positive number")]
    BadTemperature(f32),

    /// A buffer has the wrong length.
    #[error("{what}: expected length {expected}, got {got}")]
    LengthMismatch {
        what: &'static str,
        expected: usize,
        got: usize,
    },

    /// An input that must be non-empty is empty (vocab, canvas, entropy list).
    #[error("empty input: {0}")]
    Empty(&'static str),

    /// A logit is NaN or +inf (torch's `Categorical` rejects NaN; +inf makes every entropy NaN).
    #[error("non-finite logit {value} at position {position}, vocab index {index}")]
    NonFiniteLogit {
        position: usize,
        index: usize,
        value: f32,
    },

    /// A row where every logit is -inf has no distribution.
    #[error("row {position} has no finite logit (all -inf)")]
    NoFiniteLogit { position: usize },

    /// An entropy is NaN (only reachable when entropies are supplied by the caller).
    #[error("entropy at position {position} is NaN")]
    NanEntropy { position: usize },

    /// The noise tape has no recording for this draw.
    #[error("noise tape has no {what} entry for block {block}{}", match .step { Some(s) => format!(", step {s}"), None => String::new() })]
    TapeMissing {
        what: &'static str,
        block: usize,
        step: Option<usize>,
    },

    /// A token id is outside `0..vocab`.
    #[error("token {token} at position {position} is outside the vocabulary (size {vocab})")]
    TokenOutOfRange {
        position: usize,
        token: u32,
        vocab: usize,
    },

    /// The logits' vocabulary does not match the noise source's.
    #[error("vocabulary mismatch: noise source has {expected}, logits have {got}")]
    VocabMismatch { expected: usize, got: usize },

    /// A counter field of the seeded generator would overflow (block, step, position or vocab too large).
    #[error("seeded noise counter overflow: {0}")]
    CounterOverflow(String),
}
