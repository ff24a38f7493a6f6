"""Shadow models for the LiRA membership-inference audit: trained on random halves of the population
with the target's own training procedure, then quantized with the target's own recipe.

Each shadow is one pure function call (`shadow_confidences`) of (population, its IN mask, a seed): it
trains, quantizes and returns the logit-scaled confidences of every population example. Locally the
calls run one after the other; with Ray they run as Ray tasks. Training is single-threaded inside the
call, so a shadow's numbers do not depend on where or next to what it ran.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import ModelError, SecquantError
from ..quant.algorithms import quantize_model
from ..quant.algorithms.qat import retrain
from ..quant.algorithms.training import fit, gradient_step, shuffled
from ..quant.schema import Recipe

Progress = Callable[[str, int | None], Callable[[int], None]]

# The QAT entries `secquant qat` writes into a manifest's `training`; anything else would change the
# procedure in a way the shadows could not repeat, so it is refused (fail closed).
_QAT_KEYS = {"method", "epochs", "lr", "batch_size", "seed", "train_samples", "losses"}


@dataclass(frozen=True)
class TrainConfig:
    """How the float model was trained (defaults: `secquant.models.digits.train_digits`)."""

    epochs: int = 40
    lr: float = 3e-3
    batch_size: int = 64


@dataclass(frozen=True)
class TargetRecipe:
    """How one audited model was made from the float model: nothing (fp32), PTQ, or QAT."""

    name: str
    recipe: Recipe | None = None
    qat: dict[str, Any] | None = None  # the manifest's `training` entry for QAT artifacts
    synthetic_shape: tuple[int, ...] | None = None  # set for data-free (ZeroQ) calibration: the sample shape

    @staticmethod
    def from_manifest(name: str, recipe: Recipe, training: dict[str, Any] | None,
                      calibration: Any = None, sample_shape: tuple[int, ...] | None = None) -> TargetRecipe:
        """From an artifact's manifest (`recipe`, `training`, `calibration`); refuses what shadows cannot repeat.
        `sample_shape`: the float model's input shape, which data-free calibration needs."""
        synthetic = None
        if calibration is not None:
            data, source = calibration.data, calibration.source or ""
            if data == "raw" and not source.endswith("(built-in)"):
                raise SecquantError(f"{name} was calibrated on {source}, not on the model's built-in training split: "
                                    "shadow models cannot be calibrated like it; audit an artifact quantized with "
                                    "the built-in calibration data")
            if data == "private":
                raise SecquantError(f"{name} claims differential privacy: shadow models cannot repeat its noise like "
                                    "with like; audit it with `secquant audit privacy` (audit_privacy), which replays "
                                    "its mechanism and runs a canary audit")
            if data == "synthetic":
                if not sample_shape:
                    raise SecquantError(f"{name} was calibrated on synthetic (ZeroQ) data: shadow models need the "
                                        "float model's input shape to synthesize theirs")
                synthetic = tuple(sample_shape)
            elif data not in ("none", "raw"):
                raise SecquantError(f"{name} was calibrated with {data} data: shadow models do not repeat {data} "
                                    "calibration, so the audit would not compare like with like")
        if not training:
            return TargetRecipe(name, recipe, synthetic_shape=synthetic)
        if synthetic:
            raise SecquantError(f"{name}: QAT after synthetic calibration is not a procedure `secquant qat` runs; "
                                "shadow models cannot repeat it")
        unknown = set(training) - _QAT_KEYS
        if unknown or not str(training.get("method", "")).startswith("LSQ"):
            raise SecquantError(f"{name}: its training entry ({', '.join(sorted(unknown)) or training.get('method')}) "
                                "is not plain `secquant qat`; shadow models cannot repeat it, so the audit would not "
                                "compare like with like")
        return TargetRecipe(name, recipe, {k: training[k] for k in ("epochs", "lr", "batch_size", "seed")})


def keep_matrix(n_shadows: int, n_examples: int, seed: int) -> np.ndarray:
    """(n_shadows, n_examples) bool: which shadow trains on which example.

    As in Carlini et al.'s LiRA code: each example is IN for exactly floor(n/2) shadows (chosen at
    random), so every example has ceil(n/2) >= 1 OUT shadows and each shadow sees about half the data.
    """
    if n_shadows < 2:
        raise SecquantError(f"--shadows {n_shadows}: LiRA needs at least 2 shadow models (16 or more is better)")
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x11AA]))
    ranks = rng.random((n_shadows, n_examples)).argsort(0).argsort(0)
    return ranks < n_shadows // 2


