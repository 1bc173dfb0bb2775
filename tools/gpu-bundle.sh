#!/usr/bin/env bash
# Builds what the GPU suite runs on a GPU host (which has the CUDA driver but no Rust) into
# .bundle/ (git-ignored), to be sent with the device tool's `carry: [".bundle"]`:
#
#   .bundle/bin.tar.xz     release executables, debug info stripped (symbols kept for backtraces):
#                          the `dgemma` CLI, every test executable of the workspace that holds
#                          tests (the GPU tests of dgemma-cuda among them: libtest #[ignore]d,
#                          run with --include-ignored), the `cargo bench` executables, and
#                          the cdylibs tests load from beside them (libdgemma_capi.so)
#   .bundle/reference/     reference/models, reference/cases, reference/tokenizer as built against
#   .bundle/manifest.json  build facts (commit, build root, toolchain) and one entry per executable
#   .bundle/MANIFEST.md    the same, for people
#
# Compressed because stripped executables alone are ~70 MB (they share most of std and the
# dependencies, which xz's 64 MiB window removes: ~6 MB). The working tree plus carried paths
# must stay under the device tool's 64 MiB; this script fails if .bundle/ is over 60 MiB.
#
#   tools/gpu-bundle.sh                 # whole workspace
# Environment:
#   DGEMMA_BUNDLE_PACKAGES   cargo package selection instead of --workspace, e.g. "-p dgemma-cuda -p dgemma-cli"
#   DGEMMA_BUNDLE_MAX_MIB    size limit of .bundle/ (default 60)
# NVCC is always the pinned wheel toolchain (tools/install-cuda-toolchain.sh, installed if missing).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bundle="$root/.bundle"
work="$root/target/gpu-bundle"          # build logs and staging (target/ is ignored)
max_mib="${DGEMMA_BUNDLE_MAX_MIB:-60}"
read -r -a pkgs <<<"${DGEMMA_BUNDLE_PACKAGES:---workspace}"

# Always the pinned CUDA 13.0 nvcc: the GPU hosts' driver 580 rejects PTX from a newer one.
bash tools/install-cuda-toolchain.sh >/dev/null
pinned="$root/.tools/cuda/nvidia/cu13/bin/nvcc"
if [ -n "${NVCC:-}" ] && [ "$NVCC" != "$pinned" ]; then
    echo "gpu-bundle: ignoring NVCC=$NVCC, building with the pinned $pinned"
fi
export NVCC="$pinned"
echo "== nvcc: $("$NVCC" --version | tail -2 | head -1)"

rm -rf "$work/stage"
mkdir -p "$work/stage/bin"
t0=$(date +%s)
echo "== cargo build --release -p dgemma-cli --bin dgemma"
cargo build --release --locked -p dgemma-cli --bin dgemma --message-format=json-render-diagnostics >"$work/build.jsonl"
echo "== cargo test --release --no-run ${pkgs[*]}"
cargo test --release --locked "${pkgs[@]}" --no-run --message-format=json-render-diagnostics >"$work/test.jsonl"
echo "== cargo bench --no-run ${pkgs[*]}"
cargo bench --locked "${pkgs[@]}" --benches --no-run --message-format=json-render-diagnostics >"$work/bench.jsonl"
echo "== built in $(($(date +%s) - t0)) s"

commit_full="$(git rev-parse HEAD 2>/dev/null || echo unknown)"
commit="$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)"
dirty=false
if [ -n "$(git status --porcelain --untracked-files=no 2>/dev/null)" ]; then dirty=true; fi

export root work commit commit_full dirty
export RUSTC_VERSION="$(rustc --version)"
export NVCC_VERSION="$("$NVCC" --version | grep -o 'release [0-9.]*, V[0-9.]*' || echo unknown)"
export STRIP_TOOL="$(command -v strip || command -v objcopy)"

python3 - <<'EOF'
import hashlib, json, os, re, shutil, subprocess, sys, datetime

root, work = os.environ["root"], os.environ["work"]
stage = os.path.join(work, "stage")
strip_tool = os.environ["STRIP_TOOL"]

