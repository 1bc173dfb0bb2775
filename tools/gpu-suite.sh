#!/usr/bin/env bash
# The GPU suite: runs what tools/gpu-bundle.sh put in .bundle/ on a GPU host (no Rust needed there),
# from the repo root:
#
#   bash tools/gpu-suite.sh
#
# 1. nvidia-smi: device name, driver, memory (none: the run goes on and says so).
# 2. Unpacks .bundle/bin.tar.xz into a temp dir and checks each executable's sha256.
# 3. Data paths: every test, bench and library path derived from env!("CARGO_MANIFEST_DIR") takes
#    the repository root from $DGEMMA_REPO first, and the CLI tests run $DGEMMA_BIN before
#    env!("CARGO_BIN_EXE_dgemma"), so the executables need nothing at the build machine's paths:
#    the suite sets DGEMMA_REPO=<this checkout> and DGEMMA_BIN=<the bundled dgemma>, and copies
#    reference/{models,cases,tokenizer} from the bundle into the checkout where it lacks them.
#    (Bundles built before those overrides existed read their data under manifest.json's
#    build_root and fail here unless that path holds a checkout.)
# 4. Runs every bundled test executable with --include-ignored (the GPU tests are #[ignore]d) in its
#    package directory, with DGEMMA_REPO and DGEMMA_BIN as above, a per-executable timeout and one
#    budget for the whole suite; GPU executables first. Counts passed/failed from libtest's output.
# 5. Runs the bundled `dgemma info` on each reference model and `dgemma verify` on every case of
#    .bundle/reference/cases; `dgemma bench --synthetic 26b` (bf16), the gpu_kernels bench timed
#    on the figures behind issue #4's and #6's kernel targets (the kernel records), `dgemma bench`
#    again with FP8 experts; and each bench executable once in criterion's --test mode. Last, on
#    what is left of the budget (at most 240 s), tools/hf_bench.py: Hugging Face transformers' own
#    time for the same 4096-token prefill and denoising step (random 26B-A4B weights, bf16) and
#    its ratio to the dgemma bench's (records hf_transformers.*, ratio.hf_over_dgemma.*). Then,
#    on what is still left, the serving figures: `dgemma bench --serve N` for N = 1, 4, 16, 32
#    (records throughput / ttft_p50 / ttft_p99 / peak_mem_gb .bf16.concurrency{N}), and N = 32
#    with FP8 experts (.fp8.concurrency32).
#    DGEMMA_SUITE_ONLY=serve runs only those (and the quick info / verify steps): a second run
#    when the first one's budget ran out before them. Likewise DGEMMA_SUITE_ONLY=kernels (the
#    kernel records of issues #4 / #6: gpu_kernels timed on the figures behind their targets) and
#    DGEMMA_SUITE_ONLY=fp8 (dgemma bench with FP8 experts: the step.fp8.* records of #6); the
#    regex may name several ("kernels|fp8|serve").
# 6. Writes <device-slug>-<date>-<commit>.json and .md (tools/results.py; contract in
#    benches/results/README.md) into $OUT when set, else benches/results/; with $OUT also <stem>.log
#    (the output of every failed step). Prints the table last.
#
# Exit status: 0 all records passed, 1 results written with failures, 2 no bundle / setup error.
# Environment: DGEMMA_SUITE_BUDGET_S (whole suite, default 540), DGEMMA_SUITE_TIMEOUT_S (per
# executable, overrides the manifest's 300 s GPU / 180 s other), DGEMMA_SUITE_JOBS (non-GPU
# executables run at once, default cores/4 capped at 4), DGEMMA_BUNDLE (default <repo>/.bundle),
# DGEMMA_SUITE_ONLY (regex on executable names; when set, the two 26B benches are skipped),
# DGEMMA_SUITE_HF_PYTHON (the python with torch + transformers that runs tools/hf_bench.py, default
# the suite's python3).
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
export DGEMMA_SUITE_ROOT="$root"
export PYTHONUNBUFFERED=1
exec python3 - "$@" <<'EOF'
import atexit
import concurrent.futures as cf
import datetime, hashlib, json, os, re, shutil, signal, socket, struct, subprocess, sys, tarfile, tempfile, time

T0 = time.monotonic()
root = os.environ["DGEMMA_SUITE_ROOT"]
sys.path.insert(0, os.path.join(root, "tools"))
import results  # tools/results.py

bundle = os.environ.get("DGEMMA_BUNDLE", os.path.join(root, ".bundle"))
budget = float(os.environ.get("DGEMMA_SUITE_BUDGET_S", "540"))
deadline = T0 + budget
out_env = os.environ.get("OUT")
out_dir = out_env or os.path.join(root, "benches", "results")

