"""The training loop the quantizers share (QAT, transform retraining) and float training use:
plain minibatch Adam with a progress bar.

Data is either NumPy arrays (x, y) or the user's torch Dataset of (x, y) pairs or DataLoader.
A model with several outputs returns a tuple of them; its labels are then a tuple with one entry
per output (class indices, or None for an output without labels), and the loss is the sum of the
outputs' losses (`_output_loss`).
Under torchrun (torch.distributed initialised) the model is wrapped in DistributedDataParallel,
arrays and Datasets are sharded by a DistributedSampler (`batch` stays the global batch: each of
the W ranks takes batch // W), a DataLoader is used as given (its sampler's `set_epoch` is
called), and only rank 0 shows bars and log lines. Without torch.distributed the array path is
exactly the single-process loop (NumPy permutation, same batches, same results).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, TensorDataset, default_collate

from codegen.core.errors import QaccError
from codegen.core.progress import bar as progress_bar
from codegen.quant import distributed as ddp

log = logging.getLogger("qacc")

Labels = np.ndarray | tuple[np.ndarray | None, ...]
"""Class indices (N,), or for a model with several outputs one entry per output (None: none)."""
TrainData = tuple[np.ndarray, Labels] | Dataset[Any] | DataLoader[Any]
"""What `train=` takes: arrays (x, y), a Dataset of (x, y) pairs, or a DataLoader of batches."""
Batch = tuple[torch.Tensor, torch.Tensor | tuple[torch.Tensor | None, ...]]
"""One training batch: inputs, and labels (a tuple with one entry per output: several outputs)."""
Outputs = torch.Tensor | tuple[torch.Tensor, ...]
"""A network's output, or the tuple of its outputs."""


def accuracy(model: nn.Module, x: np.ndarray, y: np.ndarray, batch: int = 2000) -> float:
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(x), batch):
            out = model(torch.as_tensor(x[i : i + batch]))
            correct += int((out.argmax(1).numpy() == y[i : i + batch]).sum())
    return correct / len(x)


BATCH = 128
"""Images per training step."""
TEMPERATURE = 2.0
"""Distillation temperature."""
KD_WEIGHT = 0.5
"""With a teacher, the distillation term's share of the loss."""


