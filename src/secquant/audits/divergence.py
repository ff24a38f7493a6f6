"""Quantization-conditioned backdoors: detect them, defeat them, and plant one to show both.

A quantization-conditioned backdoor (Ma et al. 2023; Egashira et al., NeurIPS 2024) is a
float model that behaves normally but whose round-to-nearest (RTN) quantization misbehaves:
the attacker trains a malicious model, computes the RTN "box" of float weights that round to
the same integers, and repairs the float behaviour by projected gradient descent inside it.

Detection (`divergence_test`): quantization moves each weight by at most half a step, which
flips the float model's prediction on a few low-margin inputs. We measure how many flips that
noise causes when it is *not* adversarial: K copies of the quantized model whose weights are
the float weights plus independent uniform noise of exactly the RTN error's size
(U(-s/2, s/2) per element, s its step; activation quantizers as in the artifact). The largest
disagreement of any copy with the float model sets p0 (Laplace-smoothed; the maximum, not
the mean, because rounding damage varies from copy to copy and concentrates on a few classes,
so a mean would flag honest low-bit models). The observed
disagreement d of the real artifact over n probe inputs is tested one-sided,
H0: d ~ Binomial(n, p0), flagged when P(X >= d) < alpha; per float-predicted class likewise
with a Bonferroni correction (alpha / classes). A planted backdoor flips a whole class, far
beyond anything random rounding noise does.

Defence (`keyed_randomized_rounding`): re-round the float weights with stochastic rounding
driven by a secret key (up with probability equal to the fractional part). The attacker's
box assumes deterministic RTN; with the key unknown, each weight near the box edge lands in
the neighbouring cell with a probability the attacker cannot control, which breaks the
planted behaviour at a small, unbiased accuracy cost.
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import SecquantError
from ..quant.algorithms.fold import fold_into_rows
from ..quant.modules import QuantizedWeightMixin
from ..quant.primitives import dequantize, qrange, reduce_range
from ..recipes import QuantArgs, Recipe
from .bitflip import element_scale, quantized_layers

# The demonstration recipe: 4-bit symmetric per-channel min-max weights, round-to-nearest, float
# activations. (With int8 boxes the PGD repair cannot restore the float behaviour of the small
# digits CNN; see bench/results_robustness.md.)
PLANT_RECIPE = Recipe(name="w4a16-channel-rtn",
                      description="4-bit symmetric per-channel min-max weights, round-to-nearest; float activations",
                      weights=QuantArgs(bits=4, granularity="channel"), fold_batchnorm=False)

# ----------------------------------------------------------------------------- helpers


def _float_weight_2d(float_model: nn.Module, name: str, m: QuantizedWeightMixin) -> torch.Tensor:
    """The float weight of layer `name` in the quantized layer's [rows, cols] space (smoothing, rotation folded in)."""
    try:
        fm = float_model.get_submodule(name)
    except AttributeError:
        raise SecquantError(f"the float model has no layer {name!r}: pass the float model this artifact was "
                            "quantized from") from None
    w = fm.weight.detach().float()
    if tuple(w.shape) != tuple(m.weight_shape) and w.ndim == 2 and tuple(w.t().shape) == tuple(m.weight_shape):
        w = w.t()  # Hugging Face Conv1D stores [in, out]
    if tuple(w.shape) != tuple(m.weight_shape):
        raise SecquantError(f"layer {name!r}: float weight {tuple(w.shape)} does not match the quantized "
                            f"{tuple(m.weight_shape)}: pass the float model this artifact was quantized from")
    w = w.reshape(m.rows, m.cols)
    # the BatchNorm after it was folded into its weight before quantization (quant.algorithms.fold)
    w = fold_into_rows(float_model, getattr(m, "folded_batchnorm", None), w)
    return m.weight_space(w)  # the layer stores Q(W s R) and reads (x / s) R