def artifacts(path):
    with open(path) as f:
        for line in f:
            m = json.loads(line)
            if m.get("reason") == "compiler-artifact" and m.get("executable"):
                yield m

def pkg_name(m):
    # package_id: "path+file:///work/main/crates/dgemma-cuda#0.1.0" or "...#name@0.1.0"
    pid = m["package_id"]
    frag = pid.rsplit("#", 1)[-1]
    if "@" in frag:
        return frag.split("@")[0]
    return os.path.basename(pid.rsplit("#", 1)[0])

entries, seen = [], set()

def add(m, kind, name, what):
    exe = m["executable"]
    if exe in seen:
        return
    seen.add(exe)
    pkg_dir = os.path.dirname(m["manifest_path"])
    entries.append({
        "name": name, "kind": kind, "what": what, "package": pkg_name(m),
        "target": m["target"]["name"], "target_kind": m["target"]["kind"],
        "exe": exe, "package_dir": os.path.relpath(pkg_dir, root), "src_path": m["target"]["src_path"],
    })

# 1. the CLI
cli = [m for m in artifacts(os.path.join(work, "build.jsonl")) if m["target"]["kind"] == ["bin"] and m["target"]["name"] == "dgemma"]
if not cli:
    sys.exit("gpu-bundle: cargo build produced no dgemma executable")
add(cli[-1], "cli", "dgemma", "the dgemma command line (run, info, verify), release build")

# 2. test executables
for m in artifacts(os.path.join(work, "test.jsonl")):
    if not m["profile"]["test"]:
        continue  # examples and the CLI binary itself
    kinds = m["target"]["kind"]
    pkg, tgt = pkg_name(m), m["target"]["name"]
    if kinds == ["test"] and (pkg, tgt) == ("dgemma", "sass"):
        continue  # inspects the build's machine code with cuobjdump: a build-machine check (tools/test.sh)
    if kinds == ["test"]:
        name, what = f"{pkg}.test-{tgt}", f"integration tests {m['target']['src_path'].replace(root + '/', '')}"
    elif "bin" in kinds:
        name, what = f"{pkg}.bin-{tgt}", f"unit tests of binary {tgt}"
    else:
        name, what = f"{pkg}.lib", f"unit tests of library {tgt} ({m['target']['src_path'].replace(root + '/', '')})"
    add(m, "test", name, what)

# 3. bench executables (criterion, harness = false)
for m in artifacts(os.path.join(work, "bench.jsonl")):
    if m["target"]["kind"] == ["bench"]:
        add(m, "bench", f"{pkg_name(m)}.bench-{m['target']['name']}",
            f"cargo bench target {m['target']['src_path'].replace(root + '/', '')} (criterion)")

# 4. shared libraries (cdylib) the tests load from beside their executable (dgemma-capi's C example
#    looks for libdgemma_capi.so in the test executable's directory or its parent)
with open(os.path.join(work, "test.jsonl")) as f:
    for line in f:
        m = json.loads(line)
        if m.get("reason") != "compiler-artifact" or "cdylib" not in m["target"]["crate_types"]:
            continue
        for so in m["filenames"]:
            if so.endswith(".so") and so not in seen:
                seen.add(so)
                entries.append({
                    "name": os.path.basename(so), "kind": "cdylib",
                    "what": f"shared library of {pkg_name(m)} (cdylib), beside the test executables",
                    "package": pkg_name(m), "target": m["target"]["name"], "target_kind": m["target"]["kind"],
                    "exe": so, "package_dir": os.path.relpath(os.path.dirname(m["manifest_path"]), root),
                    "src_path": m["target"]["src_path"],
                })

