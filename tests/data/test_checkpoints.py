"""The trained float checkpoints shipped in codegen/data/checkpoints/ (what `qacc demo` starts
from): small, intact, loadable into their architectures, and as accurate on the Fashion-MNIST
test set as checkpoints.json records; `train.trained` returns them instead of training."""

from __future__ import annotations

import fnmatch
import hashlib
from pathlib import Path

import pytest
import torch

from codegen.core.errors import QaccError
from codegen.data import datasets, models, train

NAMES = sorted(train.RECIPES)
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def fashion() -> datasets.Split:
    return datasets.fashion_mnist()


@pytest.mark.parametrize("name", NAMES)
def test_checkpoint_is_recorded_small_and_intact(name: str) -> None:
    info = train.checkpoint_info(name)
    assert info, f"{name}: no entry in checkpoints.json"
    path = train.CHECKPOINT_DIR / info["file"]
    assert path.is_file()
    assert path.stat().st_size < 400_000, "checkpoints must stay small"
    assert hashlib.sha256(path.read_bytes()).hexdigest() == info["sha256"]
    assert info["architecture"] == models.ZOO[name].__name__
    assert info["epochs"] == train.RECIPES[name]["epochs"]
    assert info["seed"] == train.RECIPES[name]["seed"]
    state = torch.load(path, weights_only=True)
    assert all(v.dtype in (torch.float32, torch.int64) for v in state.values())


@pytest.mark.parametrize("name", NAMES)
def test_checkpoint_gives_the_recorded_float_accuracy(name: str, fashion: datasets.Split) -> None:
    _, _, x_test, y_test = fashion
    net = train.pretrained(name)
    assert isinstance(net, models.ZOO[name]) and not net.training
    info = train.checkpoint_info(name)
    assert info["test_samples"] == len(y_test)
    acc = train.accuracy(net, x_test, y_test, batch=128)
    # the same forward pass; only the summation order of another thread count may differ
    assert acc == pytest.approx(info["float_test_accuracy"], abs=3 / len(y_test))


def test_trained_returns_the_shipped_checkpoint_without_training(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, fashion: datasets.Split
) -> None:
    x, y, _, _ = fashion
    monkeypatch.setenv("QACC_CACHE", str(tmp_path))

    def no_training(*args: object, **kwargs: object) -> None:
        raise AssertionError("trained() trained although a checkpoint ships")

    monkeypatch.setattr(train, "fit", no_training)
    for name in NAMES:
        net = train.trained(name, models.ZOO[name](), x, y, epochs=train.RECIPES[name]["epochs"])
        ref = train.pretrained(name).state_dict()
        for k, v in net.state_dict().items():
            assert torch.equal(v, ref[k]), (name, k)


def test_shipped_checkpoint_only_for_its_architecture_and_recipe() -> None:
    name = "fashion_ds"
    epochs = train.RECIPES[name]["epochs"]
    other_width = models.FashionDSCNN(width=8)
    before = {k: v.clone() for k, v in other_width.state_dict().items()}
    assert train.shipped(name, other_width, epochs, 60000) is None
    assert all(torch.equal(v, before[k]) for k, v in other_width.state_dict().items())
    assert train.shipped(name, models.FashionDSCNN(), epochs + 1, 60000) is None
    assert train.shipped(name, models.FashionDSCNN(), epochs, 600) is None
    assert train.shipped(name, models.FashionCNN(), epochs, 60000) is None
    assert train.shipped("resdw", models.ResDWNet(), epochs, 60000) is None
    assert train.shipped(name, models.FashionDSCNN(), epochs, 60000) is not None


def test_pretrained_of_a_network_without_checkpoint_is_a_one_line_error() -> None:
    with pytest.raises(QaccError, match="no shipped checkpoint for network 'resdw'"):
        train.pretrained("resdw")


def test_the_wheel_and_the_sdist_carry_every_checkpoint_file() -> None:
    # pyproject.toml as setuptools reads it (tomllib is Python 3.11+; qacc supports 3.10)
    from setuptools.config.pyprojecttoml import read_configuration

    cfg = read_configuration(REPO / "pyproject.toml", expand=False)
    patterns = cfg["tool"]["setuptools"]["package-data"]["codegen.data"]
    files = [p.name for p in train.CHECKPOINT_DIR.iterdir() if p.is_file()]
    assert {info["file"] for info in train.checkpoint_info().values()} <= set(files)
    for name in files:
        assert any(fnmatch.fnmatch(f"checkpoints/{name}", p) for p in patterns), name
    assert "graft codegen/data/checkpoints" in (REPO / "MANIFEST.in").read_text()
