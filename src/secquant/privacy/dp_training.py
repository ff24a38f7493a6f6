"""Quantization-aware retraining under differential privacy (DP-SGD with Opacus).

What is protected: the *fine-tuning* data. Every step samples the training set with Poisson
sampling, clips each sample's gradient (over all trainable tensors: weights, biases, LSQ step
sizes and zero points) to `max_grad_norm`, and adds Gaussian noise whose scale Opacus
calibrates so the whole run spends at most (epsilon, delta) under its accountant (RDP by
default). What is not: anything the float model already holds. Its weights and its BatchNorm
running statistics come from its own, earlier training; if that training used the same people
(as builtin:digits does: the float model was trained, non-privately, on the member split that
QAT fine-tunes on), the artifact as a whole is not (epsilon, delta)-DP for them; only the
retraining step is. Start from a float model trained on public data for an end-to-end guarantee.

BatchNorm: in training mode it mixes the samples of a batch (batch statistics), so a sample's
gradient depends on the others and per-sample clipping is meaningless; its running statistics
would also be updated from private data without noise. Opacus refuses it (ModuleValidator)
and its fix swaps in GroupNorm, which changes the pretrained function. Instead each BatchNorm
that follows a Conv/Linear is folded into it (torch.nn.utils.fusion, inference-mode BN is a
per-channel affine map) before QAT: the quantizer then trains the weight inference actually
uses, no statistic is ever computed from the private data, and the folded BN is put back as
an identity (exact up to float rounding) so the artifact keeps the float architecture's layout. A BatchNorm that
follows no Conv/Linear is refused.

Per-sample gradients: the QAT wrappers run custom forward code (LSQ fake quantization with
straight-through rounding, the weight quantizer applied to the weight rather than the batch),
which Opacus' per-layer hooks cannot see into. Following Opacus' functorch recipe
(`grad_sample_mode="no_op"`), per-sample gradients of the whole model are computed with
torch.func (`vmap(grad(...))` over `functional_call`) and handed to Opacus' DPOptimizer, which
clips, noises and accounts exactly as with its own hooks.

Privacy of what else the run reads: static activation ranges need an initial calibration pass.
Under DP it never uses the private training set: it uses a file the caller declares public
(`calib`), which must share no sample with the training set (checked by per-sample digests), or,
without one, ZeroQ synthetic inputs distilled from the float model's BatchNorm statistics
(secquant.quant.algorithms.datafree). Per-epoch training losses are statistics of the private data not
covered by epsilon, so they are not recorded.

Randomness: the noise and the Poisson sampling both come from one torch Generator seeded from
os.urandom and never recorded, so no run can be replayed (see `secure_generator`). A run takes no
seed; two runs on the same data release different weights.

Neighbours and the sample count: add or remove one training sample, the relation Opacus' accountants
assume. Under it the count n is private, and the sampling rate, the step count and the expected batch
size Opacus derives from n would publish it. So a small share of the budget (`COUNT_SHARE`) buys a
noisy count from OpenDP, every one of those parameters is computed from that count, and the manifest
records the noisy count only; the two releases compose (basic composition: epsilons add, same delta).
"""

from __future__ import annotations

import copy
import math
import os
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CalibrationError, ModelError
from ..quant.algorithms import convert_qat, init_activation_ranges, prepare_qat
from ..quant.algorithms.qat import QATLayer
from ..quant.algorithms.rtn import set_submodule
from ..quant.algorithms.fold import identity_batchnorm, producer_pairs
from ..quant.algorithms.training import fit
from .ledger import ledger_entry
from .budget import NEIGHBOURS, PrivacyError, check_delta, check_epsilon, dp_count, resolve_delta

ACCOUNTANTS = ("rdp", "prv", "gdp")
COUNT_SHARE = 0.02  # of epsilon, spent on the noisy training-set count the sampling parameters come from
NOISE_SOURCE = ("torch Generator seeded with 64 bits from os.urandom, never recorded (noise and Poisson "
                "sampling); Opacus' secure-mode noise (sum of 4 Gaussians, against floating-point attacks)")
_BN = nn.modules.batchnorm._BatchNorm



