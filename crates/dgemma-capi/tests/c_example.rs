//! Builds `examples/generate.c` with gcc against the cdylib and runs it on the bundled tiny
//! model; also compiles a layout probe so the header's structs are checked against Rust's.
//! Skipped (with a message) only when gcc is not installed.

use dgemma_capi::{DgemmaEngineOptions, DgemmaEngineStats, DgemmaParams, DgemmaResult};
use std::mem::{offset_of, size_of};
use std::path::{Path, PathBuf};
use std::process::Command;

mod common;
use common::crate_dir;

fn gcc() -> Option<&'static str> {
    let ok = Command::new("gcc")
        .arg("--version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if ok {
        Some("gcc")
    } else {
        eprintln!(
            "SKIPPED: gcc is not installed, the C example and the layout check were not built"
        );
        None
    }
}

/// The directory holding `libdgemma_capi.so`: cargo builds the cdylib next to this test's
/// binary (`target/<profile>/deps`) and copies it to `target/<profile>`.
fn lib_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let deps = exe.parent().unwrap();
    for dir in [deps, deps.parent().unwrap()] {
        if dir.join("libdgemma_capi.so").exists() {
            return dir.to_path_buf();
        }
    }
    panic!(
        "libdgemma_capi.so not found next to {} (run `cargo build -p dgemma-capi`)",
        exe.display()
    );
}

fn tmp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("dgemma-capi-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

fn compile(gcc: &str, source: &Path, out: &Path, lib: &Path) {
    let o = Command::new(gcc)
        .args(["-std=c11", "-Wall", "-Wextra", "-Werror", "-I"])
        .arg(crate_dir().join("include"))
        .arg(source)
        .arg("-L")
        .arg(lib)
        .args(["-ldgemma_capi", "-o"])
        .arg(out)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "gcc failed on {}:\n{}",
        source.display(),
        String::from_utf8_lossy(&o.stderr)
    );
}

#[test]
fn c_example_generates_text() {
    let Some(gcc) = gcc() else { return };
    let lib = lib_dir();
    let exe = tmp("generate");
    compile(gcc, &crate_dir().join("examples/generate.c"), &exe, &lib);
    let model = dgemma_runtime::bundled_tiny_model();
    let o = Command::new(&exe)
        .arg(&model)
        .arg("Hello from C")
        .arg("11")
        .env("LD_LIBRARY_PATH", &lib)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&o.stdout);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        o.status.success(),
        "generate exited with {:?}\nstdout:\n{stdout}\nstderr:\n{stderr}",
        o.status
    );
    assert!(stdout.contains("generated text: "), "{stdout}");
    assert!(
        stdout.contains(
            "empty prompt: DGEMMA_ERR_INVALID_REQUEST: invalid request: the prompt is empty"
        ),
        "{stdout}"
    );
    assert!(
        stdout.contains("engine: 1 completed, 1 rejected"),
        "{stdout}"
    );
    assert!(stderr.contains("[canvas 0: 16 ids]"), "{stderr}");

    // The same request through the Rust API gives the same text.
    let engine = dgemma_runtime::Engine::load(&model, Default::default()).unwrap();
    let want = engine
        .generate(
            dgemma_runtime::Request::chat("Hello from C")
                .max_new_tokens(48)
                .seed(11),
        )
        .unwrap();
    // (printf("%s") stops at a NUL, which byte-fallback tokens can produce.)
    let want_text = want.text.split('\0').next().unwrap();
    assert!(
        !want_text.trim().is_empty(),
        "the request generated no text"
    );
    assert!(
        stdout.contains(&format!("generated text: {want_text}\n")),
        "C printed:\n{stdout}\nRust generated {want_text:?}"
    );
}

