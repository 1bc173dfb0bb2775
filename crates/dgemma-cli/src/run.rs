//! `dgemma run`: generate for one prompt, streaming each committed canvas to stdout and the
//! statistics to stderr.

use crate::load::{self, BackendKind, PrecisionArg, QuantArg};
use dgemma_engine::generate::{generate, FinishReason, GenerationSettings, Observer};
use dgemma_sampler::noise::SeededNoise;
use dgemma_tokenizer::{chat_prompt_ids, raw_prompt_ids, ChatTemplate, StreamDecoder, Tokenizer};
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(clap::Args)]
pub struct RunArgs {
    /// The user prompt.
    pub prompt: String,
    /// Checkpoint directory (config.json, safetensors, tokenizer.json). Defaults to the bundled
    /// tiny model (random weights) or $DGEMMA_MODEL.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Tokens to generate (rounded up to whole canvases). Defaults to generation_config.json's
    /// max_new_tokens, and to one canvas when it has none.
    #[arg(long)]
    pub max_new_tokens: Option<usize>,
    /// Most denoising steps per canvas (generation_config.json's max_denoising_steps).
    #[arg(long)]
    pub steps: Option<usize>,
    /// Seed of the sampler's noise: the same seed gives the same output.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Turn on the model's thinking mode in the chat template.
    #[arg(long)]
    pub thinking: bool,
    /// A system prompt.
    #[arg(long)]
    pub system: Option<String>,
    /// Encode the prompt as raw text after <bos>, without the chat template.
    #[arg(long)]
    pub no_chat: bool,
    /// Entropy bound of the sampler's acceptance rule.
    #[arg(long)]
    pub entropy_bound: Option<f32>,
    /// Temperature at the last step.
    #[arg(long)]
    pub t_min: Option<f64>,
    /// Temperature at the first step.
    #[arg(long)]
    pub t_max: Option<f64>,
    /// Steps the argmax canvas must stay unchanged before stopping early.
    #[arg(long)]
    pub stability_threshold: Option<usize>,
    /// Mean entropy under which a stable canvas stops early.
    #[arg(long)]
    pub confidence_threshold: Option<f32>,
    #[arg(long, value_enum, default_value = "cpu")]
    pub backend: BackendKind,
    #[arg(long, value_enum, default_value = "auto")]
    pub precision: PrecisionArg,
    /// How the MoE experts are held: `none` as stored, `fp8` FP8 E4M3 with per-output-channel
    /// scales (quantised at load from a bf16 checkpoint; weight-only, activations stay bf16).
    /// A compressed-tensors FP8 checkpoint's experts are FP8 either way.
    #[arg(long, value_enum, default_value = "none")]
    pub quant: QuantArg,
    /// Print special tokens (EOS, pad, turn markers) in the output.
    #[arg(long)]
    pub show_special: bool,
    /// Show the draft (argmax) canvas after every denoising step on stderr, as it converges.
    #[arg(long)]
    pub visual: bool,
    /// With --backend cuda: run the sampler on the host (the [C, V] logits are read back every
    /// step) instead of on the device. Same outputs up to entropy near-ties; for debugging.
    #[arg(long)]
    pub host_sampler: bool,
}

/// Streams committed canvases as text (and, with `--visual`, every draft on stderr).
struct Printer<'a> {
    decoder: StreamDecoder<'a>,
    error: Option<String>,
    /// Tokenizer and special-token policy for the draft view, when `--visual` is on.
    visual: Option<(&'a Tokenizer, bool)>,
}

impl Observer for Printer<'_> {
    fn on_step(&mut self, block: usize, step: usize, draft: &[u32], accepted: usize) {
        let Some((tok, skip_special)) = self.visual else { return };
        let text = tok.decode(draft, skip_special).unwrap_or_else(|e| format!("<{e}>"));
        let line: String = text.chars().map(|c| if c == '\n' { '⏎' } else { c }).take(100).collect();
        eprintln!("[canvas {block} step {step:>2} accepted {accepted:>3}] {line}");
    }

    fn wants_drafts(&self) -> bool {
        self.visual.is_some()
    }

    fn on_canvas(&mut self, _block: usize, tokens: &[u32]) {
        match self.decoder.push(tokens) {
            Ok(text) => {
                print!("{text}");
                let _ = std::io::stdout().flush();
            }
            Err(e) => self.error = Some(e.to_string()),
        }
    }
}

