"""BatchNorm folding: a BatchNorm in eval mode that alone normalizes a Conv1d/2d/3d (or Linear) output is folded
into that layer's weight and bias before quantization, so the quantized kernel computes conv+BN in one pass.

Pairs are found by tracing the model with torch.fx (a BatchNorm whose input is the output of a conv used
nowhere else), never by guessing from names. A model torch.fx cannot trace keeps its BatchNorm layers in
float (they are then listed among the float layers). The folded BatchNorm becomes an exact identity of the same
kind and size (mean 0, var 1 - eps, weight 1, bias 0), which keeps the float architecture's layout and state-dict
keys, so an artifact rebuilds from the unmodified float architecture.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

_BN = nn.modules.batchnorm._BatchNorm
FOLDABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def producer_pairs(model: nn.Module) -> dict[str, str]:
    """BatchNorm name -> the Conv/Linear whose output it alone normalizes (torch.fx). Raises what torch.fx
    raises when the model cannot be traced."""
    from torch.fx import symbolic_trace

    gm = symbolic_trace(model)
    mods = dict(model.named_modules())
    pairs: dict[str, str] = {}
    for node in gm.graph.nodes:
        if node.op != "call_module" or not isinstance(mods.get(node.target), _BN):
            continue
        src = node.args[0] if node.args else None
        if getattr(src, "op", None) == "call_module" and len(src.users) == 1 \
                and isinstance(mods.get(src.target), FOLDABLE):
            pairs[node.target] = src.target
    # a layer called twice (shared weights) appears once per call: fold only layers used by one BatchNorm
    used = [layer for layer in pairs.values()]
    return {bn: layer for bn, layer in pairs.items() if used.count(layer) == 1}


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


@torch.no_grad()
def fold_into_rows(model: nn.Module, bn_name: str | None, w: torch.Tensor) -> torch.Tensor:
    """A float weight [out, ...] of the layer before BatchNorm `bn_name` of `model`, scaled as folding scales it
    (gamma / sqrt(var + eps) per output row); `w` unchanged when `bn_name` is None. Readers that compare a float
    model with its quantized layers (watermark, divergence audit) see the weight the codes round this way."""
    if not bn_name:
        return w
    try:
        bn = model.get_submodule(bn_name)
    except AttributeError:
        raise ValueError(f"the model has no BatchNorm {bn_name!r} (folded into the layer before it)") from None
    scale = torch.rsqrt(bn.running_var.detach().to(w.dtype) + bn.eps)
    if bn.weight is not None:
        scale = bn.weight.detach().to(w.dtype) * scale
    return w * scale.reshape(-1, *([1] * (w.dim() - 1)))


def foldable(bn: nn.Module) -> bool:
    """A BatchNorm that normalizes with its running statistics (eval mode), so it is a fixed affine map."""
    return isinstance(bn, _BN) and not bn.training and bn.track_running_stats and bn.running_mean is not None


@torch.no_grad()
def fold_pair(model: nn.Module, bn_name: str, layer_name: str) -> None:
    """Fold BatchNorm `bn_name` into `layer_name` in place; the BatchNorm becomes an identity."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

    from .rtn import set_submodule

    bn, layer = model.get_submodule(bn_name), model.get_submodule(layer_name)
    fuse = fuse_linear_bn_eval if isinstance(layer, nn.Linear) else fuse_conv_bn_eval
    fused = fuse(copy.deepcopy(layer).eval(), copy.deepcopy(bn).eval())
    fused.weight.requires_grad_(layer.weight.requires_grad)
    fused.bias.requires_grad_(layer.weight.requires_grad)
    set_submodule(model, layer_name, fused)
    set_submodule(model, bn_name, identity_batchnorm(bn))


def fold_batchnorm(model: nn.Module, quantized: set[str]) -> dict[str, str]:
    """Fold each eval-mode BatchNorm into the conv (or Linear) before it when that layer is about to be quantized
    (`quantized`: the layers the recipe quantizes). In place; returns BatchNorm name -> layer name.

    A layer the recipe leaves in float is not folded (its artifact would then hold a bias the float
    architecture has no place for); an untraceable model folds nothing."""
    if not any(foldable(m) for m in model.modules()):
        return {}
    try:
        pairs = producer_pairs(model)
    except Exception:  # noqa: BLE001 - any tracing failure means the pairing cannot be proven: fold nothing
        return {}
    done = {}
    for bn_name, layer_name in pairs.items():
        if layer_name in quantized and foldable(model.get_submodule(bn_name)):
            fold_pair(model, bn_name, layer_name)
            done[bn_name] = layer_name
    return done
