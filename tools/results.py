#!/usr/bin/env python3
"""Results files of dgemma's GPU suite and benchmarks: writer, markdown table, validator.

Python 3 standard library only (it runs here and on the GPU hosts). The contract, as
benches/results/README.md documents it:

    {
      "device":  "NVIDIA H100 80GB HBM3",     # GPU name from nvidia-smi, or "no GPU"
      "commit":  "f5cbe53a1b2c",              # git commit the binaries were built from
      "date":    "2026-11-22T07:05:09Z",      # UTC, ISO 8601, when the run ended
      "records": [
        {"name": "gpu_suite.tests_passed",    # unique, dotted
         "value": 123,                        # a finite number
         "unit": "tests",                     # non-empty string
         "floor": null,                       # best possible value (number > 0) or null
         "ratio_to_floor": null,              # value / floor, or null when floor is null
         "target": 123,                       # the value aimed at, or null
         "passed": true,                      # true / false, or null (a measurement only)
         "note": "..."}                       # optional free text
      ],
      "meta": {...}                           # optional: driver, host, build details
    }

File name: <device-slug>-<YYYY-MM-DD>-<commit>.json, with <same>.md (a markdown table) beside it.

Usage:
    results.py add RECORDS.jsonl --name N --value V --unit U [--floor F] [--target T]
                                 [--passed true|false|null] [--note TEXT]
    results.py write --records RECORDS.jsonl --device D --commit C [--date ISO]
                     [--meta-json FILE] [--out-dir DIR] [--title TEXT]
    results.py md FILE.json          # print the markdown table of a results file
                                     # (tools/plots.py FILE.json writes it beside the file, with plots)
    results.py --check FILE.json...  # validate against the contract (exit 1 on any problem)
    results.py slug "NVIDIA H100 80GB HBM3"   # -> nvidia-h100-80gb-hbm3

As a module: make_record(), write_results(), check_results().
"""

import argparse
import datetime as _dt
import json
import math
import os
import re
import sys

REQUIRED_TOP = ("device", "commit", "date", "records")
OPTIONAL_TOP = ("meta",)
REQUIRED_RECORD = ("name", "value", "unit", "floor", "ratio_to_floor", "target", "passed")
OPTIONAL_RECORD = ("note",)
FILE_RE = re.compile(r"^(?P<slug>[a-z0-9]+(?:-[a-z0-9]+)*)-(?P<date>\d{4}-\d{2}-\d{2})-(?P<commit>[0-9a-f]{7,40}|unknown)\.json$")
COMMIT_RE = re.compile(r"^([0-9a-f]{7,40}|unknown)$")


def slug(text):
    """'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3'."""
    s = re.sub(r"[^a-z0-9]+", "-", str(text).lower()).strip("-")
    return s or "unknown"


def _num(x, what):
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise ValueError(f"{what} must be a number, got {x!r}")
    if not math.isfinite(x):
        raise ValueError(f"{what} must be finite, got {x!r}")
    return x


def make_record(name, value, unit, floor=None, target=None, passed=None, note=None):
    """One record of the contract; ratio_to_floor is value / floor when a floor is given."""
    value = _num(value, f"{name}: value")
    if floor is not None:
        floor = _num(floor, f"{name}: floor")
        if floor <= 0:
            raise ValueError(f"{name}: floor must be > 0, got {floor}")
    if target is not None:
        target = _num(target, f"{name}: target")
    if passed is not None and not isinstance(passed, bool):
        raise ValueError(f"{name}: passed must be true, false or null")
    rec = {
        "name": str(name),
        "value": value,
        "unit": str(unit),
        "floor": floor,
        "ratio_to_floor": (value / floor) if floor is not None else None,
        "target": target,
        "passed": passed,
    }
    if note:
        rec["note"] = str(note)
    return rec


def now_iso():
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).strftime("%Y-%m-%dT%H:%M:%SZ")


def _parse_date(s):
    if not isinstance(s, str):
        raise ValueError(f"date must be a string, got {s!r}")
    t = s[:-1] + "+00:00" if s.endswith("Z") else s
    d = _dt.datetime.fromisoformat(t)
    if d.tzinfo is None:
        raise ValueError(f"date must carry a time zone (UTC 'Z'), got {s!r}")
    return d


