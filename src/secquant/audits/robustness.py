"""Adversarial robustness of float and quantized classifiers: FGSM and PGD (L-inf), and
defensive (Lipschitz-regularized) quantization-aware retraining (Lin et al., ICLR 2019).

Attacks on a quantized model need gradients through its rounding, which are zero almost
everywhere. While an attack runs, `ste_gradients` makes every activation quantizer pass
gradients straight through (the straight-through estimator, i.e. BPDA with the identity):
the forward pass is still the exact fake-quantized one, only the backward pass changes.
Quantized weights are plain buffers, so gradients with respect to the input need nothing else.
Transfer attacks (examples crafted on the float model, evaluated on the quantized one) are
reported as well, since they need no gradient of the quantized model at all.

FGSM/PGD are written here (a dozen lines each) because no adversarial-attack library
(torchattacks, ART, foolbox) is a dependency of secquant and these attacks are standard.
"""

from __future__ import annotations

import math
import types
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import SecquantError
from ..quant.modules import ActQuant

DEFAULT_EPS = (0.0, 0.02, 0.05, 0.1, 0.2)


@contextmanager
def ste_gradients(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, activation quantizers of `model` use straight-through gradients.

    Forward values are unchanged (x + (fq(x) - x).detach() == fq(x)); the backward pass treats
    quantization as the identity. Restores the original forward methods on exit.
    """
    patched = []
    for m in model.modules():
        if isinstance(m, ActQuant):
            orig = m.forward

            def fwd(self, x, _orig=orig):
                y = _orig(x)
                return x + (y - x).detach()

            m.forward = types.MethodType(fwd, m)
            patched.append(m)
    try:
        yield model
    finally:
        for m in patched:
            del m.forward  # back to the class method


def _input_grad(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    x = x.detach().clone().requires_grad_(True)
    loss = F.cross_entropy(model(x), y)
    (g,) = torch.autograd.grad(loss, x)
    return g


def fgsm(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float,
         clip: tuple[float, float] = (0.0, 1.0)) -> torch.Tensor:
    """Fast gradient sign method (Goodfellow et al. 2015): one signed-gradient step of size eps."""
    if eps == 0:
        return x.clone()
    with ste_gradients(model):
        g = _input_grad(model, x, y)
    return (x + eps * g.sign()).clamp(*clip).detach()


def pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, steps: int = 10,
        step_size: float | None = None, random_start: bool = True, seed: int = 0,
        clip: tuple[float, float] = (0.0, 1.0)) -> torch.Tensor:
    """Projected gradient descent in the L-inf ball (Madry et al. 2018), random start, seeded."""
    if eps == 0:
        return x.clone()
    alpha = step_size if step_size is not None else 2.5 * eps / max(1, steps)
    adv = x.clone()
    if random_start:
        g = torch.Generator().manual_seed(seed)
        adv = (x + (torch.rand(x.shape, generator=g) * 2 - 1) * eps).clamp(*clip)
    with ste_gradients(model):
        for _ in range(steps):
            grad = _input_grad(model, adv, y)
            adv = adv + alpha * grad.sign()
            adv = torch.min(torch.max(adv, x - eps), x + eps).clamp(*clip).detach()
    return adv


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 512) -> float:
    model.eval()
    correct = sum(int((model(x[i:i + batch_size]).argmax(-1) == y[i:i + batch_size]).sum())
                  for i in range(0, len(y), batch_size))
    return correct / max(1, len(y))


def _batched_attack(attack: Callable, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                    batch_size: int = 256) -> torch.Tensor:
    return torch.cat([attack(model, x[i:i + batch_size], y[i:i + batch_size]) for i in range(0, len(y), batch_size)])


def robust_accuracy(models: dict[str, nn.Module], x: torch.Tensor, y: torch.Tensor,
                    eps_grid: Sequence[float] = DEFAULT_EPS, steps: int = 10, seed: int = 0,
                    transfer_from: str | None = "fp32", clip: tuple[float, float] = (0.0, 1.0),
                    progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """FGSM and PGD robust accuracy of each model over the epsilon grid.

    White-box attacks use each model's own (STE) gradients. With `transfer_from`, the examples
    crafted on that model are also evaluated on every other model (transfer accuracy).
    Returns {"eps": [...], "models": {name: {"clean": a, "fgsm": [...], "pgd": [...],
    "fgsm_transfer": [...], "pgd_transfer": [...]}}}.
    """
    eps_grid = [float(e) for e in eps_grid]
    lo, hi = clip
    if any(e < 0 or e > hi - lo or not math.isfinite(e) for e in eps_grid):
        raise SecquantError(f"--eps values must lie in [0, {hi - lo:g}] (the width of the input range)")
    if len(x) == 0:
        raise SecquantError("the evaluation data is empty")
    if float(x.min()) < lo - 1e-6 or float(x.max()) > hi + 1e-6:
        raise SecquantError(f"inputs span [{float(x.min()):.3g}, {float(x.max()):.3g}], outside the input range "
                            f"[{lo:g}, {hi:g}]: pass the valid input range (--input-range LO,HI)")
    for m in models.values():
        m.eval()
    res: dict[str, Any] = {"eps": eps_grid, "models": {n: {"clean": accuracy(m, x, y), "fgsm": [], "pgd": []}
                                                       for n, m in models.items()}}
    src = models.get(transfer_from) if transfer_from else None
    for e in eps_grid:
        crafted = {}
        for name, m in models.items():
            xf = _batched_attack(lambda mm, xx, yy, e=e: fgsm(mm, xx, yy, e, clip), m, x, y)
            xp = _batched_attack(lambda mm, xx, yy, e=e: pgd(mm, xx, yy, e, steps, seed=seed, clip=clip), m, x, y)
            res["models"][name]["fgsm"].append(accuracy(m, xf, y))
            res["models"][name]["pgd"].append(accuracy(m, xp, y))
            if name == transfer_from:
                crafted = {"fgsm": xf, "pgd": xp}
            if progress:
                progress(1)
        if src is not None:
            for name, m in models.items():
                if name == transfer_from:
                    continue
                for kind in ("fgsm", "pgd"):
                    res["models"][name].setdefault(f"{kind}_transfer", []).append(accuracy(m, crafted[kind], y))
    res["attack"] = {
        "norm": "linf", "input_range": [lo, hi], "pgd_steps": steps, "pgd_step_size": "2.5*eps/steps",
        "pgd_random_start": True, "seed": seed,
        "quantized_gradients": "straight-through estimator (BPDA, identity backward) through activation "
                               "quantizers; exact fake-quantized forward",
        "transfer_from": transfer_from if src is not None else None,
    }
    return res


def plot_robustness(res: dict[str, Any], path: Path) -> Path:
    """Accuracy against epsilon, one line per model and attack (SVG or PNG by suffix)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, kind in zip(axes, ("fgsm", "pgd")):
        for name, r in res["models"].items():
            (line,) = ax.plot(res["eps"], r[kind], marker="o", label=f"{name} (white-box)")
            if f"{kind}_transfer" in r:
                ax.plot(res["eps"], r[f"{kind}_transfer"], marker="x", linestyle="--", color=line.get_color(),
                        label=f"{name} (transfer)")
        ax.set_title(f"{kind.upper()} (L-inf)")
        ax.set_xlabel("epsilon")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


# ---------------------------------------------------------------- defensive quantization

def _weight_matrices(model: nn.Module) -> Iterator[torch.Tensor]:
    """2-D views of the trainable Linear/Conv weights (QAT wrappers hold them in float_mod)."""
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d)) and m.weight.requires_grad:
            yield m.weight.reshape(m.weight.shape[0], -1)


