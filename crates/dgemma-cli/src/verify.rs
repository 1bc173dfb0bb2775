//! `dgemma verify`: run a reference case and print each check's error and verdict.

use crate::load::{self, BackendKind, QuantArg};
use dgemma_engine::case::Case;
use dgemma_engine::generate::GenerationSettings;
use dgemma_engine::verify::verify_case;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(clap::Args)]
pub struct VerifyArgs {
    /// Model directory the case was made with (no tokenizer needed).
    #[arg(long)]
    pub model: PathBuf,
    /// Case file (safetensors) written by reference/make_cases.py.
    #[arg(long)]
    pub case: PathBuf,
    #[arg(long, value_enum, default_value = "cpu")]
    pub backend: BackendKind,
    /// How the MoE experts are held (`fp8`: quantised at load, which the case's tolerances were
    /// not made for: it measures what FP8 costs against transformers).
    #[arg(long, value_enum, default_value = "none")]
    pub quant: QuantArg,
}

pub fn verify(a: VerifyArgs) -> Result<ExitCode, Box<dyn std::error::Error>> {
    let case = Case::open(&a.case)?;
    let loaded = load::open(&a.model, a.quant.into(), a.backend == load::BackendKind::Cuda)?;
    let settings = GenerationSettings::from_checkpoint(&loaded.checkpoint.config, &loaded.checkpoint.generation, case.precision);
    // Positions the case reaches: the prompt, then its passes or its trace's canvases.
    let c = settings.canvas_length;
    let new_tokens = case.trace.as_ref().map_or(c, |t| t.max_new_tokens.div_ceil(c) * c);
    let context = case.prompt_ids.len() + new_tokens.max(c);
    let mut backend = load::backend(a.backend, &loaded, case.precision, context)?;
    let checks = verify_case(&case, backend.as_mut(), &settings)?;
    println!("case {} ({}, backend {})", a.case.display(), case.precision.name(), backend.name());
    let mut failed = 0;
    for c in &checks {
        let err = c.max_abs_err.map_or(String::new(), |e| format!(" max|err| {e:.3e}"));
        let agree = c.argmax_agreement.map_or(String::new(), |x| format!(" argmax {:.2}%", x * 100.0));
        println!("  {:<16}{err}{agree}  {}  {}", c.name, if c.passed { "PASS" } else { "FAIL" }, c.detail);
        failed += usize::from(!c.passed);
    }
    println!("{} passed, {} failed", checks.len() - failed, failed);
    Ok(if failed == 0 { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}