def file_stem(doc):
    d = _parse_date(doc["date"]).astimezone(_dt.timezone.utc)
    return f"{slug(doc['device'])}-{d.strftime('%Y-%m-%d')}-{doc['commit']}"


def _fmt(x):
    if x is None:
        return ""
    if isinstance(x, bool):
        return "yes" if x else "**NO**"
    if isinstance(x, int):
        return str(x)
    if isinstance(x, float):
        if x == int(x) and abs(x) < 1e15:
            return str(int(x))
        return f"{x:.6g}"
    return str(x).replace("|", "\\|").replace("\n", " ")


# Published figures of other engines that a record can be read against (shared/docs/peers.md 2.1).
# (record-name regex, low, high, unit, source). The table shows them in an "anchor" column,
# with value / anchor for a time (> 1: slower than the anchor) and anchor / value for a rate.
ANCHORS = [
    (r"^step\.bf16\.c1\.ctx4096$", 8.6, 8.6, "ms",
     "vLLM FP8, 1xH100, bs 1, 4K context: 8.6 ms per forward of 256 tokens"),
    (r"^commit\.bf16\.c256(\.ctx4096)?$", 8.6, 8.6, "ms",
     "vLLM FP8, 1xH100: 8.6 ms per forward of 256 tokens"),
    (r"^step\.bf16\.c1\.ctx65536$", 41.0, 41.0, "ms",
     "third-party vLLM study, H100, FA4: ~41 ms per step at 64K"),
    (r"^tokens_per_s\.bf16\.steps16$", 1757.0, 1757.0, "tokens/s",
     "vLLM FP8, 1xH100, 4K prompt, 16 steps: 1,757 tok/s in-canvas"),
    (r"^ttft\.bf16\.prompt4096\.steps16$", 322.0, 426.0, "ms",
     "vLLM FP8, 1xH100, 4K prompt, 16 steps: TTFT 322 ms median / 426 ms mean"),
]


def anchor(rec):
    """(text, ratio) of the published figure a record compares with, or None. The ratio is
    value / anchor for times (ms, s) and anchor / value for rates, so > 1 means behind the anchor;
    against a range it is taken at the range's lenient end (the slower time, the lower rate)."""
    for pattern, lo, hi, unit, source in ANCHORS:
        if not re.match(pattern, str(rec.get("name", ""))):
            continue
        v = rec.get("value")
        ratio = None
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0 \
                and rec.get("unit") == unit:
            ratio = v / hi if unit in ("ms", "s") else lo / v
        figure = f"{lo:g}" if lo == hi else f"{lo:g}-{hi:g}"
        return f"{figure} {unit} ({source})", ratio
    return None


