"""qacc under torchrun (torch.distributed, DistributedDataParallel, DistributedSampler), the
torch Dataset / DataLoader training input, and the device option.

The multi-process tests start `python -m torch.distributed.run` (torchrun) in a subprocess on
tests/quant/ddp_worker.py with the gloo backend on the CPU; every rank's stdout and stderr go to
their own files (torchrun --redirects 3), so the tests can see who printed what.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

import codegen
from codegen.core.errors import QaccError
from codegen.data import datasets
from codegen.quant import distributed as ddp
from codegen.quant.training import fit

WORKER = Path(__file__).resolve().parent / "ddp_worker.py"


def _torchrun(mode: str, nproc: int, out: Path) -> dict[int, str]:
    """Run the worker on `nproc` ranks; returns each rank's stdout + stderr."""
    out.mkdir(parents=True, exist_ok=True)
    logs = out / "logs"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc-per-node={nproc}", f"--log-dir={logs}", "--redirects=3", str(WORKER),
            mode, str(out)]  # fmt: skip
    proc = subprocess.run(
        argv, cwd=out, env=env, capture_output=True, text=True, timeout=300, check=False
    )
    texts = {}
    for r in range(nproc):
        files = sorted(logs.glob(f"*/attempt_0/{r}/std*.log"))
        texts[r] = "".join(f"--- {f.name}\n{f.read_text()}" for f in files)
    assert proc.returncode == 0, f"torchrun failed:\n{proc.stderr[-3000:]}\n{texts}"
    return texts


def _load(path: Path, prefix: str) -> dict[str, np.ndarray]:
    with np.load(path) as z:
        return {k[len(prefix) :]: z[k] for k in z.files if k.startswith(prefix)}


# ----------------------------------------------------------------------------- multi-process


