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
(`calib`) or, without one, ZeroQ synthetic inputs distilled from the float model's BatchNorm
statistics (secquant.privacy.datafree). Per-epoch training losses are statistics of the private
data not covered by epsilon, so they are not recorded.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CalibrationError, ModelError, SecquantError
from ..quant.algorithms import convert_qat, init_activation_ranges, prepare_qat
from ..quant.algorithms.qat import QATLayer
from ..quant.algorithms.rtn import set_submodule

ACCOUNTANTS = ("rdp", "prv", "gdp")
_BN = nn.modules.batchnorm._BatchNorm


class PrivacyError(SecquantError):
    """DP parameters are invalid or the model cannot be trained privately as it is."""


@dataclass
class DPReport:
    """What a DP-SGD run spent and how; goes into the manifest's `training.dp`."""

    target_epsilon: float
    delta: float
    epsilon: float  # spent, as the accountant reports it after the last step
    accountant: str
    noise_multiplier: float
    max_grad_norm: float
    sample_rate: float
    steps: int
    epochs: int
    expected_batch_size: int
    train_samples: int
    folded_batchnorm: dict[str, str] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "mechanism": "DP-SGD (Opacus): Poisson sampling, per-sample clipping of all trainable tensors, "
                         "Gaussian noise",
            "protects": "the fine-tuning (QAT) data only; the float model's weights and BatchNorm statistics "
                        "come from its own earlier training",
            "target_epsilon": self.target_epsilon, "epsilon": round(self.epsilon, 6), "delta": self.delta,
            "accountant": self.accountant, "noise_multiplier": round(self.noise_multiplier, 6),
            "max_grad_norm": self.max_grad_norm, "sample_rate": round(self.sample_rate, 8), "steps": self.steps,
            "epochs": self.epochs, "expected_batch_size": self.expected_batch_size,
            "train_samples": self.train_samples, "secure_rng": False,
            "folded_batchnorm": self.folded_batchnorm,
        }


def ledger_entry(dp: dict[str, Any]) -> dict[str, Any]:
    """The manifest's privacy-ledger entry for a DP-SGD run (from `training["dp"]`)."""
    return {
        "stage": "quantization-aware retraining (DP-SGD)",
        "epsilon": dp["epsilon"], "target_epsilon": dp["target_epsilon"], "delta": dp["delta"],
        "mechanism": "subsampled Gaussian (DP-SGD, Opacus)", "accountant": dp["accountant"],
        "neighbouring": "add or remove one training sample (Poisson sampling)",
        "num_samples": dp["train_samples"], "noise_multiplier": dp["noise_multiplier"],
        "max_grad_norm": dp["max_grad_norm"], "sample_rate": dp["sample_rate"], "steps": dp["steps"],
        "covers": dp["protects"],
    }


def default_delta(n: int) -> float:
    """1e-5, or smaller for large sets: delta must stay well below 1/n."""
    return min(1e-5, 0.1 / max(1, n))


def check_dp_args(epsilon: float, delta: float, max_grad_norm: float, n: int, batch_size: int,
                  accountant: str = "prv") -> None:
    if not (isinstance(epsilon, (int, float)) and math.isfinite(epsilon) and epsilon > 0):
        raise PrivacyError(f"--dp-epsilon must be a positive number, got {epsilon}")
    if not (0 < delta < 1):
        raise PrivacyError(f"--dp-delta must be in (0, 1), got {delta}")
    if delta >= 1.0 / max(1, n):
        raise PrivacyError(f"--dp-delta {delta} is not below 1/n = {1.0 / n:.3g} for {n} training samples: "
                           f"a delta that large allows releasing a sample outright; use e.g. {default_delta(n):.0e}")
    if not (max_grad_norm > 0 and math.isfinite(max_grad_norm)):
        raise PrivacyError(f"--max-grad-norm must be a positive number, got {max_grad_norm}")
    if batch_size < 1 or batch_size > n:
        raise PrivacyError(f"the batch size ({batch_size}) must be between 1 and the {n} training samples: DP-SGD "
                           "needs a training set many times larger than one batch")
    if accountant not in ACCOUNTANTS:
        raise PrivacyError(f"unknown accountant {accountant!r}: use one of {', '.join(ACCOUNTANTS)}")


