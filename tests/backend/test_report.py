"""Compile reports (report.json, report.md, self-contained report.html) and the progress bars.

The HTML is rendered by headless Chromium (Debian package `chromium`, installed by
scripts/setup-apt.sh): a probe script appended to a copy of the page records each image's decoded
size, which must be the size written in the PNG's own header, and a screenshot must show the plots.
"""

from __future__ import annotations

import base64
import copy
import io
import json
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import codegen
from codegen.backend import report
from codegen.core import progress
from codegen.targets.build import build
from tests.nets import Branchy, randomized

SWEEP = {
    "float_accuracy": 0.875,
    "rows": [
        {"method": "ptq", "policy": "guaranteed", "acc_bits": 10, "accuracy": None},
        {"method": "ptq", "policy": "guaranteed", "acc_bits": 12, "accuracy": 0.5},
        {"method": "ptq", "policy": "guaranteed", "acc_bits": 16, "accuracy": 0.8125},
        {"method": "ptq", "policy": "profiled", "acc_bits": 12, "accuracy": 0.625},
        {"method": "adaptive", "policy": "guaranteed", "acc_bits": 12, "accuracy": 0.75},
    ],
}


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture(scope="module")
def compiled(tmp_path_factory: pytest.TempPathFactory) -> codegen.targets.compiled.Compiled:
    x = np.random.default_rng(0).uniform(0, 1, (16, 3, 12, 12)).astype(np.float32)
    qm = codegen.quantize(randomized(Branchy(), 1), x, acc_bits=16, progress=False)
    # what the sweep and the method-specific quantizers add to the quantizer's report
    qm.report["sweep"] = SWEEP
    qm.report["lsq"] = {"epochs": 3, "final_loss": 0.25}
    qm.report["note_for_report"] = "hello | world"
    qm.report["layers"][0]["step_size"] = 0.0625
    out = tmp_path_factory.mktemp("report") / "out"
    return codegen.compile(qm, target="host", out_dir=out)


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    w, h = struct.unpack(">II", data[16:24])
    return int(w), int(h)


def test_compile_writes_the_three_reports(compiled: Any) -> None:
    out: Path = compiled.out_dir
    for f in (*report.REPORT_FILES, *report.PLOT_FILES.values()):
        assert (out / f).is_file(), f
    rep = json.loads((out / "report.json").read_text())
    q = rep["quantization"]
    weighted = [r for r in q["layers"] if "K" in r]
    assert len(weighted) == 6  # c1 dw pw side c2 fc
    md = (out / "report.md").read_text()
    html = (out / "report.html").read_text()
    paths = {r["name"]: r["path"] for r in rep["layers"]}
    for r in weighted:
        # one markdown row per weighted layer: name, op, K, acc bits, path, formats, bound...
        cells = [
            r["name"],
            r["op"],
            f"{r['K']:,}",
            str(r["acc_bits"]),
            paths[r["name"]],
            f"{r['input_format']} ({r['input_bits']} b)",
        ]
        assert f"| {' | '.join(cells)} |" in md, r["name"]
        row = next(ln for ln in md.splitlines() if ln.startswith(f"| {r['name']} | {r['op']} | "))
        for v in (r["bound"], r["acc_limit"], r["observed_max_abs_acc"], r["macs"]):
            assert f"| {v:,} |" in row
        assert f"<td>{r['name']}</td>" in html and f">{r['bound']:,}</td>" in html
    for r in rep["layers"]:  # every generated kernel has its row
        assert f"| {r['name']} | {r['op']} | {r['kernel']} | {r['path'] or '-'} |" in md
    # summary, sweep, the generic details of unknown keys (escaped for markdown, HTML)
    assert f"| arena bytes | {rep['memory']['arena_bytes']:,}" in md
    assert "| ptq | guaranteed | 10 | infeasible |" in md
    assert "| adaptive | guaranteed | 12 | 75.00% |" in md and "| float | - | - | 87.50% |" in md
    assert "| lsq.epochs | 3 |" in md and "| lsq.final_loss | 0.25 |" in md
    assert "| note_for_report | hello \\| world |" in md
    assert "| c1 | step_size | 0.0625 |" in md
    assert "hello | world" in html and rep["generator"] in md and rep["generator"] in html
    for f in report.PLOT_FILES.values():
        assert f"]({f})" in md


