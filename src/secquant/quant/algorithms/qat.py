"""Quantization-aware retraining with learned step sizes (LSQ, Esser et al. 2020; LSQ+ zero points).

Each targeted layer is wrapped: the float weight keeps training while the forward pass sees
it (and the layer's input) fake-quantized. Rounding passes gradients straight through (STE);
step sizes and zero points are parameters too, with LSQ's gradient scale 1/sqrt(n * qmax).
`convert_qat` then stores exactly the integers the trained quantizers produce in ordinary
secquant quantized modules, so a retrained model saves and loads like any other artifact.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import RecipeError
from ..schema import QuantArgs, Recipe
from ..modules import ActQuant, make_observer, quantize_module
from ..primitives import (
    PerGroup, PerTensor, PerToken, choose_qparams, group_view, qrange, reduce_range, ungroup_view,
)
from ..primitives.affine import expand_qparam
from .training import fit, gradient_step, shuffled
from .rtn import check_finite, plan, set_submodule, unfuse_attention


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """round() forward, identity backward."""
    return (x.round() - x).detach() + x


def grad_scale(x: torch.Tensor, g: float) -> torch.Tensor:
    """x forward, gradient multiplied by g backward (LSQ's step-size gradient scale)."""
    return (x - x * g).detach() + x * g


def _fake(x: torch.Tensor, s: torch.Tensor, z: torch.Tensor, qmin: int, qmax: int, gran) -> torch.Tensor:
    """(clamp(round(x/s) + z) - z) * s with STE rounding; s, z in the compact qparam shape."""
    def f(v, bc):
        ss, zz = bc(s), bc(z)
        return (torch.clamp(round_ste(v / ss) + zz, qmin, qmax) - zz) * ss

    if isinstance(gran, PerGroup):
        vg = group_view(x, gran.group_size, gran.axis)
        out = f(vg, lambda p: p.unsqueeze(-1))
        return ungroup_view(out, x.shape[gran.axis], gran.axis, x.ndim)
    return f(x, lambda p: expand_qparam(p, x, gran) if not isinstance(gran, PerToken) else p)


class LSQQuantizer(nn.Module):
    """Learnable step size (and zero point when asymmetric) for a fixed granularity."""

    def __init__(self, args: QuantArgs, scale: torch.Tensor, zero_point: torch.Tensor, numel_per_scale: int) -> None:
        super().__init__()
        self.args = args
        self.gran = args.granule()
        self.qmin, self.qmax = qrange(args.bits, args.is_signed)
        self.scale = nn.Parameter(scale.detach().float().clone())
        self.zero = nn.Parameter(zero_point.detach().float().clone(), requires_grad=not args.symmetric)
        self.g = 1.0 / math.sqrt(max(1, numel_per_scale) * max(1, self.qmax))

    def qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        s = grad_scale(self.scale.abs().clamp(min=1e-8), self.g)
        z = torch.clamp(round_ste(grad_scale(self.zero, self.g)), self.qmin, self.qmax)
        return s, z

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s, z = self.qparams()
        return _fake(x, s, z, self.qmin, self.qmax, self.gran)


class DynamicFake(nn.Module):
    """Run-time ranges (per token / per tensor) with STE rounding: differentiable dynamic quantization."""

    def __init__(self, args: QuantArgs) -> None:
        super().__init__()
        self.args = args
        self.gran = PerToken() if args.granularity == "token" else PerTensor()
        self.qmin, self.qmax = qrange(args.bits, args.is_signed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lo, hi = reduce_range(x.detach().float(), self.gran)
        s, z = choose_qparams(lo, hi, self.args.bits, self.args.is_signed, self.args.symmetric)
        return _fake(x, s, z.float(), self.qmin, self.qmax, self.gran)


class QATLayer(nn.Module):
    """A float layer whose weight and input are fake-quantized while it trains."""

    def __init__(self, mod: nn.Module, source_type: str, wargs: QuantArgs | None, aargs: QuantArgs | None) -> None:
        super().__init__()
        self.float_mod = mod
        self.source_type = source_type
        self.wargs, self.aargs = wargs, aargs
        w2 = self._w2()
        self.wq = None
        if wargs is not None:
            gran = wargs.granule()
            lo, hi = reduce_range(w2.detach(), gran)
            s, z = choose_qparams(lo, hi, wargs.bits, wargs.is_signed, wargs.symmetric)
            per = w2.numel() // max(1, s.numel())
            self.wq = LSQQuantizer(wargs, s, z, per)
        self.aq: nn.Module | None = None
        self.observer = None
        if aargs is not None and source_type != "Embedding":
            self.aq = DynamicFake(aargs) if aargs.dynamic else None
            if not aargs.dynamic:
                self.observer = make_observer(aargs)

    def _w2(self) -> torch.Tensor:
        w = self.float_mod.weight
        if self.source_type == "Conv1D":
            w = w.t()
        return w.reshape(w.shape[0], -1)

    def fake_weight(self) -> torch.Tensor:
        w = self.float_mod.weight
        if self.wq is None:
            return w.t() if self.source_type == "Conv1D" else w
        shape = (w.t() if self.source_type == "Conv1D" else w).shape
        return self.wq(self._w2()).reshape(shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m, t = self.float_mod, self.source_type
        if t != "Embedding":
            if self.observer is not None:
                self.observer.update(x)
            elif self.aq is not None:
                x = self.aq(x)
        w = self.fake_weight()
        if t in ("Linear", "Conv1D"):
            return F.linear(x, w, m.bias)
        if t == "Conv2d":
            return F.conv2d(x, w, m.bias, m.stride, m.padding, m.dilation, m.groups)
        if t == "Conv1d":
            return F.conv1d(x, w, m.bias, m.stride, m.padding, m.dilation, m.groups)
        return F.embedding(x, w, m.padding_idx)

    def freeze_observer(self) -> None:
        """Initialize the static activation quantizer from the observed calibration range."""
        if self.observer is None:
            return
        lo, hi = self.observer.compute_range()
        a = self.aargs
        s, z = choose_qparams(torch.tensor(lo), torch.tensor(hi), a.bits, a.is_signed, a.symmetric)
        # numel per activation scale is unknown up front: use the feature size as LSQ does per sample
        self.aq = LSQQuantizer(a, s, z, numel_per_scale=1024)
        self.observer = None


def prepare_qat(model: nn.Module, recipe: Recipe) -> dict[str, tuple[str, Any, Any]]:
    """Wrap every layer the recipe targets (in place); returns the plan."""
    if recipe.rotation is not None:
        raise RecipeError("quantization-aware retraining does not train rotated layers: remove `rotation` "
                          "from the recipe (or quantize with it after training)")
    check_finite(model)
    unfuse_attention(model, recipe)
    todo = plan(model, recipe)
    for name, (t, w, a) in todo.items():
        set_submodule(model, name, QATLayer(model.get_submodule(name), t, w, a))
    return todo


@torch.no_grad()
def init_activation_ranges(model: nn.Module, batches: Iterable, run_batch: Callable[[nn.Module, Any], Any]) -> int:
    """One calibration pass so static activation step sizes start from observed ranges."""
    layers = [m for m in model.modules() if isinstance(m, QATLayer) and m.observer is not None]
    if not layers:
        return 0
    model.eval()
    n = 0
    for b in batches:
        run_batch(model, b)
        n += 1
    if n == 0:
        from ...errors import CalibrationError
        raise CalibrationError("QAT with static activations needs calibration samples to start from")
    for m in layers:
        m.freeze_observer()
    return n


def train_qat(model: nn.Module, train_batches: Callable[[], Iterable], loss_fn: Callable, epochs: int, lr: float,
              *, checkpoint_fn: Callable[[int, nn.Module], None] | None = None,
              progress: Callable[[int], None] | None = None,
              regularizer: Callable[[nn.Module], torch.Tensor] | None = None) -> list[float]:
    """Adam (cosine-annealed) on weights, biases, step sizes and zero points; returns each epoch's mean loss.

    `regularizer(model)`, when given, is added to every batch's loss (e.g. a Lipschitz penalty).
    """
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, epochs))
    return fit(model, train_batches, epochs, gradient_step(model, opt, loss_fn, regularizer), scheduler=sched,
               checkpoint_fn=checkpoint_fn, progress=progress)


def retrain(float_module: nn.Module, recipe: Recipe, x: torch.Tensor, y: torch.Tensor,
            calib_batches: Iterable | None, run_batch: Callable[[nn.Module, Any], Any], *, epochs: int, lr: float,
            batch_size: int, seed: int, loss_fn: Callable = F.cross_entropy,
            regularizer: Callable[[nn.Module], torch.Tensor] | None = None,
            checkpoint_fn: Callable[[int, nn.Module], None] | None = None,
            progress: Callable[[int], None] | None = None) -> tuple[nn.Module, dict[str, dict], list[float]]:
    """Quantization-aware retraining (LSQ) of a copy of `float_module` on (x, y): wrap the recipe's layers,
    start static activation ranges from `calib_batches` (default: the first training samples), train with a
    seeded shuffle, and convert to ordinary quantized layers. Returns (module, layers, epoch losses)."""
    cal = recipe.calibration
    torch.manual_seed(seed)
    model = copy.deepcopy(float_module)
    for p in model.parameters():
        p.requires_grad_(True)
    prepare_qat(model, recipe)
    if calib_batches is None:
        xc = x[:cal.num_samples]
        calib_batches = (xc[i:i + cal.batch_size] for i in range(0, len(xc), cal.batch_size))
    init_activation_ranges(model, calib_batches, run_batch)
    batches = shuffled(x, y, batch_size, torch.Generator().manual_seed(seed))
    losses = train_qat(model, batches, loss_fn, epochs, lr, checkpoint_fn=checkpoint_fn, progress=progress,
                       regularizer=regularizer)
    layers = convert_qat(model)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, layers, losses


@torch.no_grad()
def convert_qat(model: nn.Module) -> dict[str, dict]:
    """Replace QAT wrappers by secquant quantized modules holding the trained integers."""
    infos = {}
    for name, m in [(n, m) for n, m in model.named_modules() if isinstance(m, QATLayer)]:
        q = quantize_module(m.float_mod, m.source_type, m.wargs, m.aargs)
        if m.wq is not None:
            s, z = m.wq.qparams()
            w2 = m._w2().detach().float()
            qi = _fake_int(w2, s, z, m.wq.qmin, m.wq.qmax, m.wq.gran)
            q.set_quantized(qi, s.detach(), z.detach().round().to(torch.int32))
        if isinstance(m.aq, LSQQuantizer) and isinstance(getattr(q, "input_quant", None), ActQuant):
            s, z = m.aq.qparams()
            q.input_quant.scale.copy_(s.detach().reshape(()))
            q.input_quant.zero_point.copy_(z.detach().round().to(torch.int32).reshape(()))
            q.input_quant.observer = None
            q.input_quant.calibrated = True
        set_submodule(model, name, q)
        infos[name] = {**q.layer_info(m.source_type), "algorithm": "lsq" if q.weight_args is not None else None}
    return infos


def _fake_int(x, s, z, qmin, qmax, gran) -> torch.Tensor:
    """The integers the trained quantizer produces for x (same rounding as the forward pass)."""
    if isinstance(gran, PerGroup):
        xg = group_view(x, gran.group_size, gran.axis)
        q = torch.clamp(torch.round(xg / s.unsqueeze(-1)) + z.unsqueeze(-1), qmin, qmax)
        return ungroup_view(q, x.shape[gran.axis], gran.axis, x.ndim).to(torch.int32)
    return torch.clamp(torch.round(x / expand_qparam(s, x, gran)) + expand_qparam(z, x, gran), qmin, qmax).to(torch.int32)
