//! Opening a checkpoint and building a backend, shared by the subcommands.

use crate::progress::Progress;
use dgemma_cpu::CpuBackend;
use dgemma_model::checkpoint::Checkpoint;
use dgemma_model::quant::Quant;
use dgemma_model::tensor::DType;
use dgemma_model::weights::ModelWeights;
use dgemma_model::{Backend, Precision};
use std::path::{Path, PathBuf};

/// Checkpoints at least this large get their pages read in up front, with a progress bar.
const PREFETCH_BYTES: u64 = 1 << 30;

/// The model used when `--model` is not given: `$DGEMMA_MODEL`, else the bundled tiny model
/// (random weights) in the repository (see [`repo_root`]).
pub fn default_model_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("DGEMMA_MODEL") {
        return PathBuf::from(dir);
    }
    let dir = repo_root().join("reference/models/tiny-default");
    dir.canonicalize().unwrap_or(dir)
}

/// The repository root: `$DGEMMA_REPO` when set and not empty (a binary built on one machine
/// and run from another checkout), else the source tree this binary was compiled from.
pub fn repo_root() -> PathBuf {
    match std::env::var_os("DGEMMA_REPO") {
        Some(dir) if !dir.is_empty() => dir.into(),
        _ => Path::new(env!("CARGO_MANIFEST_DIR")).join("../.."),
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum BackendKind {
    Cpu,
    Cuda,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum PrecisionArg {
    /// bf16 for bf16/f16 checkpoints, float32 for float32 ones.
    Auto,
    F32,
    Bf16,
}

/// How the MoE experts are held (`--quant`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum QuantArg {
    /// As the checkpoint stores them (a compressed-tensors FP8 checkpoint's experts stay FP8).
    None,
    /// FP8 E4M3 experts with per-output-channel scales: bf16/f32 experts are quantised at load
    /// (weight-only FP8; activations stay bf16).
    Fp8,
}

impl From<QuantArg> for Quant {
    fn from(q: QuantArg) -> Quant {
        match q {
            QuantArg::None => Quant::None,
            QuantArg::Fp8 => Quant::Fp8,
        }
    }
}

pub struct Loaded {
    pub checkpoint: Checkpoint,
    pub weights: ModelWeights,
    /// How the CUDA backend uploads `weights`' float experts (FP8: quantised tensor by tensor
    /// while uploading, so the host never holds all the codes).
    pub upload_quant: Quant,
}

/// The checkpoint in `dir` with its experts held as `quant` says. For a CUDA backend
/// (`for_device`), FP8 quantisation of float experts is left to the upload ([`Loaded::upload_quant`]).
pub fn open(dir: &Path, quant: Quant, for_device: bool) -> Result<Loaded, Box<dyn std::error::Error>> {
    let checkpoint = Checkpoint::open(dir)?;
    let big = checkpoint.total_bytes() >= PREFETCH_BYTES;
    if for_device {
        let weights = ModelWeights::load_with(&checkpoint, Quant::None)?;
        if big {
            let mut bar = Progress::new("loading");
            checkpoint.prefetch(&mut |done, total| bar.update(done, total));
        }
        return Ok(Loaded { checkpoint, weights, upload_quant: quant });
    }
    if quant == Quant::Fp8 {
        // Quantising at load reads every expert weight: page the files in first (with the
        // progress bar), then quantise from memory. Checking the float layout first keeps a
        // broken checkpoint from costing a full read.
        ModelWeights::load(&checkpoint)?;
        if big {
            let mut bar = Progress::new("loading");
            checkpoint.prefetch(&mut |done, total| bar.update(done, total));
            eprintln!("dgemma: quantising the experts to FP8 (e4m3, per-output-channel scales)");
        }
        let weights = ModelWeights::load_with(&checkpoint, quant)?;
        return Ok(Loaded { checkpoint, weights, upload_quant: Quant::None });
    }
    let weights = ModelWeights::load_with(&checkpoint, quant)?;
    if big {
        let mut bar = Progress::new("loading");
        checkpoint.prefetch(&mut |done, total| bar.update(done, total));
    }
    Ok(Loaded { checkpoint, weights, upload_quant: Quant::None })
}

pub fn precision(arg: PrecisionArg, weights: &ModelWeights) -> Precision {
    match arg {
        PrecisionArg::F32 => Precision::F32,
        PrecisionArg::Bf16 => Precision::Bf16,
        PrecisionArg::Auto => match weights.embed_tokens.dtype {
            DType::F32 => Precision::F32,
            _ => Precision::Bf16,
        },
    }
}

/// The backend `kind` for `loaded`. `context` is the most positions the run will reach (the
/// CUDA backend sizes its KV cache for it up front).
pub fn backend(
    kind: BackendKind,
    loaded: &Loaded,
    precision: Precision,
    context: usize,
) -> Result<Box<dyn Backend>, Box<dyn std::error::Error>> {
    let cfg = &loaded.checkpoint.config;
    match kind {
        BackendKind::Cpu => Ok(Box::new(CpuBackend::new(&cfg.text, &loaded.weights, precision))),
        BackendKind::Cuda => {
            if precision != Precision::Bf16 {
                return Err(format!(
                    "the CUDA backend computes in bf16 only; {} was asked for (use --precision bf16, or --backend cpu)",
                    precision.name()
                )
                .into());
            }
            let dev = dgemma::cuda::open_device(0)?;
            let context = context.min(cfg.text.max_position_embeddings);
            let mut options = dgemma::gpu::GpuOptions::new(context, cfg.canvas_length);
            options.expert_quant = loaded.upload_quant;
            let needed = dgemma::gpu::weights::DeviceWeights::bytes_needed(&loaded.weights, loaded.upload_quant);
            let mut bar = (needed >= PREFETCH_BYTES as usize)
                .then(|| Progress::new("uploading"));
            let backend = dgemma::gpu::GpuBackend::new(
                dgemma::gpu::GpuExecutor::new(dev),
                &cfg.text,
                &loaded.weights,
                options,
                &mut |done, total| {
                    if let Some(b) = bar.as_mut() {
                        b.update(done as u64, total as u64)
                    }
                },
            )?;
            Ok(Box::new(backend))
        }
    }
}
