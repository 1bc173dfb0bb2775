#!/usr/bin/env bash
# dgemma's CPU backend against Hugging Face transformers on the CPU, on the tiny-default shapes
# (issue #5's CPU side-by-side). Not run by CI: it installs torch.
#
#   bash tools/cpu-side-by-side.sh
#
# 1. Python: $DGEMMA_HF_PYTHON if set, else .venv-cpu/bin/python; .venv-cpu (git-ignored) is
#    (re)created when it cannot import torch and transformers' DiffusionGemma: torch's CPU wheel,
#    else PyPI's torch (CUDA libraries included, ~5 GB; it runs on the CPU all the same), then
#    reference/requirements.txt.
# 2. The same two operations on both sides, for each dtype (f32, bf16), prompt length P and
#    thread count (1 and every core: rayon's pool for dgemma, torch.set_num_threads for torch):
#      prefill  P prompt tokens through the encoder into a fresh cache
#      step     one decoder forward of the 16-token canvas over the P cached positions,
#               self-conditioning logits in
#    dgemma: crates/dgemma-cpu/examples/side_by_side.rs on reference/models/tiny-default;
#    transformers: tools/hf_bench.py --tiny --device cpu (random weights of the same shapes).
#    Each figure is the mean ms of ITERS timed calls after ITERS/10 (at least 2) warm-up calls,
#    each measurement on an otherwise idle machine (see measure below).
# 3. benches/results/cpu-<host>-<date>-<commit>.json + .md (benches/results/README.md), with
#    ratio.dgemma_over_hf.* records (dgemma ms / transformers ms: > 1 means dgemma is slower).
#    <host> is the host name, or ci-cpu under CI.
#
# Environment: CASES ("P:ITERS ...", default "64:200 1024:20"), THREADS (default "1 <nproc>"),
# OUT_DIR (default benches/results).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
CASES="${CASES:-64:200 1024:20}"
THREADS="${THREADS:-$(printf '%s\n' 1 "$(nproc)" | sort -nu | tr '\n' ' ')}"
OUT_DIR="${OUT_DIR:-benches/results}"
py="${DGEMMA_HF_PYTHON:-.venv-cpu/bin/python}"
probe='import torch; from transformers import DiffusionGemmaForBlockDiffusion'

if ! "$py" -c "$probe" 2>/dev/null; then
    [ -n "${DGEMMA_HF_PYTHON:-}" ] && { echo "DGEMMA_HF_PYTHON=$py cannot import torch + DiffusionGemma" >&2; exit 2; }
    echo "== creating .venv-cpu (torch, transformers)" >&2
    rm -rf .venv-cpu
    python3 -m venv .venv-cpu
    .venv-cpu/bin/pip install --no-cache-dir --timeout 20 --retries 0 torch \
        --index-url https://download.pytorch.org/whl/cpu \
        || .venv-cpu/bin/pip install --no-cache-dir torch
    .venv-cpu/bin/pip install --no-cache-dir -r reference/requirements.txt
    "$py" -c "$probe"
fi

# Each measurement runs on an idle machine (other work inflates the times, torch's with 2+
# threads the most): it waits (at most 2 min) until under 10 % of the cores were busy over 2 s,
# and runs again (3 tries) when other processes took over 10 % of the cores while it ran (its
# own CPU time excluded). What stayed contended is listed in the results' meta.contended_runs.
hz="$(getconf CLK_TCK)"
TIMEFORMAT='%U %S'
stat_now() { awk '/^cpu /{print $2+$3+$4+$7+$8+$9, $2+$3+$4+$5+$6+$7+$8+$9}' /proc/stat; }  # busy, all
measure() {
    local label=$1 try b0 a0 b1 a1 others; shift
    for try in 1 2 3; do
        for _ in $(seq 60); do
            read -r b0 a0 < <(stat_now); sleep 2; read -r b1 a1 < <(stat_now)
            [ $(( (b1 - b0) * 100 / (a1 - a0 + 1) )) -lt 10 ] && break
        done
        read -r b0 a0 < <(stat_now)
        { time "$@" 2>&3; } 3>&2 2>"$tmp/cpu"
        read -r b1 a1 < <(stat_now)
        others=$(awk -v b=$((b1 - b0)) -v a=$((a1 - a0)) -v hz="$hz" \
            '{printf "%d", (b - hz * ($1 + $2)) * 100 / (a + 1)}' "$tmp/cpu")
        [ "$others" -lt 10 ] && return 0
        echo "warning: other processes took ${others}% of the cores during $label (try $try)" >&2
    done
    contended+="$label "
}
contended=""

