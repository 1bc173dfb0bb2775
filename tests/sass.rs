//! The machine code (SASS) nvcc put in `dgemma::kernels::FATBIN`, checked without a GPU.
//!
//! Performance claims about the kernels ("the MoE GEMM runs on tensor cores", "the sm_90a GEMM
//! uses wgmma", "no kernel spills registers") are facts about the code ptxas emitted, not about
//! the CUDA source: a template change, a new nvcc or a register cap can quietly turn an `mma.sync`
//! loop into scalar code or add local-memory spills, and nothing else in CI would notice (the
//! emulator runs the CUDA source on the CPU, not the SASS). This test writes the fatbin to a temp
//! file, disassembles each cubin with `cuobjdump -sass -arch <arch>` (sm_90a and sm_120), reads
//! `cuobjdump -res-usage` (registers, stack frame, local and shared memory per kernel), and checks:
//!
//! - every kernel of `KERNEL_NAMES` is in both cubins, and nothing else is;
//! - the rules of [`RULES`]: each kernel family that must run on tensor cores contains the
//!   opcode (`HMMA` for `mma.sync`, `HGMMA` for wgmma) on every arch it targets
//!   (`dgemma::kernels::kernel_target`); every rule must match at least one kernel, so renaming
//!   a family cannot make its rule vacuous;
//! - no kernel has a stack frame, local memory or `LDL`/`STL` (register spills or local arrays),
//!   except the ones listed in [`KNOWN_STACK`] with their exact frame size and the reason;
//! - a kernel for one arch only is a trap (`BPT.TRAP`, no tensor opcode) on the other arch.
//!
//! It prints a per-kernel table (arch, registers, stack, shared, tensor and fragment-load
//! opcodes); `--nocapture` shows it. It needs the compiled kernels (nvcc, see build.rs) and
//! cuobjdump: `$DGEMMA_CUOBJDUMP`, else `<repo>/.tools/cuda-inspect/nvidia/cu13/bin/cuobjdump`
//! (`tools/install-cuda-toolchain.sh --inspect`). Without either it fails, never passes. It is
//! `#[ignore]`d so that a plain `cargo test --workspace` on a machine without them stays green;
//! `tools/test.sh` (CI) installs cuobjdump and runs it with `--include-ignored`. (The GPU suite
//! also runs every bundled test with `--include-ignored`: on a GPU host this one needs
//! `DGEMMA_CUOBJDUMP`, or tools/gpu-bundle.sh should leave it out.)
//!
//! ```text
//! cargo test -p dgemma --test sass -- --include-ignored --nocapture
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use dgemma::kernels::{kernel_target, FATBIN, HAVE_KERNELS, KERNEL_NAMES, NOT_BUILT_REASON};

/// The machine-code images of the fatbin (the third image, compute_120, is PTX).
const ARCHS: [&str; 2] = ["sm_90a", "sm_120"];