def shadow_seed(seed: int, index: int) -> int:
    """Independent, reproducible seed of shadow `index`."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


@contextlib.contextmanager
def _single_thread() -> Iterator[None]:
    """One intra-op thread: bitwise-reproducible training wherever it runs (and fastest for tiny CNNs)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def reinitialized(template: nn.Module) -> nn.Module:
    """A copy of `template` with fresh parameters from torch's global RNG, in module order.

    In the same order as construction, so for a model whose layers initialize in __init__ (DigitsCNN)
    this equals building a new model after the same `torch.manual_seed`.
    """
    model = copy.deepcopy(template)
    for name, m in model.named_modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
        elif any(True for _ in m.parameters(recurse=False)):
            raise ModelError(f"layer {name or type(m).__name__} has parameters but no reset_parameters(): shadow "
                             "models of this architecture cannot be initialized afresh")
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def train_classifier(template: nn.Module, x: torch.Tensor, y: torch.Tensor, seed: int,
                     cfg: TrainConfig = TrainConfig()) -> nn.Module:
    """Train a fresh copy of `template` on (x, y) with the digits procedure (Adam, cross-entropy,
    shuffled mini-batches); with the member split and seed 0 this reproduces `train_digits`."""
    with torch.random.fork_rng(devices=[]), _single_thread():
        g = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        model = reinitialized(template)
        opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
        fit(model, shuffled(x, y, cfg.batch_size, g), cfg.epochs, gradient_step(model, opt))
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _run(module: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    return module(batch)


def quantize_like(model: nn.Module, target: TargetRecipe, x_in: torch.Tensor, y_in: torch.Tensor) -> nn.Module:
    """`model` quantized the way the target was: its recipe, calibrated (and QAT-retrained) on the
    model's own training data, as `secquant quantize` / `secquant qat` do with the built-in split."""
    if target.recipe is None:
        return model
    recipe = target.recipe
    cal = recipe.calibration
    with torch.random.fork_rng(devices=[]), _single_thread():
        if target.synthetic_shape is not None:  # as secquant.api.quantize(..., calib="synthetic")
            q = copy.deepcopy(model).eval()
            public = _synthetic_source(model, target.synthetic_shape, cal) if recipe.needs_calibration else None
            quantize_model(q, recipe, (lambda: public(cal.batch_size)) if public else None, _run)
            return q.eval()
        if target.qat is None:
            q = copy.deepcopy(model).eval()
            xc = x_in[:cal.num_samples]
            quantize_model(q, recipe, lambda: (xc[i:i + cal.batch_size] for i in range(0, len(xc), cal.batch_size)),
                           _run)
            return q.eval()
        # secquant.api.qat's retraining, on the shadow's own training set
        t = target.qat
        xc = x_in[:cal.num_samples]
        q, _, _ = retrain(model, recipe, x_in, y_in, (xc[i:i + cal.batch_size] for i in range(0, len(xc), cal.batch_size)),
                          _run, epochs=t["epochs"], lr=t["lr"], batch_size=t["batch_size"], seed=t["seed"])
        return q


def _synthetic_source(model: nn.Module, shape: tuple[int, ...], cal: Any):
    """The data-free inputs `secquant quantize --calib synthetic` would make for `model` (its own BatchNorm
    statistics, so a shadow's reflect the shadow's training half)."""
    from ..models import ModelHandle, TensorClassifierAdapter
    from ..privacy.synthetic import synthetic_source

    h = ModelHandle(module=model, spec="shadow model", rebuild={}, adapter=TensorClassifierAdapter(shape))
    return synthetic_source(h, cal.num_samples, cal.seed)


@torch.no_grad()
def logits_of(module: nn.Module, x: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    with _single_thread():
        return torch.cat([module(x[i:i + batch_size]) for i in range(0, len(x), batch_size)]).double()


def logit_confidence(logits: torch.Tensor, labels: torch.Tensor) -> np.ndarray:
    """phi = log(p_y / (1 - p_y)), computed stably as z_y - logsumexp(z_j, j != y) (LiRA's statistic)."""
    z = logits.double()
    zy = z.gather(1, labels.view(-1, 1)).squeeze(1)
    others = z.scatter(1, labels.view(-1, 1), float("-inf"))
    return (zy - torch.logsumexp(others, dim=1)).numpy()


def shadow_confidences(index: int, seed: int, keep: np.ndarray, template: nn.Module, x: torch.Tensor,
                       y: torch.Tensor, targets: list[TargetRecipe], cfg: TrainConfig) -> np.ndarray:
    """Train shadow `index` on the examples where `keep` is True, make one copy per target recipe, and
    return phi of every population example under each: shape (len(targets), len(x))."""
    idx = torch.as_tensor(np.flatnonzero(keep))
    x_in, y_in = x[idx], y[idx]
    shadow = train_classifier(template, x_in, y_in, shadow_seed(seed, index), cfg)
    out = np.empty((len(targets), len(x)))
    for k, t in enumerate(targets):
        out[k] = logit_confidence(logits_of(quantize_like(shadow, t, x_in, y_in), x), y)
    return out


def _no_progress(label: str, total: int | None) -> Callable[[int], None]:
    return lambda n: None


def run_shadows(template: nn.Module, x: torch.Tensor, y: torch.Tensor, keep: np.ndarray, seed: int,
                targets: list[TargetRecipe], cfg: TrainConfig, ray_address: str | None = None,
                progress: Progress = _no_progress, num_cpus: int | None = None) -> np.ndarray:
    """phi of every example under every shadow and target recipe: (n_shadows, len(targets), len(x)).

    `ray_address`: None trains here, one shadow after another; "local" starts a private Ray instance on
    this machine; anything else is passed to `ray.init(address=...)` (the workers need secquant installed).
    """
    tick = progress("training shadow models", len(keep))
    if ray_address is None:
        res = []
        for i in range(len(keep)):
            res.append(shadow_confidences(i, seed, keep[i], template, x, y, targets, cfg))
            tick(1)
        return np.stack(res)
    return _run_on_ray(ray_address, template, x, y, keep, seed, targets, cfg, tick, num_cpus)


_RAY_ADDRESS = re.compile(r"^(local|auto|(ray://)?[A-Za-z0-9_.\-]+:\d{1,5})$")


def check_ray_address(address: str) -> None:
    """'local', 'auto', HOST:PORT or ray://HOST:PORT; anything else is a typo caught before any work."""
    if not _RAY_ADDRESS.match(address):
        raise SecquantError(f"--ray {address!r}: give 'local' (a private Ray instance here), 'auto', HOST:PORT of "
                            "a Ray head node, or ray://HOST:PORT (Ray client)")


def _run_on_ray(address: str, template, x, y, keep, seed, targets, cfg, tick, num_cpus) -> np.ndarray:
    try:
        import ray
    except ImportError:  # pragma: no cover - ray is a declared dependency
        raise SecquantError("--ray needs the `ray` package: install it or drop --ray") from None
    started = False
    if not ray.is_initialized():
        try:
            if address == "local":
                ray.init(num_cpus=num_cpus, include_dashboard=False, logging_level=logging.WARNING,
                         log_to_driver=False)
            else:
                ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
        except Exception as e:  # noqa: BLE001 - ray raises ConnectionError, RuntimeError, ValueError... for a bad address
            raise SecquantError(f"--ray {address}: could not start or reach a Ray cluster "
                                f"({str(e).splitlines()[0] if str(e) else type(e).__name__}); use `--ray local`, "
                                "a reachable address such as ray://HOST:10001, or drop --ray") from None
        started = True
    try:
        task = ray.remote(num_cpus=1)(shadow_confidences)
        shared = [ray.put(v) for v in (template, x, y, targets, cfg)]
        refs = [task.remote(i, seed, keep[i], shared[0], shared[1], shared[2], shared[3], shared[4])
                for i in range(len(keep))]
        pending = list(refs)
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            tick(len(done))
        try:
            return np.stack(ray.get(refs))
        except ray.exceptions.RayTaskError as e:
            cause = e.as_instanceof_cause()
            if isinstance(cause, SecquantError):
                raise SecquantError(str(cause).splitlines()[0]) from None
            raise
    finally:
        if started:
            ray.shutdown()
