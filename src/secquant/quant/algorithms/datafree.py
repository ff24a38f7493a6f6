"""Data-free calibration: synthetic inputs distilled from BatchNorm statistics (ZeroQ, Cai et al. CVPR 2020).

A trained BatchNorm layer remembers the mean and variance of its input over the training
set (`running_mean`, `running_var`). ZeroQ optimizes random inputs until, layer by layer,
the batch statistics of every BatchNorm's input match those remembered values; the result
is a calibration set that touched no real sample (only what the float model already holds).
An optional cross-entropy term towards balanced random classes spreads the samples over the
model's outputs (the "logit diversity" of later data-free work), which helps when activation
ranges depend on the class.

Why our own code: ZeroQ's reference implementation is a research script tied to its own
models, and no maintained library ships BatchNorm-statistics distillation as a function.
The method is a ~30-line optimization loop over torch hooks, written here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import CalibrationError, ModelError

DATA_LABEL = "synthetic (ZeroQ: inputs optimized to match BatchNorm running statistics)"


def batchnorm_layers(module: nn.Module) -> list[tuple[str, nn.modules.batchnorm._BatchNorm]]:
    """The BatchNorm layers that carry running statistics (the only ones ZeroQ can match)."""
    return [(n, m) for n, m in module.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
            and m.running_mean is not None and m.running_var is not None]


def check_batchnorm(module: nn.Module) -> list[tuple[str, nn.modules.batchnorm._BatchNorm]]:
    """Refuse (clearly) a model ZeroQ cannot synthesize data for."""
    layers = batchnorm_layers(module)
    if not layers:
        raise CalibrationError(
            f"{type(module).__name__} has no BatchNorm layer with running statistics, so synthetic (ZeroQ) "
            "calibration data cannot be made for it: use a weight-only preset that needs no data (w8a16, "
            "w4a16 without calibration) or pass --calib FILE with real (or masked) samples")
    return layers


def synthesize_from_batchnorm(module: nn.Module, n: int, input_shape: tuple[int, ...] | list[int], steps: int = 500,
                              seed: int = 0, *, lr: float = 0.1, diversity: float = 0.0,
                              batch_size: int = 64) -> torch.Tensor:
    """`n` synthetic inputs of per-sample shape `input_shape` whose pre-BatchNorm batch statistics
    match every BatchNorm's running mean/std (ZeroQ). `diversity` > 0 adds a cross-entropy pull
    towards balanced random classes (classifiers only). The module is not changed."""
    if n < 1 or steps < 1:
        raise CalibrationError("synthetic calibration needs at least 1 sample and 1 optimization step")
    layers = check_batchnorm(module)
    shape = tuple(int(s) for s in input_shape)
    was_training = module.training
    module.eval()  # BN normalizes with its running statistics; we match the statistics of its *input*
    gen = torch.Generator().manual_seed(seed)
    stats: list[tuple[torch.Tensor, torch.Tensor]] = []

    def hook(mod, inputs, _out):
        x = inputs[0]
        dims = [d for d in range(x.ndim) if d != 1]  # all but the channel axis
        stats.append((x.mean(dims), x.var(dims, unbiased=False)))

    handles = [m.register_forward_hook(hook) for _, m in layers]
    targets = [(m.running_mean.detach().float(), (m.running_var.detach().float() + m.eps).sqrt()) for _, m in layers]
    out = []
    try:
        for start in range(0, n, batch_size):
            b = min(batch_size, n - start)
            x = torch.randn((b, *shape), generator=gen).requires_grad_(True)
            labels: torch.Tensor | None = None  # balanced random classes, drawn once the class count is known
            opt = torch.optim.Adam([x], lr=lr)
            sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=max(5, steps // 20))
            for _ in range(steps):
                stats.clear()
                opt.zero_grad()
                logits = module(x)
                loss = x.new_zeros(())
                for (mu, var), (rm, rs) in zip(stats, targets):
                    loss = loss + torch.linalg.vector_norm(mu - rm) + torch.linalg.vector_norm(var.clamp_min(0).add(1e-8).sqrt() - rs)
                if diversity > 0:
                    if logits.ndim != 2:
                        raise ModelError("diversity needs a classifier returning (batch, classes) logits")
                    if labels is None:
                        labels = (torch.arange(b) % logits.shape[1])[torch.randperm(b, generator=gen)]
                    loss = loss + diversity * F.cross_entropy(logits, labels)
                (gx,) = torch.autograd.grad(loss, [x])  # only the inputs move; the model's .grad stays untouched
                x.grad = gx
                opt.step()
                sched.step(float(loss.detach()))
            out.append(x.detach())
    finally:
        for h in handles:
            h.remove()
        module.train(was_training)
    result = torch.cat(out)
    if not torch.isfinite(result).all():
        raise CalibrationError("synthetic calibration diverged (NaN/Inf): retry with a smaller lr or fewer steps")
    return result


def bn_mismatch(module: nn.Module, x: torch.Tensor) -> float:
    """Mean over BatchNorm layers of |batch mean - running mean| + |batch std - running std|, per channel:
    how far a set of inputs is from what the model's BatchNorm layers remember (0 = a perfect match)."""
    layers = check_batchnorm(module)
    vals: list[float] = []

    def hook(mod, inputs, _out):
        a = inputs[0]
        dims = [d for d in range(a.ndim) if d != 1]
        rs = (mod.running_var + mod.eps).sqrt()
        vals.append(float((a.mean(dims) - mod.running_mean).abs().mean() + (a.var(dims, unbiased=False).add(mod.eps).sqrt() - rs).abs().mean()))

    handles = [m.register_forward_hook(hook) for _, m in layers]
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            module(x)
    finally:
        for h in handles:
            h.remove()
        module.train(was_training)
    return sum(vals) / len(vals)