# List the tests of each test executable (here, on the build machine: libtest --list needs no GPU).
def count(exe, cwd, *flags):
    out = subprocess.run([exe, "--list", *flags], cwd=cwd, capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        raise SystemExit(f"gpu-bundle: {exe} --list failed:\n{out.stderr}")
    return [l[: -len(": test")] for l in out.stdout.splitlines() if l.endswith(": test")]

def ignore_reasons(e):
    """The reasons of #[ignore = "..."] in the target's sources (the test file, or the package's src/)."""
    src = e["src_path"]
    files = [src] if e["target_kind"] == ["test"] else [
        os.path.join(d, f) for d, _, fs in os.walk(os.path.dirname(src)) for f in fs if f.endswith(".rs")]
    if e["target_kind"] == ["test"]:
        common = os.path.join(os.path.dirname(src), "common")
        files += [os.path.join(d, f) for d, _, fs in os.walk(common) for f in fs if f.endswith(".rs")]
    out = set()
    for f in files:
        try:
            out |= set(re.findall(r'#\[ignore\s*=\s*"([^"]*)"\s*\]', open(f, encoding="utf-8").read()))
        except OSError:
            pass
    if not out:
        out.add("(no reason given)")
    return out

kept, skipped = [], []
for e in entries:
    cwd = os.path.join(root, e["package_dir"])
    if e["kind"] == "test":
        all_tests = count(e["exe"], cwd, "--include-ignored")
        ignored = count(e["exe"], cwd, "--ignored")
        e["tests"], e["ignored_tests"] = len(all_tests), len(ignored)
        # GPU tests are the #[ignore]d ones whose reason names a GPU or CUDA ("needs a CUDA GPU");
        # other #[ignore]d tests (slow ones) run too under --include-ignored.
        e["ignore_reasons"] = sorted(ignore_reasons(e)) if ignored else []
        e["gpu"] = any(re.search(r"\b(gpu|cuda)\b", r, re.I) for r in e["ignore_reasons"])
        e["timeout_s"] = 300 if e["gpu"] else 180
        if not all_tests:
            skipped.append(e)
            continue
    kept.append(e)

# Strip debug info (keep the symbol table: panics and backtraces stay readable) into the stage.
for e in kept:
    dst = os.path.join(stage, "bin", e["name"])
    if os.path.basename(strip_tool) == "objcopy":
        subprocess.run([strip_tool, "--strip-debug", e["exe"], dst], check=True)
    else:
        subprocess.run([strip_tool, "--strip-debug", "-o", dst, e["exe"]], check=True)
    os.chmod(dst, 0o755 if e["kind"] != "cdylib" else 0o644)
    e["file"] = "bin/" + e["name"]
    e["bytes"] = os.path.getsize(dst)
    e["sha256"] = hashlib.sha256(open(dst, "rb").read()).hexdigest()
    e["exe_at_build"] = e.pop("exe")
    e["src_path"] = os.path.relpath(e["src_path"], root)

# Newest glibc symbol version any executable needs (the GPU hosts must have at least this).
glibc = "unknown"
try:
    vers = set()
    for e in kept:
        t = subprocess.run(["objdump", "-T", os.path.join(stage, e["file"])], capture_output=True, text=True).stdout
        vers |= set(re.findall(r"GLIBC_([0-9.]+)", t))
    if vers:
        glibc = max(vers, key=lambda v: tuple(int(x) for x in v.split(".")))
except OSError:
    pass

# dgemma info here: the fatbin must be embedded, or the GPU tests are pointless.
info = subprocess.run([os.path.join(stage, "bin", "dgemma"), "info", "--model",
                       os.path.join(root, "reference/models/tiny-default")],
                      capture_output=True, text=True)
kernels_line = next((l for l in info.stdout.splitlines() if l.startswith("cuda kernels:")), "")
if "none embedded" in kernels_line or not kernels_line:
    sys.exit(f"gpu-bundle: the dgemma build has no CUDA kernels ({kernels_line or info.stderr.strip()}); set NVCC")

m = re.search(r"\(commit ([0-9a-f]+|unknown)\)", info.stdout)
binary_commit = m.group(1) if m else "unknown"
if binary_commit != os.environ["commit"]:
    print(f"gpu-bundle: WARNING: the binaries say commit {binary_commit}, git says {os.environ['commit']}")

manifest = {
    "format": 1,
    "commit": os.environ["commit"],
    "commit_full": os.environ["commit_full"],
    "binary_commit": binary_commit,
    "dirty": os.environ["dirty"] == "true",
    "built": datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).strftime("%Y-%m-%dT%H:%M:%SZ"),
    "build_host": os.uname().nodename,
    # Where it was built (informational): test executables fall back to data paths under this root
    # (env!("CARGO_MANIFEST_DIR")) unless $DGEMMA_REPO is set, and the CLI tests to
    # env!("CARGO_BIN_EXE_dgemma") unless $DGEMMA_BIN is; gpu-suite.sh sets both on the host.
    "build_root": root,
    "cli_exe_at_build": kept[0]["exe_at_build"] if kept[0]["name"] == "dgemma" else None,
    "rustc": os.environ["RUSTC_VERSION"],
    "nvcc": os.environ["NVCC_VERSION"],
    "needs_glibc": glibc,
    "kernels": kernels_line,
    "archive": "bin.tar.xz",
    "reference": ["reference/models", "reference/cases", "reference/tokenizer"],
    "executables": kept,
    "skipped_no_tests": [{"name": e["name"], "what": e["what"]} for e in skipped],
}
with open(os.path.join(stage, "manifest.json"), "w") as f:
    json.dump(manifest, f, indent=1)
    f.write("\n")