def log(msg):
    print(f"[{time.monotonic() - T0:6.1f}s] {msg}", flush=True)

manifest_path = os.path.join(bundle, "manifest.json")
if not os.path.exists(manifest_path):
    print(f"gpu-suite: no bundle at {bundle}: run tools/gpu-bundle.sh on the build machine and carry .bundle", file=sys.stderr)
    sys.exit(2)
manifest = json.load(open(manifest_path))
records, failures_log, meta = [], [], {}

def rec(*a, **k):
    records.append(results.make_record(*a, **k))

# ---- 1. the GPU ----------------------------------------------------------------------------
gpus, device, driver = [], "no GPU", None
for fields in ("name,driver_version,memory.total,compute_cap", "name,driver_version,memory.total"):
    try:
        p = subprocess.run(["nvidia-smi", f"--query-gpu={fields}", "--format=csv,noheader"],
                           capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        meta["nvidia_smi"] = f"not usable: {e}"
        break
    if p.returncode == 0 and p.stdout.strip():
        gpus = [[x.strip() for x in l.split(",")] for l in p.stdout.strip().splitlines()]
        break
    meta["nvidia_smi"] = f"exit {p.returncode}: {(p.stderr or p.stdout).strip()[:300]}"
if gpus:
    device, driver = gpus[0][0], gpus[0][1]
    meta["gpu"] = "; ".join(", ".join(g) for g in gpus)
    meta.pop("nvidia_smi", None)
meta.update({"driver": driver, "host": socket.gethostname(), "dirty": manifest.get("dirty"),
             "built": manifest.get("built"), "build_root": manifest.get("build_root"),
             "rustc": manifest.get("rustc"), "nvcc": manifest.get("nvcc"), "repo": root})
log(f"device: {device}; driver {driver}; {len(gpus)} GPU(s)" + (f" ({meta.get('nvidia_smi')})" if not gpus else ""))
rec("gpu_suite.gpus", len(gpus), "gpus", target=1, passed=len(gpus) >= 1,
    note=meta.get("gpu") or meta.get("nvidia_smi", "nvidia-smi found no GPU"))

# ---- 2. unpack -----------------------------------------------------------------------------
tmp = tempfile.mkdtemp(prefix="dgemma-suite-")

def cleanup():
    """Removes what this run made: the temp dir with the unpacked executables."""
    shutil.rmtree(tmp, ignore_errors=True)

atexit.register(cleanup)
with tarfile.open(os.path.join(bundle, manifest.get("archive", "bin.tar.xz")), "r:xz") as t:
    try:
        t.extractall(tmp, filter="data")
    except TypeError:  # Python without extraction filters
        t.extractall(tmp)
bad_sha = []
for e in manifest["executables"]:
    path = os.path.join(tmp, e["file"])
    e["path"] = path
    if hashlib.sha256(open(path, "rb").read()).hexdigest() != e["sha256"]:
        bad_sha.append(e["name"])
    os.chmod(path, 0o755)
if bad_sha:
    log(f"WARNING: sha256 mismatch: {bad_sha}")
cli = next(e for e in manifest["executables"] if e["kind"] == "cli")
log(f"bundle: commit {manifest['commit']}{' (dirty)' if manifest.get('dirty') else ''}, "
    f"{len(manifest['executables'])} executables, built {manifest.get('built')} in {manifest.get('build_root')}")

# ---- 3. data paths -------------------------------------------------------------------------
# The executables take the repository root from DGEMMA_REPO and the CLI tests the binary from
# DGEMMA_BIN (both set in `env` below), so nothing is needed at the build root; no symlink.
path_fix = f"DGEMMA_REPO={root}, DGEMMA_BIN=<bundled dgemma>"
build_root = manifest.get("build_root")
if build_root and os.path.realpath(build_root) != os.path.realpath(root):
    path_fix += f" (built in {build_root})"
for d in manifest.get("reference", []):
    if not os.path.exists(os.path.join(root, d)) and os.path.exists(os.path.join(bundle, d)):
        shutil.copytree(os.path.join(bundle, d), os.path.join(root, d))
        path_fix += f"; {d} restored from the bundle"
meta["path_fix"] = path_fix
log(f"paths: {path_fix}")


# ---- helpers -------------------------------------------------------------------------------
env = dict(os.environ, DGEMMA_REPO=root, DGEMMA_BIN=cli["path"], DGEMMA_BUNDLE=bundle, RUST_BACKTRACE="1")
env.pop("DGEMMA_MODEL", None)
# libcublasLt for the GEMM floors (dgemma bench's floor.*_gemm_tflops, loaded at run time by
# cudarc): the CUDA toolkit's, or the one PyTorch's wheels bring (site-packages/nvidia/.../lib).
import glob, site
lt_dirs = sorted({os.path.dirname(p) for base in site.getsitepackages() + ["/usr/local/cuda/lib64"]
                  for p in glob.glob(os.path.join(base, "**", "libcublasLt.so*"), recursive=True)})
if lt_dirs:
    env["LD_LIBRARY_PATH"] = ":".join(lt_dirs + [p for p in [env.get("LD_LIBRARY_PATH")] if p])
meta["libcublaslt_dirs"] = lt_dirs

def run(argv, cwd, timeout):
    """(returncode or None on timeout, combined output, seconds)."""
    t = time.monotonic()
    try:
        p = subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, start_new_session=True)
    except OSError as e:
        return -1, f"could not start {argv[0]}: {e}\n", 0.0
    try:
        outb, _ = p.communicate(timeout=max(1.0, timeout))
        rc = p.returncode
    except subprocess.TimeoutExpired:
        try:
            os.killpg(p.pid, signal.SIGKILL)  # the process group this call started
        except OSError:
            pass
        outb, _ = p.communicate()
        rc = None
    return rc, outb.decode("utf-8", "replace"), time.monotonic() - t