#[test]
fn struct_layouts_match_the_header() {
    let Some(gcc) = gcc() else { return };
    let fields: Vec<(&str, &str, usize)> = vec![
        (
            "DgemmaParams",
            "max_new_tokens",
            offset_of!(DgemmaParams, max_new_tokens),
        ),
        (
            "DgemmaParams",
            "max_denoising_steps",
            offset_of!(DgemmaParams, max_denoising_steps),
        ),
        ("DgemmaParams", "seed", offset_of!(DgemmaParams, seed)),
        (
            "DgemmaParams",
            "system_prompt",
            offset_of!(DgemmaParams, system_prompt),
        ),
        (
            "DgemmaParams",
            "thinking",
            offset_of!(DgemmaParams, thinking),
        ),
        (
            "DgemmaParams",
            "raw_prompt",
            offset_of!(DgemmaParams, raw_prompt),
        ),
        (
            "DgemmaParams",
            "skip_special_tokens",
            offset_of!(DgemmaParams, skip_special_tokens),
        ),
        (
            "DgemmaParams",
            "entropy_bound",
            offset_of!(DgemmaParams, entropy_bound),
        ),
        (
            "DgemmaParams",
            "confidence_threshold",
            offset_of!(DgemmaParams, confidence_threshold),
        ),
        ("DgemmaParams", "t_min", offset_of!(DgemmaParams, t_min)),
        ("DgemmaParams", "t_max", offset_of!(DgemmaParams, t_max)),
        (
            "DgemmaParams",
            "stability_threshold",
            offset_of!(DgemmaParams, stability_threshold),
        ),
        (
            "DgemmaParams",
            "stop_ids",
            offset_of!(DgemmaParams, stop_ids),
        ),
        (
            "DgemmaParams",
            "n_stop_ids",
            offset_of!(DgemmaParams, n_stop_ids),
        ),
        ("DgemmaResult", "text", offset_of!(DgemmaResult, text)),
        (
            "DgemmaResult",
            "text_len",
            offset_of!(DgemmaResult, text_len),
        ),
        ("DgemmaResult", "ids", offset_of!(DgemmaResult, ids)),
        ("DgemmaResult", "n_ids", offset_of!(DgemmaResult, n_ids)),
        (
            "DgemmaResult",
            "prompt_tokens",
            offset_of!(DgemmaResult, prompt_tokens),
        ),
        (
            "DgemmaResult",
            "canvases",
            offset_of!(DgemmaResult, canvases),
        ),
        (
            "DgemmaResult",
            "decoder_passes",
            offset_of!(DgemmaResult, decoder_passes),
        ),
        (
            "DgemmaResult",
            "new_tokens",
            offset_of!(DgemmaResult, new_tokens),
        ),
        (
            "DgemmaResult",
            "finish_reason",
            offset_of!(DgemmaResult, finish_reason),
        ),
        (
            "DgemmaResult",
            "eos_token",
            offset_of!(DgemmaResult, eos_token),
        ),
        ("DgemmaResult", "seconds", offset_of!(DgemmaResult, seconds)),
        (
            "DgemmaEngineStats",
            "submitted",
            offset_of!(DgemmaEngineStats, submitted),
        ),
        (
            "DgemmaEngineStats",
            "new_tokens",
            offset_of!(DgemmaEngineStats, new_tokens),
        ),
        (
            "DgemmaEngineStats",
            "memory_waits",
            offset_of!(DgemmaEngineStats, memory_waits),
        ),
        ("DgemmaEngineOptions", "backend", offset_of!(DgemmaEngineOptions, backend)),
        ("DgemmaEngineOptions", "prefill_chunk", offset_of!(DgemmaEngineOptions, prefill_chunk)),
        ("DgemmaEngineOptions", "memory_limit", offset_of!(DgemmaEngineOptions, memory_limit)),
        ("DgemmaEngineOptions", "quant", offset_of!(DgemmaEngineOptions, quant)),
    ];
    let sizes = [
        ("DgemmaParams", size_of::<DgemmaParams>()),
        ("DgemmaResult", size_of::<DgemmaResult>()),
        ("DgemmaEngineStats", size_of::<DgemmaEngineStats>()),
        ("DgemmaEngineOptions", size_of::<DgemmaEngineOptions>()),
        ("DgemmaStatus", size_of::<dgemma_capi::DgemmaStatus>()),
    ];
    let mut c = String::from(
        "#include <stddef.h>\n#include <stdio.h>\n#include \"dgemma.h\"\nint main(void) {\n",
    );
    let mut want = String::new();
    for (s, n) in sizes {
        c.push_str(&format!(
            "    printf(\"sizeof {s} %zu\\n\", sizeof({s}));\n"
        ));
        want.push_str(&format!("sizeof {s} {n}\n"));
    }
    for (s, f, off) in &fields {
        c.push_str(&format!(
            "    printf(\"offsetof {s}.{f} %zu\\n\", offsetof({s}, {f}));\n"
        ));
        want.push_str(&format!("offsetof {s}.{f} {off}\n"));
    }
    c.push_str("    return 0;\n}\n");
    let src = tmp("layout.c");
    std::fs::write(&src, c).unwrap();
    let lib = lib_dir();
    let exe = tmp("layout");
    compile(gcc, &src, &exe, &lib);
    let o = Command::new(&exe)
        .env("LD_LIBRARY_PATH", &lib)
        .output()
        .unwrap();
    assert!(o.status.success());
    assert_eq!(String::from_utf8_lossy(&o.stdout), want);
}
