"""The training methods (adaptive, transform) on a model with several outputs: labels per output,
the loss summed over the outputs, an output without labels trained by distillation only (or not
at all without a teacher), and the result bit-exact in C like any other model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset, TensorDataset

import codegen
from codegen.core.errors import InvalidDataError, QaccError
from codegen.quant.training import fit
from tests.frontend.test_real_networks import TwoHeads, same_outputs


class Pair(nn.Module):
    """Two independent classifier heads on one input."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 3)
        self.b = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.a(x), self.b(x)


class PerOutput(Dataset[tuple[torch.Tensor, tuple[torch.Tensor, None]]]):
    """(x, (label of the first output, None)) pairs: the second output has no labels."""

    def __init__(self, x: np.ndarray, y: np.ndarray):
        self.x, self.y = torch.as_tensor(x), torch.as_tensor(y)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, tuple[torch.Tensor, None]]:
        return self.x[i], (self.y[i], None)


def _data(n: int = 96) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return (
        rng.normal(size=(n, 6)).astype(np.float32),
        rng.integers(0, 3, n),
        rng.integers(0, 2, n),
    )


@pytest.mark.parametrize("kind", ["arrays", "dataset"])
def test_an_output_without_labels_leaves_the_other_training_as_alone(kind: str) -> None:
    """Without a teacher, an unlabelled output adds nothing: the labelled head trains step for
    step as the same head alone (same batches, same loss), the other head not at all."""
    x, y, _ = _data()
    torch.manual_seed(0)
    pair = Pair()
    alone = nn.Linear(6, 3)
    alone.load_state_dict(pair.a.state_dict())
    b0 = [p.detach().clone() for p in pair.b.parameters()]

    def run(model: nn.Module, data: Any, labels: Any) -> list[dict[str, float]]:
        hist: list[dict[str, float]] = []
        fit(model, data, labels, epochs=2, batch=32, lr=1e-2, schedule="cosine",
            progress=False, history=hist)  # fmt: skip
        return hist

    if kind == "arrays":
        runs = [run(pair, x, (y, None)), run(alone, x, y)]
    else:
        tensors = TensorDataset(torch.as_tensor(x), torch.as_tensor(y))
        runs = [run(pair, PerOutput(x, y), None), run(alone, tensors, None)]
    assert all(
        torch.equal(p, q) for p, q in zip(pair.a.parameters(), alone.parameters(), strict=True)
    )
    assert all(torch.equal(p, q) for p, q in zip(pair.b.parameters(), b0, strict=True))
    assert [(r["loss"], r["accuracy"]) for r in runs[0]] == [
        (r["loss"], r["accuracy"]) for r in runs[1]
    ]
    assert all(r["accuracy_0"] == r["accuracy"] and "accuracy_1" not in r for r in runs[0])


def test_the_loss_is_the_sum_over_the_outputs_and_accuracy_is_per_output() -> None:
    """At lr 0 the epoch's loss is the loss of the initial network: the sum of the outputs'
    cross entropies; with a teacher, a labelled output's is the mix of cross entropy and
    distillation (kd_weight 0.5, temperature 2) and an unlabelled one's the distillation term."""
    x, y, y2 = _data()
    torch.manual_seed(0)
    pair, teacher = Pair(), Pair()
    xt = torch.as_tensor(x)
    with torch.no_grad():
        (a, b), (ta, tb) = pair(xt), teacher(xt)
        ce_a = float(F.cross_entropy(a, torch.as_tensor(y)))
        ce_b = float(F.cross_entropy(b, torch.as_tensor(y2)))
        kd_a, kd_b = (
            4 * float(F.kl_div(F.log_softmax(s / 2, 1), F.softmax(t / 2, 1), reduction="batchmean"))
            for s, t in ((a, ta), (b, tb))
        )
        acc = [float((a.argmax(1).numpy() == y).mean()), float((b.argmax(1).numpy() == y2).mean())]

    def loss(labels: Any, teach: Any) -> dict[str, float]:
        hist: list[dict[str, float]] = []
        fit(pair, x, labels, epochs=1, batch=len(x), lr=0.0, schedule="cosine", progress=False,
            history=hist, teacher=teach)  # fmt: skip
        return hist[0]

    row = loss((y, y2), None)
    assert row["loss"] == pytest.approx(ce_a + ce_b, rel=1e-6)
    assert [row["accuracy_0"], row["accuracy_1"]] == acc and row["accuracy"] == acc[0]
    row = loss((y, None), lambda xb: tuple(t.detach() for t in teacher(xb)))
    assert row["loss"] == pytest.approx(0.5 * ce_a + 0.5 * kd_a + kd_b, rel=1e-6)