def remaining(reserve=15.0):
    return deadline - time.monotonic() - reserve

SUMMARY = re.compile(r"^test result: (\w+)\. (\d+) passed; (\d+) failed; (\d+) ignored")
LINE = re.compile(r"^test (\S+) \.\.\. (ok|FAILED|ignored)\s*$")

def run_tests(e):
    name, expected = e["name"], e["tests"]
    cwd = os.path.join(root, e["package_dir"])
    if not os.path.isdir(cwd):
        cwd = root
    limit = float(os.environ.get("DGEMMA_SUITE_TIMEOUT_S") or e.get("timeout_s", 180))
    limit = min(limit, remaining())
    if limit < 5:
        return dict(e=e, rc=None, passed=0, failed=expected, secs=0.0, note="not run: suite budget spent", out="")
    rc, out, secs = run([e["path"], "--include-ignored"], cwd, limit)
    ok_lines = [m.group(1) for m in map(LINE.match, out.splitlines()) if m and m.group(2) == "ok"]
    failed_lines = [m.group(1) for m in map(LINE.match, out.splitlines()) if m and m.group(2) == "FAILED"]
    summ = [m for m in map(SUMMARY.match, out.splitlines()) if m]
    if summ and rc is not None:
        passed, failed = int(summ[-1].group(2)), int(summ[-1].group(3))
        note = ""
    else:
        passed = len(ok_lines)
        failed = max(expected - passed, len(failed_lines))
        note = (f"timed out after {limit:.0f} s" if rc is None else f"exit {rc} without a libtest summary") + \
               f"; {passed + len(failed_lines)} of {expected} finished"
    if failed_lines:
        names = ", ".join(failed_lines[:6]) + (f" (+{len(failed_lines) - 6})" if len(failed_lines) > 6 else "")
        note = (note + "; " if note else "") + f"failed: {names}"
    if rc not in (0, 101, None) and summ:
        note = (note + "; " if note else "") + f"exit {rc}"
    return dict(e=e, rc=rc, passed=passed, failed=failed, secs=secs, note=note, out=out)

test_results = []
def finish(r):
    e = r["e"]
    ok = r["rc"] == 0 and r["failed"] == 0 and r["passed"] == e["tests"]
    log(f"{'PASS' if ok else 'FAIL'} {e['name']}: {r['passed']}/{e['tests']} passed, {r['failed']} failed "
        f"({r['secs']:.1f} s){'; ' + r['note'] if r['note'] else ''}")
    if not ok:
        failures_log.append(f"===== {e['name']} ({e['what']}): rc {r['rc']}, {r['note']}\n{r['out'][-20000:]}\n")
    test_results.append((r, ok))

# ---- 4a. GPU test executables, one at a time -----------------------------------------------
only = os.environ.get("DGEMMA_SUITE_ONLY")
tests = [e for e in manifest["executables"] if e["kind"] == "test" and (not only or re.search(only, e["name"]))]
for e in [e for e in tests if e.get("gpu")]:
    log(f"running {e['name']} (GPU, {e['tests']} tests)")
    finish(run_tests(e))