@dataclass
class DPReport:
    """What a DP-SGD run spent and how; goes into the manifest's `training.dp`. Holds no exact sample count."""

    target_epsilon: float
    delta: float
    epsilon: float  # spent in all: the noisy count plus DP-SGD as the accountant reports it after the last step
    epsilon_count: float
    epsilon_sgd: float
    accountant: str
    noise_multiplier: float
    max_grad_norm: float
    sample_rate: float
    steps: int
    epochs: int
    expected_batch_size: int
    train_samples_dp: int  # the noisy count, never the exact one
    folded_batchnorm: dict[str, str] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "mechanism": "DP-SGD (Opacus): Poisson sampling, per-sample clipping of all trainable tensors, "
                         "Gaussian noise; sampling rate and steps from a DP count of the training set",
            "protects": "the fine-tuning (QAT) data only; the float model's weights and BatchNorm statistics "
                        "come from its own earlier training",
            "neighbouring": NEIGHBOURS,
            "target_epsilon": self.target_epsilon, "epsilon": round(self.epsilon, 6),
            "epsilon_count": round(self.epsilon_count, 6), "epsilon_sgd": round(self.epsilon_sgd, 6),
            "composition": "basic: epsilon = epsilon_count (pure, discrete Laplace count from OpenDP) + epsilon_sgd "
                           "(accountant), same delta",
            "delta": self.delta, "accountant": self.accountant, "noise_multiplier": round(self.noise_multiplier, 6),
            "max_grad_norm": self.max_grad_norm, "sample_rate": round(self.sample_rate, 8), "steps": self.steps,
            "epochs": self.epochs, "expected_batch_size": self.expected_batch_size,
            "train_samples_dp": self.train_samples_dp, "noise_source": NOISE_SOURCE,
            "folded_batchnorm": self.folded_batchnorm,
        }


def dp_sgd_ledger_entry(dp: dict[str, Any]) -> dict[str, Any]:
    """The manifest's privacy-ledger entry for a DP-SGD run (from `training["dp"]`)."""
    return ledger_entry(**{
        "stage": "quantization-aware retraining (DP-SGD)",
        "epsilon": dp["epsilon"], "target_epsilon": dp["target_epsilon"], "delta": dp["delta"],
        "epsilon_count": dp["epsilon_count"], "epsilon_sgd": dp["epsilon_sgd"], "composition": dp["composition"],
        "mechanism": "subsampled Gaussian (DP-SGD, Opacus) after a discrete Laplace count (OpenDP)",
        "accountant": dp["accountant"], "neighbouring": dp["neighbouring"],
        "num_samples_dp": dp["train_samples_dp"], "noise_multiplier": dp["noise_multiplier"],
        "max_grad_norm": dp["max_grad_norm"], "sample_rate": dp["sample_rate"], "steps": dp["steps"],
        "noise_source": dp["noise_source"], "covers": dp["protects"],
    })


def check_dp_args(epsilon: float, delta: float, max_grad_norm: float, n: int, batch_size: int,
                  accountant: str = "prv") -> None:
    check_epsilon(epsilon)
    check_delta(delta, n)
    if not (max_grad_norm > 0 and math.isfinite(max_grad_norm)):
        raise PrivacyError(f"--max-grad-norm must be a positive number, got {max_grad_norm}")
    if batch_size < 1 or batch_size > n:
        raise PrivacyError(f"the batch size ({batch_size}) must be between 1 and the {n} training samples: DP-SGD "
                           "needs a training set many times larger than one batch")
    if accountant not in ACCOUNTANTS:
        raise PrivacyError(f"unknown accountant {accountant!r}: use one of {', '.join(ACCOUNTANTS)}")


def secure_generator() -> torch.Generator:
    """The generator of a DP-SGD run's noise and Poisson sampling: seeded with 64 bits from os.urandom,
    never recorded or returned.

    Why not Opacus' secure_mode=True: it needs torchcsprng, whose last release (0.2.1, 2021) ships no
    build for Python 3.11 or torch 2.x (checked: pip finds no distribution). What this gives instead:
    replaying a run needs the seed, and guessing it costs up to 2^64 training runs. What it does not give:
    torch's Mersenne Twister is not a CSPRNG, so an attacker who saw ~624 consecutive raw outputs could
    predict the rest; the artifact shows none, only sums of clipped gradients and noise. Opacus' secure-mode
    noise (the sum of four Gaussians) is kept against floating-point attacks on the Gaussian sampler."""
    g = torch.Generator()
    g.manual_seed(int.from_bytes(os.urandom(8), "little"))
    return g


