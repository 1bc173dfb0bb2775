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

/// The FP8 case (`fp8-bf16`: transformers on tiny-default with its experts quantised per output
/// row and dequantised, written by `make_cases.py` with torch as the compressed-tensors checkpoint
/// `tiny-fp8`). dgemma's own quantisation at load of tiny-default (`--quant fp8`) gives the very
/// codes and scales of that checkpoint, an independent check of both quantisers, and passes the
/// case just as the checkpoint does (every case, that one included, passes above).
#[test]
fn fp8_quantised_at_load_equals_the_committed_fp8_checkpoint_and_passes_its_case() {
    use dgemma::model::quant::{ExpertTensor, Fp8Experts, Quant};
    let models = reference_dir().join("models");
    let stored = ModelWeights::load(&Checkpoint::open(models.join("tiny-fp8")).unwrap()).unwrap();
    let ck = Checkpoint::open(models.join("tiny-default")).unwrap();
    let quantised = ModelWeights::load_with(&ck, Quant::Fp8).unwrap();
    let fp8 = |t: &ExpertTensor| -> Fp8Experts { t.as_fp8().unwrap_or_else(|| panic!("{} is not FP8", t.name())).clone() };
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    let mut tensors = 0;
    for (i, (a, b)) in stored.layers.iter().zip(&quantised.layers).enumerate() {
        for (x, y) in [(&a.experts_gate_up, &b.experts_gate_up), (&a.experts_down, &b.experts_down)] {
            let (x, y) = (fp8(x), fp8(y));
            assert_eq!(x.shape, y.shape, "layer {i} {}", x.name);
            assert_eq!(bits(&x.scales), bits(&y.scales), "layer {i} {}: scales", x.name);
            assert!(x.codes() == y.codes(), "layer {i} {}: codes", x.name);
            tensors += 1;
        }
    }
    assert_eq!(tensors, 2 * ck.config.text.num_hidden_layers);

    let case = Case::open(&reference_dir().join("cases/fp8-bf16.safetensors")).unwrap();
    assert_eq!(case.model_dir(&models), Some(models.join("tiny-fp8")));
    let mut backend = CpuBackend::new(&ck.config.text, &quantised, case.precision);
    let settings = GenerationSettings::from_checkpoint(&ck.config, &ck.generation, case.precision);
    let checks = verify_case(&case, &mut backend, &settings).unwrap();
    assert!(checks.len() >= 4, "{} checks", checks.len());
    for c in &checks {
        assert!(c.passed, "{}: {}", c.name, c.detail);
    }
}