def markdown(doc, title=None):
    recs = doc["records"]
    failed = [r for r in recs if r.get("passed") is False]
    lines = [
        f"# {title or 'dgemma results'}",
        "",
        f"device **{doc['device']}** · commit `{doc['commit']}` · {doc['date']}"
        + (f" · {len(failed)} record(s) failed" if failed else " · all checked records passed"),
        "",
    ]
    meta = doc.get("meta") or {}
    keep = [k for k in ("driver", "gpu", "host", "dirty", "wall_s", "path_fix") if meta.get(k) is not None]
    if keep:
        show = lambda v: str(v).lower() if isinstance(v, bool) else _fmt(v)
        lines += [" · ".join(f"{k}: {show(meta[k])}" for k in keep), ""]
    # The anchor column appears only when a record has a published figure to compare with.
    anchors = [anchor(r) for r in recs]
    with_anchor = any(anchors)
    lines += [
        "| name | value | unit | floor | ratio | target | " + ("anchor | x anchor | " if with_anchor else "")
        + "passed | note |",
        "| --- | ---: | --- | ---: | ---: | ---: | " + ("--- | ---: | " if with_anchor else "") + "--- | --- |",
    ]
    for r, a in zip(recs, anchors):
        note = r.get("note", "")
        if len(note) > 120:
            note = note[:117] + "..."
        cells = [_fmt(r["name"]), _fmt(r["value"]), _fmt(r["unit"]), _fmt(r["floor"]),
                 _fmt(r["ratio_to_floor"]), _fmt(r["target"])]
        if with_anchor:
            cells += [_fmt(a[0]) if a else "", _fmt(round(a[1], 3)) if a and a[1] is not None else ""]
        cells += ["" if r["passed"] is None else _fmt(r["passed"]), _fmt(note)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def check_results(doc, filename=None):
    """Every way `doc` breaks the contract, as a list of strings (empty: valid)."""
    errs = []
    if not isinstance(doc, dict):
        return ["top level must be a JSON object"]
    for k in REQUIRED_TOP:
        if k not in doc:
            errs.append(f"missing top-level key {k!r}")
    for k in doc:
        if k not in REQUIRED_TOP + OPTIONAL_TOP:
            errs.append(f"unknown top-level key {k!r}")
    if errs:
        return errs
    if not isinstance(doc["device"], str) or not doc["device"].strip():
        errs.append("device must be a non-empty string")
    if not isinstance(doc["commit"], str) or not COMMIT_RE.match(doc["commit"]):
        errs.append(f"commit must be 7-40 lowercase hex digits or 'unknown', got {doc['commit']!r}")
    try:
        _parse_date(doc["date"])
    except ValueError as e:
        errs.append(f"date: {e}")
    if "meta" in doc and not isinstance(doc["meta"], dict):
        errs.append("meta must be an object")
    recs = doc["records"]
    if not isinstance(recs, list) or not recs:
        errs.append("records must be a non-empty list")
        return errs
    seen = set()
    for i, r in enumerate(recs):
        where = f"records[{i}]"
        if not isinstance(r, dict):
            errs.append(f"{where}: must be an object")
            continue
        for k in REQUIRED_RECORD:
            if k not in r:
                errs.append(f"{where}: missing key {k!r}")
        for k in r:
            if k not in REQUIRED_RECORD + OPTIONAL_RECORD:
                errs.append(f"{where}: unknown key {k!r}")
        if any(k not in r for k in REQUIRED_RECORD):
            continue
        name = r["name"]
        if not isinstance(name, str) or not re.match(r"^[A-Za-z0-9_.:+-]+$", name):
            errs.append(f"{where}: name must be a non-empty string of [A-Za-z0-9_.:+-], got {name!r}")
        elif name in seen:
            errs.append(f"{where}: duplicate name {name!r}")
        seen.add(name)
        where = f"record {name!r}"
        for k in ("value",):
            if isinstance(r[k], bool) or not isinstance(r[k], (int, float)) or not math.isfinite(r[k]):
                errs.append(f"{where}: {k} must be a finite number, got {r[k]!r}")
        if not isinstance(r["unit"], str) or not r["unit"]:
            errs.append(f"{where}: unit must be a non-empty string")
        for k in ("floor", "target", "ratio_to_floor"):
            v = r[k]
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)):
                errs.append(f"{where}: {k} must be a finite number or null, got {v!r}")
        if r["passed"] is not None and not isinstance(r["passed"], bool):
            errs.append(f"{where}: passed must be true, false or null, got {r['passed']!r}")
        if "note" in r and not isinstance(r["note"], str):
            errs.append(f"{where}: note must be a string")
        f, ratio, v = r["floor"], r["ratio_to_floor"], r["value"]
        if isinstance(f, (int, float)) and not isinstance(f, bool):
            if f <= 0:
                errs.append(f"{where}: floor must be > 0")
            elif not isinstance(ratio, (int, float)) or isinstance(ratio, bool):
                errs.append(f"{where}: ratio_to_floor must be value / floor when a floor is given")
            elif isinstance(v, (int, float)) and not math.isclose(ratio, v / f, rel_tol=1e-6, abs_tol=1e-12):
                errs.append(f"{where}: ratio_to_floor {ratio} != value / floor = {v / f}")
        elif f is None and ratio is not None:
            errs.append(f"{where}: ratio_to_floor must be null when floor is null")
    if filename is not None:
        base = os.path.basename(filename)
        m = FILE_RE.match(base)
        if not m:
            errs.append(f"file name {base!r} is not <device-slug>-<YYYY-MM-DD>-<commit>.json")
        elif not errs:
            want = file_stem(doc) + ".json"
            if base != want:
                errs.append(f"file name {base!r} does not match its content (expected {want!r})")
    return errs