/// Which arch(es) of a kernel a rule looks at.
#[derive(Clone, Copy)]
enum On {
    /// Every arch the kernel targets (`kernel_target`: "all" is both).
    Targets,
    /// This arch only, if the kernel targets it.
    Arch(&'static str),
}

/// A kernel family's machine code must contain an opcode.
struct Rule {
    /// Short name for the summary line.
    id: &'static str,
    what: &'static str,
    kernels: fn(&str) -> bool,
    on: On,
    /// Prefix of a full mnemonic (`HMMA` matches `HMMA.16816.F32.BF16`, not `HGMMA...`).
    must_contain: &'static str,
}

const RULES: &[Rule] = &[
    Rule {
        id: "mma-gemm",
        what: "tensor-core MoE GEMM (grouped_gemm_*_mma_*: mma.sync)",
        kernels: |n| n.starts_with("grouped_gemm_") && n.contains("_mma_"),
        on: On::Targets,
        must_contain: "HMMA",
    },
    Rule {
        id: "attention",
        what: "attention (attention_* but *_wgmma_*: mma.sync)",
        kernels: |n| n.starts_with("attention_") && !n.contains("_wgmma_"),
        on: On::Targets,
        must_contain: "HMMA",
    },
    Rule {
        id: "linear",
        what: "linear (linear_* but *_wgmma_*: mma.sync)",
        kernels: |n| n.starts_with("linear_") && !n.contains("_wgmma_"),
        on: On::Targets,
        must_contain: "HMMA",
    },
    Rule {
        // soft_embedding_h{H}_v{V}_t..._w..._s{S}: the GEMM; the _probs_ and _reduce_ kernels
        // around it are SIMT.
        id: "soft-embedding",
        what: "soft embedding GEMM (soft_embedding_h*: mma.sync)",
        kernels: |n| n.starts_with("soft_embedding_h") && !n.contains("_wgmma"),
        on: On::Targets,
        must_contain: "HMMA",
    },
    Rule {
        id: "wgmma-gemm",
        what: "wgmma MoE GEMM (grouped_gemm_*_wgmma_*: HGMMA on sm_90a)",
        kernels: |n| n.starts_with("grouped_gemm_") && n.contains("_wgmma_"),
        on: On::Arch("sm_90a"),
        must_contain: "HGMMA",
    },
    Rule {
        id: "wgmma-attention",
        what: "wgmma attention (attention_*_wgmma_*: HGMMA on sm_90a; P V on wgmma too from head_dim 128)",
        kernels: |n| n.starts_with("attention_") && n.contains("_wgmma_"),
        on: On::Arch("sm_90a"),
        must_contain: "HGMMA",
    },
    Rule {
        id: "wgmma-soft-embedding",
        what: "wgmma soft embedding GEMM (soft_embedding_h*_wgmma*: HGMMA on sm_90a)",
        kernels: |n| n.starts_with("soft_embedding_h") && n.contains("_wgmma"),
        on: On::Arch("sm_90a"),
        must_contain: "HGMMA",
    },
    Rule {
        id: "wgmma-linear",
        what: "wgmma linear (linear_*_wgmma_*: HGMMA on sm_90a)",
        kernels: |n| n.starts_with("linear_") && n.contains("_wgmma_"),
        on: On::Arch("sm_90a"),
        must_contain: "HGMMA",
    },
];

/// Kernels allowed a stack frame, with its exact size in bytes (any change fails, so a fix or a
/// growth is noticed and this list stays true) and why. Each is a ptxas register spill
/// (`nvcc -Xptxas -v` on the kernel's generated .cu reports the spill stores and loads); they
/// are known defects pinned here so that no other kernel starts spilling, not accepted designs.
const KNOWN_STACK: &[(&str, &str, u64, &str)] = &[
    (
        "sm_120",
        "grouped_gemm_n1408_k2816_geglu_mma_t64x64x32_w8_bf16_sm120",
        8,
        "ptxas spill at 80 registers: 8 bytes stack frame, 8 bytes spill stores, 8 bytes spill loads",
    ),
    (
        "sm_120",
        "grouped_gemm_n2816_k704_down_r32_c64_e4m3_bf16_sm120",
        8,
        "SIMT FP8 GEMM at 128 registers: 8 bytes stack frame, 12 bytes spill stores, 24 bytes spill loads",
    ),
    (
        "sm_120",
        "grouped_gemm_n1408_k2816_geglu_r32_c32_e4m3_bf16_sm120",
        8,
        "SIMT FP8 GEMM at 128 registers: 8 bytes stack frame (ptxas spill)",
    ),
    (
        "sm_90a",
        "grouped_gemm_n64_k64_geglu_r32_c32_e4m3_bf16_sm90a",
        8,
        "SIMT FP8 GEMM at 128 registers: 8 bytes stack frame, 4 bytes spill stores, 4 bytes spill loads",
    ),
];

/// Opcodes (before the first '.') the table shows: tensor-core math, fragment and TMA loads,
/// local memory.
fn shown(base: &str) -> bool {
    base.contains("MMA")
        || matches!(base, "LDSM" | "STSM" | "UTMALDG" | "UTMASTG" | "UBLKCP" | "LDGSTS" | "LDL" | "STL")
}

/// One kernel in one cubin.
#[derive(Default)]
struct Function {
    /// Full mnemonic ("HMMA.16816.F32.BF16") -> count.
    mnemonics: BTreeMap<String, usize>,
    /// `-res-usage` fields: REG, STACK, SHARED, LOCAL, ...
    res: BTreeMap<String, u64>,
}

impl Function {
    fn has_prefix(&self, prefix: &str) -> bool {
        self.mnemonics.keys().any(|m| m.starts_with(prefix))
    }
    fn base_counts(&self) -> BTreeMap<&str, usize> {
        let mut out = BTreeMap::new();
        for (m, c) in &self.mnemonics {
            *out.entry(m.split('.').next().unwrap_or(m)).or_insert(0) += c;
        }
        out
    }
    fn res(&self, key: &str) -> u64 {
        self.res.get(key).copied().unwrap_or(0)
    }
}

/// The repository root: `$DGEMMA_REPO` when set and not empty, else the compile-time source tree.
fn repo_root() -> PathBuf {
    match std::env::var_os("DGEMMA_REPO") {
        Some(dir) if !dir.is_empty() => dir.into(),
        _ => Path::new(env!("CARGO_MANIFEST_DIR")).into(),
    }
}

fn cuobjdump_path() -> PathBuf {
    match std::env::var_os("DGEMMA_CUOBJDUMP") {
        Some(p) if !p.is_empty() => p.into(),
        _ => repo_root().join(".tools/cuda-inspect/nvidia/cu13/bin/cuobjdump"),
    }
}

fn run(cuobjdump: &Path, args: &[&str], fatbin: &Path) -> String {
    let out = Command::new(cuobjdump)
        .args(args)
        .arg(fatbin)
        .output()
        .unwrap_or_else(|e| panic!("running {} {args:?}: {e}", cuobjdump.display()));
    assert!(
        out.status.success(),
        "{} {args:?} {} failed ({}):\n{}",
        cuobjdump.display(),
        fatbin.display(),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("cuobjdump output is UTF-8")
}

/// `cuobjdump -sass -arch <arch>`: function name -> mnemonics. Checks that the output is of that
/// arch only.
fn parse_sass(arch: &str, text: &str) -> BTreeMap<String, Function> {
    let mut funcs: BTreeMap<String, Function> = BTreeMap::new();
    let mut current: Option<String> = None;
    let mut archs_seen = BTreeSet::new();
    for line in text.lines() {
        let t = line.trim();
        if let Some(a) = t.strip_prefix("arch = ") {
            archs_seen.insert(a.trim().to_string());
        } else if let Some(name) = t.strip_prefix("Function : ") {
            let name = name.trim().to_string();
            assert!(!funcs.contains_key(&name), "{arch}: function {name} twice in the SASS");
            funcs.insert(name.clone(), Function::default());
            current = Some(name);
        } else if let Some(rest) = t.strip_prefix("/*") {
            // "/*0040*/   @!P0 BPT.TRAP 0x1 ;   /* 0x... */"; encoding-only lines are "/* 0x... */".
            let Some((addr, insn)) = rest.split_once("*/") else { continue };
            if !addr.chars().all(|c| c.is_ascii_hexdigit()) || addr.is_empty() {
                continue;
            }
            let insn = insn.split("/*").next().unwrap_or("").trim().trim_start_matches('{').trim();
            let mut tokens = insn.split(|c: char| c.is_whitespace() || c == ';').filter(|s| !s.is_empty());
            let mut op = tokens.next().unwrap_or("");
            if op.starts_with('@') {
                op = tokens.next().unwrap_or("");
            }
            if op.is_empty() {
                continue;
            }
            let name = current.as_ref().unwrap_or_else(|| panic!("{arch}: instruction before any function: {line}"));
            *funcs.get_mut(name).unwrap().mnemonics.entry(op.to_string()).or_insert(0) += 1;
        }
    }
    let want: BTreeSet<String> = [arch.to_string()].into();
    assert_eq!(archs_seen, want, "`cuobjdump -sass -arch {arch}` printed other archs");
    funcs
}

/// `cuobjdump -res-usage`: (arch, function) -> fields.
fn parse_res_usage(text: &str) -> BTreeMap<(String, String), BTreeMap<String, u64>> {
    let mut out = BTreeMap::new();
    let mut arch = String::new();
    let mut func: Option<String> = None;
    for line in text.lines() {
        let t = line.trim();
        if let Some(a) = t.strip_prefix("arch = ") {
            arch = a.trim().to_string();
            func = None;
        } else if let Some(f) = t.strip_prefix("Function ") {
            func = Some(f.trim().trim_end_matches(':').to_string());
        } else if let Some(f) = func.take() {
            // "REG:128 STACK:8 SHARED:27648 LOCAL:0 CONSTANT[0]:588 TEXTURE:0 ..."
            let fields: BTreeMap<String, u64> = t
                .split_whitespace()
                .filter_map(|kv| kv.split_once(':'))
                .filter_map(|(k, v)| v.parse().ok().map(|v| (k.to_string(), v)))
                .collect();
            assert!(fields.contains_key("REG"), "unexpected -res-usage line for {arch} {f}: {line}");
            out.insert((arch.clone(), f), fields);
        }
    }
    out
}

/// The archs kernel `name` has a real body on.
fn targets(name: &str) -> Vec<&'static str> {
    match kernel_target(name).unwrap_or_else(|| panic!("{name} is not in KERNEL_NAMES")) {
        "all" => ARCHS.to_vec(),
        t => {
            let a = ARCHS.iter().find(|&&a| a == t).unwrap_or_else(|| panic!("{name}: unknown target {t}"));
            vec![*a]
        }
    }
}

#[test]
#[ignore = "needs cuobjdump (the toolchain script's --inspect); tools/test.sh runs it with --include-ignored"]
fn sass_matches_the_expectations() {
    assert!(
        HAVE_KERNELS,
        "the CUDA kernels were not built ({NOT_BUILT_REASON}): there is no SASS to check. Run \
         tools/install-cuda-toolchain.sh and build with NVCC=<repo>/.tools/cuda/nvidia/cu13/bin/nvcc"
    );
    let cuobjdump = cuobjdump_path();
    assert!(
        cuobjdump.is_file(),
        "no cuobjdump at {}: run tools/install-cuda-toolchain.sh --inspect, or set DGEMMA_CUOBJDUMP \
         (the SASS checks run where the kernels are built, by tools/test.sh)",
        cuobjdump.display()
    );

    let fatbin = std::env::temp_dir().join(format!("dgemma-sass-{}.fatbin", std::process::id()));
    std::fs::write(&fatbin, FATBIN).expect("write the fatbin to a temp file");
    // The two disassemblies take ~2 s each: run them side by side.
    let (sass, res) = std::thread::scope(|s| {
        let jobs: Vec<_> = ARCHS
            .iter()
            .map(|&arch| {
                let (cuobjdump, fatbin) = (&cuobjdump, &fatbin);
                s.spawn(move || (arch, parse_sass(arch, &run(cuobjdump, &["-sass", "-arch", arch], fatbin))))
            })
            .collect();
        let res = parse_res_usage(&run(&cuobjdump, &["-res-usage"], &fatbin));
        let sass: BTreeMap<&str, BTreeMap<String, Function>> = jobs.into_iter().map(|j| j.join().unwrap()).collect();
        (sass, res)
    });
    let _ = std::fs::remove_file(&fatbin);
    let mut sass = sass;

    let mut failures: Vec<String> = Vec::new();
    let names: BTreeSet<&str> = KERNEL_NAMES.iter().copied().collect();
    for arch in ARCHS {
        let funcs = sass.get_mut(arch).unwrap();
        let have: BTreeSet<&str> = funcs.keys().map(String::as_str).collect();
        for missing in names.difference(&have) {
            failures.push(format!("{arch}: kernel {missing} is not in the SASS"));
        }
        for extra in have.difference(&names) {
            failures.push(format!("{arch}: SASS function {extra} is not in KERNEL_NAMES"));
        }
        for (name, f) in funcs.iter_mut() {
            match res.get(&(arch.to_string(), name.clone())) {
                Some(fields) => f.res = fields.clone(),
                None => failures.push(format!("{arch}: no -res-usage entry for {name}")),
            }
        }
    }

    // The expectations table.
    let mut rule_counts: Vec<String> = Vec::new();
    for rule in RULES {
        let mut matched = 0;
        for name in KERNEL_NAMES.iter().filter(|n| (rule.kernels)(n)) {
            for arch in targets(name) {
                if let On::Arch(a) = rule.on {
                    if a != arch {
                        continue;
                    }
                }
                matched += 1;
                let Some(f) = sass[arch].get(*name) else { continue };
                if !f.has_prefix(rule.must_contain) {
                    failures.push(format!(
                        "{arch}: {name} has no {} ({}); its tensor opcodes: {}",
                        rule.must_contain,
                        rule.what,
                        summary(f)
                    ));
                }
            }
        }
        rule_counts.push(format!("{} {}:{matched}", rule.id, rule.must_contain));
        if matched == 0 {
            failures.push(format!(
                "rule \"{}\" matched no kernel: was the family renamed? Fix its predicate",
                rule.what
            ));
        }
    }

    // No stack frame / local memory / LDL / STL anywhere but the known list.
    for arch in ARCHS {
        for (name, f) in &sass[arch] {
            let bases = f.base_counts();
            let local_ops = bases.get("LDL").unwrap_or(&0) + bases.get("STL").unwrap_or(&0);
            let (stack, local) = (f.res("STACK"), f.res("LOCAL"));
            let known = KNOWN_STACK.iter().find(|(a, n, _, _)| *a == arch && n == name);
            match known {
                Some((_, _, bytes, why)) => {
                    if stack != *bytes || local != 0 {
                        failures.push(format!(
                            "{arch}: {name} is in KNOWN_STACK with {bytes} bytes ({why}) but now has STACK:{stack} \
                             LOCAL:{local} ({local_ops} LDL/STL): update or remove the entry"
                        ));
                    }
                }
                None if stack != 0 || local != 0 || local_ops != 0 => failures.push(format!(
                    "{arch}: {name} uses local memory: STACK:{stack} LOCAL:{local}, {local_ops} LDL/STL (register \
                     spills or a local array; `nvcc -Xptxas -v` on its generated .cu says which)"
                )),
                None => {}
            }
        }
    }
    for (arch, name, _, _) in KNOWN_STACK {
        if !sass.get(arch).is_some_and(|f| f.contains_key(*name)) {
            failures.push(format!("KNOWN_STACK lists {arch} {name}, which is not in the fatbin: remove it"));
        }
    }

    // A kernel for one arch only is a trap on the other.
    let mut traps = 0;
    for name in KERNEL_NAMES {
        let on = targets(name);
        for arch in ARCHS.iter().filter(|a| !on.contains(*a)) {
            let Some(f) = sass[arch].get(*name) else { continue };
            traps += 1;
            let tensor: Vec<_> = f.base_counts().into_keys().filter(|b| b.contains("MMA")).collect();
            if !f.has_prefix("BPT.TRAP") || !tensor.is_empty() {
                failures.push(format!(
                    "{arch}: {name} targets {} only, but its {arch} body is not a bare trap ({})",
                    on.join(","),
                    summary(f)
                ));
            }
        }
    }

    // The table: the real bodies (the off-target traps are counted, not listed). Opcode counts
    // are static (instructions in the code, not executed ones); "shared" is the static shared
    // memory (dynamic shared memory is a launch parameter, not in the cubin).
    println!("{:<7} {:>4} {:>5} {:>6}  {:<32} kernel", "arch", "reg", "stack", "shared", "static opcode counts");
    for arch in ARCHS {
        for (name, f) in &sass[arch] {
            if !targets(name).contains(&arch) {
                continue;
            }
            println!(
                "{arch:<7} {:>4} {:>5} {:>6}  {:<32} {name}",
                f.res("REG"),
                f.res("STACK"),
                f.res("SHARED"),
                summary(f)
            );
        }
    }
    println!(
        "{} kernels x {} archs; rules (pairs checked): {}; {} off-target trap bodies; {} known stack frames",
        KERNEL_NAMES.len(),
        ARCHS.len(),
        rule_counts.join(", "),
        traps,
        KNOWN_STACK.len()
    );

    assert!(failures.is_empty(), "{} SASS check(s) failed:\n  {}", failures.len(), failures.join("\n  "));
}

/// "HMMA:128 LDSM:32" (the shown opcodes and their counts) or "-".
fn summary(f: &Function) -> String {
    let parts: Vec<String> =
        f.base_counts().into_iter().filter(|(b, _)| shown(b)).map(|(b, c)| format!("{b}:{c}")).collect();
    if parts.is_empty() {
        "-".into()
    } else {
        parts.join(" ")
    }
}