def lipschitz_penalty(model: nn.Module, beta: float) -> torch.Tensor:
    """beta * sum_W ||W W^T - I||_F^2 (orthogonality; on the smaller Gram matrix of each W).

    Keeping every layer near-orthogonal bounds its Lipschitz constant near 1, so small input
    perturbations are not amplified layer after layer (Lin et al.'s defensive quantization).
    """
    total = None
    for w in _weight_matrices(model):
        gram = w @ w.t() if w.shape[0] <= w.shape[1] else w.t() @ w
        eye = torch.eye(gram.shape[0], dtype=gram.dtype)
        term = ((gram - eye) ** 2).sum()
        total = term if total is None else total + term
    if total is None:
        return torch.zeros(())
    return beta * total


def defensive_qat(float_model: nn.Module, recipe, x: torch.Tensor, y: torch.Tensor, *, epochs: int = 5,
                  lr: float = 1e-3, beta: float = 1e-3, batch_size: int = 64, seed: int = 0,
                  calib_samples: int = 256) -> tuple[nn.Module, list[float]]:
    """Quantization-aware retraining (LSQ) with the Lipschitz penalty; beta=0 is plain QAT.

    Returns the converted quantized module (ordinary secquant quantized layers) and the epoch losses.
    """
    from ..quant.algorithms.qat import retrain

    if epochs < 1:
        raise SecquantError("defensive QAT needs at least one epoch")
    if beta < 0:
        raise SecquantError("--beta (Lipschitz penalty weight) must be >= 0")
    calib = (x[i:i + batch_size] for i in range(0, min(len(x), calib_samples), batch_size))
    model, _, losses = retrain(float_model, recipe, x, y, calib, lambda m, b: m(b), epochs=epochs, lr=lr,
                               batch_size=batch_size, seed=seed, loss_fn=F.cross_entropy,
                               regularizer=(lambda m: lipschitz_penalty(m, beta)) if beta > 0 else None)
    return model, losses


def defensive_comparison(float_model: nn.Module, recipe, train: tuple[torch.Tensor, torch.Tensor],
                         test: tuple[torch.Tensor, torch.Tensor], *, epochs: int = 5, beta: float = 1e-3,
                         lr: float = 1e-3, eps_grid: Sequence[float] = DEFAULT_EPS, steps: int = 10,
                         seed: int = 0, clip: tuple[float, float] = (0.0, 1.0)) -> dict[str, Any]:
    """Plain QAT (before) against Lipschitz-regularized QAT (after): robust accuracy of both."""
    plain, l0 = defensive_qat(float_model, recipe, *train, epochs=epochs, lr=lr, beta=0.0, seed=seed)
    defended, l1 = defensive_qat(float_model, recipe, *train, epochs=epochs, lr=lr, beta=beta, seed=seed)
    res = robust_accuracy({"qat": plain, "qat+lipschitz": defended}, *test, eps_grid, steps, seed,
                          transfer_from=None, clip=clip)
    res["defensive_qat"] = {"recipe": getattr(recipe, "name", str(recipe)), "epochs": epochs, "lr": lr,
                            "beta": beta, "penalty": "beta * sum ||W W^T - I||_F^2 over conv/linear weights",
                            "losses_plain": [round(v, 5) for v in l0],
                            "losses_defensive": [round(v, 5) for v in l1]}
    return res
