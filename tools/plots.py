#!/usr/bin/env python3
"""Tables and plots of a dgemma results file (benches/results/README.md).

    python3 tools/plots.py benches/results/<stem>.json [--out-dir DIR] [--no-matplotlib]

writes beside the file (or into DIR):

    <stem>.md                      the markdown table of every record (tools/results.py, with the
                                   floor, ratio, target and the published anchor of each figure),
                                   then links to the plots below
    <stem>.step_vs_context.png     per-step time of `step.bf16.c1.ctx<N>` against the context N,
                                   with each record's floor and the published anchors
    <stem>.step_vs_batch.png       per-step time of `step.bf16.c<B>.ctx4096` against the number of
                                   canvases B (only when two or more batch sizes are present)

Uses matplotlib when it can be imported; otherwise a small rasteriser in this file (lines,
markers, a 5x7 bitmap font, PNG through zlib + struct), so it runs on a bare Python 3 (the GPU
hosts, CI). Prints the paths it wrote. Exit status 0, or 2 for an unreadable or invalid file.
"""

import argparse
import json
import math
import os
import re
import struct
import sys
import zlib

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import results  # noqa: E402  (tools/results.py)

STEP_CTX_RE = re.compile(r"^step\.bf16\.c1\.ctx(\d+)$")
STEP_BATCH_RE = re.compile(r"^step\.bf16\.c(\d+)\.ctx4096$")

BLUE = (31, 98, 180)
RED = (200, 40, 40)
GREEN = (30, 140, 60)
GREY = (225, 225, 225)
DARK = (40, 40, 40)
WHITE = (255, 255, 255)


# ---------------------------------------------------------------------------------------------
# Series

