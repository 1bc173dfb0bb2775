#!/usr/bin/env python3
"""Tests of tools/plots.py and the anchor column of tools/results.py (standard library only;
tools/test.sh runs them). A synthetic results file is written to a temporary directory and
rendered with the built-in rasteriser (matplotlib is not needed, nor used)."""

import json
import os
import struct
import sys
import tempfile
import unittest
import zlib

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import plots  # noqa: E402
import results  # noqa: E402


def synthetic_doc(batch=True):
    recs = [results.make_record("floor.hbm_read_gbs", 3000.0, "GB/s")]
    for ctx, ms in [(1024, 18.0), (4096, 19.0), (32768, 25.0), (131072, 48.0)]:
        recs.append(results.make_record(f"step.bf16.c1.ctx{ctx}", ms, "ms", floor=16.7 + ctx * 2e-5))
    if batch:
        for c, ms in [(2, 22.0), (4, 27.0)]:
            recs.append(results.make_record(f"step.bf16.c{c}.ctx4096", ms, "ms", floor=16.8))
    recs.append(results.make_record("step.bf16.c1.ctx999999", 1.0, "ms"))  # no floor: still plotted
    recs.append(results.make_record("tokens_per_s.bf16.steps16", 900.0, "tokens/s"))
    recs.append(results.make_record("ttft.bf16.prompt4096.steps16", 700.0, "ms"))
    recs.append(results.make_record("gpu_suite.tests_passed", 10, "tests", target=10, passed=True))
    return {"device": "NVIDIA H100 80GB HBM3", "commit": "0123456789ab", "date": "2026-11-22T07:06:11Z",
            "records": recs}


def read_png(path):
    """(width, height, rgb rows) of an 8-bit RGB, filter-0 PNG as plots.Canvas writes it."""
    data = open(path, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "PNG signature"
    pos, idat, ihdr = 8, b"", None
    while pos < len(data):
        (n,) = struct.unpack(">I", data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + n]
        (crc,) = struct.unpack(">I", data[pos + 8 + n:pos + 12 + n])
        assert crc == zlib.crc32(kind + body) & 0xFFFFFFFF, f"CRC of {kind}"
        if kind == b"IHDR":
            ihdr = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat += body
        pos += 12 + n
    w, h, depth, color = ihdr[:4]
    assert (depth, color) == (8, 2)
    raw = zlib.decompress(idat)
    assert len(raw) == h * (1 + 3 * w)
    return w, h, [raw[y * (1 + 3 * w) + 1:(y + 1) * (1 + 3 * w)] for y in range(h)]


def count_color(rows, rgb):
    c = bytes(rgb)
    return sum(row[i:i + 3] == c for row in rows for i in range(0, len(row), 3))


class PlotsTest(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.TemporaryDirectory()
        self.dir = self.tmp.name

    def tearDown(self):
        self.tmp.cleanup()

    def write(self, doc):
        self.assertEqual(results.check_results(doc), [])
        path = os.path.join(self.dir, results.file_stem(doc) + ".json")
        with open(path, "w") as f:
            json.dump(doc, f)
        return path

    def test_table_and_both_plots(self):
        path = self.write(synthetic_doc())
        stem = os.path.splitext(path)[0]
        self.assertEqual(plots.main([path, "--no-matplotlib"]), 0)
        md = open(stem + ".md").read()
        self.assertIn("| anchor | x anchor |", md)
        self.assertIn("8.6 ms (vLLM FP8", md)
        self.assertIn("1757 tokens/s", md)
        self.assertIn("322-426 ms", md)
        self.assertIn("![Per-step time against context length](", md)
        for name in ("step_vs_context", "step_vs_batch"):
            w, h, rows = read_png(f"{stem}.{name}.png")
            self.assertEqual((w, h), (900, 580))
            self.assertGreater(count_color(rows, plots.BLUE), 200, f"{name}: the measured line")
            self.assertGreater(count_color(rows, plots.RED), 100, f"{name}: the floor line")
            self.assertGreater(count_color(rows, plots.GREEN), 20, f"{name}: the 4K anchor")

    def test_no_batch_plot_with_one_batch_size(self):
        path = self.write(synthetic_doc(batch=False))
        written = plots.render(path, use_mpl=False)
        names = [os.path.basename(p) for p in written]
        self.assertTrue(any(n.endswith(".step_vs_context.png") for n in names), names)
        self.assertFalse(any(n.endswith(".step_vs_batch.png") for n in names), names)

    def test_existing_title_is_kept_and_other_dir(self):
        path = self.write(synthetic_doc())
        out = os.path.join(self.dir, "out")
        os.makedirs(out)
        stem = os.path.basename(os.path.splitext(path)[0])
        with open(os.path.join(out, stem + ".md"), "w") as f:
            f.write("# dgemma GPU suite on NVIDIA H100 80GB HBM3\n\nold\n")
        plots.render(path, out_dir=out, use_mpl=False)
        self.assertTrue(open(os.path.join(out, stem + ".md")).read().startswith("# dgemma GPU suite on NVIDIA H100"))

    def test_invalid_file_is_refused(self):
        doc = synthetic_doc()
        doc["records"][1]["ratio_to_floor"] = 123.0
        path = os.path.join(self.dir, "bad.json")
        with open(path, "w") as f:
            json.dump(doc, f)
        self.assertEqual(plots.main([path, "--no-matplotlib"]), 2)

    def test_no_anchor_column_without_anchored_records(self):
        doc = {"device": "no GPU", "commit": "unknown", "date": "2026-11-22T07:06:11Z",
               "records": [results.make_record("gpu_suite.tests_passed", 1, "tests", target=1, passed=True)]}
        self.assertNotIn("anchor", results.markdown(doc))

    def test_anchor_ratios(self):
        self.assertAlmostEqual(results.anchor({"name": "step.bf16.c1.ctx4096", "value": 17.2, "unit": "ms"})[1], 2.0)
        # A rate: anchor / value; a range of times: against its slower end.
        self.assertAlmostEqual(results.anchor({"name": "tokens_per_s.bf16.steps16", "value": 878.5,
                                               "unit": "tokens/s"})[1], 2.0)
        self.assertAlmostEqual(results.anchor({"name": "ttft.bf16.prompt4096.steps16", "value": 852.0,
                                               "unit": "ms"})[1], 2.0)
        self.assertIsNone(results.anchor({"name": "step.bf16.c1.ctx1024", "value": 1.0, "unit": "ms"}))

    def test_font_covers_the_labels(self):
        for glyph in plots._FONT.values():
            self.assertEqual(len(glyph), 7)
            self.assertTrue(all(len(r) == 5 for r in glyph))
        for text in ("MS PER STEP", "CONTEXT (CACHED POSITIONS)", "0.25", "128K", "VLLM FP8, 1XH100"):
            self.assertTrue(all(ch.upper() in plots._FONT for ch in text), text)


if __name__ == "__main__":
    unittest.main()