def read_records(path):
    recs = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                recs.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise SystemExit(f"{path}:{n}: not JSON: {e}")
    return recs


def write_results(records, device, commit, out_dir, date=None, meta=None, title=None):
    """Writes <stem>.json and <stem>.md into out_dir; returns (json_path, md_path, doc)."""
    doc = {"device": device, "commit": commit, "date": date or now_iso(), "records": records}
    if meta:
        doc["meta"] = meta
    errs = check_results(doc)
    if errs:
        raise ValueError("results do not meet the contract:\n  " + "\n  ".join(errs))
    os.makedirs(out_dir, exist_ok=True)
    stem = file_stem(doc)
    jp = os.path.join(out_dir, stem + ".json")
    mp = os.path.join(out_dir, stem + ".md")
    with open(jp, "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")
    with open(mp, "w", encoding="utf-8") as f:
        f.write(markdown(doc, title))
    return jp, mp, doc


def _opt_num(s):
    if s is None or s in ("", "null", "none"):
        return None
    v = float(s)
    return int(v) if v == int(v) and re.match(r"^-?\d+$", s.strip()) else v


def _opt_bool(s):
    if s is None or s in ("", "null", "none"):
        return None
    if s.lower() in ("true", "yes", "1", "pass", "passed"):
        return True
    if s.lower() in ("false", "no", "0", "fail", "failed"):
        return False
    raise SystemExit(f"--passed must be true, false or null, got {s!r}")


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "--check":
        files = argv[1:]
        if not files:
            print("usage: results.py --check FILE.json...", file=sys.stderr)
            return 2
        bad = 0
        for path in files:
            try:
                with open(path, encoding="utf-8") as f:
                    doc = json.load(f)
            except (OSError, json.JSONDecodeError) as e:
                print(f"{path}: INVALID: {e}")
                bad += 1
                continue
            errs = check_results(doc, path)
            if errs:
                bad += 1
                print(f"{path}: INVALID")
                for e in errs:
                    print(f"  - {e}")
            else:
                n = len(doc["records"])
                nf = sum(1 for r in doc["records"] if r["passed"] is False)
                print(f"{path}: valid ({n} records, {nf} failed, device {doc['device']!r}, commit {doc['commit']})")
        return 1 if bad else 0

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("add", help="append one record to a JSON-lines file")
    a.add_argument("file")
    a.add_argument("--name", required=True)
    a.add_argument("--value", required=True)
    a.add_argument("--unit", required=True)
    a.add_argument("--floor")
    a.add_argument("--target")
    a.add_argument("--passed")
    a.add_argument("--note")
    w = sub.add_parser("write", help="write <stem>.json and <stem>.md from a JSON-lines file of records")
    w.add_argument("--records", required=True)
    w.add_argument("--device", required=True)
    w.add_argument("--commit", required=True)
    w.add_argument("--date")
    w.add_argument("--meta-json", help="file holding a JSON object stored as 'meta'")
    w.add_argument("--out-dir", default=".")
    w.add_argument("--title")
    m = sub.add_parser("md", help="print the markdown table of a results file")
    m.add_argument("file")
    s = sub.add_parser("slug", help="print the file-name slug of a device name")
    s.add_argument("text")
    args = p.parse_args(argv)

    if args.cmd == "add":
        rec = make_record(args.name, _opt_num(args.value), args.unit, _opt_num(args.floor),
                          _opt_num(args.target), _opt_bool(args.passed), args.note)
        with open(args.file, "a", encoding="utf-8") as f:
            f.write(json.dumps(rec) + "\n")
        return 0
    if args.cmd == "write":
        meta = None
        if args.meta_json:
            with open(args.meta_json, encoding="utf-8") as f:
                meta = json.load(f)
        jp, mp, doc = write_results(read_records(args.records), args.device, args.commit,
                                    args.out_dir, args.date, meta, args.title)
        print(jp)
        print(mp)
        return 0
    if args.cmd == "md":
        with open(args.file, encoding="utf-8") as f:
            sys.stdout.write(markdown(json.load(f)))
        return 0
    if args.cmd == "slug":
        print(slug(args.text))
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