def _finite(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def series(doc, pattern):
    """[(x, value, floor or None, record)] of the records whose name matches `pattern` (group 1
    is x), unit ms, finite value; sorted by x."""
    out = []
    for r in doc["records"]:
        m = pattern.match(str(r.get("name", "")))
        if m and r.get("unit") == "ms" and _finite(r.get("value")):
            f = r.get("floor")
            out.append((int(m.group(1)), float(r["value"]), float(f) if _finite(f) else None, r))
    return sorted(out, key=lambda t: t[0])


def anchor_points(points):
    """[(x, low, high, label)] of the published anchors of these records."""
    out = []
    for x, _, _, r in points:
        for pattern, lo, hi, unit, source in results.ANCHORS:
            if re.match(pattern, r["name"]) and unit == "ms":
                out.append((x, lo, hi, source.split(":")[0]))
    return out


def _k(x):
    return f"{x // 1024}K" if x >= 1024 and x % 1024 == 0 else str(x)


# ---------------------------------------------------------------------------------------------
# A minimal rasteriser (used when matplotlib is not importable)

# 5x7 glyphs, rows top to bottom; lowercase letters are drawn as capitals.
_FONT_ROWS = {
    "0": ".###. #...# #..## #.#.# ##..# #...# .###.",
    "1": "..#.. .##.. ..#.. ..#.. ..#.. ..#.. .###.",
    "2": ".###. #...# ....# ...#. ..#.. .#... #####",
    "3": "##### ...#. ..#.. ...#. ....# #...# .###.",
    "4": "...#. ..##. .#.#. #..#. ##### ...#. ...#.",
    "5": "##### #.... ####. ....# ....# #...# .###.",
    "6": "..##. .#... #.... ####. #...# #...# .###.",
    "7": "##### ....# ...#. ..#.. .#... .#... .#...",
    "8": ".###. #...# #...# .###. #...# #...# .###.",
    "9": ".###. #...# #...# .#### ....# ...#. .##..",
    "A": ".###. #...# #...# ##### #...# #...# #...#",
    "B": "####. #...# #...# ####. #...# #...# ####.",
    "C": ".###. #...# #.... #.... #.... #...# .###.",
    "D": "###.. #..#. #...# #...# #...# #..#. ###..",
    "E": "##### #.... #.... ####. #.... #.... #####",
    "F": "##### #.... #.... ####. #.... #.... #....",
    "G": ".###. #...# #.... #.### #...# #...# .####",
    "H": "#...# #...# #...# ##### #...# #...# #...#",
    "I": ".###. ..#.. ..#.. ..#.. ..#.. ..#.. .###.",
    "J": "..### ...#. ...#. ...#. ...#. #..#. .##..",
    "K": "#...# #..#. #.#.. ##... #.#.. #..#. #...#",
    "L": "#.... #.... #.... #.... #.... #.... #####",
    "M": "#...# ##.## #.#.# #.#.# #...# #...# #...#",
    "N": "#...# #...# ##..# #.#.# #..## #...# #...#",
    "O": ".###. #...# #...# #...# #...# #...# .###.",
    "P": "####. #...# #...# ####. #.... #.... #....",
    "Q": ".###. #...# #...# #...# #.#.# #..#. .##.#",
    "R": "####. #...# #...# ####. #.#.. #..#. #...#",
    "S": ".#### #.... #.... .###. ....# ....# ####.",
    "T": "##### ..#.. ..#.. ..#.. ..#.. ..#.. ..#..",
    "U": "#...# #...# #...# #...# #...# #...# .###.",
    "V": "#...# #...# #...# #...# #...# .#.#. ..#..",
    "W": "#...# #...# #...# #.#.# #.#.# #.#.# .#.#.",
    "X": "#...# #...# .#.#. ..#.. .#.#. #...# #...#",
    "Y": "#...# #...# .#.#. ..#.. ..#.. ..#.. ..#..",
    "Z": "##### ....# ...#. ..#.. .#... #.... #####",
    " ": "..... ..... ..... ..... ..... ..... .....",
    ".": "..... ..... ..... ..... ..... .##.. .##..",
    ",": "..... ..... ..... ..... .##.. ..#.. .#...",
    ":": "..... .##.. .##.. ..... .##.. .##.. .....",
    "(": "...#. ..#.. .#... .#... .#... ..#.. ...#.",
    ")": ".#... ..#.. ...#. ...#. ...#. ..#.. .#...",
    "/": "..... ....# ...#. ..#.. .#... #.... .....",
    "-": "..... ..... ..... ##### ..... ..... .....",
    "+": "..... ..#.. ..#.. ##### ..#.. ..#.. .....",
    "_": "..... ..... ..... ..... ..... ..... #####",
    "=": "..... ..... ##### ..... ##### ..... .....",
    "%": "##..# ##..# ...#. ..#.. .#... #..## #..##",
    "*": "..... ..#.. #.#.# .###. #.#.# ..#.. .....",
}
_FONT = {c: [row for row in rows.split()] for c, rows in _FONT_ROWS.items()}
_BOX = ["#####", "#...#", "#...#", "#...#", "#...#", "#...#", "#####"]


class Canvas:
    """An RGB image with the drawing primitives the plots need."""

    def __init__(self, width, height, bg=WHITE):
        self.w, self.h = width, height
        self.px = bytearray(bytes(bg) * (width * height))

    def set(self, x, y, c):
        x, y = int(round(x)), int(round(y))
        if 0 <= x < self.w and 0 <= y < self.h:
            i = 3 * (y * self.w + x)
            self.px[i:i + 3] = bytes(c)

    def get(self, x, y):
        i = 3 * (y * self.w + x)
        return tuple(self.px[i:i + 3])

    def rect(self, x0, y0, x1, y1, c):
        for y in range(int(y0), int(y1) + 1):
            for x in range(int(x0), int(x1) + 1):
                self.set(x, y, c)

    def line(self, x0, y0, x1, y1, c, width=1, dash=None):
        """A line `width` pixels thick; `dash` = (on, off) lengths in pixels."""
        n = max(1, int(max(abs(x1 - x0), abs(y1 - y0))))
        r = (width - 1) / 2
        for i in range(n + 1):
            if dash and (i % (dash[0] + dash[1])) >= dash[0]:
                continue
            x = x0 + (x1 - x0) * i / n
            y = y0 + (y1 - y0) * i / n
            self.rect(x - r, y - r, x + r, y + r, c)

    def marker(self, x, y, c, kind="square", size=4):
        if kind == "square":
            self.rect(x - size, y - size, x + size, y + size, c)
        elif kind == "diamond":
            for d in range(-size - 1, size + 2):
                half = size + 1 - abs(d)
                self.rect(x - half, y + d, x + half, y + d, c)
        else:  # cross
            self.line(x - size, y - size, x + size, y + size, c, 2)
            self.line(x - size, y + size, x + size, y - size, c, 2)

    def text(self, x, y, s, c=DARK, scale=2, align="left"):
        """Text with its top at y; align left / center / right at x."""
        adv = 6 * scale
        width = len(s) * adv - scale
        if align == "center":
            x -= width / 2
        elif align == "right":
            x -= width
        for k, ch in enumerate(s):
            glyph = _FONT.get(ch.upper(), _BOX)
            for row, bits in enumerate(glyph):
                for col, b in enumerate(bits):
                    if b == "#":
                        self.rect(x + k * adv + col * scale, y + row * scale,
                                  x + k * adv + col * scale + scale - 1, y + row * scale + scale - 1, c)

    def png(self):
        raw = b"".join(b"\x00" + bytes(self.px[3 * y * self.w:3 * (y + 1) * self.w]) for y in range(self.h))

        def chunk(kind, data):
            return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

        return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", self.w, self.h, 8, 2, 0, 0, 0))
                + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))