# ---- 5. dgemma info and verify (quick; before the long CPU tests) ---------------------------
ref = os.path.join(bundle, "reference")
models_dir, cases_dir = os.path.join(ref, "models"), os.path.join(ref, "cases")
kernels = None
for model in sorted(os.listdir(models_dir)) if os.path.isdir(models_dir) else []:
    rc, out, secs = run([cli["path"], "info", "--model", os.path.join(models_dir, model)], root, min(60, max(1, remaining())))
    line = next((l for l in out.splitlines() if l.startswith("cuda kernels:")), "")
    m = re.match(r"cuda kernels: (\d+) embedded", line)
    if m:
        kernels = int(m.group(1))
    if rc != 0:
        failures_log.append(f"===== dgemma info --model {model}: rc {rc}\n{out[-5000:]}\n")
    rec(f"dgemma.info.{model}", 1 if rc == 0 else 0, "runs", target=1, passed=rc == 0,
        note=(line[:160] if rc == 0 else (out.strip().splitlines() or ["timed out"])[-1][:160]))
    log(f"{'PASS' if rc == 0 else 'FAIL'} dgemma info --model {model} ({secs:.1f} s)")
rec("dgemma.kernels_embedded", kernels or 0, "kernels", passed=bool(kernels),
    note=manifest.get("kernels", "")[:200])

