"""`qacc demo` (what `make demo` runs) end to end, in miniature: small networks, a slice of
Fashion-MNIST and a few training images, but every step of the short demo (float, PTQ per width,
both fine-tunes, the host build, both QEMU targets, instruction counts, the summary and the
files), and of the full-length one (`qacc demo --full`, `make paper`)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from codegen.cli import main as cli_main
from codegen.data import datasets, models
from codegen.tools import demo


@pytest.fixture
def miniature(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    x, y, x_test, y_test = datasets.fashion_mnist()
    monkeypatch.setattr(
        datasets, "fashion_mnist", lambda: (x[:600], y[:600], x_test[:50], y_test[:50])
    )
    # other widths than the shipped checkpoints: the demo trains them (1 epoch, 600 images)
    monkeypatch.setattr(
        models,
        "ZOO",
        {
            "fashion_cnn": lambda: models.FashionCNN(width=4),
            "fashion_ds": lambda: models.FashionDSCNN(width=8),
        },
    )
    monkeypatch.setenv("QACC_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(demo, "CALIB", 100)
    monkeypatch.setattr(demo, "SHORT_CALIB", 100)


@pytest.mark.qemu
def test_short_demo_runs_end_to_end_in_miniature(
    miniature: None,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    for name, value in {
        "STORY_EPOCHS": 1,
        "TRANSFORM_EPOCHS": 1,
        "FINETUNE_SAMPLES": 200,
        "TRANSFORM_SAMPLES": 200,
        "SHORT_QEMU_IMAGES": {"cortex-a53": 3, "cortex-m55": 2},
    }.items():
        monkeypatch.setattr(demo, name, value)

    assert demo.main(out_dir=tmp_path / "demo") == 0

    out = capsys.readouterr().out
    assert "NO" not in out
    assert "float network: trained" in out  # no shipped checkpoint has width 8
    assert re.search(r"1\. Float accuracy: +\d+\.\d\d% on 50 test images", out)
    for a in demo.PTQ_WIDTHS:
        assert re.search(
            rf"PTQ {a:>2}-bit accumulators: +\d+\.\d\d% \( *[-+]\d+\.\d\d pt vs float\), "
            r"0 overflows",
            out,
        ), a
    assert re.search(
        r"adaptive W4A4, 12-bit accumulators .*?: +\d+\.\d\d% \( *[-+]\d+\.\d\d pt vs float\), "
        r"0 overflows\s+on the 50 test images",
        out,
        re.S,
    )
    assert re.search(
        r"transform quantization .*?, 2 bits/weight, 16-bit accumulators,.*?: +\d+\.\d\d% "
        r"\( *[-+]\d+\.\d\d pt vs float\),\s+0 overflows; coded at \d\.\d+ bits/weight",
        out,
        re.S,
    )
    assert "host         bit-exact yes (50 images" in out
    assert "cortex-a53   bit-exact yes (3 images under QEMU" in out
    assert "cortex-m55   bit-exact yes (2 images under QEMU" in out
    for w in (32, 16):
        assert re.search(
            rf"PTQ W8A8, {w}-bit accumulators: +[\d,]+ instructions, weights [\d,]+ B, "
            r"arena [\d,]+ B",
            out,
        ), w
    assert re.search(r"adaptive W4A4, 12-bit: +[\d,]+ instructions, weights [\d,]+ B", out)
    assert re.search(r"speedup of 16-bit over 32-bit accumulators: \d+\.\d\dx fewer", out)
    assert "| model | acc bits | accuracy | vs float | overflows |" in out
    assert "| FashionDSCNN adaptive W4A4 | 12 |" in out
    assert "| FashionCNN transform | 16 |" in out
    assert "host 50, cortex-a53 3, cortex-m55 2 |" in out
    for kind in ("report", "library", "header"):
        m = re.search(rf"^   {kind} +(\S+)$", out, re.M)
        assert m and Path(m.group(1)).is_file(), kind
    assert re.search(r"done in \d+ s", out)


@pytest.mark.qemu
def test_full_demo_runs_end_to_end_in_miniature(
    miniature: None,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    for name, value in {
        "WIDTHS": (16,),
        "DS_WIDTHS": (16, 12),
        "ADAPTIVE_WIDTHS": (12,),
        "ADAPTIVE_EPOCHS": 1,
        "ADAPTIVE_MODEL_EPOCHS": 1,
        "QEMU_IMAGES": 3,
    }.items():
        monkeypatch.setattr(demo, name, value)

    assert demo.main(full_run=True, epochs=1, out_dir=tmp_path / "demo") == 0

    out = capsys.readouterr().out
    assert out.count("bit-exact         yes (50 images)") == 2  # PTQ 16 and adaptive 12
    for target in demo.QEMU_TARGETS:
        assert out.count(f"{target:<17} bit-exact yes (3 images under QEMU") == 1
    assert "NO" not in out
    sweep_dir = tmp_path / "demo" / "fashion_ds-sweep"
    assert {p.name for p in sweep_dir.iterdir()} >= {"sweep.json", "sweep.md", "sweep.png"}
    assert "| adaptive | guaranteed | 12 |" in (sweep_dir / "sweep.md").read_text()
    assert (tmp_path / "demo" / "fashion_ds-adaptive12" / "report.html").is_file()
    for target in demo.QEMU_TARGETS:
        assert (tmp_path / "demo" / f"fashion_ds-adaptive12-{target}").is_dir()


def test_model_and_epochs_belong_to_the_full_demo(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["demo", "--model", "resdw"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "add --full" in err[0]