@pytest.mark.slow
def test_adaptive_qat_on_two_ranks_matches_one_rank(tmp_path: Path) -> None:
    """2 ranks x 64 images per step against 1 rank x 128: the same global batches (the
    DistributedSampler's permutation does not depend on the number of ranks, and rank r's
    batch i is positions [128 i, 128 (i + 1)) of it with stride 2) and the same mean gradient
    (DDP averages the ranks' mean-loss gradients); only the order of the float additions
    differs (the all-reduce sums two half-batch gradients): float32 gradients differing in the
    last bits. Adam divides each gradient by its own running RMS, so where a gradient is a
    near-cancelling sum (and where a rounding decision of the fake quantizer flips) those bits
    become a visible fraction of a step: after 8 steps at lr 1e-3 the weights differ by up to
    ~1e-5 (about 1% of one step, 4e-5 of the tensor's largest value), not 1e-7. The tolerance
    is 1e-4 of each tensor's largest value; the integer weights are expected to agree (0 or a
    handful flip at a rounding boundary)."""
    two = _torchrun("qat", 2, tmp_path / "two")
    one = _torchrun("qat", 1, tmp_path / "one")
    assert "qacc: adaptive QAT epoch 1/1" in one[0]

    # every rank ends with the same parameters, float and integer, bit for bit
    r0, r1 = (_load(tmp_path / "two" / f"rank{r}.npz", "") for r in (0, 1))
    bars = [bool(r0.pop("bars")[0]), bool(r1.pop("bars")[0])]  # would a bar show on a tty
    assert r0.keys() == r1.keys()
    assert all(np.array_equal(r0[k], r1[k]) for k in r0), [
        k for k in r0 if not np.array_equal(r0[k], r1[k])
    ]

    # the graph is bit-exact in C on the host (rank 0 compiled it; rank 1 wrote nothing)
    result = json.loads((tmp_path / "two" / "result.json").read_text())
    assert result["c_bit_exact"] is True
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == [
        "c", "logs", "rank0.npz", "rank1.npz", "result.json"
    ]  # fmt: skip

    # only rank 0 printed: qacc's per-epoch log line there, nothing at all from rank 1
    assert "qacc: adaptive QAT epoch 1/1" in two[0]
    assert "qacc" not in two[1] and "epoch" not in two[1]
    assert two[1].replace("--- stderr.log\n", "").replace("--- stdout.log\n", "") == ""
    assert bars == [True, False]

    # against one rank on the same global batches
    f2, f1 = (
        _load(tmp_path / "two" / "rank0.npz", "f:"),
        _load(tmp_path / "one" / "rank0.npz", "f:"),
    )
    # per tensor, the largest difference relative to the tensor's largest value
    worst = max(
        float(np.max(np.abs(f2[k] - f1[k])) / max(np.max(np.abs(f1[k])), 1e-12)) for k in f1
    )
    moved = max(float(np.max(np.abs(f2[k] - f1[k]))) for k in f1)
    g2, g1 = (
        _load(tmp_path / "two" / "rank0.npz", "g:"),
        _load(tmp_path / "one" / "rank0.npz", "g:"),
    )
    assert g1.keys() == g2.keys()
    steps = [k for k in g1 if k.endswith((".weight_scale", ".format_scale"))]  # float steps
    integers = [k for k in g1 if k not in steps]  # weights, biases, requant, formats
    weights = [k for k in g1 if k.endswith(".weight")]
    differ = sum(int((g2[k] != g1[k]).sum()) for k in integers)
    total = sum(g1[k].size for k in weights)
    other = [k for k in g1 if k not in weights and not np.array_equal(g1[k], g2[k])]
    step_diff = max(float(np.max(np.abs(g2[k] - g1[k]) / np.abs(g1[k]))) for k in steps)
    print(f"2 ranks vs 1: float params max abs diff {moved:.3g}, max diff / tensor max "
          f"{worst:.3g}; integer values differing {differ} ({total} weights); other entries "
          f"differing: {other}; float steps max relative diff {step_diff:.3g}")  # fmt: skip
    assert worst < 1e-4 and moved < 1e-4  # measured: 8.1e-6 abs, 4.3e-5 of a tensor max
    # measured: no integer value differs (weights, biases, multipliers, shifts, zero points);
    # only the float steps do (c1.weight_scale 5e-6, the input's scale 3e-6 relative)
    assert differ <= max(1, total // 1000)
    assert step_diff < 1e-4


@pytest.mark.slow
def test_ptq_calibration_all_reduced_over_two_ranks_equals_one_rank(tmp_path: Path) -> None:
    """Each of 2 ranks calibrates on half of 600 images: the ranges (MIN / MAX all-reduce) and
    the candidates' scores (sums all-reduced) are those of one process with all 600, so the
    integer graph is the same, bit for bit. Under torchrun the default rounding is nearest (OPTQ's
    layer statistics are per rank)."""
    _torchrun("ptq", 2, tmp_path / "two")
    g0, g1 = (_load(tmp_path / "two" / f"rank{r}.npz", "g:") for r in (0, 1))
    xtr, ytr, _, _ = datasets.digits()
    from tests.quant.ddp_worker import EXAMPLE, graph_arrays

    net = EXAMPLE["model"]("tiny", None)
    single = graph_arrays(codegen.quantize(net, xtr[:600], acc_bits=12, labels=ytr[:600],
                                           progress=False, rounding="nearest"))  # fmt: skip
    assert single.keys() == g0.keys() == g1.keys()
    for k in single:
        assert np.array_equal(g0[k], single[k]), k
        assert np.array_equal(g1[k], single[k]), k


@pytest.mark.slow
def test_transform_retraining_on_two_ranks_keeps_ranks_identical(tmp_path: Path) -> None:
    """ELT (second moments all-reduced in float64) with one epoch of data-parallel retraining:
    both ranks build the same integer graph."""
    _torchrun("transform", 2, tmp_path / "two")
    g0, g1 = (_load(tmp_path / "two" / f"rank{r}.npz", "g:") for r in (0, 1))
    assert g0.keys() == g1.keys()
    assert all(np.array_equal(g0[k], g1[k]) for k in g0)


# ----------------------------------------------------------------------------- Dataset input


class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(1, 4, 3, padding=1)
        self.fc = nn.Linear(4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.c1(x)).mean(dim=(2, 3)))


class _Pairs(Dataset[tuple[np.ndarray, int]]):
    """A map-style Dataset of (numpy image, int label) that records what was read."""

    def __init__(self, x: np.ndarray, y: np.ndarray):
        self.x, self.y = x, y
        self.read: list[int] = []

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        self.read.append(int(i))
        return self.x[i], int(self.y[i])


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray]:
    xtr, ytr, _, _ = datasets.digits()
    return xtr[:300], ytr[:300]


