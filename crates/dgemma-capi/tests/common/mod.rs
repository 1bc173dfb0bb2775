//! Shared by the integration tests: where the crate's committed files are.

#![allow(dead_code)]

use std::path::PathBuf;

/// `crates/dgemma-capi` in the repository: under `$DGEMMA_REPO` (the repository root) when set
/// and not empty (test executables built on one machine and run from another checkout), else
/// the compile-time source tree.
pub fn crate_dir() -> PathBuf {
    match std::env::var_os("DGEMMA_REPO") {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir).join("crates/dgemma-capi"),
        _ => PathBuf::from(env!("CARGO_MANIFEST_DIR")),
    }
}
