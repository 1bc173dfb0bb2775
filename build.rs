//! Build script of the `dgemma` crate.
//!
//! 1. Records the git commit the library is built from (`dgemma::GIT_COMMIT`, stamped into
//!    benchmark results).
//! 2. Builds the CUDA kernels: runs `dgemma-codegen` for every supported model shape, writes one
//!    small `.cu` file per kernel into `OUT_DIR/kernels/`, and compiles them with nvcc into ONE
//!    fatbin holding sm_90a and sm_120 machine code plus compute_120 PTX. It then writes the
//!    kernel index that `src/kernels.rs` exposes (`FATBIN`, `KERNEL_NAMES`, `ARCHS`,
//!    `HAVE_KERNELS`).
//!
//! nvcc is `$NVCC` if set (authoritative: a broken `$NVCC` is not replaced by another nvcc),
//! else `nvcc` on `PATH`, else `.tools/cuda/nvidia/cu13/bin/nvcc` (installed by
//! `tools/install-cuda-toolchain.sh`). Without a working nvcc, or with `DGEMMA_SKIP_KERNELS=1`,
//! the build still succeeds: a `cargo:warning` says why, the fatbin is empty and
//! `HAVE_KERNELS` is false. If nvcc runs but fails to compile the kernels, the build fails.
//!
//! Other knobs: `DGEMMA_NVCC_FLAGS` (extra nvcc flags, space-separated), `DGEMMA_NVCC_THREADS`
//! (nvcc `--threads`, default: cargo's job count).

use std::env;
use std::fs;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use dgemma_codegen::{emit, emit_unity, file_name, supported_specs, KernelSpec, Target, FATBIN_ARCHS, GENCODES};

const WHEEL_NVCC: &str = ".tools/cuda/nvidia/cu13/bin/nvcc";
const FATBIN_FILE: &str = "dgemma_kernels.fatbin";
const INDEX_FILE: &str = "kernel_index.rs";

fn main() {
    stamp_git_commit();
    build_kernels();
}

fn stamp_git_commit() {
    let commit = Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=DGEMMA_GIT_COMMIT={commit}");
    println!("cargo:rerun-if-changed=.git/HEAD");
    println!("cargo:rerun-if-changed=.git/refs");
}

/// Why no kernels were built (the build goes on without them).
struct NoKernels(String);

fn build_kernels() {
    let root = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let out = PathBuf::from(env::var("OUT_DIR").expect("OUT_DIR"));
    // codegen/ is a build-dependency (cargo also re-runs this script when its code changes);
    // csrc/ holds the templates nvcc reads.
    println!("cargo:rerun-if-changed=codegen/src");
    println!("cargo:rerun-if-changed=csrc");
    for var in ["NVCC", "DGEMMA_SKIP_KERNELS", "DGEMMA_NVCC_FLAGS", "DGEMMA_NVCC_THREADS"] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    let wheel = root.join(WHEEL_NVCC);
    if wheel.exists() {
        println!("cargo:rerun-if-changed={}", wheel.display());
    }

    let specs = supported_specs();
    for spec in &specs {
        if let Err(e) = spec.validate() {
            panic!("invalid kernel spec: {e}");
        }
    }
    let gen_dir = out.join("kernels");
    fs::create_dir_all(&gen_dir).expect("create OUT_DIR/kernels");
    for spec in &specs {
        write_if_changed(&gen_dir.join(file_name(spec)), &emit(spec));
    }
    let unity = gen_dir.join("all_kernels.cu");
    write_if_changed(&unity, &emit_unity(&specs));
    // Drop instantiation files of kernels no longer in the table.
    let current: Vec<String> = specs.iter().map(file_name).chain(["all_kernels.cu".to_string()]).collect();
    for entry in fs::read_dir(&gen_dir).expect("read OUT_DIR/kernels").flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !current.contains(&name) {
            let _ = fs::remove_file(entry.path());
        }
    }

    let fatbin = out.join(FATBIN_FILE);
    let built = if env::var("DGEMMA_SKIP_KERNELS").is_ok_and(|v| !v.is_empty() && v != "0") {
        Err(NoKernels("DGEMMA_SKIP_KERNELS is set".into()))
    } else {
        find_nvcc(&root).map(|(nvcc, version)| {
            compile(&nvcc, &root.join("csrc"), &gen_dir, &unity, &fatbin, specs.len());
            version
        })
    };
    let index = match built {
        Ok(version) => kernel_index(&specs, &fatbin, &version, ""),
        Err(NoKernels(why)) => {
            println!(
                "cargo:warning=CUDA kernels were not built: {why}. dgemma::kernels::HAVE_KERNELS is false and \
                 the fatbin is empty. Install nvcc with tools/install-cuda-toolchain.sh and set NVCC={}",
                wheel.display()
            );
            fs::write(&fatbin, b"").expect("write empty fatbin");
            kernel_index(&[], &fatbin, "", &why)
        }
    };
    write_if_changed(&out.join(INDEX_FILE), &index);
}

/// `$NVCC`, else `nvcc` on PATH, else the wheel nvcc; returns it with its version line.
fn find_nvcc(root: &Path) -> Result<(PathBuf, String), NoKernels> {
    if let Some(v) = env::var_os("NVCC").filter(|v| !v.is_empty()) {
        let nvcc = PathBuf::from(v);
        return nvcc_version(&nvcc)
            .map(|ver| (nvcc.clone(), ver))
            .map_err(|e| NoKernels(format!("NVCC={} does not run ({e})", nvcc.display())));
    }
    let on_path = PathBuf::from("nvcc");
    if let Ok(ver) = nvcc_version(&on_path) {
        return Ok((on_path, ver));
    }
    let wheel = root.join(WHEEL_NVCC);
    match nvcc_version(&wheel) {
        Ok(ver) => Ok((wheel, ver)),
        Err(_) => Err(NoKernels(format!("no nvcc: NVCC is unset, none on PATH, and {} is missing", wheel.display()))),
    }
}