def test_train_accepts_a_dataset_and_a_dataloader(digits: tuple[np.ndarray, np.ndarray]) -> None:
    x, y = digits
    torch.manual_seed(0)
    model = _Tiny().eval()
    ds = _Pairs(x, y)
    qm = codegen.quantize(model, x[:100], acc_bits=12, method="adaptive", train=ds, epochs=2,
                          progress=False)  # fmt: skip
    assert sorted(ds.read) == sorted(list(range(len(x))) * 2)  # each sample once per epoch
    assert len(qm.report["adaptive"]["history"]) == 2
    # the shuffle is seeded: the same Dataset gives the same integer graph again
    again = codegen.quantize(model, x[:100], acc_bits=12, method="adaptive", train=_Pairs(x, y),
                             epochs=2, progress=False)  # fmt: skip
    assert np.array_equal(qm.reference_int(x), again.reference_int(x))
    for na, nb in zip(qm.graph.nodes, again.graph.nodes, strict=True):
        assert na.params.keys() == nb.params.keys()
        assert all(np.array_equal(na.params[k], nb.params[k]) for k in na.params), na.name

    # a DataLoader is used as given: its batch size and (here sequential) order
    seen: list[int] = []

    class Counting(TensorDataset):
        def __getitem__(self, i: int) -> tuple[torch.Tensor, ...]:
            seen.append(int(i))
            return super().__getitem__(i)

    loader = DataLoader(Counting(torch.as_tensor(x), torch.as_tensor(y)), batch_size=50)
    qm2 = codegen.quantize(model, x[:100], acc_bits=12, method="transform", train=loader,
                           epochs=1, progress=False)  # fmt: skip
    assert seen == list(range(len(x)))
    assert qm2.report["transform"]["retraining"][0]["epoch"] == 1

    with pytest.raises(QaccError, match="torch Dataset"):
        codegen.quantize(model, x[:100], method="adaptive", train=[x, y], progress=False)


def test_fit_on_arrays_is_the_single_process_loop(digits: tuple[np.ndarray, np.ndarray]) -> None:
    """Without torch.distributed, arrays go through the NumPy-permutation loop of before: the
    same batches as indexing the arrays by hand."""
    x, y = digits
    assert not ddp.active()
    torch.manual_seed(0)
    a = _Tiny()
    b = _Tiny()
    b.load_state_dict(a.state_dict())
    fit(a, x, y, epochs=1, batch=64, progress=False)
    # by hand: the same permutation, Adam and one-cycle schedule
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    opt = torch.optim.Adam(b.parameters(), lr=2e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=5)
    order = torch.as_tensor(rng.permutation(len(x)))
    xt, yt = torch.as_tensor(x), torch.as_tensor(y)
    b.train()
    for i in range(0, len(x), 64):
        idx = order[i : i + 64]
        loss = nn.functional.cross_entropy(b(xt[idx]), yt[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)


# ----------------------------------------------------------------------------- device


def test_device_cpu_explicitly_gives_the_default_graph(
    digits: tuple[np.ndarray, np.ndarray],
) -> None:
    x, y = digits
    torch.manual_seed(0)
    model = _Tiny().eval()
    runs = [
        codegen.quantize(
            model,
            x[:100],
            acc_bits=12,
            method="adaptive",
            train=(x, y),
            epochs=1,
            progress=False,
            **kw,
        )
        for kw in ({}, {"device": "cpu"})
    ]
    for na, nb in zip(runs[0].graph.nodes, runs[1].graph.nodes, strict=True):
        for k in na.params:
            assert np.array_equal(na.params[k], nb.params[k])
    ptq = [
        codegen.quantize(model, x[:100], acc_bits=12, progress=False, **kw)
        for kw in ({}, {"device": "cpu"})
    ]
    assert np.array_equal(ptq[0].reference_int(x), ptq[1].reference_int(x))


def test_cuda_without_cuda_is_a_one_line_error(
    digits: tuple[np.ndarray, np.ndarray], monkeypatch: pytest.MonkeyPatch
) -> None:
    x, y = digits
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(QaccError) as e:
        codegen.quantize(_Tiny().eval(), x[:50], method="adaptive", train=(x, y), device="cuda")
    msg = str(e.value)
    assert "\n" not in msg and "torch.cuda.is_available() is False" in msg and "'cpu'" in msg
    with pytest.raises(QaccError, match="not supported"):
        ddp.resolve_device("mps")
    assert ddp.resolve_device("cpu") == torch.device("cpu")
