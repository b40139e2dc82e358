"""The training loop the quantizers share (QAT, transform retraining) and float training use:
plain minibatch Adam on the CPU with a progress bar."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from codegen.core.progress import bar as progress_bar


def accuracy(model: nn.Module, x: np.ndarray, y: np.ndarray, batch: int = 2000) -> float:
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(x), batch):
            out = model(torch.as_tensor(x[i : i + batch]))
            correct += int((out.argmax(1).numpy() == y[i : i + batch]).sum())
    return correct / len(x)


def fit(
    model: nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    epochs: int = 4,
    batch: int = 128,
    lr: float = 2e-3,
    seed: int = 0,
    progress: bool = True,
    schedule: str = "onecycle",
    desc: str = "train",
    history: list[dict[str, float]] | None = None,
    teacher: Callable[[torch.Tensor], torch.Tensor] | None = None,
    temperature: float = 2.0,
) -> nn.Module:
    """Adam with a one-cycle (training) or cosine (fine-tuning) schedule; one progress bar per
    epoch showing loss and accuracy. Per-epoch figures are appended to `history` if given.
    With a `teacher`, the loss is the mean of cross entropy and the distillation loss (KL of the
    softened outputs, Hinton et al. 2015)."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    steps = max(1, epochs * ((len(x) + batch - 1) // batch))
    sched: torch.optim.lr_scheduler.LRScheduler
    if schedule == "onecycle":
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    else:
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    xt, yt = torch.as_tensor(x), torch.as_tensor(y)
    for epoch in range(epochs):
        model.train()
        order = torch.as_tensor(rng.permutation(len(x)))
        bar = progress_bar(
            range(0, len(x), batch), f"{desc} epoch {epoch + 1}/{epochs}", progress=progress
        )
        seen = correct = 0
        loss_sum = 0.0
        for i in bar:
            idx = order[i : i + batch]
            out = model(xt[idx])
            loss = nn.functional.cross_entropy(out, yt[idx])
            if teacher is not None:
                with torch.no_grad():
                    soft = nn.functional.softmax(teacher(xt[idx]) / temperature, dim=1)
                kd = nn.functional.kl_div(
                    nn.functional.log_softmax(out / temperature, dim=1), soft,
                    reduction="batchmean",
                )  # fmt: skip
                loss = 0.5 * loss + 0.5 * temperature**2 * kd
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            seen += len(idx)
            correct += int((out.argmax(1) == yt[idx]).sum())
            loss_sum += float(loss.detach()) * len(idx)
            bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.3f}")
        bar.close()
        if history is not None:
            history.append(
                {
                    "epoch": epoch + 1,
                    "loss": loss_sum / max(1, seen),
                    "accuracy": correct / max(1, seen),
                }
            )
    return model.eval()