def fit(
    model: nn.Module,
    x: np.ndarray | Dataset[Any] | DataLoader[Any],
    y: Labels | None = None,
    epochs: int = 4,
    batch: int = BATCH,
    lr: float = 2e-3,
    seed: int = 0,
    progress: bool = True,
    schedule: str = "onecycle",
    desc: str = "train",
    history: list[dict[str, float]] | None = None,
    teacher: Callable[[torch.Tensor], Outputs] | None = None,
    temperature: float = TEMPERATURE,
    device: torch.device | str = "cpu",
    on_epoch: Callable[[], Mapping[str, float]] | None = None,
    penalty: Callable[[], torch.Tensor] | None = None,
    groups: list[dict[str, Any]] | None = None,
    warmup: float = 0.0,
    kd_weight: float = KD_WEIGHT,
    on_step: Callable[[float], None] | None = None,
    ema: float = 0.0,
) -> nn.Module:
    """Adam with a one-cycle (training) or cosine (fine-tuning) schedule; one progress bar per
    epoch showing loss and accuracy. Per-epoch figures are appended to `history` if given
    (under torchrun, summed over the ranks). With a `teacher`, the loss is the mean of cross
    entropy and the distillation loss (KL of the softened outputs, Hinton et al. 2015).

    `x` is an array (then `y` holds the labels), a Dataset of (x, y) pairs or a DataLoader;
    `model` must already be on `device` (the batches are moved there). `on_epoch`, if given, is
    called after every epoch (the model in eval mode) and its figures join the epoch's row.
    `penalty`, if given, is called after every forward pass and its value added to the loss.

    A model with several outputs (it returns a tuple; the `teacher` too) takes a tuple of labels
    per batch, one entry per output: class indices for an N x classes output, or None. The loss
    is the sum over the outputs of `_output_loss`; the epoch's row gives the first labelled
    output's accuracy as "accuracy" and every labelled output k's (from 0) as "accuracy_k".

    `groups` (Adam parameter groups, each with its own "lr" and "weight_decay") replaces
    `model.parameters()`; `warmup` (cosine only) is the share of the steps over which the rates
    rise linearly from 0 before the cosine decay; `kd_weight` is the distillation term's share of
    the loss; `on_step(done)`, if given, is called before every step with the share of the
    training steps already taken. `ema` > 0: the model ends with the exponential moving average
    of its parameters over the steps (decay `ema` per step), and `on_epoch` sees the average."""
    torch.manual_seed(seed)
    dev = torch.device(device)
    batches = _batches(x, y, batch, seed)
    net: nn.Module = model
    if ddp.active():
        ids = [dev.index] if dev.type == "cuda" else None
        net = nn.parallel.DistributedDataParallel(model, device_ids=ids)  # broadcasts rank 0's
    opt = torch.optim.Adam(model.parameters() if groups is None else groups, lr=lr)
    steps = max(1, epochs * len(batches))
    sched: torch.optim.lr_scheduler.LRScheduler
    if schedule == "onecycle":
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    elif warmup > 0:
        sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(steps, warmup))
    else:
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    taken = 0
    params = [p for p in model.parameters() if p.requires_grad]
    average = [p.detach().clone() for p in params] if ema > 0 else None
    for epoch in range(epochs):
        net.train()
        label = f"{desc} epoch {epoch + 1}/{epochs}"
        bar = progress_bar(batches.epoch(epoch), label, progress=progress, total=len(batches))
        seen = 0
        correct: np.ndarray | None = None  # per output
        loss_sum = 0.0
        start = time.perf_counter()
        for xb, yb in bar:
            xb = xb.to(dev, torch.float32)
            if on_step is not None:
                on_step(taken / steps)
            taken += 1
            out = net(xb)
            if isinstance(out, torch.Tensor):  # one output
                if not isinstance(yb, torch.Tensor):
                    raise QaccError(
                        "the model has one output: the training labels must be one tensor of "
                        f"class indices per batch, not a tuple of {len(yb)}"
                    )
                yb = yb.to(dev, torch.int64)
                want: torch.Tensor | None = None
                if teacher is not None:
                    with torch.no_grad():
                        t = teacher(xb)
                    assert isinstance(t, torch.Tensor)
                    want = t
                loss = _output_loss(out, yb, want, temperature, kd_weight)
                hits = [float((out.argmax(1) == yb).sum())]
            else:
                loss, hits = _outputs_loss(out, yb, xb, teacher, temperature, kd_weight)
            if penalty is not None:
                loss = loss + penalty()
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            if average is not None:
                with torch.no_grad():
                    torch._foreach_lerp_(average, [p.detach() for p in params], 1.0 - ema)
            seen += len(xb)
            correct = np.array(hits, dtype=np.float64) + (0.0 if correct is None else correct)
            loss_sum += float(loss.detach()) * len(xb)
            bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{_first(correct) / seen:.3f}")
        bar.close()
        # the epoch's figures over all ranks (the same on every rank)
        counts = np.zeros(1) if correct is None else correct
        tot = ddp.all_reduce(np.array([loss_sum, seen, *counts], dtype=np.float64), "sum")
        loss_sum, seen, counts = float(tot[0]), int(tot[1]), tot[2:]
        row = {
            "epoch": epoch + 1,
            "loss": loss_sum / max(1, seen),
            "accuracy": _first(counts) / max(1, seen),
        }
        if len(counts) > 1:
            row.update({f"accuracy_{k}": float(c) / max(1, seen)
                        for k, c in enumerate(counts) if not math.isnan(c)})  # fmt: skip
        live = None
        if average is not None:  # the average is what the epoch ends with
            live = [p.detach().clone() for p in params]
            _assign(params, average)
        if on_epoch is not None:
            model.eval()
            row.update(on_epoch())
        if live is not None and epoch + 1 < epochs:  # training goes on from the live weights
            _assign(params, live)
        if history is not None:
            history.append(row)
        if ddp.is_main():
            log.info("%s: loss %.4f, accuracy %.4f, %d samples, %.1f s", label, row["loss"],
                     row["accuracy"], seen, time.perf_counter() - start)  # fmt: skip
    differ = ddp.sync_parameters(model)
    if differ:
        log.warning("ranks disagreed on %d parameter values after training; took rank 0's", differ)
    return model.eval()


@torch.no_grad()
def _assign(params: list[nn.Parameter], values: list[torch.Tensor]) -> None:
    for p, v in zip(params, values, strict=True):
        p.copy_(v)


