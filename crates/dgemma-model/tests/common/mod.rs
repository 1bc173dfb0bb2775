//! Shared by the integration tests: where the committed fixtures are.

#![allow(dead_code)]

use std::path::PathBuf;

/// `crates/dgemma-model` in the repository: under `$DGEMMA_REPO` (the repository root) when set
/// and not empty (test executables built on one machine and run from another checkout), else
/// the compile-time source tree.
pub fn crate_dir() -> PathBuf {
    match std::env::var_os("DGEMMA_REPO") {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir).join("crates/dgemma-model"),
        _ => PathBuf::from(env!("CARGO_MANIFEST_DIR")),
    }
}

/// A committed file under `tests/fixtures`.
pub fn fixture(name: &str) -> PathBuf {
    crate_dir().join("tests/fixtures").join(name)
}