pub fn run(a: RunArgs) -> Result<ExitCode, Box<dyn std::error::Error>> {
    let dir = a.model.clone().unwrap_or_else(load::default_model_dir);
    let tokenizer = Tokenizer::from_dir(&dir)?;
    let template = ChatTemplate::from_dir(&dir)?;
    let loaded = load::open(&dir, a.quant.into(), a.backend == BackendKind::Cuda)?;
    let cfg = &loaded.checkpoint.config;
    let gen_cfg = &loaded.checkpoint.generation;
    let precision = load::precision(a.precision, &loaded.weights);
    let prompt = if a.no_chat {
        raw_prompt_ids(&tokenizer, &a.prompt)?
    } else {
        chat_prompt_ids(&tokenizer, template.as_ref(), &a.prompt, a.system.as_deref(), a.thinking)?
    };

    let mut settings = GenerationSettings::from_checkpoint(cfg, gen_cfg, precision);
    settings.device_sampling = !a.host_sampler;
    let limit_from_config = a.max_new_tokens.is_none();
    if let Some(n) = a.max_new_tokens {
        settings.max_new_tokens = n;
    }
    let s = &mut settings.sampler;
    if let Some(v) = a.steps {
        s.max_denoising_steps = v;
    }
    if let Some(v) = a.entropy_bound {
        s.entropy_bound = v;
    }
    if let Some(v) = a.t_min {
        s.t_min = v;
    }
    if let Some(v) = a.t_max {
        s.t_max = v;
    }
    if let Some(v) = a.stability_threshold {
        s.stability_threshold = v;
    }
    if let Some(v) = a.confidence_threshold {
        s.confidence_threshold = v;
    }

    let context = prompt.len() + settings.canvases() * settings.canvas_length;
    let mut backend = load::backend(a.backend, &loaded, precision, context)?;

    eprintln!(
        "dgemma: {} | backend {} ({}{}) | prompt {} tokens | up to {} canvas(es) of {} | {} steps max | seed {}",
        dir.display(),
        backend.name(),
        precision.name(),
        if loaded.weights.layers.iter().any(|l| l.experts_gate_up.is_fp8()) { ", fp8 experts" } else { "" },
        prompt.len(),
        settings.canvases(),
        settings.canvas_length,
        settings.sampler.max_denoising_steps,
        a.seed
    );
    let mut noise = SeededNoise::new(a.seed, settings.vocab_size);
    let mut printer = Printer {
        decoder: StreamDecoder::new(&tokenizer, !a.show_special),
        error: None,
        visual: a.visual.then_some((&tokenizer, !a.show_special)),
    };
    let gen = generate(backend.as_mut(), &prompt, &settings, &mut noise, &mut printer)?;
    if let Some(e) = printer.error {
        return Err(e.into());
    }
    // Flush what the decoder held back (a trailing run of byte-fallback tokens).
    println!("{}", printer.decoder.finish()?);

    let st = &gen.stats;
    eprintln!(
        "stats: canvases {} | steps per canvas {:?} | tokens/forward {:.2} | {} tokens in {:.2} s = {:.1} tokens/s | prefill {:.1} ms",
        st.canvases,
        st.steps_per_canvas,
        st.tokens_per_forward(),
        st.new_tokens,
        st.total_time().as_secs_f64(),
        st.tokens_per_second(),
        st.prefill_time.as_secs_f64() * 1e3
    );
    match gen.finish {
        FinishReason::Eos(id) => eprintln!("finished: EOS token {id}"),
        FinishReason::MaxNewTokens if limit_from_config => eprintln!(
            "finished: reached max_new_tokens = {} from generation_config.json without an EOS; \
             pass --max-new-tokens N to generate more",
            settings.max_new_tokens
        ),
        FinishReason::MaxNewTokens => eprintln!("finished: reached --max-new-tokens {}", settings.max_new_tokens),
    }
    Ok(ExitCode::SUCCESS)
}