def _nice_ticks(hi, count=5):
    """0 .. >= hi in steps of 1, 2 or 5 x 10^k."""
    if hi <= 0:
        return [0.0, 1.0]
    raw = hi / count
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    n = int(math.ceil(hi / step - 1e-9))
    return [i * step for i in range(n + 1)]


def _fmt_tick(v):
    return f"{v:g}" if abs(v) >= 0.01 or v == 0 else f"{v:.0e}"


def raster_plot(path, title, subtitle, xlabel, ylabel, xs_log2, lines, anchors):
    """lines: [(label, color, [(x, y)], dash, marker)]; anchors: [(x, lo, hi, label)]."""
    W, H = 900, 580
    left, right, top, bottom = 100, 30, 84, 90
    c = Canvas(W, H)
    xs = sorted({x for _, _, pts, _, _ in lines for x, _ in pts} | {a[0] for a in anchors})
    ys = [y for _, _, pts, _, _ in lines for _, y in pts] + [a[2] for a in anchors]
    if not xs or not ys:
        return False
    ticks_y = _nice_ticks(max(ys) * 1.08)
    y_hi = ticks_y[-1]
    fx = (lambda x: math.log2(x)) if xs_log2 else (lambda x: float(x))
    x_lo, x_hi = fx(xs[0]), fx(xs[-1])
    if x_hi == x_lo:
        x_lo, x_hi = x_lo - 1, x_hi + 1
    pad = 0.06 * (x_hi - x_lo)
    x_lo, x_hi = x_lo - pad, x_hi + pad

    def X(x):
        return left + (fx(x) - x_lo) / (x_hi - x_lo) * (W - left - right)

    def Y(y):
        return H - bottom - y / y_hi * (H - top - bottom)

    for t in ticks_y:
        c.line(left, Y(t), W - right, Y(t), GREY)
        c.text(left - 10, Y(t) - 7, _fmt_tick(t), align="right")
    for x in xs:
        c.line(X(x), top, X(x), H - bottom, GREY)
        c.text(X(x), H - bottom + 10, _k(x) if xs_log2 else str(x), align="center")
    c.line(left, top, left, H - bottom, DARK, 2)
    c.line(left, H - bottom, W - right, H - bottom, DARK, 2)
    c.text(W / 2, 10, title, scale=2, align="center")
    c.text(W / 2, 34, subtitle, scale=1, align="center")
    c.text((left + W - right) / 2, H - bottom + 40, xlabel, align="center")
    c.text(12, top - 26, ylabel, align="left")
    for label, color, pts, dash, mk in lines:
        for (xa, ya), (xb, yb) in zip(pts, pts[1:]):
            c.line(X(xa), Y(ya), X(xb), Y(yb), color, 3, dash)
        for x, y in pts:
            c.marker(X(x), Y(y), color, mk)
    for x, lo, hi, _ in anchors:
        if hi > lo:
            c.line(X(x), Y(lo), X(x), Y(hi), GREEN, 3)
        c.marker(X(x), Y(lo), GREEN, "diamond", 5)
        if hi > lo:
            c.marker(X(x), Y(hi), GREEN, "diamond", 5)
    # Legend, top left inside the axes.
    entries = [(label, color, dash, mk) for label, color, _, dash, mk in lines]
    if anchors:
        entries.append(("PUBLISHED ANCHOR: " + anchors[0][3], GREEN, None, "diamond"))
    ly = top + 10
    box_w = 80 + 12 * max(len(e[0]) for e in entries)
    c.rect(left + 6, ly - 6, left + 6 + box_w, ly - 6 + 24 * len(entries) + 4, WHITE)
    for label, color, dash, mk in entries:
        c.line(left + 15, ly + 7, left + 55, ly + 7, color, 3, dash if mk != "diamond" else (0, 1))
        c.marker(left + 35, ly + 7, color, mk, 4)
        c.text(left + 65, ly, label, scale=2)
        ly += 24
    with open(path, "wb") as f:
        f.write(c.png())
    return True


