"""Quantization-aware retraining (QAT) with learned step sizes: LSQ (Esser et al., 2020) and
LSQ+'s learnable offset (Bhalgat et al., 2020) as an integer zero point.

Why: at 2-4 bits, round-to-nearest (PTQ) moves every weight by up to half a step and no
choice of range undoes that. Retraining with the rounding in the forward pass lets the float
weights settle where their *rounded* values work, and lets each step size (and zero point)
settle where the trade-off between rounding and clipping error is best for the loss.

How:

- `prepare_qat` swaps each layer the recipe targets for a `QATLayer`: it owns the float
  weight (and bias) as trainable parameters and fake-quantizes weight and input in forward.
  Weight step sizes start from the weight's min-max (or MSE-searched) ranges, exactly as
  round-to-nearest would choose them; static activation step sizes start from a short
  calibration pass (`init_activation_ranges`), as PTQ's `calibrate` would. So before any
  training step the QAT model computes what the PTQ model computes.
- Rounding uses the straight-through estimator (STE); step sizes get LSQ's gradient
  (round(v/s) - v/s inside the grid, the clipping bound outside), scaled by
  g = 1 / sqrt(numel_per_scale * qmax) so that they learn at the pace of the weights.
  Asymmetric schemes also learn their zero point (kept integer in forward by an STE round,
  so the trained model needs no float offset).
- Dynamic activations (ranges computed per token / per tensor at run time) have nothing to
  learn: they are fake-quantized with the run-time range and STE rounding.
- `train_qat` runs plain Adam; `convert_qat` stores the integers the trained quantizers
  produce in the ordinary secquant modules (QuantLinear, QuantConv1d/2d, QuantEmbedding),
  so the converted model computes the QAT model's eval output and saves like any artifact.

Only uniform integer formats (`format: int`) are trainable here; recipe smoothing and the
GPTQ algorithm are PTQ range/rounding choices that QAT replaces, and are ignored.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import CalibrationError, ModelError, RecipeError
from ...recipes.schema import QuantArgs, Recipe
from ..modules import ActQuant, QuantConv1d, QuantConv2d, QuantEmbedding, QuantLinear, make_observer
from ..modules.weight import mse_range, qparam_shape
from ..primitives import PerChannel, PerGroup, PerTensor, PerToken, choose_qparams, qrange, reduce_range
from ..primitives.affine import group_view, ungroup_view
from ..primitives.ranges import EPS
from .rtn import check_finite, plan, set_submodule

# ----------------------------------------------------------------------------------------------
# Differentiable building blocks
# ----------------------------------------------------------------------------------------------


class _RoundSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return torch.round(x)

    @staticmethod
    def backward(ctx, grad):
        return grad


class _GradScale(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, g: float):
        ctx.g = g
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.g, None


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """round(x) (half to even, like the integer path) forward; identity gradient backward."""
    return _RoundSTE.apply(x)


def grad_scale(x: torch.Tensor, g: float) -> torch.Tensor:
    """x unchanged forward (bit for bit); gradient multiplied by g backward (LSQ's gradient scale)."""
    return _GradScale.apply(x, float(g))


class _FakeQuantLSQ(torch.autograd.Function):
    """(clamp(round(x/s) + z, qmin, qmax) - z) * s, with LSQ / LSQ+ gradients.

    s and z are broadcastable against x (z integer-valued floats). Forward is the very formula
    of `primitives.fake_quantize`, so the converted integer model reproduces it exactly.
    Backward, with t = x/s and "inside" meaning qmin <= t + z <= qmax (before rounding):
      d/dx = 1 inside, 0 outside (STE, clipped values get no gradient);
      d/ds = round(t) - t inside, (q - z) outside (the clipping bound, LSQ eq. 3);
      d/dz = 0 inside, -s outside (LSQ+'s offset gradient).
    """

    @staticmethod
    def forward(ctx, x, s, z, qmin: int, qmax: int):
        t = x / s
        r = torch.round(t)
        q = torch.clamp(r + z, qmin, qmax)
        out = (q - z) * s
        ctx.save_for_backward(t, r, q, s, z)
        ctx.qmin, ctx.qmax = qmin, qmax
        return out

    @staticmethod
    def backward(ctx, grad):
        t, r, q, s, z = ctx.saved_tensors
        tz = t + z
        inside = (tz >= ctx.qmin) & (tz <= ctx.qmax)
        gx = gs = gz = None
        if ctx.needs_input_grad[0]:
            gx = grad * inside.to(grad.dtype)
        if ctx.needs_input_grad[1]:
            gs = (grad * torch.where(inside, r - t, q - z)).sum_to_size(s.shape)
        if ctx.needs_input_grad[2]:
            gz = (grad * torch.where(inside, torch.zeros_like(t), -s.expand_as(t))).sum_to_size(z.shape)
        return gx, gs, gz, None, None


def fake_quantize_lsq(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int,
                      gran=PerTensor()) -> torch.Tensor:
    """Fake-quantize x with compact-shape qparams at `gran` (PerGroup: along the last axis of a 2-D x)."""
    z = zero_point.to(x.dtype)
    if isinstance(gran, PerGroup):
        xg = group_view(x, gran.group_size, gran.axis)
        out = _FakeQuantLSQ.apply(xg, scale.unsqueeze(-1), z.unsqueeze(-1), qmin, qmax)
        return ungroup_view(out, x.shape[gran.axis], gran.axis, x.ndim)
    if isinstance(gran, PerChannel):
        shape = [1] * x.ndim
        shape[gran.axis % x.ndim] = -1
        scale, z = scale.reshape(shape), z.reshape(shape)
    return _FakeQuantLSQ.apply(x, scale, z, qmin, qmax)


def integer_codes(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int,
                  gran=PerTensor()) -> torch.Tensor:
    """The int32 integers clamp(round(x/s) + z) that `fake_quantize_lsq` dequantizes (no grad)."""
    z = zero_point.to(x.dtype)
    if isinstance(gran, PerGroup):
        xg = group_view(x, gran.group_size, gran.axis)
        q = torch.clamp(torch.round(xg / scale.unsqueeze(-1)) + z.unsqueeze(-1), qmin, qmax)
        return ungroup_view(q, x.shape[gran.axis], gran.axis, x.ndim).to(torch.int32)
    if isinstance(gran, PerChannel):
        shape = [1] * x.ndim
        shape[gran.axis % x.ndim] = -1
        scale, z = scale.reshape(shape), z.reshape(shape)
    return torch.clamp(torch.round(x / scale) + z, qmin, qmax).to(torch.int32)


# ----------------------------------------------------------------------------------------------
# Quantizers
# ----------------------------------------------------------------------------------------------


class LSQQuantizer(nn.Module):
    """Learnable step size `scale` and (asymmetric schemes) learnable zero point `zero_point`.

    Both are float parameters in the compact qparam shape of the granularity. In forward the
    step size is clamped to >= EPS and the zero point rounded (STE) and clamped to the integer
    grid, so the forward pass always uses the integer zero point that conversion stores.
    Symmetric schemes keep the zero point fixed at the grid's middle (requires_grad False).
    """

    def __init__(self, args: QuantArgs, gran, shape: tuple[int, ...]) -> None:
        super().__init__()
        if args.format != "int":
            raise RecipeError(f"QAT trains uniform integer grids only; format {args.format!r} is not trainable "
                              "(use format: int, or quantize it post-training)")
        self.args = args
        self.gran = gran
        self.qmin, self.qmax = qrange(args.bits, args.is_signed)
        self.scale = nn.Parameter(torch.ones(shape))
        self.zero_point = nn.Parameter(torch.zeros(shape), requires_grad=not args.symmetric)
        self.g = 1.0

    def set_qparams(self, scale: torch.Tensor, zero_point: torch.Tensor, numel_per_scale: int) -> None:
        """Start from given qparams; numel_per_scale sets LSQ's gradient scale 1/sqrt(n * qmax)."""
        with torch.no_grad():
            self.scale.copy_(scale.float().reshape(self.scale.shape))
            self.zero_point.copy_(zero_point.float().reshape(self.zero_point.shape))
        self.g = 1.0 / math.sqrt(max(1, int(numel_per_scale)) * max(1, self.qmax))

    def qparams(self, with_grad: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """(step size, integer-valued zero point) as used in forward."""
        s, z = self.scale, self.zero_point
        if with_grad:
            s, z = grad_scale(s, self.g), round_ste(grad_scale(z, self.g))
        else:
            s, z = s.detach(), torch.round(z.detach())
        return torch.clamp(s, min=EPS), torch.clamp(z, self.qmin, self.qmax)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s, z = self.qparams()
        return fake_quantize_lsq(x, s, z, self.qmin, self.qmax, self.gran)

    @torch.no_grad()
    def project_(self) -> None:
        """Keep parameters where forward uses them (called after each optimizer step)."""
        self.scale.clamp_(min=EPS)
        self.zero_point.clamp_(self.qmin, self.qmax)

    @torch.no_grad()
    def export(self, x: torch.Tensor | None = None) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
        """(integer codes of x or None, float32 scale, int32 zero point) of the trained quantizer."""
        s, z = self.qparams(with_grad=False)
        q = None if x is None else integer_codes(x.detach().float(), s, z, self.qmin, self.qmax, self.gran)
        return q, s.clone(), z.to(torch.int32)

    def extra_repr(self) -> str:
        a = self.args
        return f"bits={a.bits}, {a.granularity}, symmetric={a.symmetric}, g={self.g:.3g}"


class WeightLSQ(LSQQuantizer):
    """LSQ quantizer for a weight seen as its 2-D [rows, cols] view (cols: the reduction dim)."""

    def __init__(self, args: QuantArgs, w2: torch.Tensor, init: str = "recipe") -> None:
        rows, cols = w2.shape
        shape = qparam_shape(args, rows, cols)  # also rejects invalid channel axes / granularities
        gran = args.granule()
        if isinstance(gran, PerChannel):
            gran = PerChannel(0 if gran.axis in (0, -2) else 1)
        super().__init__(args, gran, shape)
        w2 = w2.detach().float()
        lo, hi = reduce_range(w2, gran)
        if init == "mse" or (init == "recipe" and args.observer == "mse"):
            lo, hi = mse_range(w2, lo, hi, args)
        elif init not in ("minmax", "recipe"):
            raise ValueError(f"weight_init must be 'recipe', 'minmax' or 'mse', got {init!r}")
        s, z = choose_qparams(lo, hi, args.bits, args.is_signed, args.symmetric)
        self.set_qparams(s, z, w2.numel() // max(1, s.numel()))


class ActivationLSQ(LSQQuantizer):
    """Static per-tensor activation quantizer: observes calibration data, then learns its qparams.

    While `observer` is set, inputs pass through unchanged and are observed (as in PTQ
    calibration); `init_from_observer` then sets the starting step size and zero point.
    LSQ's gradient scale uses the number of input elements per sample.
    """

    def __init__(self, args: QuantArgs) -> None:
        super().__init__(args, PerTensor(), ())
        self.observer = None
        self.initialized = False
        self.numel_per_sample = 1

    def start_observing(self) -> None:
        self.observer = make_observer(self.args)

    def init_from_observer(self) -> None:
        if self.observer is None or self.observer.count == 0:
            raise CalibrationError("a static activation quantizer saw no calibration data "
                                   "(the layer is not reached by the model's forward pass)")
        lo, hi = self.observer.compute_range()
        a = self.args
        s, z = choose_qparams(torch.tensor(lo), torch.tensor(hi), a.bits, a.is_signed, a.symmetric)
        self.set_qparams(s, z, self.numel_per_sample)
        self.observer = None
        self.initialized = True

    def _load_from_state_dict(self, *args, **kwargs):  # a checkpoint carries trained qparams
        self.initialized = True
        return super()._load_from_state_dict(*args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observer is not None:
            self.numel_per_sample = int(x[0].numel()) if x.ndim > 1 else int(x.numel())
            self.observer.update(x.detach())
            return x
        if not self.initialized:
            raise RuntimeError("static activation quantizer used before init_activation_ranges()")
        return super().forward(x)


class DynamicFakeQuant(nn.Module):
    """Dynamic activations: run-time range (per token or per tensor) as ActQuant computes it,
    STE rounding; nothing to learn, gradients flow to the input inside the range."""

    def __init__(self, args: QuantArgs) -> None:
        super().__init__()
        self.args = args
        self.gran = PerToken() if args.granularity == "token" else PerTensor()
        self.qmin, self.qmax = qrange(args.bits, args.is_signed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.args
        lo, hi = reduce_range(x.detach().float(), self.gran)
        s, z = choose_qparams(lo, hi, a.bits, a.is_signed, a.symmetric)
        return fake_quantize_lsq(x, s, z, self.qmin, self.qmax)  # s, z broadcast per token already

    def extra_repr(self) -> str:
        return f"bits={self.args.bits}, dynamic, {self.args.granularity}"


# ----------------------------------------------------------------------------------------------
# The QAT layer
# ----------------------------------------------------------------------------------------------


class QATLayer(nn.Module):
    """A Linear / Conv1d / Conv2d / Embedding (or HF Conv1D) layer training under fake quantization.

    Owns `weight` (standard [out, in, ...] layout; a Hugging Face Conv1D weight is stored
    transposed) and `bias` as trainable parameters, `weight_quant` (WeightLSQ or None) and
    `input_quant` (ActivationLSQ, DynamicFakeQuant or None).
    """

    def __init__(self, mod: nn.Module, source_type: str, wargs: QuantArgs | None, aargs: QuantArgs | None,
                 weight_init: str = "recipe") -> None:
        super().__init__()
        self.source_type = source_type
        self.wargs = wargs
        self.aargs = None if source_type == "Embedding" else aargs
        w = mod.weight.detach()
        if source_type == "Conv1D":
            w = w.t()
        if source_type in ("Conv1d", "Conv2d"):
            if mod.padding_mode != "zeros":
                raise ModelError("only padding_mode='zeros' convolutions are supported")
            self.stride, self.padding, self.dilation, self.groups = mod.stride, mod.padding, mod.dilation, mod.groups
        if source_type == "Embedding":
            if mod.max_norm is not None or mod.sparse:
                raise ModelError("embeddings with max_norm or sparse gradients are not supported")
            self.padding_idx = mod.padding_idx
        self.weight = nn.Parameter(w.float().clone().contiguous())
        b = getattr(mod, "bias", None)
        self.bias = nn.Parameter(b.detach().float().clone()) if b is not None else None
        self.weight_quant = WeightLSQ(wargs, self.weight.reshape(w.shape[0], -1), weight_init) \
            if wargs is not None else None
        self.input_quant: nn.Module | None = None
        if self.aargs is not None:
            if self.aargs.format != "int":
                raise RecipeError(f"activations use format 'int', not {self.aargs.format!r}")
            self.input_quant = DynamicFakeQuant(self.aargs) if self.aargs.dynamic else ActivationLSQ(self.aargs)

    def fake_weight(self) -> torch.Tensor:
        """The weight as the quantized layer will see it (float, differentiable)."""
        if self.weight_quant is None:
            return self.weight
        w2 = self.weight.reshape(self.weight.shape[0], -1)
        return self.weight_quant(w2).reshape(self.weight.shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.source_type
        w = self.fake_weight()
        if t == "Embedding":
            return F.embedding(x, w, self.padding_idx)
        if self.input_quant is not None:
            x = self.input_quant(x)
        if t in ("Linear", "Conv1D"):
            return F.linear(x, w, self.bias)
        conv = F.conv2d if t == "Conv2d" else F.conv1d
        return conv(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)

    @torch.no_grad()
    def to_quantized(self) -> nn.Module:
        """The secquant quantized module holding the integers this layer's quantizers produce."""
        t, wargs, aargs = self.source_type, self.wargs, self.aargs
        shape = tuple(self.weight.shape)
        if t == "Embedding":
            q = QuantEmbedding(shape[0], shape[1], wargs, self.padding_idx)
        elif t in ("Linear", "Conv1D"):
            q = QuantLinear(shape[1], shape[0], self.bias is not None, wargs, aargs)
        else:
            cls = QuantConv2d if t == "Conv2d" else QuantConv1d
            q = cls(shape, self.bias is not None, wargs, aargs, self.stride, self.padding, self.dilation, self.groups)
        if self.weight_quant is None:
            q.set_weight(self.weight)
        else:
            codes, s, z = self.weight_quant.export(self.weight.reshape(shape[0], -1))
            q.set_quantized(codes, s, z)
        if self.bias is not None:
            q.bias.data.copy_(self.bias.detach().float())
        iq = self.input_quant
        if isinstance(iq, ActivationLSQ):
            if not iq.initialized:
                raise CalibrationError("static activation ranges were never initialized: run "
                                       "init_activation_ranges() before training and converting")
            _, s, z = iq.export()
            aq: ActQuant = q.input_quant
            aq.scale.copy_(s.reshape(()))
            aq.zero_point.copy_(z.reshape(()))
            aq.observer = None
            aq.calibrated = True
        return q

    def extra_repr(self) -> str:
        return f"{self.source_type}, weight={tuple(self.weight.shape)}, bias={self.bias is not None}"


# ----------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------


def prepare_qat(model: nn.Module, recipe: Recipe, *, weight_init: str = "recipe") -> dict[str, tuple[str, Any, Any]]:
    """Replace (in place) each layer the recipe targets by a QATLayer; returns the plan
    name -> (source_type, weight args, activation args).

    weight_init: "recipe" (MSE-searched ranges when the recipe's weight observer is "mse",
    min-max otherwise: the ranges round-to-nearest would use), "minmax" or "mse".
    Static activation quantizers still need `init_activation_ranges` before use.
    """
    check_finite(model)
    todo = plan(model, recipe)
    if not todo:
        kinds = ", ".join(recipe.targets)
        raise ModelError(f"the model has no quantizable layer ({kinds}) left after the recipe's ignore list; "
                         "check the model or the recipe's targets/ignore")
    for name, (_, w, a) in todo.items():  # validate everything before touching the model
        for args in (w, a):
            if args is not None and args.format != "int":
                raise RecipeError(f"{name}: QAT trains uniform integer grids only; format {args.format!r} is not "
                                  "trainable (use format: int, or quantize it post-training)")
    layers = {name: QATLayer(model.get_submodule(name), t, w, a, weight_init) for name, (t, w, a) in todo.items()}
    for name, layer in layers.items():
        set_submodule(model, name, layer)
    return todo


def qat_layers(model: nn.Module) -> dict[str, QATLayer]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QATLayer)}


@torch.no_grad()
def init_activation_ranges(model: nn.Module, batches: Iterable, run_batch: Callable[[nn.Module, Any], Any],
                           progress: Callable[[int], None] | None = None) -> int:
    """Observe calibration batches (weights already fake-quantized, inputs passed through, as in PTQ
    calibration) and start each static activation step size / zero point from the observed range.

    Returns the number of batches read (0 when no layer has static activations).
    """
    quantizers = [m for m in model.modules() if isinstance(m, ActivationLSQ)]
    if not quantizers:
        return 0
    for q in quantizers:
        q.start_observing()
    was_training = model.training
    model.eval()
    n = 0
    try:
        for batch in batches:
            run_batch(model, batch)
            n += 1
            if progress:
                progress(1)
        if n == 0:
            raise CalibrationError("calibration data is empty: static activation quantization needs samples")
        for q in quantizers:
            q.init_from_observer()
    finally:
        for q in quantizers:
            q.observer = None
        model.train(was_training)
    return n


def train_qat(model: nn.Module, train_batches_fn: Callable[[], Iterable], loss_fn: Callable, epochs: int,
              lr: float, *, checkpoint_fn: Callable[[int, nn.Module], None] | None = None,
              progress: Callable[[int], None] | None = None, qparam_lr: float | None = None,
              cosine: bool = True) -> list[float]:
    """Adam over every trainable parameter (weights, biases, norms, step sizes, zero points).

    `train_batches_fn()` yields (inputs, targets) for one epoch; the loss is loss_fn(model(inputs),
    targets). Step sizes and zero points use `qparam_lr` (default: lr; LSQ's gradient scale
    already balances them). With `cosine` the learning rate decays to 0 over the run, so the
    last epoch, the one converted, is a settled one. Calls checkpoint_fn(epoch, model) after each
    epoch (epoch counted from 1) and progress(1). Returns the mean training loss of each epoch;
    the model is left in eval mode.
    """
    if epochs < 1:
        raise ValueError("epochs must be >= 1")
    quantizers = [m for m in model.modules() if isinstance(m, LSQQuantizer)]
    qids = {id(p) for q in quantizers for p in q.parameters()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    qparams = [p for p in trainable if id(p) in qids]
    others = [p for p in trainable if id(p) not in qids]
    groups = [g for g in ({"params": others, "lr": lr},
                          {"params": qparams, "lr": lr if qparam_lr is None else qparam_lr}) if g["params"]]
    if not groups:
        raise ModelError("the model has no trainable parameter: set requires_grad on its parameters")
    opt = torch.optim.Adam(groups)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs) if cosine else None
    losses: list[float] = []
    for epoch in range(1, epochs + 1):
        model.train()
        total, count = 0.0, 0
        for x, y in train_batches_fn():
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(x), y)
            if not torch.isfinite(loss):
                raise ModelError(f"QAT diverged at epoch {epoch} (loss {float(loss)}): lower the learning rate")
            loss.backward()
            opt.step()
            for q in quantizers:
                q.project_()
            n = int(y.shape[0]) if hasattr(y, "shape") and y.ndim else 1
            total += float(loss.detach()) * n
            count += n
        if count == 0:
            raise CalibrationError("QAT training data is empty")
        if sched is not None:
            sched.step()
        losses.append(total / count)
        model.eval()
        if checkpoint_fn is not None:
            checkpoint_fn(epoch, model)
        if progress is not None:
            progress(1)
    model.eval()
    return losses


@torch.no_grad()
def convert_qat(model: nn.Module) -> dict[str, dict]:
    """Replace (in place) each QATLayer by the secquant quantized module holding its trained integers.

    The converted model's output equals the QAT model's eval-mode output (same integers, same
    scales, same kernels). Returns name -> layer_info (the manifest's layer entries).
    """
    infos: dict[str, dict] = {}
    for name, layer in qat_layers(model).items():
        q = layer.to_quantized()
        set_submodule(model, name, q)
        infos[name] = q.layer_info(layer.source_type)
    return infos


__all__ = ["round_ste", "grad_scale", "fake_quantize_lsq", "integer_codes", "LSQQuantizer", "WeightLSQ",
           "ActivationLSQ", "DynamicFakeQuant", "QATLayer", "prepare_qat", "qat_layers",
           "init_activation_ranges", "train_qat", "convert_qat"]
