//! What a caller asks for: [`Request`], its [`Prompt`] and per-request overrides.

use dgemma_engine::generate::GenerationSettings;

/// The prompt of a request.
#[derive(Clone, Debug, PartialEq)]
pub enum Prompt {
    /// One user turn rendered with the checkpoint's chat template (`add_generation_prompt`),
    /// with an optional system turn and the model's thinking mode.
    Chat {
        user: String,
        system: Option<String>,
        thinking: bool,
    },
    /// `<bos>` followed by the text encoded as is (no chat template).
    Text(String),
    /// Token ids used as they are (they should start with `<bos>`).
    Ids(Vec<u32>),
}

impl Prompt {
    /// A chat prompt with one user turn, no system prompt, thinking off.
    pub fn chat(user: impl Into<String>) -> Prompt {
        Prompt::Chat {
            user: user.into(),
            system: None,
            thinking: false,
        }
    }
}

/// Optional overrides of the checkpoint's sampler settings (`generation_config.json`).
/// `None` keeps the checkpoint's value.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SamplerOverrides {
    /// Entropy bound of the acceptance rule (> 0).
    pub entropy_bound: Option<f32>,
    /// Temperature at the last step (>= 0).
    pub t_min: Option<f64>,
    /// Temperature at the first step (> 0, >= t_min).
    pub t_max: Option<f64>,
    /// Steps the argmax canvas must stay unchanged before stopping early.
    pub stability_threshold: Option<usize>,
    /// Mean entropy under which a stable canvas stops early (`f32::NEG_INFINITY`: never).
    pub confidence_threshold: Option<f32>,
}

/// One generation request. Build it with [`Request::chat`], [`Request::text`] or
/// [`Request::ids`] and the builder methods; every field is public as well.
#[derive(Clone, Debug, PartialEq)]
pub struct Request {
    pub prompt: Prompt,
    /// Tokens to generate, rounded up to whole canvases (`None`: the checkpoint's
    /// `max_new_tokens`, or one canvas when it has none).
    pub max_new_tokens: Option<usize>,
    /// Most denoising steps per canvas (`None`: the checkpoint's `max_denoising_steps`).
    pub max_denoising_steps: Option<usize>,
    pub sampler: SamplerOverrides,
    /// Ids that end the generation when they appear in a committed canvas (`None`: the
    /// checkpoint's EOS ids; `Some(vec![])`: never stop early).
    pub stop_ids: Option<Vec<u32>>,
    /// Seed of the sampler's noise. The same request with the same seed gives the same ids,
    /// whatever else the engine is running.
    pub seed: u64,
    /// Send an [`crate::Event::Draft`] after every denoising step.
    pub stream_drafts: bool,
    /// Leave special tokens (EOS, pad, turn markers) out of the text (default true).
    pub skip_special_tokens: bool,
}

impl Request {
    pub fn new(prompt: Prompt) -> Request {
        Request {
            prompt,
            max_new_tokens: None,
            max_denoising_steps: None,
            sampler: SamplerOverrides::default(),
            stop_ids: None,
            seed: 0,
            stream_drafts: false,
            skip_special_tokens: true,
        }
    }

    /// A chat request with one user turn ([`Prompt::chat`]).
    pub fn chat(user: impl Into<String>) -> Request {
        Request::new(Prompt::chat(user))
    }

    /// A raw-text request ([`Prompt::Text`]).
    pub fn text(text: impl Into<String>) -> Request {
        Request::new(Prompt::Text(text.into()))
    }

    /// A request for these prompt ids ([`Prompt::Ids`]).
    pub fn ids(ids: impl Into<Vec<u32>>) -> Request {
        Request::new(Prompt::Ids(ids.into()))
    }

    pub fn seed(mut self, seed: u64) -> Request {
        self.seed = seed;
        self
    }

    pub fn max_new_tokens(mut self, n: usize) -> Request {
        self.max_new_tokens = Some(n);
        self
    }

    pub fn max_denoising_steps(mut self, n: usize) -> Request {
        self.max_denoising_steps = Some(n);
        self
    }

    pub fn stop_ids(mut self, ids: impl Into<Vec<u32>>) -> Request {
        self.stop_ids = Some(ids.into());
        self
    }

    pub fn stream_drafts(mut self, on: bool) -> Request {
        self.stream_drafts = on;
        self
    }

    pub fn sampler(mut self, overrides: SamplerOverrides) -> Request {
        self.sampler = overrides;
        self
    }

    /// The system prompt of a [`Prompt::Chat`] (ignored for other prompts).
    pub fn system(mut self, system: impl Into<String>) -> Request {
        if let Prompt::Chat { system: s, .. } = &mut self.prompt {
            *s = Some(system.into());
        }
        self
    }

    /// The thinking mode of a [`Prompt::Chat`] (ignored for other prompts).
    pub fn thinking(mut self, on: bool) -> Request {
        if let Prompt::Chat { thinking, .. } = &mut self.prompt {
            *thinking = on;
        }
        self
    }
}

/// A request after validation: the prompt ids and the complete settings the engine will run.
/// [`crate::Engine::prepare`] returns it, so a caller (or a test) can run the same thing
/// elsewhere, e.g. through `dgemma_engine::generate`.
#[derive(Clone, Debug)]
pub struct PreparedRequest {
    pub prompt_ids: Vec<u32>,
    pub settings: GenerationSettings,
    pub seed: u64,
    pub stream_drafts: bool,
    pub skip_special_tokens: bool,
}