def case_meta(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        return json.loads(f.read(n)).get("__metadata__", {})

def case_model(path):
    return case_meta(path).get("model")

CHECK = re.compile(r"^\s+(\S+)\s+(?:max\|err\| (\S+))?\s*(?:argmax (\S+)%)?\s+(PASS|FAIL)\b")
cases = sorted(f for f in os.listdir(cases_dir) if f.endswith(".safetensors")) if os.path.isdir(cases_dir) else []
for case in cases:
    stem = case[: -len(".safetensors")]
    path = os.path.join(cases_dir, case)
    try:
        model = case_model(path)
    except (OSError, ValueError, struct.error) as ex:
        model, out = None, f"unreadable case: {ex}"
    if not model:
        rec(f"verify.{stem}", 0, "checks", passed=False, note="the case names no model")
        continue
    rc, out, secs = run([cli["path"], "verify", "--model", os.path.join(models_dir, model), "--case", path],
                        root, min(120, max(1, remaining())))
    checks = [m for m in map(CHECK.match, out.splitlines()) if m]
    npass = sum(1 for c in checks if c.group(4) == "PASS")
    errs = [(float(c.group(2)), c.group(1)) for c in checks if c.group(2)]
    if rc == 0:
        note = f"{model}; worst max|err| {max(errs)[0]:.3g} ({max(errs)[1]})" if errs else model
    elif rc is None:
        note = f"{model}; timed out"
    else:
        bad = [c.group(1) for c in checks if c.group(4) == "FAIL"]
        last = (out.strip().splitlines() or [""])[-1]
        note = f"{model}; exit {rc}; " + (f"failed: {', '.join(bad)}" if bad else last[:160])
        failures_log.append(f"===== dgemma verify {case} (model {model}): rc {rc}\n{out[-5000:]}\n")
    rec(f"verify.{stem}", npass, "checks", target=len(checks) if checks else None, passed=rc == 0, note=note)
    log(f"{'PASS' if rc == 0 else 'FAIL'} dgemma verify {stem}: {npass}/{len(checks)} checks ({secs:.1f} s)")
    # The CUDA backend computes in bf16: it answers the bf16 cases (float32 ones are the CPU's).
    if case_meta(path).get("dtype") != "bfloat16":
        continue
    rc, out, secs = run([cli["path"], "verify", "--backend", "cuda", "--model", os.path.join(models_dir, model),
                         "--case", path], root, min(180, max(1, remaining())))
    checks = [m for m in map(CHECK.match, out.splitlines()) if m]
    npass = sum(1 for c in checks if c.group(4) == "PASS")
    errs = [(float(c.group(2)), c.group(1)) for c in checks if c.group(2)]
    note = f"{model}; --backend cuda" + (f"; worst max|err| {max(errs)[0]:.3g} ({max(errs)[1]})" if errs else "")
    if rc != 0:
        note += f"; exit {rc}; " + (out.strip().splitlines() or ["timed out"])[-1][:160]
        failures_log.append(f"===== dgemma verify --backend cuda {case} (model {model}): rc {rc}\n{out[-5000:]}\n")
    rec(f"verify_cuda.{stem}", npass, "checks", target=len(checks) if checks else None, passed=rc == 0, note=note)
    log(f"{'PASS' if rc == 0 else 'FAIL'} dgemma verify --backend cuda {stem}: {npass}/{len(checks)} checks ({secs:.1f} s)")

# dgemma run on the GPU, on the bundled model.
tiny = os.path.join(models_dir, "tiny-default")
if os.path.isdir(tiny):
    rc, out, secs = run([cli["path"], "run", "--backend", "cuda", "--model", tiny, "--seed", "7", "Why is the sky blue?"],
                        root, min(120, max(1, remaining())))
    last = (out.strip().splitlines() or ["(no output)"])[-1][:160]
    if rc != 0:
        failures_log.append(f"===== dgemma run --backend cuda: rc {rc}\n{out[-5000:]}\n")
    rec("dgemma.run_cuda.tiny-default", 1 if rc == 0 else 0, "runs", target=1, passed=rc == 0, note=last)
    log(f"{'PASS' if rc == 0 else 'FAIL'} dgemma run --backend cuda ({secs:.1f} s): {last}")

# ---- 5c. dgemma bench: the CUDA backend on synthetic 26B-A4B weights -------------------------
def cli_bench(quant, contexts):
    """dgemma bench --synthetic 26b with experts held as `quant` (none: bf16; fp8: e4m3, its records
    named *.fp8.*); its records, or a failed record saying why."""
    tag = "" if quant == "none" else f".{quant}"
    bench_json = os.path.join(tmp, f"bench{tag}.json")
    rc, out, secs = run([cli["path"], "bench", "--synthetic", "26b", "--quant", quant, "--contexts", contexts,
                         "--prompt", "4096", "--iters", "3", "--json", bench_json], root, min(240, remaining(60)))
    if rc == 0 and os.path.exists(bench_json):
        for r in json.load(open(bench_json))["records"]:
            if r["value"] is None:
                rec(f"bench.{r['name']}", 0, r["unit"], passed=False, note=r.get("note"))
                continue
            rec(r["name"], r["value"], r["unit"], floor=r.get("floor"), target=r.get("target"),
                passed=r.get("passed"), note=r.get("note"))
    else:
        failures_log.append(f"===== dgemma bench --synthetic 26b --quant {quant}: rc {rc}\n{out[-5000:]}\n")
        rec(f"dgemma.bench_26b{tag}", 0, "runs", target=1, passed=False,
            note=("timed out" if rc is None else f"exit {rc}: " + (out.strip().splitlines() or [""])[-1][:160]))
    log(f"{'PASS' if rc == 0 else 'FAIL'} dgemma bench --synthetic 26b --quant {quant} ({secs:.1f} s)")

if remaining() > 120 and not only:
    cli_bench("none", "1024,4096,32768")

# ---- 5c2. kernel records: the per-kernel targets of issues #4 and #6 ------------------------
# The gpu_kernels bench, timed for real (criterion, L2 flushed, CUDA events) on the figures behind
# the targets, each figure appended to a JSON-lines file (benches/gpu_common: $DGEMMA_BENCH_RECORDS).
# Every figure becomes a record kernel.<figure> (ms against its floor; on sm_90a the ".mma" figures
# are the mma.sync kernels the backend's wgmma ones replace); the targets are built from the
# backend's figures (KERNEL_TARGETS). A figure missing from the run fails its target's record.
KERNEL_FILTER = (r"gpu_kernels/(grouped_gemm\.|attention\.full\.decoder\.(mma\.)?d512\.q256\.kv8448$|"
                 r"linear\.(lm_head|q_proj\.full|dense_up)\.|row_softmax_entropy_argmax\.|soft_embedding\.(mma\.)?h)")
# name, unit, the figures (regexes: each must match exactly one), how the value is formed
KERNEL_TARGETS = [
    ("moe.grouped_gemm.bf16.m256", "GB/s", [r"^grouped_gemm\.gate_up_geglu\.n", r"^grouped_gemm\.down\.n"], "bandwidth"),
    ("moe.grouped_gemm.fp8.m256", "GB/s", [r"^grouped_gemm\.gate_up_geglu\.e4m3\.", r"^grouped_gemm\.down\.e4m3\."],
     "bandwidth"),
    ("attn.hd512.c256.ctx8192", "TFLOP/s", [r"^attention\.full\.decoder\.d512\.q256\.kv8448$"], "tflops"),
    ("lmhead_selfcond.bf16.c256", "ms", [r"^linear\.lm_head\.n", r"^row_softmax_entropy_argmax\.", r"^soft_embedding\.h"],
     "time"),
]

def kernel_records(figs):
    """Result records from the gpu_kernels figures (dicts of benches/gpu_common's JSON lines)."""
    for f in figs:
        rec(f"kernel.{f['figure']}", f["ms"], "ms", floor=f["floor_ms"] if f["floor_ms"] > 0 else None,
            note=f"{f['bound']} floor; median of {f['samples']}, min {f['min_ms']:.4f} ms; "
                 f"{f['bytes'] / f['ms'] / 1e6:.0f} GB/s" + (f", {f['flops'] / f['ms'] / 1e9:.1f} TFLOP/s" if f["flops"] else ""))
    for name, unit, pats, kind in KERNEL_TARGETS:
        parts = []
        for pat in pats:
            hit = [f for f in figs if re.search(pat, f["figure"])]
            if len(hit) != 1:
                break
            parts.append(hit[0])
        if len(parts) != len(pats):
            rec(name, 0, unit, passed=False, note=f"figure {pat!r} matched {len(hit)} timed figures (needs one)")
            continue
        ms = sum(f["ms"] for f in parts)
        figures = " + ".join(f["figure"] for f in parts)
        if kind == "bandwidth":  # fraction of the measured read bandwidth; target 85 %
            bw = parts[0]["read_gbs"]
            value = sum(f["bytes"] for f in parts) / ms / 1e6
            rec(name, value, unit, floor=bw, target=0.85 * bw, passed=value >= 0.85 * bw,
                note=f"{figures}; floor = measured HBM read bandwidth, target 85 % of it")
        elif kind == "tflops":  # useful FLOPs (QK^T and P.V once) over time; target 450
            # The floor: this run's measured bf16 GEMM rate (cuBLASLt, 5c) when there is one.
            measured = next((r["value"] for r in records if r["name"] == "floor.bf16_gemm_tflops" and r["value"]), None)
            peak, source = (measured, "measured cuBLASLt bf16 GEMM rate") if measured else (parts[0]["peak_tflops"],
                                                                                           "datasheet bf16 peak")
            value = sum(f["flops"] for f in parts) / ms / 1e9
            rec(name, value, unit, floor=peak, target=450, passed=value >= 450,
                note=f"{figures}; floor = {source}, target 450 TFLOP/s")
        else:  # total time; target 1.1 ms
            rec(name, ms, unit, floor=sum(f["floor_ms"] for f in parts), target=1.1, passed=ms <= 1.1,
                note=f"{figures}; floor = sum of the figures' floors")

kbench = next((e for e in manifest["executables"] if e["kind"] == "bench" and e["name"].endswith("bench-gpu_kernels")), None)
if only and not re.search(only, "kernels"):
    pass
elif kbench is None:
    rec("kernel_records", 0, "runs", target=1, passed=False, note="no gpu_kernels bench in the bundle")
elif remaining() <= 90:
    meta["kernel_records"] = f"not run: {max(0, remaining()):.0f} s of the suite budget left"
    log(f"skipped the kernel records: {meta['kernel_records']}")
else:
    figs_path = os.path.join(tmp, "figures.jsonl")
    env["DGEMMA_BENCH_RECORDS"] = figs_path
    rc, out, secs = run([kbench["path"], "--bench", KERNEL_FILTER], os.path.join(root, kbench["package_dir"]),
                        min(240, remaining(60)))
    del env["DGEMMA_BENCH_RECORDS"]
    figs = [json.loads(l) for l in open(figs_path)] if os.path.exists(figs_path) else []
    kernel_records(figs)
    if rc != 0 or not figs:
        failures_log.append(f"===== gpu_kernels --bench (kernel records): rc {rc}\n{out[-5000:]}\n")
        rec("kernel_records", len(figs), "figures", passed=False,
            note=("timed out" if rc is None else f"exit {rc}: " + (out.strip().splitlines() or [""])[-1][:160]))
    log(f"{'PASS' if rc == 0 and figs else 'FAIL'} gpu_kernels kernel records: {len(figs)} figures ({secs:.1f} s)")

# ---- 5c3. the FP8 step: dgemma bench with FP8 experts (issue #6: step.fp8.c1.ctx4096,
# step.fp8.c{4,16}.ctx4096, tokens_per_s.fp8.*, ttft.fp8.*, peak_mem_gb.fp8.*). After the kernel
# records; alone with DGEMMA_SUITE_ONLY=fp8 when the first run's budget ran out.
if (not only or re.search(only, "fp8")):
    if remaining() > 120:
        cli_bench("fp8", "4096")
    else:
        meta["bench_fp8"] = f"not run: {max(0, remaining()):.0f} s of the suite budget left"
        log(f"skipped dgemma bench --quant fp8: {meta['bench_fp8']}")

# ---- 4b. the other test executables, a few at a time ----------------------------------------
others = [e for e in tests if not e.get("gpu")]
jobs = int(os.environ.get("DGEMMA_SUITE_JOBS") or max(1, min(4, (os.cpu_count() or 1) // 4)))
log(f"running {len(others)} more test executables, {jobs} at a time")
with cf.ThreadPoolExecutor(max_workers=jobs) as pool:
    for r in pool.map(run_tests, others):
        finish(r)

# ---- 5b. bench executables: criterion --test runs each benchmark once ------------------------
for e in [e for e in manifest["executables"] if e["kind"] == "bench" and (not only or re.search(only, e["name"]))]:
    cwd = os.path.join(root, e["package_dir"])
    _, lst, _ = run([e["path"], "--list"], cwd, min(30, max(1, remaining())))
    n = sum(1 for l in lst.splitlines() if l.endswith(": benchmark"))
    rc, out, secs = run([e["path"], "--test"], cwd, min(120, max(1, remaining())))
    ok = sum(1 for l in out.splitlines() if l.strip() == "Success")
    passed = rc == 0 and ok == n
    if not passed:
        failures_log.append(f"===== {e['name']} --test: rc {rc}\n{out[-5000:]}\n")
    rec(f"gpu_suite.bench_smoke.{e['name']}", ok, "benchmarks", target=n, passed=passed,
        note="criterion --test (each benchmark once, not timed)" + ("" if rc == 0 else f"; exit {rc}"))
    log(f"{'PASS' if passed else 'FAIL'} {e['name']} --test: {ok}/{n} ({secs:.1f} s)")

# ---- 5d. transformers side by side: the same prefill and step, timed in HF transformers ---------
# Last, on what the tests and the benches above left of the budget (at most 240 s), so it can never
# starve them. tools/hf_bench.py builds DiffusionGemmaForBlockDiffusion with random 26B-A4B weights
# on this GPU (bf16, sdpa, grouped_mm experts) and times the calls generate makes; the ratios divide
# by this run's dgemma bench figures of the same name (5c).
hf_name = "hf_transformers."
if only:
    pass
elif remaining() <= 120:
    meta["hf_bench"] = f"not run: {max(0, remaining()):.0f} s of the suite budget left"
    log(f"skipped tools/hf_bench.py: {meta['hf_bench']}")
else:
    hf_json = os.path.join(tmp, "hf.json")
    hf_python = os.environ.get("DGEMMA_SUITE_HF_PYTHON") or sys.executable or "python3"
    rc, out, secs = run([hf_python, os.path.join(root, "tools", "hf_bench.py"), "--json", hf_json],
                        root, min(240, remaining()))
    hf = None
    if rc == 0 and os.path.exists(hf_json):
        try:
            hf = [dict(r, unit=r.get("unit") or "ms") for r in json.load(open(hf_json))["records"]
                  if r["name"].startswith(hf_name) and isinstance(r["value"], (int, float)) and r["value"] > 0]
        except (OSError, ValueError, KeyError, TypeError) as ex:
            out += f"\nunreadable {hf_json}: {ex}\n"
    if hf:
        dgemma = {r["name"]: r["value"] for r in records}
        for r in hf:
            rec(r["name"], r["value"], r["unit"], note=r.get("note"))
            base = r["name"][len(hf_name):]  # prefill.bf16.tokens4096, step.bf16.c1.ctx4096: 5c's names
            if dgemma.get(base):
                rec(f"ratio.hf_over_dgemma.{base}", r["value"] / dgemma[base], "x",
                    note=f"transformers {r['value']:.3f} {r['unit']} / dgemma {dgemma[base]:.3f} {r['unit']} ({base})")
            else:
                log(f"no dgemma {base} record in this run: no ratio for {r['name']}")
    else:
        failures_log.append(f"===== tools/hf_bench.py: rc {rc}\n{out[-5000:]}\n")
        last = (out.strip().splitlines() or [""])[-1][:160]
        rec("hf_transformers.bench", 0, "runs", target=1, passed=False,
            note=("timed out" if rc is None else f"exit {rc}: {last}" if rc else f"no records: {last}"))
    log(f"{'PASS' if hf else 'FAIL'} tools/hf_bench.py ({secs:.1f} s)")

# ---- 5e. serving figures: the runtime's scheduler under 1, 4, 16, 32 concurrent requests ----
# dgemma bench --serve N --serve-only: N requests of 4K-token prompts through dgemma-runtime on
# synthetic 26B-A4B weights (records throughput / ttft_p50 / ttft_p99 / peak_mem_gb
# .bf16.concurrency{N}). One process per level, smallest first, on what is left of the budget.
for n, quant in ([(1, "none"), (4, "none"), (16, "none"), (32, "none"), (32, "fp8")]
                 if not only or re.search(only, "serve") else []):
    dt = "fp8" if quant == "fp8" else "bf16"
    key = f"serve_{dt}_{n}"
    if remaining() <= 90:
        meta[key] = f"not run: {max(0, remaining()):.0f} s of the suite budget left"
        log(f"skipped dgemma bench --serve {n} --quant {quant}: {meta[key]}")
        continue
    serve_json = os.path.join(tmp, f"{key}.json")
    rc, out, secs = run([cli["path"], "bench", "--synthetic", "26b", "--serve", str(n), "--serve-only",
                         "--quant", quant, "--prompt", "4096", "--json", serve_json], root, min(150, remaining(30)))
    ok = rc == 0 and os.path.exists(serve_json)
    if ok:
        for r in json.load(open(serve_json))["records"]:
            if r["value"] is None:
                ok = False
                rec(f"bench.{r['name']}", 0, r["unit"], passed=False, note=r.get("note"))
            else:
                rec(r["name"], r["value"], r["unit"], note=r.get("note"))
    else:
        failures_log.append(f"===== dgemma bench --serve {n} --quant {quant}: rc {rc}\n{out[-5000:]}\n")
        rec(f"throughput.{dt}.concurrency{n}", 0, "tok/s", passed=False,
            note=("timed out" if rc is None else f"exit {rc}: " + (out.strip().splitlines() or [""])[-1][:160]))
    log(f"{'PASS' if ok else 'FAIL'} dgemma bench --serve {n} --quant {quant} ({secs:.1f} s)")

# ---- 6. records and files ------------------------------------------------------------------
tp = sum(r["passed"] for r, _ in test_results)
tf = sum(r["failed"] for r, _ in test_results)
texp = sum(r["e"]["tests"] for r, _ in test_results)
gp = sum(r["passed"] for r, _ in test_results if r["e"].get("gpu"))
gf = sum(r["failed"] for r, _ in test_results if r["e"].get("gpu"))
gexp = sum(r["e"]["tests"] for r, _ in test_results if r["e"].get("gpu"))
head = [
    results.make_record("gpu_suite.tests_passed", tp, "tests", target=texp, passed=tp == texp,
                        note=f"{len(test_results)} test executables, --include-ignored"),
    results.make_record("gpu_suite.tests_failed", tf, "tests", target=0, passed=tf == 0),
    results.make_record("gpu_suite.gpu_tests_passed", gp, "tests", target=gexp, passed=gp == gexp and gexp > 0,
                        note=", ".join(r["e"]["name"] for r, _ in test_results if r["e"].get("gpu"))),
    results.make_record("gpu_suite.gpu_tests_failed", gf, "tests", target=0, passed=gf == 0),
]
per_bin = [results.make_record(f"gpu_suite.test.{r['e']['name']}", r["passed"], "tests", target=r["e"]["tests"],
                               passed=ok, note=(f"{r['secs']:.1f} s" + (f"; {r['note']}" if r["note"] else "")))
           for r, ok in test_results]
wall = time.monotonic() - T0
records = records[:1] + head + per_bin + records[1:]
records.append(results.make_record("gpu_suite.wall_s", round(wall, 1), "s", target=budget, passed=wall <= budget))
meta["wall_s"] = round(wall, 1)
if bad_sha:
    meta["sha256_mismatch"] = bad_sha

commit = manifest.get("commit") or "unknown"
jp, mp, doc = results.write_results(records, device, commit, out_dir, meta=meta,
                                    title=f"dgemma GPU suite on {device}")
if out_env:
    with open(os.path.splitext(jp)[0] + ".log", "w") as f:
        f.write("".join(failures_log) or "nothing failed\n")
    log_path = os.path.splitext(jp)[0] + ".log"
else:
    log_path = os.path.join(tempfile.gettempdir(), os.path.basename(os.path.splitext(jp)[0]) + ".log")
    with open(log_path, "w") as f:
        f.write("".join(failures_log) or "nothing failed\n")
cleanup()
errs = results.check_results(doc, jp)
print()
print(open(mp).read())
print(f"results: {jp}\ntable:   {mp}\nlog:     {log_path}")
if errs:
    print("results file INVALID:\n  " + "\n  ".join(errs))
    sys.exit(2)
nfail = sum(1 for r in doc["records"] if r["passed"] is False)
print(f"{nfail} record(s) failed; suite took {wall:.0f} s of its {budget:.0f} s budget")
sys.exit(1 if nfail else 0)
EOF