md = [f"# dgemma GPU bundle", "",
      f"commit `{manifest['commit']}`{' (dirty tree)' if manifest['dirty'] else ''}, built {manifest['built']} on {manifest['build_host']} in `{root}`",
      f"{manifest['rustc']}; nvcc {manifest['nvcc']}; needs glibc >= {glibc}; {kernels_line}", "",
      "| name | kind | tests (ignored) | what |", "| --- | --- | ---: | --- |"]
for e in kept:
    t = f"{e['tests']} ({e['ignored_tests']})" if e["kind"] == "test" else ""
    gpu = " **GPU**" if e.get("gpu") else ""
    md.append(f"| {e['name']} | {e['kind']}{gpu} | {t} | {e['what']} |")
if skipped:
    md += ["", "Left out (no tests): " + ", ".join(e["name"] for e in skipped)]
with open(os.path.join(stage, "MANIFEST.md"), "w") as f:
    f.write("\n".join(md) + "\n")
print("\n".join(md))
EOF

echo "== compressing (xz -9)"
tar -C "$work/stage" -cf - bin | xz -9 -T2 >"$work/stage/bin.tar.xz"
rm -rf "$work/stage/bin"
for d in reference/models reference/cases reference/tokenizer; do
    mkdir -p "$work/stage/$(dirname "$d")"
    cp -a "$d" "$work/stage/$d"
done
rm -rf "$bundle"
mv "$work/stage" "$bundle"

bytes=$(du -sb "$bundle" | cut -f1)
mib=$(python3 -c "print(f'{$bytes/2**20:.1f}')")
echo "== .bundle: $mib MiB ($bytes bytes): $(du -sh "$bundle/bin.tar.xz" | cut -f1) executables, $(du -sh "$bundle/reference" | cut -f1) reference data"
# What the device tool sends: tracked + untracked-not-ignored files, plus the carried .bundle.
tree=$( (git ls-files -z --cached --others --exclude-standard | xargs -0 -r stat -c %s -- 2>/dev/null || true) | awk '{s+=$1} END {print s+0}')
echo "== working tree that travels: $(python3 -c "print(f'{$tree/2**20:.1f}')") MiB; with .bundle: $(python3 -c "print(f'{($tree+$bytes)/2**20:.1f}')") MiB (limit 64 MiB)"
if [ "$bytes" -gt $((max_mib * 1024 * 1024)) ]; then
    echo "gpu-bundle: .bundle is $mib MiB, over the ${max_mib} MiB limit" >&2
    exit 1
fi
if [ $((tree + bytes)) -gt $((64 * 1024 * 1024)) ]; then
    echo "gpu-bundle: warning: working tree + .bundle is over the device tool's 64 MiB" >&2
fi
echo "== done: carry [\".bundle\"], command: bash tools/gpu-suite.sh"
