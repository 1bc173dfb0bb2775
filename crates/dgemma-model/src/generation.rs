//! `generation_config.json` (transformers `DiffusionGemmaGenerationConfig`).
//!
//! Absent fields (or an absent file) take transformers' defaults
//! (`_get_default_generation_params`): 48 denoising steps, entropy-bound sampler with bound 0.1,
//! temperature schedule 0.8 -> 0.4, stability threshold 1, confidence threshold 0.005. EOS and pad
//! ids fall back to the model config. `max_new_tokens` stays `None` when unset (transformers then
//! uses 256, [`GenerationConfig::DEFAULT_MAX_NEW_TOKENS`]).
//!
//! transformers' constructor raises on any keyword it does not know, so sampling knobs of
//! autoregressive generation (`top_k`, `top_p`, `repetition_penalty`, `temperature`, ...) are
//! rejected here too, as are sampler classes other than `EntropyBoundSamplerConfig`.

use std::path::Path;

use serde_json::{json, Map, Value};

use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::json::{self, describe, Obj};

/// Decoding parameters of the block-diffusion sampler.
#[derive(Clone, Debug, PartialEq)]
pub struct GenerationConfig {
    /// `None` when unset; transformers then generates 256 tokens.
    pub max_new_tokens: Option<usize>,
    /// `max_length` (prompt + generated); transformers uses it only when `max_new_tokens` is
    /// unset or 256.
    pub max_length: Option<usize>,
    /// N, the most denoising steps per canvas.
    pub max_denoising_steps: usize,
    /// `sampler_config.entropy_bound` of the `EntropyBoundSamplerConfig`.
    pub entropy_bound: f64,
    /// Temperature at the last step.
    pub t_min: f64,
    /// Temperature at the first step.
    pub t_max: f64,
    pub stability_threshold: usize,
    pub confidence_threshold: f64,
    pub eos_token_ids: Vec<u32>,
    pub pad_token_id: u32,
}

/// Keys transformers accepts that do not affect this engine.
const IGNORED_KEYS: [&str; 9] = [
    "return_dict_in_generate",
    "cache_implementation",
    "cache_config",
    "disable_compile",
    "bos_token_id",
    "_commit_hash",
    "_from_model_config",
    "transformers_version",
    "max_length",
];

/// Autoregressive sampling knobs that DiffusionGemma's sampler does not have.
const SAMPLING_KEYS: [&str; 14] = [
    "top_k",
    "top_p",
    "min_p",
    "typical_p",
    "epsilon_cutoff",
    "eta_cutoff",
    "repetition_penalty",
    "encoder_repetition_penalty",
    "no_repeat_ngram_size",
    "temperature",
    "do_sample",
    "num_beams",
    "length_penalty",
    "presence_penalty",
];

impl GenerationConfig {
    /// transformers' `max_new_tokens` default.
    pub const DEFAULT_MAX_NEW_TOKENS: usize = 256;
    pub const DEFAULT_MAX_DENOISING_STEPS: usize = 48;
    pub const DEFAULT_ENTROPY_BOUND: f64 = 0.1;
    pub const DEFAULT_T_MIN: f64 = 0.4;
    pub const DEFAULT_T_MAX: f64 = 0.8;
    pub const DEFAULT_STABILITY_THRESHOLD: usize = 1;
    pub const DEFAULT_CONFIDENCE_THRESHOLD: f64 = 0.005;

    /// transformers' defaults, with EOS / pad from the model config.
    pub fn defaults_for(model: &ModelConfig) -> GenerationConfig {
        GenerationConfig {
            max_new_tokens: None,
            max_length: None,
            max_denoising_steps: Self::DEFAULT_MAX_DENOISING_STEPS,
            entropy_bound: Self::DEFAULT_ENTROPY_BOUND,
            t_min: Self::DEFAULT_T_MIN,
            t_max: Self::DEFAULT_T_MAX,
            stability_threshold: Self::DEFAULT_STABILITY_THRESHOLD,
            confidence_threshold: Self::DEFAULT_CONFIDENCE_THRESHOLD,
            eos_token_ids: model.eos_token_ids.clone(),
            pad_token_id: model.text.pad_token_id,
        }
    }

    /// `max_new_tokens`, or transformers' default 256.
    pub fn max_new_tokens_or_default(&self) -> usize {
        self.max_new_tokens.unwrap_or(Self::DEFAULT_MAX_NEW_TOKENS)
    }

    /// Reads `path`; errors name the file.
    pub fn from_file(path: impl AsRef<Path>, model: &ModelConfig) -> Result<GenerationConfig> {
        let path = path.as_ref();
        let value = json::read_file(path)?;
        GenerationConfig::from_value(&value, path, model)
    }

    /// Reads `path` if it exists, else returns [`GenerationConfig::defaults_for`].
    pub fn from_file_or_default(
        path: impl AsRef<Path>,
        model: &ModelConfig,
    ) -> Result<GenerationConfig> {
        let path = path.as_ref();
        if path.exists() {
            GenerationConfig::from_file(path, model)
        } else {
            Ok(GenerationConfig::defaults_for(model))
        }
    }

    /// Parses JSON text; errors name the file as `generation_config.json`.
    pub fn from_json_str(text: &str, model: &ModelConfig) -> Result<GenerationConfig> {
        let file = Path::new("generation_config.json");
        GenerationConfig::from_value(&json::parse(text, file)?, file, model)
    }

