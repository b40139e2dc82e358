"""The training loop the quantizers share (QAT, transform retraining) and float training use:
plain minibatch Adam with a progress bar.

Data is either NumPy arrays (x, y) or the user's torch Dataset of (x, y) pairs or DataLoader.
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
from torch.utils.data import DataLoader, Dataset, DistributedSampler, TensorDataset

from codegen.core.errors import QaccError
from codegen.core.progress import bar as progress_bar
from codegen.quant import distributed as ddp

log = logging.getLogger("qacc")

TrainData = tuple[np.ndarray, np.ndarray] | Dataset[Any] | DataLoader[Any]
"""What `train=` takes: arrays (x, y), a Dataset of (x, y) pairs, or a DataLoader of batches."""


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
    y: np.ndarray | None = None,
    epochs: int = 4,
    batch: int = BATCH,
    lr: float = 2e-3,
    seed: int = 0,
    progress: bool = True,
    schedule: str = "onecycle",
    desc: str = "train",
    history: list[dict[str, float]] | None = None,
    teacher: Callable[[torch.Tensor], torch.Tensor] | None = None,
    temperature: float = TEMPERATURE,
    device: torch.device | str = "cpu",
    on_epoch: Callable[[], Mapping[str, float]] | None = None,
    penalty: Callable[[], torch.Tensor] | None = None,
    groups: list[dict[str, Any]] | None = None,
    warmup: float = 0.0,
    kd_weight: float = KD_WEIGHT,
    on_step: Callable[[float], None] | None = None,
) -> nn.Module:
    """Adam with a one-cycle (training) or cosine (fine-tuning) schedule; one progress bar per
    epoch showing loss and accuracy. Per-epoch figures are appended to `history` if given
    (under torchrun, summed over the ranks). With a `teacher`, the loss is the mean of cross
    entropy and the distillation loss (KL of the softened outputs, Hinton et al. 2015).

    `x` is an array (then `y` holds the labels), a Dataset of (x, y) pairs or a DataLoader;
    `model` must already be on `device` (the batches are moved there). `on_epoch`, if given, is
    called after every epoch (the model in eval mode) and its figures join the epoch's row.
    `penalty`, if given, is called after every forward pass and its value added to the loss.

    `groups` (Adam parameter groups, each with its own "lr" and "weight_decay") replaces
    `model.parameters()`; `warmup` (cosine only) is the share of the steps over which the rates
    rise linearly from 0 before the cosine decay; `kd_weight` is the distillation term's share of
    the loss; `on_step(done)`, if given, is called before every step with the share of the
    training steps already taken."""
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
    for epoch in range(epochs):
        net.train()
        label = f"{desc} epoch {epoch + 1}/{epochs}"
        bar = progress_bar(batches.epoch(epoch), label, progress=progress, total=len(batches))
        seen = correct = 0
        loss_sum = 0.0
        start = time.perf_counter()
        for xb, yb in bar:
            xb, yb = xb.to(dev, torch.float32), yb.to(dev, torch.int64)
            if on_step is not None:
                on_step(taken / steps)
            taken += 1
            out = net(xb)
            loss = nn.functional.cross_entropy(out, yb)
            if teacher is not None:
                with torch.no_grad():
                    soft = nn.functional.softmax(teacher(xb) / temperature, dim=1)
                kd = nn.functional.kl_div(
                    nn.functional.log_softmax(out / temperature, dim=1), soft,
                    reduction="batchmean",
                )  # fmt: skip
                loss = (1.0 - kd_weight) * loss + kd_weight * temperature**2 * kd
            if penalty is not None:
                loss = loss + penalty()
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            seen += len(yb)
            correct += int((out.argmax(1) == yb).sum())
            loss_sum += float(loss.detach()) * len(yb)
            bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.3f}")
        bar.close()
        # the epoch's figures over all ranks (the same on every rank)
        tot = ddp.all_reduce(np.array([loss_sum, seen, correct], dtype=np.float64), "sum")
        loss_sum, seen, correct = float(tot[0]), int(tot[1]), int(tot[2])
        row = {
            "epoch": epoch + 1,
            "loss": loss_sum / max(1, seen),
            "accuracy": correct / max(1, seen),
        }
        if on_epoch is not None:
            model.eval()
            row.update(on_epoch())
        if history is not None:
            history.append(row)
        if ddp.is_main():
            log.info("%s: loss %.4f, accuracy %.4f, %d samples, %.1f s", label, row["loss"],
                     row["accuracy"], seen, time.perf_counter() - start)  # fmt: skip
    differ = ddp.sync_parameters(model)
    if differ:
        log.warning("ranks disagreed on %d parameter values after training; took rank 0's", differ)
    return model.eval()


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

    def __init__(
        self, count: int, make: Callable[[int], Iterable[tuple[torch.Tensor, torch.Tensor]]]
    ):
        self.count, self.make = count, make

    def __len__(self) -> int:
        return self.count

    def epoch(self, e: int) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
        return self.make(e)


def _batches(
    x: np.ndarray | Dataset[Any] | DataLoader[Any], y: np.ndarray | None, batch: int, seed: int
) -> _Batches:
    if isinstance(x, np.ndarray):
        if y is None:
            raise QaccError("training arrays need labels: pass (x_train, y_train)")
        xt, yt = torch.as_tensor(x), torch.as_tensor(y)
        if not ddp.active():  # today's single-process loop, batch for batch
            rng = np.random.default_rng(seed)
            n = len(x)

            def from_arrays(e: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
                order = torch.as_tensor(rng.permutation(n))
                for i in range(0, n, batch):
                    idx = order[i : i + batch]
                    yield xt[idx], yt[idx]

            return _Batches((n + batch - 1) // batch, from_arrays)
        x = TensorDataset(xt, yt)
    if isinstance(x, DataLoader):
        loader = x
    elif isinstance(x, Dataset):
        if ddp.active():
            sampler: Any = DistributedSampler(x, ddp.world(), ddp.rank(), shuffle=True, seed=seed)
            loader = DataLoader(x, batch_size=max(1, batch // ddp.world()), sampler=sampler)
        else:
            gen = torch.Generator().manual_seed(seed)
            loader = DataLoader(x, batch_size=batch, shuffle=True, generator=gen)
    else:
        raise QaccError(
            f"training data must be arrays (x, y), a torch Dataset or a DataLoader, "
            f"got {type(x).__name__}"
        )

    def from_loader(e: int) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
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


def _pairs(loader: Iterable[Any]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    for item in loader:
        if not (isinstance(item, (tuple, list)) and len(item) == 2):
            raise QaccError("training batches must be (inputs, labels) pairs")
        xb, yb = item
        yield torch.as_tensor(xb), torch.as_tensor(yb)