# ---------------------------------------------------------------------------------------------- BatchNorm


def _producer_pairs(model: nn.Module) -> dict[str, str]:
    """BatchNorm name -> the Conv/Linear whose output it alone normalizes (found with torch.fx)."""
    from torch.fx import symbolic_trace

    try:
        gm = symbolic_trace(model)
    except Exception as e:  # noqa: BLE001 - any tracing failure means we cannot prove the pairing
        raise ModelError(f"cannot trace {type(model).__name__} with torch.fx to fold its BatchNorm layers for "
                         f"DP-SGD ({str(e).splitlines()[0] if str(e) else type(e).__name__}): remove or fold "
                         "BatchNorm before DP training") from None
    mods = dict(model.named_modules())
    pairs: dict[str, str] = {}
    for node in gm.graph.nodes:
        if node.op != "call_module" or not isinstance(mods.get(node.target), _BN):
            continue
        src = node.args[0] if node.args else None
        if getattr(src, "op", None) == "call_module" and len(src.users) == 1 \
                and isinstance(mods.get(src.target), (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
            pairs[node.target] = src.target
    return pairs


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


@torch.no_grad()
def identity_batchnorm(bn: _BN) -> _BN:
    """A frozen BatchNorm of the same kind and size that computes x (up to float rounding): mean 0,
    var 1 - eps, weight 1, bias 0. Keeps the float architecture's layout (and state dict keys)."""
    new = copy.deepcopy(bn).eval()
    new.running_mean.zero_()
    new.running_var.fill_(1.0 - bn.eps)
    if new.affine:
        new.weight.fill_(1.0)
        new.bias.zero_()
        new.weight.requires_grad_(False)
        new.bias.requires_grad_(False)
    return new


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
             epsilon: float, delta: float, max_grad_norm: float = 1.0, accountant: str = "prv", seed: int = 0,
             loss_fn: Callable = F.cross_entropy, progress: Callable[[int], None] | None = None) -> DPReport:
    """DP-SGD (Opacus, Adam update on the privatized gradient) of every trainable tensor of `model`
    on (x, y) for `epochs`, spending at most (epsilon, delta). In place; returns what was spent."""
    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader, TensorDataset

    n = len(y)
    check_dp_args(epsilon, delta, max_grad_norm, n, batch_size, accountant)
    if any(isinstance(m, _BN) for m in model.modules()):
        raise ModelError("fold BatchNorm (fold_batchnorm) before DP training: it mixes the samples of a batch")
    torch.manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ModelError("the model has no trainable tensor to retrain")
    opt = torch.optim.Adam(params, lr=lr)
    loader = DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=True)
    model.train()  # Opacus checks; the model holds no BatchNorm, so train/eval only matters for dropout
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Secure RNG turned off")  # recorded as secure_rng: false
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")  # PRV's RDP pre-bound
        engine = PrivacyEngine(accountant=accountant)
        _gsm, dp_opt, dp_loader = engine.make_private_with_epsilon(
            module=model, optimizer=opt, data_loader=loader, target_epsilon=float(epsilon),
            target_delta=float(delta), epochs=epochs, max_grad_norm=float(max_grad_norm),
            grad_sample_mode="no_op", poisson_sampling=True)
    names = [nm for nm, p in model.named_parameters() if p.requires_grad]
    by_name = dict(model.named_parameters())
    ps_grad = _per_sample_grad_fn(model, loss_fn)
    steps = 0
    for _ in range(epochs):
        model.train()
        for xb, yb in dp_loader:
            current = {nm: by_name[nm].detach() for nm in names}
            if len(xb):
                grads = ps_grad(current, xb, yb)
            else:  # Poisson sampling can draw an empty batch: the step still happens (noise only)
                grads = {nm: torch.zeros((0, *by_name[nm].shape)) for nm in names}
            for nm in names:
                by_name[nm].grad_sample = grads[nm].detach()
            dp_opt.step()
            dp_opt.zero_grad(set_to_none=True)
            steps += 1
        if progress:
            progress(1)
    model.eval()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        spent = float(engine.get_epsilon(delta))
    sample_rate = 1.0 / len(loader)
    return DPReport(target_epsilon=float(epsilon), delta=float(delta), epsilon=spent, accountant=accountant,
                    noise_multiplier=float(dp_opt.noise_multiplier), max_grad_norm=float(max_grad_norm),
                    sample_rate=sample_rate, steps=steps, epochs=epochs,
                    expected_batch_size=int(n * sample_rate), train_samples=n)


