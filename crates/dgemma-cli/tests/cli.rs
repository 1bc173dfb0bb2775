//! The `dgemma` binary end to end on the bundled tiny model and the committed cases.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The repository root: `$DGEMMA_REPO` when set and not empty (test executables built on one
/// machine and run from another checkout), else the compile-time source tree.
fn repo() -> PathBuf {
    match std::env::var_os("DGEMMA_REPO") {
        Some(dir) if !dir.is_empty() => dir.into(),
        _ => Path::new(env!("CARGO_MANIFEST_DIR")).join("../.."),
    }
}

/// The `dgemma` binary under test: `$DGEMMA_BIN` when set and not empty, else the one cargo built.
fn dgemma_bin() -> PathBuf {
    match std::env::var_os("DGEMMA_BIN") {
        Some(bin) if !bin.is_empty() => bin.into(),
        _ => env!("CARGO_BIN_EXE_dgemma").into(),
    }
}

fn dgemma(args: &[&str]) -> Output {
    Command::new(dgemma_bin()).args(args).env_remove("DGEMMA_MODEL").output().expect("dgemma runs")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn run_on_the_bundled_model_streams_text_and_reports_stats() {
    let out = dgemma(&["run", "--max-new-tokens", "40", "--seed", "3", "Why is the sky blue?"]);
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "stderr: {stderr}");
    assert!(!stdout.trim().is_empty(), "no text streamed");
    assert!(stderr.contains("stats: canvases"), "{stderr}");
    assert!(stderr.contains("tokens/forward") && stderr.contains("tokens/s"), "{stderr}");
    assert!(stderr.contains("finished:"), "{stderr}");
    // Same seed, same output; the chat template's thinking mode changes the prompt.
    let again = dgemma(&["run", "--max-new-tokens", "40", "--seed", "3", "Why is the sky blue?"]);
    assert_eq!(text(&again.stdout), stdout);
    let visual = dgemma(&["run", "--max-new-tokens", "40", "--seed", "3", "--visual", "Why is the sky blue?"]);
    assert_eq!(text(&visual.stdout), stdout, "--visual must not change the output");
    assert!(text(&visual.stderr).contains("[canvas 0 step  0"), "{}", text(&visual.stderr));
    let thinking = dgemma(&["run", "--max-new-tokens", "40", "--seed", "3", "--thinking", "Why is the sky blue?"]);
    assert!(thinking.status.success());
    assert!(text(&thinking.stderr).contains("prompt"), "{}", text(&thinking.stderr));
}

#[test]
fn info_prints_the_parsed_checkpoint() {
    let out = dgemma(&["info"]);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(stdout.contains("vocab 512") && stdout.contains("tensors:"), "{stdout}");
    assert!(stdout.contains("Full") && stdout.contains("Sliding"), "{stdout}");
    assert!(stdout.contains("cuda kernels:"), "{stdout}");
}

#[test]
fn verify_passes_a_committed_case_and_fails_a_corrupted_one() {
    let models = repo().join("reference/models");
    let cases = repo().join("reference/cases");
    let case = std::fs::read_dir(&cases)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().contains("-f32") && p.extension().is_some_and(|x| x == "safetensors"))
        .min()
        .expect("a float32 case is committed");
    let model_name = case_model(&case);
    let model = models.join(&model_name);
    let out = dgemma(&["verify", "--model", model.to_str().unwrap(), "--case", case.to_str().unwrap()]);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", text(&out.stderr));
    assert!(stdout.contains("PASS") && !stdout.contains("FAIL") && stdout.contains("0 failed"), "{stdout}");

    // Shift one logit of pass0 by 1.0: that check must fail and the exit code must say so.
    let bytes = std::fs::read(&case).unwrap();
    let (n, meta) = safetensors_header(&bytes);
    let info = &meta["pass0.logits"];
    let start = 8 + n + info["data_offsets"][0].as_u64().unwrap() as usize;
    let mut bad = bytes.clone();
    let v = f32::from_le_bytes(bad[start..start + 4].try_into().unwrap()) + 1.0;
    bad[start..start + 4].copy_from_slice(&v.to_le_bytes());
    let bad_path = std::env::temp_dir().join(format!("dgemma-bad-case-{}.safetensors", std::process::id()));
    std::fs::write(&bad_path, bad).unwrap();
    let out = dgemma(&["verify", "--model", model.to_str().unwrap(), "--case", bad_path.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(text(&out.stdout).contains("FAIL"), "{}", text(&out.stdout));
}

#[test]
fn the_cuda_backend_and_bad_paths_give_clear_errors() {
    // Without a usable GPU (or kernels) --backend cuda is a clear error; with one it runs.
    let out = dgemma(&["run", "--backend", "cuda", "--max-new-tokens", "16", "hello"]);
    let gpu_usable = dgemma::kernels::HAVE_KERNELS && dgemma::gpu::Device::count() > 0;
    if gpu_usable {
        assert!(out.status.success(), "{}", text(&out.stderr));
        assert!(text(&out.stderr).contains("backend cuda"), "{}", text(&out.stderr));
    } else {
        assert!(!out.status.success());
        assert!(text(&out.stderr).contains("CUDA"), "{}", text(&out.stderr));
    }
    let out = dgemma(&["run", "--backend", "cuda", "--precision", "f32", "hello"]);
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("bf16 only"), "{}", text(&out.stderr));
    let out = dgemma(&["info", "--model", "/nonexistent/model"]);
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("/nonexistent/model"), "{}", text(&out.stderr));
    let out = dgemma(&["run", "--steps", "0", "hello"]);
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("max_denoising_steps"), "{}", text(&out.stderr));
}

fn safetensors_header(bytes: &[u8]) -> (usize, serde_json::Value) {
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    (n, serde_json::from_slice(&bytes[8..8 + n]).unwrap())
}

fn case_model(case: &Path) -> String {
    let bytes = std::fs::read(case).unwrap();
    let (_, meta) = safetensors_header(&bytes);
    meta["__metadata__"]["model"].as_str().unwrap().to_string()
}
