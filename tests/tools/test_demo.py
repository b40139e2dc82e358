"""`qacc demo` (what `make demo` runs) end to end, in miniature: small networks, a slice of
Fashion-MNIST and one training epoch, but every step of both sections, the host builds and the
QEMU runs of the adaptive models."""

from __future__ import annotations

from pathlib import Path

import pytest

from codegen.data import datasets, models
from codegen.tools import demo


@pytest.mark.qemu
def test_demo_runs_end_to_end_in_miniature(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    x, y, x_test, y_test = datasets.fashion_mnist()
    monkeypatch.setattr(
        datasets, "fashion_mnist", lambda: (x[:600], y[:600], x_test[:50], y_test[:50])
    )
    monkeypatch.setattr(
        models,
        "ZOO",
        {
            "fashion_cnn": lambda: models.FashionCNN(width=4),
            "fashion_ds": lambda: models.FashionDSCNN(width=4),
        },
    )
    monkeypatch.setenv("QACC_CACHE", str(tmp_path / "cache"))
    for name, value in {
        "WIDTHS": (16,),
        "DS_WIDTHS": (16, 12),
        "ADAPTIVE_WIDTHS": (16, 12),
        "ADAPTIVE_EPOCHS": 1,
        "ADAPTIVE_MODEL_EPOCHS": 1,
        "CALIB": 100,
        "QEMU_IMAGES": 3,
    }.items():
        monkeypatch.setattr(demo, name, value)

    assert demo.main(epochs=1, out_dir=tmp_path / "demo") == 0

    out = capsys.readouterr().out
    assert out.count("bit-exact         yes (50 images)") == 3  # PTQ 16, adaptive 16 and 12
    for target in demo.QEMU_TARGETS:
        assert out.count(f"{target:<17} bit-exact yes (3 images under QEMU") == 2
    assert "NO" not in out
    sweep_dir = tmp_path / "demo" / "fashion_ds-sweep"
    assert {p.name for p in sweep_dir.iterdir()} >= {"sweep.json", "sweep.md", "sweep.png"}
    assert "| adaptive | guaranteed | 12 |" in (sweep_dir / "sweep.md").read_text()
    for a in (16, 12):
        assert (tmp_path / "demo" / f"fashion_ds-adaptive{a}" / "report.html").is_file()
        for target in demo.QEMU_TARGETS:
            assert (tmp_path / "demo" / f"fashion_ds-adaptive{a}-{target}").is_dir()