def _output_loss(
    out: torch.Tensor,
    labels: torch.Tensor | None,
    want: torch.Tensor | None,
    temperature: float,
    kd_weight: float,
) -> torch.Tensor:
    """One output's loss: cross entropy on its labels, mixed with distillation from the
    teacher's same output (`want`) at `kd_weight`; without labels, the distillation term alone.
    An N x classes output distils the softened class distribution (KL); any other output (a
    feature map, a sequence) its values (mean squared error); it takes no labels."""
    if labels is None and out.ndim != 2:
        assert want is not None
        return nn.functional.mse_loss(out, want)
    kd: torch.Tensor | None = None
    if want is not None:
        with torch.no_grad():
            soft = nn.functional.softmax(want / temperature, dim=1)
        kd = nn.functional.kl_div(
            nn.functional.log_softmax(out / temperature, dim=1), soft, reduction="batchmean"
        )
    if labels is None:
        assert kd is not None
        return temperature**2 * kd
    loss = nn.functional.cross_entropy(out, labels)
    if kd is not None:
        loss = (1.0 - kd_weight) * loss + kd_weight * temperature**2 * kd
    return loss


def _outputs_loss(
    outs: tuple[torch.Tensor, ...],
    labels: torch.Tensor | tuple[torch.Tensor | None, ...],
    xb: torch.Tensor,
    teacher: Callable[[torch.Tensor], Outputs] | None,
    temperature: float,
    kd_weight: float,
) -> tuple[torch.Tensor, list[float]]:
    """The loss of a model with several outputs, the sum of `_output_loss` over those with
    labels or a teacher, and each output's correct predictions (NaN: no labels)."""
    n = len(outs)
    if not isinstance(labels, tuple) or len(labels) != n:
        got = f"a tuple of {len(labels)}" if isinstance(labels, tuple) else "one tensor"
        raise QaccError(
            f"the model has {n} outputs: the training labels must be a tuple of {n} per batch "
            f"(class indices, or None for an output without labels), got {got}"
        )
    wants: tuple[torch.Tensor | None, ...] = (None,) * n
    if teacher is not None:
        with torch.no_grad():
            t = teacher(xb)
        assert isinstance(t, tuple) and len(t) == n
        wants = t
    total: torch.Tensor | None = None
    hits: list[float] = []
    for k, (out, lab, want) in enumerate(zip(outs, labels, wants, strict=True)):
        if lab is not None:
            if out.ndim != 2:
                raise QaccError(
                    f"output {k} is not N x classes (per sample {tuple(out.shape[1:])}): its "
                    "training labels must be None"
                )
            if tuple(lab.shape) != (len(xb),):
                raise QaccError(
                    f"the training labels of output {k} have shape {tuple(lab.shape)}, expected "
                    f"({len(xb)},): one class index per sample"
                )
            lab = lab.to(out.device, torch.int64)
            hits.append(float((out.argmax(1) == lab).sum()))
        else:
            hits.append(math.nan)
        if lab is None and want is None:
            continue  # nothing to learn from here: the other outputs train the shared layers
        loss = _output_loss(out, lab, want, temperature, kd_weight)
        total = loss if total is None else total + loss
    if total is None:
        raise QaccError("no output has training labels and there is no teacher to distil from")
    return total, hits


def _first(counts: np.ndarray) -> float:
    """The first labelled output's count of correct predictions (0 with none)."""
    labelled = counts[~np.isnan(counts)]
    return float(labelled[0]) if len(labelled) else 0.0


def warmup_cosine(steps: int, warmup: float) -> Callable[[int], float]:
    """The rate's factor at each step: linear from 0 over the first `warmup` share of the
    steps, then cosine decay to 0 (CosineAnnealingLR's curve) over the rest."""
    w = max(1, round(warmup * steps))

    def factor(step: int) -> float:
        if step < w:
            return (step + 1) / w
        return 0.5 * (1.0 + math.cos(math.pi * (step - w) / max(1, steps - w)))

    return factor


class _Batches:
    """The batches of one epoch, and their number (for the schedule and the bar)."""

    def __init__(self, count: int, make: Callable[[int], Iterable[Batch]]):
        self.count, self.make = count, make

    def __len__(self) -> int:
        return self.count

    def epoch(self, e: int) -> Iterable[Batch]:
        return self.make(e)