def mpl_plot(path, title, subtitle, xlabel, ylabel, xs_log2, lines, anchors):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5.6), dpi=100)
    for label, color, pts, dash, mk in lines:
        ax.plot([p[0] for p in pts], [p[1] for p in pts], color=[v / 255 for v in color],
                linestyle="--" if dash else "-", marker="s" if mk == "square" else "x", label=label)
    for i, (x, lo, hi, label) in enumerate(anchors):
        ax.plot([x, x] if hi > lo else [x], [lo, hi] if hi > lo else [lo], color=[v / 255 for v in GREEN],
                marker="D", linestyle="-", label=f"published anchor: {label}" if i == 0 else None)
    if xs_log2:
        ax.set_xscale("log", base=2)
        xs = sorted({p[0] for _, _, pts, _, _ in lines for p in pts})
        ax.set_xticks(xs)
        ax.set_xticklabels([_k(x) for x in xs])
    ax.set_ylim(bottom=0)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(f"{title}\n{subtitle}")
    ax.grid(True, color="#e0e0e0")
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def plot(path, title, subtitle, xlabel, ylabel, xs_log2, lines, anchors, use_mpl):
    if use_mpl:
        try:
            return mpl_plot(path, title, subtitle, xlabel, ylabel, xs_log2, lines, anchors)
        except ImportError:
            pass
    return raster_plot(path, title, subtitle, xlabel, ylabel, xs_log2, lines, anchors)


def have_matplotlib():
    try:
        import matplotlib  # noqa: F401
        return True
    except ImportError:
        return False


# ---------------------------------------------------------------------------------------------
# Driver

def render(json_path, out_dir=None, use_mpl=True):
    """Writes the table and the plots of one results file; returns the paths written."""
    with open(json_path, encoding="utf-8") as f:
        doc = json.load(f)
    errs = results.check_results(doc)
    if errs:
        raise ValueError(f"{json_path}: not a valid results file:\n  " + "\n  ".join(errs))
    out_dir = out_dir or os.path.dirname(os.path.abspath(json_path))
    os.makedirs(out_dir, exist_ok=True)
    stem = os.path.splitext(os.path.basename(json_path))[0]
    use_mpl = use_mpl and have_matplotlib()
    written, pictures = [], []
    tag = f"{doc['device']}, commit {doc['commit']}, {doc['date']}"

    figures = [
        # (series, least distinct x, file suffix, title, x label, log x, caption)
        (series(doc, STEP_CTX_RE), 1, "step_vs_context", "DENOISING STEP VS CONTEXT, ONE CANVAS",
         "CONTEXT (CACHED POSITIONS)", True, "Per-step time against context length"),
        (series(doc, STEP_BATCH_RE), 2, "step_vs_batch", "DENOISING STEP VS CANVASES, CONTEXT 4K",
         "CANVASES PER STEP", False, "Per-step time against batch size (canvases), context 4096"),
    ]
    for points, least, suffix, title, xlabel, logx, caption in figures:
        if len({x for x, _, _, _ in points}) < least:
            continue
        lines = [("MEASURED STEP (MS)", BLUE, [(x, v) for x, v, _, _ in points], None, "square")]
        floors = [(x, f) for x, _, f, _ in points if f is not None]
        if floors:
            lines.append(("FLOOR (MS)", RED, floors, (8, 6), "cross"))
        p = os.path.join(out_dir, f"{stem}.{suffix}.png")
        if plot(p, title, tag, xlabel, "MS PER STEP", logx, lines, anchor_points(points), use_mpl):
            written.append(p)
            pictures.append((caption, os.path.basename(p)))

    # The table beside the file, keeping the title of an existing one.
    md_path = os.path.join(out_dir, f"{stem}.md")
    title = None
    if os.path.exists(md_path):
        with open(md_path, encoding="utf-8") as f:
            first = f.readline().strip()
        if first.startswith("# "):
            title = first[2:]
    text = results.markdown(doc, title)
    if pictures:
        text += "\n## Plots\n\n" + "".join(f"{what}:\n\n![{what}]({name})\n\n" for what, name in pictures)
    with open(md_path, "w", encoding="utf-8") as f:
        f.write(text)
    written.insert(0, md_path)
    return written


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("file", help="a results JSON (benches/results/<stem>.json)")
    p.add_argument("--out-dir", help="where to write (default: beside the file)")
    p.add_argument("--no-matplotlib", action="store_true", help="always use the built-in rasteriser")
    a = p.parse_args(argv)
    try:
        paths = render(a.file, a.out_dir, use_mpl=not a.no_matplotlib)
    except (OSError, ValueError, json.JSONDecodeError) as e:
        print(f"plots: {e}", file=sys.stderr)
        return 2
    for path in paths:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