    pub fn from_value(value: &Value, file: &Path, model: &ModelConfig) -> Result<GenerationConfig> {
        let g = Obj::new(file, "", value)?;
        let mut cfg = GenerationConfig::defaults_for(model);

        for (key, val) in g.map {
            if val.is_null() {
                continue;
            }
            let known = [
                "max_new_tokens",
                "max_denoising_steps",
                "sampler_config",
                "t_min",
                "t_max",
                "stability_threshold",
                "confidence_threshold",
                "eos_token_id",
                "pad_token_id",
            ];
            if known.contains(&key.as_str()) || IGNORED_KEYS.contains(&key.as_str()) {
                continue;
            }
            if SAMPLING_KEYS.contains(&key.as_str()) {
                return Err(g.err(
                    key,
                    "is not supported: DiffusionGemma's entropy-bound sampler has no top-k / top-p / temperature / repetition-penalty settings (transformers rejects it too)",
                ));
            }
            return Err(g.err(key, "is not a DiffusionGemmaGenerationConfig field (transformers rejects unknown fields)"));
        }

        if let Some(v) = g.opt_usize("max_new_tokens")? {
            if v == 0 {
                return Err(g.err("max_new_tokens", "must be a positive integer, got 0"));
            }
            cfg.max_new_tokens = Some(v);
        }
        if let Some(v) = g.opt_usize("max_length")? {
            if v == 0 {
                return Err(g.err("max_length", "must be a positive integer, got 0"));
            }
            cfg.max_length = Some(v);
        }
        if let Some(v) = g.opt_usize("max_denoising_steps")? {
            if v == 0 {
                return Err(g.err("max_denoising_steps", "must be a positive integer, got 0"));
            }
            cfg.max_denoising_steps = v;
        }
        if let Some(sc) = g.opt_obj("sampler_config")? {
            match sc.opt_str("_cls_name")? {
                Some("EntropyBoundSamplerConfig") => {}
                Some(other) => {
                    return Err(sc.err(
                        "_cls_name",
                        format!(
                            "sampler `{other}` is not supported (only EntropyBoundSamplerConfig)"
                        ),
                    ))
                }
                None => return Err(sc.missing("_cls_name")),
            }
            for key in sc.map.keys() {
                if key != "_cls_name" && key != "entropy_bound" {
                    return Err(sc.err(key, "is not an EntropyBoundSamplerConfig field"));
                }
            }
            let bound = sc
                .opt_f64("entropy_bound")?
                .ok_or_else(|| sc.missing("entropy_bound"))?;
            if bound <= 0.0 {
                return Err(sc.err("entropy_bound", format!("must be > 0, got {bound}")));
            }
            cfg.entropy_bound = bound;
        } else if let Some(v) = g.get("sampler_config") {
            return Err(g.err(
                "sampler_config",
                format!("expected an object, got {}", describe(v)),
            ));
        }
        if let Some(v) = g.opt_f64("t_min")? {
            cfg.t_min = v;
        }
        if let Some(v) = g.opt_f64("t_max")? {
            cfg.t_max = v;
        }
        if cfg.t_min < 0.0 {
            return Err(g.err("t_min", format!("must be >= 0, got {}", cfg.t_min)));
        }
        if cfg.t_max <= cfg.t_min {
            return Err(g.err(
                "t_max",
                format!(
                    "must be greater than t_min ({} <= {})",
                    cfg.t_max, cfg.t_min
                ),
            ));
        }
        if let Some(v) = g.opt_usize("stability_threshold")? {
            cfg.stability_threshold = v;
        }
        if let Some(v) = g.opt_f64("confidence_threshold")? {
            if v <= 0.0 {
                return Err(g.err("confidence_threshold", format!("must be > 0, got {v}")));
            }
            cfg.confidence_threshold = v;
        }
        if let Some(ids) = g.opt_id_list("eos_token_id")? {
            cfg.eos_token_ids = ids;
        }
        if let Some(id) = g.opt_u32("pad_token_id")? {
            cfg.pad_token_id = id;
        }
        let vocab = model.text.vocab_size;
        for &id in cfg
            .eos_token_ids
            .iter()
            .chain(std::iter::once(&cfg.pad_token_id))
        {
            if id as usize >= vocab {
                return Err(Error::config(
                    file,
                    format!("token id {id} (eos_token_id / pad_token_id) is outside the vocabulary (vocab_size {vocab})"),
                ));
            }
        }
        Ok(cfg)
    }

    /// `generation_config.json` as the conversion script writes it.
    pub fn to_json(&self) -> Value {
        let mut m = Map::new();
        m.insert(
            "confidence_threshold".into(),
            json!(self.confidence_threshold),
        );
        m.insert("eos_token_id".into(), json!(self.eos_token_ids));
        m.insert(
            "max_denoising_steps".into(),
            json!(self.max_denoising_steps),
        );
        if let Some(v) = self.max_length {
            m.insert("max_length".into(), json!(v));
        }
        if let Some(v) = self.max_new_tokens {
            m.insert("max_new_tokens".into(), json!(v));
        }
        m.insert("pad_token_id".into(), json!(self.pad_token_id));
        m.insert(
            "sampler_config".into(),
            json!({"_cls_name": "EntropyBoundSamplerConfig", "entropy_bound": self.entropy_bound}),
        );
        m.insert(
            "stability_threshold".into(),
            json!(self.stability_threshold),
        );
        m.insert("t_max".into(), json!(self.t_max));
        m.insert("t_min".into(), json!(self.t_min));
        m.insert("transformers_version".into(), json!("5.23.0"));
        Value::Object(m)
    }
}