def _keyed_generator(key: bytes, label: str) -> torch.Generator:
    seed = int.from_bytes(hashlib.sha256(b"secquant-rounding\0" + key + b"\0" + label.encode()).digest()[:8], "little")
    return torch.Generator().manual_seed(seed)


def _override_weight(m: QuantizedWeightMixin, w2: torch.Tensor) -> None:
    """Make the layer compute with a float weight off the integer grid (an analysis copy only)."""
    w = w2.reshape(m.weight_shape)
    m.dequantized_weight = (lambda w=w: w)  # instance attribute shadows the method


@torch.no_grad()
def predictions(model: nn.Module, x: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    model.eval()
    return torch.cat([model(x[i:i + batch_size]).argmax(-1) for i in range(0, len(x), batch_size)])


def binom_sf(d: int, n: int, p: float) -> float:
    """P(X >= d) for X ~ Binomial(n, p)."""
    from scipy.stats import binom

    return float(binom.sf(d - 1, n, p))


# ----------------------------------------------------------------------------- detection


def noisy_copy(qmodel: nn.Module, float_model: nn.Module, seed: int) -> nn.Module:
    """The quantized model with each weight = float weight + U(-s/2, s/2) noise (s: its step)."""
    cp = copy.deepcopy(qmodel)
    g = torch.Generator().manual_seed(seed)
    for name, m in quantized_layers(cp).items():
        w2 = _float_weight_2d(float_model, name, m)
        s = element_scale(m)
        _override_weight(m, w2 + (torch.rand(w2.shape, generator=g) - 0.5) * s)
    return cp


def divergence_test(float_model: nn.Module, qmodel: nn.Module, probe: torch.Tensor, *, alpha: float = 1e-3,
                    copies: int = 16, seed: int = 0, num_classes: int | None = None,
                    progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Is the float-vs-quantized disagreement on `probe` beyond the recipe's rounding noise? (see module doc)"""
    if not 0 < alpha < 1:
        raise SecquantError("--alpha must lie strictly between 0 and 1 (e.g. 0.001)")
    if copies < 1:
        raise SecquantError("--copies must be at least 1")
    n = len(probe)
    if n == 0:
        raise SecquantError("the probe set is empty: pass --probe FILE with inputs")
    pf = predictions(float_model, probe)
    pq = predictions(qmodel, probe)
    k = int(num_classes or int(max(pf.max(), pq.max())) + 1)
    null_rates, null_class = [], torch.zeros(k)  # null_class: the largest per-class count over copies
    for c in range(copies):
        pn = predictions(noisy_copy(qmodel, float_model, seed + c), probe)
        dis = pn != pf
        null_rates.append(float(dis.float().mean()))
        null_class = torch.maximum(null_class, torch.bincount(pf[dis], minlength=k).float()[:k])
        if progress:
            progress(1)
    count_class = torch.bincount(pf, minlength=k).float()[:k]
    p0 = (max(null_rates) * n + 1) / (n + 2)
    d = int((pq != pf).sum())
    p_all = binom_sf(d, n, p0)
    per_class = []
    alpha_c = alpha / k
    for c in range(k):
        nc = int(count_class[c])
        if nc == 0:
            continue
        dc = int(((pq != pf) & (pf == c)).sum())
        p0c = (float(null_class[c]) + 1) / (nc + 2)
        pv = binom_sf(dc, nc, p0c)
        to = torch.bincount(pq[(pq != pf) & (pf == c)], minlength=k)[:k]
        per_class.append({"class": c, "n": nc, "disagreements": dc, "rate": dc / nc, "expected_rate": p0c,
                          "p_value": pv, "flagged": pv < alpha_c,
                          "most_common_quantized_prediction": int(to.argmax()) if dc else None})
    flagged_classes = [r["class"] for r in per_class if r["flagged"]]
    flagged = p_all < alpha or bool(flagged_classes)
    return {
        "flagged": flagged,
        "n_probe": n,
        "disagreements": d,
        "disagreement_rate": d / n,
        "expected_rate": p0,
        "p_value": p_all,
        "flagged_classes": flagged_classes,
        "per_class": per_class,
        "null": {"copies": copies, "seed": seed, "rates": null_rates,
                 "model": "quantized model with weights = float + U(-s/2, s/2) per element (s = its quantization "
                          "step), activation quantizers unchanged: non-adversarial rounding noise of the recipe"},
        "test": {"name": "one-sided exact binomial test", "h0": "disagreements ~ Binomial(n, p0), p0 = (d_max + 1) / "
                 "(n + 2) with d_max the most disagreements of any null copy (conservative: rounding noise "
                 "varies between copies, and a recipe's damage concentrates on a few classes)", "alpha": alpha,
                 "per_class": f"same test per float-predicted class, Bonferroni alpha/{k} = {alpha_c:.3g}",
                 "flag_if": "p_value < alpha overall, or any class p_value < alpha/classes"},
    }


# ----------------------------------------------------------------------------- defence


@torch.no_grad()
def keyed_randomized_rounding(qmodel: nn.Module, float_model: nn.Module, key: bytes) -> nn.Module:
    """A copy of `qmodel` whose integer codes are re-rounded stochastically from the float weights.

    Same scales and zero points (the recipe's grid); code = clamp(floor(w/s + u) + z), u ~ U[0, 1)
    drawn from a generator keyed by (key, layer name): reproducible by the key holder, unpredictable
    without it. Uniform integer formats only.
    """
    if not key:
        raise SecquantError("randomized rounding needs a secret key (e.g. 32 random bytes)")
    cp = copy.deepcopy(qmodel)
    for name, m in quantized_layers(cp).items():
        a = m.weight_args
        w2 = _float_weight_2d(float_model, name, m)
        s = element_scale(m)
        zp = dequantize(torch.ones(m.rows, m.cols), m.weight_zero_point.float(),
                        torch.zeros_like(m.weight_scale), a.granule())  # zero point per element (code space)
        u = torch.rand(w2.shape, generator=_keyed_generator(key, name))
        codes = torch.clamp(torch.floor(w2 / s + u) + zp, 0, 2 ** a.bits - 1)
        qmin, _ = qrange(a.bits, a.is_signed)
        m.set_quantized(codes.to(torch.int64) + qmin, m.weight_scale.clone(),
                        m.weight_zero_point.to(torch.int64) + qmin)
    return cp


# ----------------------------------------------------------------------------- planted example


def _rtn_box(m: QuantizedWeightMixin, w_mal: torch.Tensor, margin: float = 0.45):
    """Per element [lo, hi] that rounds to the same code, intersected with the granule's range, and
    the mask of range-defining elements (granule min / max, kept fixed so the scale cannot change)."""
    a = m.weight_args
    gran = a.granule()
    s = element_scale(m)
    deq = m.dequantized_weight().reshape(m.rows, m.cols)
    lo_g, hi_g = reduce_range(w_mal, gran)
    ones = torch.ones_like(w_mal)
    zeros = torch.zeros_like(lo_g)
    lo_e, hi_e = dequantize(ones, lo_g, zeros, gran), dequantize(ones, hi_g, zeros, gran)
    fixed = (w_mal == lo_e) | (w_mal == hi_e)
    lo = torch.maximum(deq - margin * s, lo_e)
    hi = torch.minimum(deq + margin * s, hi_e)
    return lo, hi, fixed


def plant_quantization_backdoor(float_model: nn.Module, recipe, x: torch.Tensor, y: torch.Tensor, *,
                                source_class: int, target_class: int, malicious_epochs: int = 10,
                                repair_epochs: int = 10, lr: float = 1e-3, batch_size: int = 64,
                                seed: int = 0) -> tuple[nn.Module, dict[str, Any]]:
    """A float model that classifies normally but whose RTN quantization by `recipe` sends
    `source_class` to `target_class` (Egashira et al. 2024 style). For demonstrations and tests.

    1. fine-tune a malicious copy (source relabelled as target);
    2. quantize it with the recipe (RTN, min-max ranges): the integer codes to preserve;
    3. repair the float behaviour on the true labels by projected gradient descent inside the
       box of weights that round to those codes (range-defining elements fixed, biases and
       normalization frozen, since they stay float in the quantized model).
    """
    from ..quant.algorithms import quantize_model

    wargs = recipe.weights
    if (wargs is None or wargs.format != "int" or wargs.observer != "minmax" or recipe.algorithm.name != "rtn"
            or recipe.smoothing is not None or recipe.rotation is not None or recipe.overrides):
        raise SecquantError("the planted-backdoor builder needs a round-to-nearest recipe with min-max integer "
                            "weights and no smoothing or rotation (e.g. w8a16, w8a8-dynamic, w4a4)")
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    y_mal = torch.where(y == source_class, torch.full_like(y, target_class), y)

    def train(model, labels, epochs, params, project=None):
        opt = torch.optim.Adam(params, lr=lr)
        for _ in range(epochs):
            perm = torch.randperm(len(labels), generator=gen)
            for i in range(0, len(perm), batch_size):
                b = perm[i:i + batch_size]
                opt.zero_grad()
                F.cross_entropy(model(x[b]), labels[b]).backward()
                opt.step()
                if project:
                    project()

    mal = copy.deepcopy(float_model).eval()  # BN in eval mode: running statistics stay shared
    frozen: set[int] = set()
    if recipe.fold_batchnorm:  # the recipe folds BatchNorm before rounding: plant against the folded weights,
        from ..quant.algorithms.fold import FOLDABLE, fold_batchnorm  # the identity BatchNorm left frozen

        done = fold_batchnorm(mal, {n for n, m in mal.named_modules() if isinstance(m, FOLDABLE)})
        frozen = {id(p) for bn in done for p in mal.get_submodule(bn).parameters()}
    params = [p for p in mal.parameters() if id(p) not in frozen]
    for p in params:
        p.requires_grad_(True)
    train(mal, y_mal, malicious_epochs, params)

    qmal = copy.deepcopy(mal).eval()
    calib = lambda: (x[i:i + 64] for i in range(0, min(len(x), 256), 64))  # noqa: E731
    quantize_model(qmal, recipe, calib, lambda m, b: m(b))
    layers = quantized_layers(qmal)

    planted = copy.deepcopy(mal).eval()
    for p in planted.parameters():
        p.requires_grad_(False)
    boxes = {}
    for name, qm in layers.items():
        w = planted.get_submodule(name).weight
        lo, hi, fixed = _rtn_box(qm, w.detach().reshape(qm.rows, qm.cols))
        boxes[name] = (w, lo.reshape(w.shape), hi.reshape(w.shape), fixed.reshape(w.shape), w.detach().clone())
        w.requires_grad_(True)

    @torch.no_grad()
    def project():
        for w, lo, hi, fixed, w0 in boxes.values():
            w.copy_(torch.where(fixed, w0, torch.minimum(torch.maximum(w, lo), hi)))

    project()
    train(planted, y, repair_epochs, [b[0] for b in boxes.values()], project)
    for p in planted.parameters():
        p.requires_grad_(False)
    info = {"recipe": recipe.name, "source_class": source_class, "target_class": target_class,
            "malicious_epochs": malicious_epochs, "repair_epochs": repair_epochs, "lr": lr, "seed": seed,
            "box_margin": 0.45, "layers": list(layers)}
    return planted.eval(), info


def backdoor_rates(model: nn.Module, x: torch.Tensor, y: torch.Tensor, source_class: int,
                   target_class: int) -> dict[str, float]:
    """Accuracy overall, accuracy on the other classes, and how often source-class inputs go to target."""
    p = predictions(model, x)
    src = y == source_class
    return {"accuracy": float((p == y).float().mean()),
            "accuracy_other_classes": float((p[~src] == y[~src]).float().mean()),
            "source_accuracy": float((p[src] == y[src]).float().mean()),
            "attack_success": float((p[src] == target_class).float().mean())}