def test_wrong_labels_are_one_line_errors() -> None:
    x, y, _ = _data()
    pair = Pair()
    for labels, match in (
        (y, r"the model has 2 outputs: the training labels must be a tuple of 2 per batch"),
        ((y,), r"must be a tuple of 2 per batch .*got a tuple of 1"),
        ((y[:, None], None), r"labels of output 0 have shape \(32, 1\), expected \(32,\)"),
    ):
        with pytest.raises(QaccError, match=match):
            fit(pair, x, labels, epochs=1, batch=32, progress=False)  # type: ignore[arg-type]
    with pytest.raises(QaccError, match=r"no output has training labels and there is no teacher"):
        fit(pair, x, (None, None), epochs=1, batch=32, progress=False)


def _two_heads() -> tuple[nn.Module, np.ndarray, np.ndarray]:
    torch.manual_seed(0)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((64, 3, 8, 8)).astype(np.float32)
    return TwoHeads().eval(), x, rng.integers(0, 4, len(x))


def test_quantize_checks_the_labels_of_every_output_in_one_line() -> None:
    model, x, y = _two_heads()
    cases = [  # the classifier head (4 classes), then the stem's feature map (8 x 8 x 8)
        ("adaptive", y, r"^the model has 2 outputs: give train=\(x_train, \(y_1, \.\.\., y_2\)\)"),
        ("transform", (y, None, None), r"^the model has 2 outputs: give train="),
        ("adaptive", (y[:10], None), r"^training labels of output 0 \('fc'\) have shape \(10,\), "
         r"expected \(64,\): one label per training sample$"),
        ("adaptive", (y + 4, None), r"^training labels of output 0 \('fc'\) must be class "
         r"indices in \[0, 3\]$"),
        ("transform", (y, y), r"^output 1 \('stem'\) is not N x classes \(per sample "
         r"\(8, 8, 8\)\): its training labels must be None$"),
        ("transform", (None, None), r"^method 'transform' needs the labels of at least one "
         r"output$"),
    ]  # fmt: skip
    for method, labels, match in cases:
        with pytest.raises(InvalidDataError, match=match):
            codegen.quantize(model, x[:16], method=method, train=(x, labels), progress=False)


@pytest.mark.parametrize(
    ("method", "options"),
    [
        ("adaptive", {"adaptive": {"batch": 32}}),  # distils both outputs (the stem's by MSE)
        ("transform", {"bits_per_weight": 4}),
    ],
)
def test_two_outputs_train_and_are_bit_exact_on_the_host(
    method: str, options: dict[str, object], tmp_path: Path
) -> None:
    model, x, y = _two_heads()
    qm = codegen.quantize(model, x[:32], method=method, acc_bits=16, overflow="guaranteed",
                          train=(x, (y, None)), epochs=1, progress=False, name="heads",
                          **options)  # type: ignore[arg-type]  # fmt: skip
    section = qm.report[method]
    history = section["history" if method == "adaptive" else "retraining"]
    assert len(history) == 1 and "accuracy_0" in history[0] and "accuracy_1" not in history[0]
    assert all(r["bound_fits"] for r in qm.report["layers"] if "bound_fits" in r)
    want = qm.reference_int(x[:4])
    assert isinstance(want, tuple) and len(want) == 2
    c = codegen.compile(qm, target="host", out_dir=tmp_path / method, testbench=False)
    assert same_outputs(c.run_int(x[:4]), want)
