"""GPTQ on convolutions: a Conv1d/Conv2d is a matrix product of its weight [out, in/g * k] with the im2col
(unfold) view of its input, X = [N * L, in/g * k] per group, so its Hessian is 2 X^T X / n like a Linear layer's.

Each group of a grouped (or depthwise) convolution reads its own input channels: it gets its own Hessian and
its own GPTQ run over its rows. What GPTQ cannot store as one weight (one scale for the whole tensor, or scales
per input column, shared across groups) stays with round-to-nearest, and the manifest says "rtn" for it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..primitives import PerChannel, PerGroup
from ..schema import QuantArgs

CONV_TYPES = ("Conv1d", "Conv2d")
MAX_UNFOLD = 2**24  # elements of one unfolded chunk (64 MiB of float32): batches are unfolded a few samples at a time


def gptq_applies(source_type: str, mod: nn.Module, wargs: QuantArgs | None) -> bool:
    """Whether the GPTQ driver quantizes this layer (else it gets round-to-nearest)."""
    if wargs is None:
        return False
    if source_type in ("Linear", "Conv1D"):
        return True
    if source_type not in CONV_TYPES or getattr(mod, "padding_mode", "zeros") != "zeros":
        return False
    if mod.groups == 1:
        return True
    g = wargs.granule()
    return isinstance(g, PerGroup) or (isinstance(g, PerChannel) and g.axis in (0, -2))


def n_groups(mod: nn.Module) -> int:
    return int(getattr(mod, "groups", 1)) if isinstance(mod, (nn.Conv1d, nn.Conv2d)) else 1


def _explicit_padding(mod: nn.Conv2d | nn.Conv1d, x: torch.Tensor, k: tuple[int, ...]) -> tuple[torch.Tensor, tuple]:
    """x padded for 'same' (possibly one more at the end, as torch does) and the padding left to unfold."""
    p = mod.padding
    if p == "valid":
        return x, (0,) * len(k)
    if p == "same":
        total = [d * (kk - 1) for kk, d in zip(k, mod.dilation)]
        pads = []
        for t in reversed(total):  # F.pad takes the last dimension first
            pads += [t // 2, t - t // 2]
        return F.pad(x, pads), (0,) * len(k)
    return x, tuple(p)


def conv_input_rows(mod: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """The unfolded input of a convolution as rows [N * L, in/g * k], one matrix per group."""
    k = tuple(mod.kernel_size)
    x, pad = _explicit_padding(mod, x, k)
    stride, dil = tuple(mod.stride), tuple(mod.dilation)
    if len(k) == 1:  # Conv1d as a Conv2d of height 1
        x, k, pad, stride, dil = x.unsqueeze(2), (1, *k), (0, *pad), (1, *stride), (1, *dil)
    cols = F.unfold(x, k, dilation=dil, padding=pad, stride=stride)  # [N, C * k, L], channel-major
    rows = cols.transpose(1, 2).reshape(-1, cols.shape[1])
    g = mod.groups
    per = rows.shape[1] // g
    return [rows[:, i * per:(i + 1) * per] for i in range(g)]


def layer_input_rows(mod: nn.Module, x: torch.Tensor) -> list[list[torch.Tensor]]:
    """Chunks of a layer input's rows, each a list with one matrix per group (Linear: the input itself)."""
    if not isinstance(mod, (nn.Conv1d, nn.Conv2d)):
        return [[x]]
    if x.dim() == len(mod.kernel_size) + 1:  # unbatched
        x = x.unsqueeze(0)
    step = max(1, MAX_UNFOLD // max(1, x[0].numel() * math.prod(mod.kernel_size)))
    return [conv_input_rows(mod, x[i:i + step]) for i in range(0, x.shape[0], step)]


def grouped_gptq(w: torch.Tensor, accs: list, quantize, target):
    """GPTQ of each group's rows of w [out, cols] under its own Hessian; results concatenated along the rows.
    `quantize(w, H)` runs GPTQ, `target(w, acc)` the float-model target of one group."""
    g = len(accs)
    rows = w.shape[0] // g
    qs, ss, zs, infos = [], [], [], []
    for i, acc in enumerate(accs):
        wi = target(w[i * rows:(i + 1) * rows], acc)
        q, s, z, info = quantize(wi, acc.H)
        qs.append(q), ss.append(s), zs.append(z), infos.append(info)
    info = dict(infos[0])
    info.update(damp=max(i["damp"] for i in infos), loss=sum(i["loss"] for i in infos))
    if g > 1:
        info["groups"] = g
    if g == 1:
        return qs[0], ss[0], zs[0], info
    return torch.cat(qs, 0), torch.cat(ss, 0), torch.cat(zs, 0), info
