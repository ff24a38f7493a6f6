"""The one training loop: every retraining in secquant (QAT, DP-SGD QAT, shadow models for the privacy
audit, robustness training, the built-in digits model) runs `fit` with its own `step`.

A step takes one batch (inputs, labels), updates the model and returns the batch's mean loss (or None
when it computes none, as DP-SGD's per-sample gradients do); `fit` runs epochs, averages the losses and
handles the scheduler, checkpoints and progress.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

Step = Callable[[Any, torch.Tensor], float | None]


def shuffled(x: torch.Tensor, y: torch.Tensor, batch_size: int,
             generator: torch.Generator) -> Callable[[], Iterator[tuple[torch.Tensor, torch.Tensor]]]:
    """Mini-batches of (x, y) in a fresh random order (from `generator`) every epoch."""

    def batches():
        perm = torch.randperm(len(y), generator=generator)
        for i in range(0, len(perm), batch_size):
            b = perm[i:i + batch_size]
            yield x[b], y[b]

    return batches


def gradient_step(model: nn.Module, optimizer: torch.optim.Optimizer, loss_fn: Callable = F.cross_entropy,
                  regularizer: Callable[[nn.Module], torch.Tensor] | None = None) -> Step:
    """An ordinary optimizer step on loss_fn(model(x), y) (+ regularizer(model))."""

    def step(x, y) -> float:
        optimizer.zero_grad()
        loss = loss_fn(model(x), y)
        if regularizer is not None:
            loss = loss + regularizer(model)
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    return step


def fit(model: nn.Module, batches: Callable[[], Iterable], epochs: int, step: Step, *,
        scheduler: Any = None, checkpoint_fn: Callable[[int, nn.Module], None] | None = None,
        progress: Callable[[int], None] | None = None) -> list[float]:
    """Train for `epochs` passes over `batches()`; returns each epoch's mean loss (nan when the step
    reports none). The model is left in eval mode."""
    losses = []
    for epoch in range(epochs):
        model.train()
        total, n = 0.0, 0
        for x, y in batches():
            loss = step(x, y)
            if loss is not None:
                total += loss * len(y)
                n += len(y)
        if scheduler is not None:
            scheduler.step()
        losses.append(total / n if n else float("nan"))
        if checkpoint_fn:
            checkpoint_fn(epoch + 1, model)
        if progress:
            progress(1)
    model.eval()
    return losses
