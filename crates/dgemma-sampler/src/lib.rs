//! dgemma-sampler: the per-step sampler of DiffusionGemma's block-diffusion loop.
//!
//! Everything here mirrors `transformers/models/diffusion_gemma/generation_diffusion_gemma.py`
//! (transformers 5.23), see `docs/model-spec.md` sections 4 and 5:
//!
//! | module | idea | HF counterpart |
//! |---|---|---|
//! | [`schedule`] | linear temperature `T(cur_step)` and `processed = logits / T` | `LinearTemperatureScheduleLogitsProcessor.__call__` |
//! | [`mod@entropy`] | argmax, softmax, logsumexp and the entropy of `Categorical(logits=row)` | `torch.distributions.Categorical.entropy`, `torch.argmax` |
//! | [`accept`] | entropy-bound acceptance mask | `EntropyBoundSampler.accept_canvas` |
//! | [`stopping`] | stable-and-confident adaptive stop | `StableAndConfidentStoppingCriteria` |
//! | [`rng`] | Philox4x32-10, portable `ln`, Gumbel and uniform-id transforms | (replaces the torch global RNG) |
//! | [`noise`] | [`NoiseSource`]: seeded (counter-based) and tape (replayed) randomness | `initialize_canvas`, `torch.multinomial`, `renoise_canvas` |
//! | [`step`] | one whole denoising step | `_denoising_step` (sampler part) |
//!
//! The crate does not depend on any other dgemma crate: the engine fills [`SamplerSettings`] from
//! the generation config and calls [`denoise_step`] (or [`Sampler::step`]) once per decoder pass.

pub mod accept;
pub mod entropy;
pub mod error;
pub mod noise;
pub mod rng;
pub mod schedule;
pub mod step;
pub mod stopping;

pub use accept::{accept_mask, accept_mask_on, AcceptScratch};
pub use entropy::{argmax, entropy, entropy_with_scratch, logsumexp, softmax};
pub use error::{Result, SamplerError};
pub use noise::{NoiseSource, SeededNoise, TapeBlock, TapeNoise};
pub use schedule::{apply_temperature, temperature, temperature_on, TorchDevice};
pub use step::{denoise_step, denoise_step_in_place, Sampler, SamplerSettings, StepOutcome};
pub use stopping::StableAndConfident;