def test_html_is_self_contained_and_deterministic(compiled: Any) -> None:
    out: Path = compiled.out_dir
    html = (out / "report.html").read_text()
    assert "<script" not in html.lower()
    refs = re.findall(r"""(?:src|href)\s*=\s*["']([^"']*)""", html, re.I)
    assert refs and all(r.startswith("data:image/png;base64,") for r in refs), refs
    assert not re.search(r"url\(|@import|https?://", html)
    embedded = [base64.b64decode(r.split(",", 1)[1]) for r in refs]
    assert embedded == [(out / f).read_bytes() for f in report.PLOT_FILES.values()]
    # a pure function of report.json: rendering again gives the same bytes
    rep = compiled.report
    assert report.to_html(rep) == html
    assert report.to_markdown(rep) == (out / "report.md").read_text()


def test_report_tolerates_missing_and_unknown_sections() -> None:
    bare = {"generator": "qacc 0", "model": "m", "target": "host", "layers": []}
    assert report.plots(bare) == {}
    assert "qacc report: m for host" in report.to_markdown(bare)
    assert "<img" not in report.to_html(bare)
    odd = {
        **bare,
        "quantization": {"layers": [{"name": "a", "weird": [1, {"x": 2}]}], "n": None, "m": [[1]]},
    }
    md = report.to_markdown(odd)
    assert "| n | - |" in md and "| m | (1 items; see report.json) |" in md
    assert "| a | weird | (2 items; see report.json) |" in md


def test_instruction_counts_are_rendered(compiled: Any) -> None:
    rep = copy.deepcopy(compiled.report)
    names = [r["name"] for r in rep["layers"]]
    counts = {n: 1000 + 7 * i for i, n in enumerate(names)}
    rep["instructions"] = {"total": 123456, "layers": counts, "target": "cortex-a53"}
    md = report.to_markdown(rep)
    assert "| instructions per inference (cortex-a53, QEMU) | 123,456 |" in md
    for r in rep["layers"]:
        n = counts[r["name"]]
        per_mac = f"{n / r['macs']:.3f}" if r["macs"] else "-"
        assert f"| {r['macs']:,} | {r['weight_bytes']:,} | {n:,} | {per_mac} |" in md


CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",  # CI runs as root in a container
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--hide-scrollbars",
)

PROBE = """<script>
window.addEventListener("load", () => {
  for (const img of document.images) {
    img.setAttribute("data-probe", img.naturalWidth + "x" + img.naturalHeight);
  }
  document.body.setAttribute("data-probed", document.images.length);
});
</script>"""


def chromium(tmp: Path) -> list[str]:
    """The command line start: a private profile, so parallel test workers never share one."""
    exe = shutil.which("chromium")
    assert exe, "headless Chromium is missing: apt-get install chromium (or run `make setup`)"
    return [exe, *CHROMIUM_FLAGS, f"--user-data-dir={tmp / 'chromium-profile'}"]