fn nvcc_version(nvcc: &Path) -> Result<String, String> {
    let out = Command::new(nvcc).arg("--version").output().map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(format!("`{} --version` exited with {}", nvcc.display(), out.status));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(text.lines().rfind(|l| l.contains("release")).unwrap_or("unknown version").trim().to_string())
}

/// A fingerprint of everything the fatbin depends on: the generated sources, the templates,
/// the compiler and the flags. nvcc is skipped when it matches the previous build's.
fn fingerprint(nvcc: &Path, csrc: &Path, gen_dir: &Path, flags: &[String]) -> String {
    let mut files: Vec<PathBuf> = Vec::new();
    for dir in [csrc, gen_dir] {
        if let Ok(entries) = fs::read_dir(dir) {
            files.extend(entries.flatten().map(|e| e.path()).filter(|p| p.is_file()));
        }
    }
    files.sort();
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    for f in &files {
        f.file_name().hash(&mut hasher);
        fs::read(f).unwrap_or_default().hash(&mut hasher);
    }
    nvcc.hash(&mut hasher);
    fs::metadata(nvcc).ok().and_then(|m| m.modified().ok()).hash(&mut hasher);
    flags.hash(&mut hasher);
    format!("{:016x}", hasher.finish())
}

/// One nvcc invocation over the unity file; nvcc's `--threads` compiles the three code images
/// (sm_90a, sm_120, compute_120) in parallel.
fn compile(nvcc: &Path, csrc: &Path, gen_dir: &Path, unity: &Path, fatbin: &Path, count: usize) {
    let threads = env::var("DGEMMA_NVCC_THREADS")
        .ok()
        .or_else(|| env::var("NUM_JOBS").ok())
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or(2)
        .max(1);
    let extra: Vec<String> =
        env::var("DGEMMA_NVCC_FLAGS").map(|v| v.split_whitespace().map(String::from).collect()).unwrap_or_default();
    let stamp_path = fatbin.with_extension("fingerprint");
    let stamp = fingerprint(nvcc, csrc, gen_dir, &extra);
    let up_to_date =
        fs::metadata(fatbin).is_ok_and(|m| m.len() > 0) && fs::read_to_string(&stamp_path).is_ok_and(|s| s == stamp);
    if up_to_date {
        println!("dgemma build.rs: the {count} CUDA kernels are up to date (fingerprint {stamp})");
        return;
    }
    let mut cmd = Command::new(nvcc);
    cmd.args(["-O3", "-std=c++17", "-fatbin", "--threads", &threads.to_string()]);
    for g in GENCODES {
        cmd.arg("-gencode").arg(g);
    }
    cmd.arg("-I").arg(csrc).arg("-I").arg(gen_dir);
    cmd.args(&extra);
    cmd.arg("-o").arg(fatbin).arg(unity);
    let start = Instant::now();
    let out = cmd.output().unwrap_or_else(|e| panic!("running {}: {e}", nvcc.display()));
    if !out.status.success() {
        panic!(
            "nvcc failed to compile the CUDA kernels ({}):\n{:?}\n{}{}",
            out.status,
            cmd,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    fs::write(&stamp_path, &stamp).expect("write the fatbin fingerprint");
    let size = fs::metadata(fatbin).map(|m| m.len()).unwrap_or(0);
    // Plain output (cargo keeps it in target/*/build/dgemma-*/output; `cargo build -vv` shows it):
    // a cargo:warning would be replayed on every build.
    println!(
        "dgemma build.rs: built {count} CUDA kernels ({}) into a {size}-byte fatbin in {:.1} s",
        FATBIN_ARCHS.join(" + "),
        start.elapsed().as_secs_f64()
    );
}

/// The Rust source `src/kernels.rs` includes.
fn kernel_index(specs: &[KernelSpec], fatbin: &Path, nvcc_version: &str, not_built: &str) -> String {
    let have = !specs.is_empty();
    let mut s = String::from("// Generated by build.rs: the kernels embedded in FATBIN. Do not edit.\n");
    s += &format!("pub const HAVE_KERNELS: bool = {have};\n");
    let archs: &[&str] = if have { &FATBIN_ARCHS } else { &[] };
    s += &format!("pub const ARCHS: &[&str] = &{archs:?};\n");
    s += &format!("pub const NVCC_VERSION: &str = {nvcc_version:?};\n");
    s += &format!("pub const NOT_BUILT_REASON: &str = {not_built:?};\n");
    s += "pub static KERNEL_NAMES: &[&str] = &[\n";
    for spec in specs {
        s += &format!("    {:?},\n", spec.kernel_name());
    }
    s += "];\n";
    s += "pub static KERNEL_TARGETS: &[&str] = &[\n";
    for spec in specs {
        let t = match spec.target {
            Target::Portable => "all",
            Target::Only(a) => a.nvcc_name(),
        };
        s += &format!("    {t:?},\n");
    }
    s += "];\n";
    s += &format!(
        "static FATBIN_ALIGNED: &Aligned<[u8]> = &Aligned {{ _align: [], bytes: *include_bytes!({:?}) }};\n",
        fatbin.display().to_string()
    );
    s
}

fn write_if_changed(path: &Path, contents: &str) {
    if fs::read_to_string(path).ok().as_deref() != Some(contents) {
        fs::write(path, contents).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
    }
}
