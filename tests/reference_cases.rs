//! Every committed transformers case (`reference/cases/*.safetensors`) must pass on the CPU
//! backend, in the precision the case names: decoder logits within tolerance and generation
//! traces reproduced token for token (see `dgemma_engine::verify`).

use dgemma::cpu::CpuBackend;
use dgemma::engine::case::Case;
use dgemma::engine::verify::verify_case;
use dgemma::model::checkpoint::Checkpoint;
use dgemma::model::weights::ModelWeights;
use dgemma::GenerationSettings;
use std::path::{Path, PathBuf};

/// The repository root: `$DGEMMA_REPO` when set and not empty (test executables built on one
/// machine and run from another checkout), else the compile-time source tree.
fn repo_root() -> PathBuf {
    match std::env::var_os("DGEMMA_REPO") {
        Some(dir) if !dir.is_empty() => dir.into(),
        _ => Path::new(env!("CARGO_MANIFEST_DIR")).into(),
    }
}

fn reference_dir() -> PathBuf {
    repo_root().join("reference")
}

fn case_files() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(reference_dir().join("cases"))
        .expect("reference/cases exists")
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    files.sort();
    files
}

#[test]
fn every_committed_case_passes_on_the_cpu_backend() {
    let files = case_files();
    assert!(files.len() >= 6, "expected the committed reference cases, found {}", files.len());
    let mut failures = Vec::new();
    let mut traces = 0;
    for path in &files {
        let case = Case::open(path).unwrap();
        let dir = case.model_dir(&reference_dir().join("models")).expect("case names its model");
        let ck = Checkpoint::open(&dir).unwrap();
        let weights = ModelWeights::load(&ck).unwrap();
        let mut backend = CpuBackend::new(&ck.config.text, &weights, case.precision);
        let settings = GenerationSettings::from_checkpoint(&ck.config, &ck.generation, case.precision);
        let checks = verify_case(&case, &mut backend, &settings).unwrap();
        assert!(!checks.is_empty(), "{} produced no checks", path.display());
        traces += usize::from(case.trace.is_some());
        for c in checks {
            eprintln!(
                "{} {} err {:?} argmax {:?} {} {}",
                path.file_name().unwrap().to_string_lossy(),
                c.name,
                c.max_abs_err,
                c.argmax_agreement,
                if c.passed { "PASS" } else { "FAIL" },
                c.detail
            );
            if !c.passed {
                failures.push(format!("{}: {} ({})", path.display(), c.name, c.detail));
            }
        }
    }
    assert!(traces >= 3, "expected generation traces among the cases, found {traces}");
    assert!(failures.is_empty(), "failed checks:\n{}", failures.join("\n"));
}