# ---------------------------------------------------------------------------------------------- BatchNorm


def _producer_pairs(model: nn.Module) -> dict[str, str]:
    """BatchNorm name -> the Conv/Linear whose output it alone normalizes (torch.fx, quant.algorithms.fold)."""
    try:
        return producer_pairs(model)
    except Exception as e:  # noqa: BLE001 - any tracing failure means we cannot prove the pairing
        raise ModelError(f"cannot trace {type(model).__name__} with torch.fx to fold its BatchNorm layers for "
                         f"DP-SGD ({str(e).splitlines()[0] if str(e) else type(e).__name__}): remove or fold "
                         "BatchNorm before DP training") from None


@torch.no_grad()
def fold_batchnorm(model: nn.Module) -> dict[str, str]:
    """Fold every BatchNorm into the Conv/Linear before it (inference mode, in place); the BN becomes an
    exact identity (see `identity_batchnorm`). Returns BN name -> layer name. Refuses an unpaired BN."""
    bns = [n for n, m in model.named_modules() if isinstance(m, _BN)]
    if not bns:
        return {}
    pairs = _producer_pairs(model)
    lonely = [n for n in bns if n not in pairs]
    if lonely:
        raise ModelError(f"BatchNorm {', '.join(map(repr, lonely))} does not directly follow a Conv or Linear layer, "
                         "so it cannot be folded; DP-SGD cannot train through BatchNorm (it mixes the samples of a "
                         "batch): replace it (e.g. by GroupNorm) and retrain the float model, or use PTQ")
    from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

    for bn_name, layer_name in pairs.items():
        bn, layer = model.get_submodule(bn_name), model.get_submodule(layer_name)
        if not bn.track_running_stats or bn.running_mean is None:
            raise ModelError(f"BatchNorm {bn_name!r} keeps no running statistics, so it normalizes with batch "
                             "statistics even at inference and cannot be folded for DP-SGD")
        fuse = fuse_linear_bn_eval if isinstance(layer, nn.Linear) else fuse_conv_bn_eval
        fused = fuse(copy.deepcopy(layer).eval(), copy.deepcopy(bn).eval())
        fused.weight.requires_grad_(True)
        fused.bias.requires_grad_(True)
        set_submodule(model, layer_name, fused)
        set_submodule(model, bn_name, identity_batchnorm(bn))
    return pairs