def probe_images(html: str, tmp: Path) -> tuple[list[tuple[str, str]], str]:
    """Load `html` in headless Chromium; [(PNG size from its header, size Chromium decoded)]."""
    page = tmp / "probe.html"
    page.write_text(html.replace("</body>", PROBE + "</body>"))
    proc = subprocess.run(
        [*chromium(tmp), "--virtual-time-budget=5000", "--dump-dom", page.as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    dom = proc.stdout
    m = re.search(r'<body[^>]*data-probed="(\d+)"', dom)
    assert m, "the probe script did not run"
    imgs = re.findall(r"<img\b[^>]*>", dom)
    assert len(imgs) == int(m.group(1))
    pairs = []
    for tag in imgs:
        src = re.search(r'src="data:image/png;base64,([^"]*)"', tag)
        probe = re.search(r'data-probe="([^"]*)"', tag)
        assert src and probe, tag[:200]
        try:
            w, h = png_size(base64.b64decode(src.group(1)))
            want = f"{w}x{h}"
        except (AssertionError, ValueError, struct.error):
            want = "not a PNG"
        pairs.append((want, probe.group(1)))
    return pairs, dom


@pytest.mark.slow
def test_html_renders_in_headless_chromium(compiled: Any, tmp_path: Path) -> None:
    html = (compiled.out_dir / "report.html").read_text()
    pairs, dom = probe_images(html, tmp_path)
    assert len(pairs) == len(report.PLOT_FILES)
    for want, got in pairs:
        assert got == want and not got.startswith("0x"), (want, got)
    assert dom.count("<table") == len(re.findall(r"<table\b", html)) >= 5
    assert "<td>c1</td>" in dom and "Accumulators per layer" in dom

    # the check fails when an image is broken: a corrupted data URI decodes to 0x0
    broken = re.sub(r"(base64,)iVBORw0KGgo", r"\1AAAAiVBORw0K", html, count=1)
    assert broken != html
    bad, _ = probe_images(broken, tmp_path)
    assert bad[0][1] == "0x0" and bad[0][0] != bad[0][1]

    # and the screenshot is not blank: plot colours on a white page
    from PIL import Image

    shot = tmp_path / "shot.png"
    subprocess.run(
        [
            *chromium(tmp_path),
            f"--screenshot={shot}",
            "--window-size=1200,4000",
            (compiled.out_dir / "report.html").as_uri(),
        ],
        capture_output=True,
        timeout=120,
        check=True,
    )
    img = np.asarray(Image.open(shot).convert("RGB")).astype(np.int64)
    assert img.shape[:2] == (4000, 1200)
    non_white = np.any(img < 240, axis=2).mean()
    assert 0.02 < non_white < 0.9, non_white
    # the headroom plot's limit markers (#cb181d) and bound bars (#9ecae1) are on the page
    for rgb in ((0xCB, 0x18, 0x1D), (0x9E, 0xCA, 0xE1)):
        assert np.all(np.abs(img - np.array(rgb)) <= 8, axis=2).sum() > 200, rgb


# ----------------------------------------------------------------------------- progress bars


def test_progress_bars_only_on_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    for stream, asked, shown in (
        (FakeTTY(), True, True),
        (FakeTTY(), False, False),
        (io.StringIO(), True, False),
    ):
        monkeypatch.setattr(sys, "stderr", stream)
        assert progress.enabled(asked) is shown
        assert list(progress.bar(range(3), "counting", progress=asked)) == [0, 1, 2]
        with progress.ticker("waiting", progress=asked, total=4, poll=lambda: 2):
            pass
        assert ("counting" in stream.getvalue() and "waiting" in stream.getvalue()) is shown


def test_build_progress_follows_the_build_steps(
    compiled: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tty = FakeTTY()
    monkeypatch.setattr(sys, "stderr", tty)
    res = build(compiled.out_dir, "host", build_dir=tmp_path / "b", testbench=False)
    assert res.static_lib.is_file()
    text = tty.getvalue()
    assert f"configure {compiled.name} for host" in text
    steps = re.findall(rf"build {compiled.name} for host: +\d+%\|[^|]*\| (\d+)/(\d+)", text)
    assert steps and steps[-1][0] == steps[-1][1], text[-500:]  # ran to the last step
    assert "$ " in res.log and "Linking C" in res.log  # the log still has the whole output

    quiet = io.StringIO()
    monkeypatch.setattr(sys, "stderr", quiet)
    build(compiled.out_dir, "host", build_dir=tmp_path / "c", testbench=False)
    assert quiet.getvalue() == ""


@pytest.mark.qemu
def test_counted_instructions_go_into_the_report(tmp_path: Path) -> None:
    x = np.random.default_rng(1).uniform(0, 1, (8, 3, 12, 12)).astype(np.float32)
    qm = codegen.quantize(randomized(Branchy(), 2), x, acc_bits=16, progress=False)
    c = codegen.compile(qm, target="cortex-m4", out_dir=tmp_path / "m4")
    assert "not counted" in (c.out_dir / "report.md").read_text()
    counts = c.count_instructions(x[:1])
    rep = c.report
    assert rep["instructions"] == {**counts, "target": "cortex-m4"}
    md = (c.out_dir / "report.md").read_text()
    assert f"| instructions per inference (cortex-m4, QEMU) | {counts['total']:,} |" in md
    for r in rep["layers"]:
        assert f"| {r['weight_bytes']:,} | {counts['layers'][r['name']]:,} |" in md
    assert f">{counts['total']:,}</td>" in (c.out_dir / "report.html").read_text()