cargo build --release --locked -p dgemma-cpu --example side_by_side
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
load_before="$(cut -d' ' -f1-3 /proc/loadavg)"
for t in $THREADS; do
    for case in $CASES; do
        p="${case%%:*}" iters="${case##*:}"
        warmup=$(( iters / 10 > 2 ? iters / 10 : 2 ))
        common=(--threads "$t" --prompt "$p" --iters "$iters" --warmup "$warmup")
        echo "== threads $t, prompt $p: dgemma" >&2
        measure "dgemma.t$t.p$p" target/release/examples/side_by_side "${common[@]}" \
            --json "$tmp/dgemma.t$t.p$p.json"
        for dt in f32 bf16; do
            echo "== threads $t, prompt $p: transformers $dt" >&2
            measure "hf.$dt.t$t.p$p" "$py" tools/hf_bench.py --tiny --device cpu --dtype "$dt" "${common[@]}" \
                --json "$tmp/hf.$dt.t$t.p$p.json"
        done
    done
done

versions="$("$py" -c 'import torch, transformers; print(f"transformers {transformers.__version__}, torch {torch.__version__}")')"
python3 - "$tmp" "$OUT_DIR" "$load_before" "$contended" "$versions" <<'EOF'
import glob, json, os, platform, re, socket, subprocess, sys
sys.path.insert(0, "tools")
import results

tmp, out_dir, load_before, contended, versions = sys.argv[1:]
def git(*a):
    return subprocess.run(["git", *a], capture_output=True, text=True).stdout.strip()
host = "ci-cpu" if os.environ.get("CI") else socket.gethostname()
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), platform.machine())

figures = {}  # (side, op, dtype, P, threads) -> (name, mean, median, note)
for path in sorted(glob.glob(f"{tmp}/*.json")):
    side, t = os.path.basename(path).split(".")[0], re.search(r"\.t(\d+)\.", os.path.basename(path)).group(1)
    for r in json.load(open(path))["records"]:
        op, dt, p = re.search(r"\.(prefill|step)\.(f32|bf16)\..*?(\d+)$", r["name"]).groups()
        name = r["name"].replace("hf_transformers.tiny.", "hf_transformers.tiny.cpu.") + f".t{t}"
        figures[(side, op, dt, int(p), int(t))] = (name, r["value"], r["median"], r["note"])

records, rows = [], []
for (side, op, dt, p, t), (name, value, median, note) in sorted(figures.items(), key=lambda kv: kv[0][1:] + (kv[0][0],)):
    other = figures.get(("hf" if side == "dgemma" else "dgemma", op, dt, p, t))
    if side == "dgemma" and other:
        ratio, ratio_med = value / other[1], median / other[2]
        note = f"dgemma/transformers = {ratio:.3f} (transformers {other[1]:.3f} ms); {note}"
        records.append(results.make_record(name, value, "ms", note=note))
        records.append(results.make_record(
            f"ratio.dgemma_over_hf.{name}", ratio, "x",
            note=f"means: dgemma {value:.3f} ms / transformers {other[1]:.3f} ms, {t} thread(s) each "
                 f"(medians: {ratio_med:.3f}); > 1: dgemma slower"))
        rows.append(f"| {op} | {dt} | {p} | {t} | {value:.3f} | {other[1]:.3f} | **{ratio:.3f}** "
                    f"| {median:.3f} | {other[2]:.3f} | {ratio_med:.3f} |")
    else:
        records.append(results.make_record(name, value, "ms", note=note))
meta = {"host": host, "cpu": f"{cpu}, {os.cpu_count()} cores", "dirty": bool(git("status", "--porcelain")),
        "loadavg_before": load_before, "loadavg_after": " ".join(open("/proc/loadavg").read().split()[:3]),
        "contended_runs": contended.split() or None, "hf": versions,
        "rustc": subprocess.run(["rustc", "--version"], capture_output=True, text=True).stdout.strip()}
title = "dgemma CPU backend vs transformers on the CPU (tiny-default shapes)"
jp, mp, doc = results.write_results(records, f"cpu {host}", git("rev-parse", "--short=12", "HEAD") or "unknown",
                                    out_dir, meta=meta, title=title)
side = ["", "## Side by side (ms per call; dgemma / transformers > 1: dgemma slower)", "",
        "| operation | dtype | prompt P | threads | dgemma mean | transformers mean | dgemma / transformers "
        "| dgemma median | transformers median | ratio of medians |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |", *rows, "",
        "prefill: P prompt tokens through the encoder into a fresh cache (transformers: generate's step 1.a, "
        "mask construction included). step: one decoder forward of the 16-token canvas over the P cached "
        "positions with self-conditioning logits in. dgemma runs the bundled tiny-default checkpoint (weights "
        "stored bf16, widened to f32 in f32 mode); transformers runs random weights of the same shapes (sdpa, "
        f"grouped_mm experts, eager; {versions}). Threads (the names' .t<N>): rayon's pool for dgemma, "
        "torch.set_num_threads for torch. c1: one canvas per step. "
        f"Load average before / after: {meta['loadavg_before']} / {meta['loadavg_after']}"
        + (f"; run while the machine was busy: {contended}." if contended.split() else
           "; no other process took over 10 % of the cores during any run."), ""]
with open(mp, "a") as f:
    f.write("\n".join(side))
print(jp)
print(mp)
print("\n".join(side[3:3 + 2 + len(rows)]))
EOF