class _NoBatchNorm(nn.Module):
    """Placeholder the DP model uses while training: Opacus' validator refuses any BatchNorm module,
    even a frozen identity, so the identities are swapped out for training and back in afterwards."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


# ---------------------------------------------------------------------------------------------- training


def _per_sample_grad_fn(model: nn.Module, loss_fn: Callable):
    """vmap(grad(loss of one sample)) over the whole model: per-sample gradients of the parameters passed in."""
    from torch.func import functional_call, grad, vmap

    def one(params, xi, yi):
        out = functional_call(model, params, (xi.unsqueeze(0),), strict=False)
        return loss_fn(out, yi.unsqueeze(0))

    return vmap(grad(one), in_dims=(None, 0, 0), randomness="different")


def train_dp(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, epochs: int, lr: float, batch_size: int,
             epsilon: float, delta: float, max_grad_norm: float = 1.0, accountant: str = "prv",
             loss_fn: Callable = F.cross_entropy, progress: Callable[[int], None] | None = None) -> DPReport:
    """DP-SGD (Opacus, Adam update on the privatized gradient) of every trainable tensor of `model`
    on (x, y) for `epochs`, spending at most (epsilon, delta) in all. In place; returns what was spent.

    COUNT_SHARE of epsilon buys a noisy count n~ of the training set; the sampling rate (batch_size / n~),
    the steps per epoch (n~ / batch_size) and the noise multiplier (Opacus' search for the rest of the budget)
    come from n~ and public settings only. Noise and sampling draw from `secure_generator()`."""
    from opacus.accountants import create_accountant
    from opacus.accountants.utils import get_noise_multiplier
    from opacus.data_loader import DPDataLoader
    from opacus.optimizers import DPOptimizer
    from torch.utils.data import TensorDataset

    n = len(y)
    check_dp_args(epsilon, delta, max_grad_norm, n, batch_size, accountant)
    if any(isinstance(m, _BN) for m in model.modules()):
        raise ModelError("fold BatchNorm (fold_batchnorm) before DP training: it mixes the samples of a batch")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ModelError("the model has no trainable tensor to retrain")
    n_dp, eps_count = dp_count(n, COUNT_SHARE * float(epsilon))
    sample_rate = min(1.0, batch_size / max(1, n_dp))
    eps_sgd_target = float(epsilon) - eps_count
    gen = secure_generator()
    loader = DPDataLoader(TensorDataset(x, y), sample_rate=sample_rate, generator=gen)
    steps = epochs * len(loader)  # len = int(1 / sample_rate): from the noisy count
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")  # PRV's RDP pre-bound
        sigma = float(get_noise_multiplier(target_epsilon=eps_sgd_target, target_delta=float(delta),
                                           sample_rate=sample_rate, steps=steps, accountant=accountant))
    # expected_batch_size is the public batch_size (= sample_rate * n~), never from the exact n
    dp_opt = DPOptimizer(torch.optim.Adam(params, lr=lr), noise_multiplier=sigma, max_grad_norm=float(max_grad_norm),
                         expected_batch_size=batch_size, generator=gen, secure_mode=True)
    acct = create_accountant(accountant)
    names = [nm for nm, p in model.named_parameters() if p.requires_grad]
    by_name = dict(model.named_parameters())
    ps_grad = _per_sample_grad_fn(model, loss_fn)
    done = 0

    def step(xb, yb) -> None:  # per-sample gradients, clipped and noised by the DP optimizer; no loss computed
        nonlocal done
        current = {nm: by_name[nm].detach() for nm in names}
        if len(xb):
            grads = ps_grad(current, xb, yb)
        else:  # Poisson sampling can draw an empty batch: the step still happens (noise only)
            grads = {nm: torch.zeros((0, *by_name[nm].shape)) for nm in names}
        for nm in names:
            by_name[nm].grad_sample = grads[nm].detach()
        dp_opt.step()
        dp_opt.zero_grad(set_to_none=True)
        acct.step(noise_multiplier=sigma, sample_rate=sample_rate)
        done += 1

    # the model holds no BatchNorm, so train/eval mode only matters for dropout
    fit(model, lambda: loader, epochs, step, progress=progress)
    for p in params:
        p.grad_sample = None
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        eps_sgd = float(acct.get_epsilon(delta))
    return DPReport(target_epsilon=float(epsilon), delta=float(delta), epsilon=eps_count + eps_sgd,
                    epsilon_count=eps_count, epsilon_sgd=eps_sgd, accountant=accountant, noise_multiplier=sigma,
                    max_grad_norm=float(max_grad_norm), sample_rate=sample_rate, steps=done, epochs=epochs,
                    expected_batch_size=batch_size, train_samples_dp=n_dp)


def _needs_activation_init(model: nn.Module) -> bool:
    return any(isinstance(m, QATLayer) and m.observer is not None for m in model.modules())


def check_public_init(init: list[torch.Tensor], x: torch.Tensor) -> int:
    """Refuse calibration data declared public that shares any sample with the private training set
    (by per-sample digest); returns how many samples it holds."""
    from .provenance import shared_samples

    if not init:
        raise CalibrationError("the public calibration data (--calib) is empty")
    cand = torch.cat([b for b in init])
    shared = shared_samples(cand, x)
    if shared:
        raise PrivacyError(f"--calib shares {shared} of its {len(cand)} samples with the private training set, so "
                           "it is not public data: the initial activation ranges would be read from private samples "
                           "without noise. Pass a file with no training sample in it, or drop --calib to start the "
                           "ranges from ZeroQ synthetic inputs")
    return len(cand)


def dp_qat(float_module: nn.Module, recipe, x: torch.Tensor, y: torch.Tensor, run_batch: Callable[[nn.Module, Any], Any],
           *, epochs: int, lr: float, batch_size: int, epsilon: float, delta: float | None = None,
           max_grad_norm: float = 1.0, init_batches: Iterable | None = None, init_sha256: str | None = None,
           sample_shape: tuple[int, ...] | None = None, synthetic_samples: int = 256, synthetic_steps: int = 200,
           synthetic_seed: int = 0, accountant: str = "prv", progress: Callable[[int], None] | None = None
           ) -> tuple[nn.Module, dict[str, dict], dict[str, Any]]:
    """DP-SGD quantization-aware retraining of a copy of `float_module`.

    `init_batches` (data the caller declares public; refused if it shares a sample with `x`; `init_sha256`
    is its file's hash, recorded) start the static activation ranges; without them ZeroQ synthetic inputs
    of `sample_shape` are used (seeded: they are public and read no data). Returns (converted quantized
    module, layer infos, the manifest's `training` entry, which holds no seed and no exact count)."""
    n = len(y)
    delta = resolve_delta(delta)
    check_dp_args(epsilon, delta, max_grad_norm, n, batch_size, accountant)
    qmodule = copy.deepcopy(float_module).eval()
    for p in qmodule.parameters():
        p.requires_grad_(True)
    folded = fold_batchnorm(qmodule)
    prepare_qat(qmodule, recipe)
    act_init: dict[str, Any] = {"data": "none (no static activation quantizer)"}
    if _needs_activation_init(qmodule):
        if init_batches is None:
            if not sample_shape:
                raise CalibrationError("DP QAT with static activations needs public data for the initial activation "
                                       "ranges (the private training set is not used for them): pass --calib FILE, "
                                       "or use a dynamic-activation or weight-only preset")
            from ..quant.algorithms.datafree import DATA_LABEL, check_batchnorm, synthesize_from_batchnorm
            try:
                check_batchnorm(float_module)
            except CalibrationError:
                raise CalibrationError("DP QAT with static activations needs public data for the initial activation "
                                       "ranges and this model has no BatchNorm to synthesize it from: pass --calib "
                                       "FILE with public samples, or use a dynamic-activation or weight-only preset"
                                       ) from None
            synth = synthesize_from_batchnorm(float_module, synthetic_samples, sample_shape, synthetic_steps,
                                              synthetic_seed)
            init_batches = [synth[i:i + 32] for i in range(0, len(synth), 32)]
            act_init = {"data": f"{DATA_LABEL}, {synthetic_samples} samples"}
        else:
            init_batches = list(init_batches)
            m = check_public_init(init_batches, x)
            act_init = {"data": f"caller-supplied calibration data declared public ({m} samples; checked: no sample "
                                "in common with the private training set)", "sha256": init_sha256}
        init_activation_ranges(qmodule, init_batches, run_batch)
    # Opacus refuses any BatchNorm module, even the frozen identities: swap them out while training.
    for bn_name in folded:
        set_submodule(qmodule, bn_name, _NoBatchNorm())
    report = train_dp(qmodule, x, y, epochs=epochs, lr=lr, batch_size=batch_size, epsilon=epsilon, delta=delta,
                      max_grad_norm=max_grad_norm, accountant=accountant, progress=progress)
    for bn_name in folded:
        set_submodule(qmodule, bn_name, identity_batchnorm(float_module.get_submodule(bn_name)))
    report.folded_batchnorm = dict(folded)
    layers = convert_qat(qmodule)
    qmodule.eval()
    for p in qmodule.parameters():
        p.requires_grad_(False)
    training = {
        "method": "LSQ (learned step size) quantization-aware retraining under DP-SGD (Opacus), "
                  "straight-through estimator, BatchNorm folded into the preceding layer",
        "epochs": epochs, "lr": lr, "batch_size": batch_size,  # no seed: see secure_generator; no exact count
        "losses": None,  # statistics of the private data, not covered by epsilon: not recorded
        "activation_init": act_init["data"], "activation_init_sha256": act_init.get("sha256"),
        "dp": report.as_dict(),
    }
    return qmodule, layers, training