class _PerOutput(Dataset[Any]):
    """Arrays x and one label array (or None) per output, as (x_i, (y1_i, y2_i, ...)) pairs."""

    def __init__(self, x: torch.Tensor, ys: tuple[torch.Tensor | None, ...]):
        self.x, self.ys = x, ys

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, tuple[torch.Tensor | None, ...]]:
        return self.x[i], tuple(None if y is None else y[i] for y in self.ys)


def _collate(items: list[Any]) -> Any:
    """The DataLoader's default collation, but a label tuple (several outputs) is collated entry
    by entry, and an entry that is None (an output without labels) stays None."""
    first = items[0]
    if isinstance(first, (tuple, list)) and len(first) == 2 and isinstance(first[1], tuple):
        columns = list(zip(*(item[1] for item in items), strict=True))
        ys = tuple(None if c[0] is None else default_collate(list(c)) for c in columns)
        return default_collate([item[0] for item in items]), ys
    return default_collate(items)


def _batches(
    x: np.ndarray | Dataset[Any] | DataLoader[Any], y: Labels | None, batch: int, seed: int
) -> _Batches:
    if isinstance(x, np.ndarray):
        if y is None:
            raise QaccError("training arrays need labels: pass (x_train, y_train)")
        xt = torch.as_tensor(x)
        take: Callable[[torch.Tensor], Batch]
        if isinstance(y, tuple):  # several outputs: one label array (or None) per output
            ys = tuple(None if v is None else torch.as_tensor(v) for v in y)
            data: Dataset[Any] = _PerOutput(xt, ys)

            def take(idx: torch.Tensor) -> Batch:
                return xt[idx], tuple(None if v is None else v[idx] for v in ys)
        else:
            yt = torch.as_tensor(y)
            data = TensorDataset(xt, yt)

            def take(idx: torch.Tensor) -> Batch:
                return xt[idx], yt[idx]

        if not ddp.active():  # today's single-process loop, batch for batch
            rng = np.random.default_rng(seed)
            n = len(x)

            def from_arrays(e: int) -> Iterator[Batch]:
                order = torch.as_tensor(rng.permutation(n))
                for i in range(0, n, batch):
                    yield take(order[i : i + batch])

            return _Batches((n + batch - 1) // batch, from_arrays)
        x = data
    if isinstance(x, DataLoader):
        loader = x
    elif isinstance(x, Dataset):
        if ddp.active():
            sampler: Any = DistributedSampler(x, ddp.world(), ddp.rank(), shuffle=True, seed=seed)
            loader = DataLoader(x, batch_size=max(1, batch // ddp.world()), sampler=sampler,
                                collate_fn=_collate)  # fmt: skip
        else:
            gen = torch.Generator().manual_seed(seed)
            loader = DataLoader(x, batch_size=batch, shuffle=True, generator=gen,
                                collate_fn=_collate)  # fmt: skip
    else:
        raise QaccError(
            f"training data must be arrays (x, y), a torch Dataset or a DataLoader, "
            f"got {type(x).__name__}"
        )

    def from_loader(e: int) -> Iterable[Batch]:
        sampler = getattr(loader, "sampler", None)
        if isinstance(sampler, DistributedSampler):  # ours, or one the user's DataLoader has
            sampler.set_epoch(e)
        return _pairs(loader)

    return _Batches(_sized(loader), from_loader)


def _sized(loader: DataLoader[Any]) -> int:
    try:
        return len(loader)
    except TypeError as e:
        raise QaccError(
            "the training DataLoader has no length (an IterableDataset?); give a map-style "
            "Dataset or a DataLoader with a known number of batches"
        ) from e


def _pairs(loader: Iterable[Any]) -> Iterator[Batch]:
    for item in loader:
        if not (isinstance(item, (tuple, list)) and len(item) == 2):
            raise QaccError("training batches must be (inputs, labels) pairs")
        xb, yb = item
        yield torch.as_tensor(xb), _labels(yb)


def _labels(yb: Any) -> torch.Tensor | tuple[torch.Tensor | None, ...]:
    """A batch's labels: a tensor, or (several outputs) a tuple or list of tensors and Nones."""
    if isinstance(yb, (tuple, list)) and all(
        v is None or isinstance(v, (torch.Tensor, np.ndarray)) for v in yb
    ):
        return tuple(None if v is None else torch.as_tensor(v) for v in yb)
    return torch.as_tensor(yb)