def _needs_activation_init(model: nn.Module) -> bool:
    return any(isinstance(m, QATLayer) and m.observer is not None for m in model.modules())


def dp_qat(float_module: nn.Module, recipe, x: torch.Tensor, y: torch.Tensor, run_batch: Callable[[nn.Module, Any], Any],
           *, epochs: int, lr: float, batch_size: int, epsilon: float, delta: float | None = None,
           max_grad_norm: float = 1.0, seed: int = 0, init_batches: Iterable | None = None,
           sample_shape: tuple[int, ...] | None = None, synthetic_samples: int = 256, synthetic_steps: int = 200,
           accountant: str = "prv", progress: Callable[[int], None] | None = None
           ) -> tuple[nn.Module, dict[str, dict], dict[str, Any]]:
    """DP-SGD quantization-aware retraining of a copy of `float_module`.

    `init_batches` (data the caller declares public) start the static activation ranges; without them
    ZeroQ synthetic inputs of `sample_shape` are used. Returns (converted quantized module, layer infos,
    the manifest's `training` entry)."""
    n = len(y)
    delta = default_delta(n) if delta is None else float(delta)
    check_dp_args(epsilon, delta, max_grad_norm, n, batch_size, accountant)
    torch.manual_seed(seed)
    qmodule = copy.deepcopy(float_module).eval()
    for p in qmodule.parameters():
        p.requires_grad_(True)
    folded = fold_batchnorm(qmodule)
    prepare_qat(qmodule, recipe)
    act_init = "none (no static activation quantizer)"
    if _needs_activation_init(qmodule):
        if init_batches is None:
            if not sample_shape:
                raise CalibrationError("DP QAT with static activations needs public data for the initial activation "
                                       "ranges (the private training set is not used for them): pass --calib FILE, "
                                       "or use a dynamic-activation or weight-only preset")
            from .datafree import DATA_LABEL, check_batchnorm, synthesize_from_batchnorm
            try:
                check_batchnorm(float_module)
            except CalibrationError:
                raise CalibrationError("DP QAT with static activations needs public data for the initial activation "
                                       "ranges and this model has no BatchNorm to synthesize it from: pass --calib "
                                       "FILE with public samples, or use a dynamic-activation or weight-only preset"
                                       ) from None
            synth = synthesize_from_batchnorm(float_module, synthetic_samples, sample_shape, synthetic_steps, seed)
            init_batches = (synth[i:i + 32] for i in range(0, len(synth), 32))
            act_init = f"{DATA_LABEL}, {synthetic_samples} samples"
        else:
            act_init = "caller-supplied calibration data (declared public; not the private training set)"
        init_activation_ranges(qmodule, init_batches, run_batch)
    # Opacus refuses any BatchNorm module, even the frozen identities: swap them out while training.
    for bn_name in folded:
        set_submodule(qmodule, bn_name, _NoBatchNorm())
    report = train_dp(qmodule, x, y, epochs=epochs, lr=lr, batch_size=batch_size, epsilon=epsilon, delta=delta,
                      max_grad_norm=max_grad_norm, accountant=accountant, seed=seed, progress=progress)
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
        "epochs": epochs, "lr": lr, "batch_size": batch_size, "seed": seed, "train_samples": int(n),
        "losses": None,  # statistics of the private data, not covered by epsilon: not recorded
        "activation_init": act_init,
        "dp": report.as_dict(),
    }
    return qmodule, layers, training
