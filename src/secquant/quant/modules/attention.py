"""PyTorch attention made quantizable: `nn.MultiheadAttention` split into four projection layers, and the
transformer layers that would hand its weights to a fused kernel moved to their unfused path.

`nn.MultiheadAttention` keeps its input projection as one packed matrix (`in_proj_weight`, or three
`*_proj_weight` when kdim/vdim differ) and reads `out_proj.weight` directly inside
`F.multi_head_attention_forward`; `nn.TransformerEncoderLayer` / `nn.TransformerEncoder` pass those tensors
and `linear1.weight` to `torch._transformer_encoder_layer_fwd` in eval mode. A quantized layer has no float
`weight`, so before quantizing, secquant replaces (same weights, same outputs):

- each `nn.MultiheadAttention` by `QuantMultiheadAttention`: `q_proj`, `k_proj`, `v_proj` (the rows of the
  packed input projection) and `out_proj` as ordinary Linear layers, attention computed here; the recipe's
  algorithms (GPTQ, smoothing, calibration) then treat the projections like any Linear layer, and the ONNX
  export traces the attention around them;
- each `nn.TransformerEncoderLayer` / `nn.TransformerEncoder` by a subclass whose forward is PyTorch's own
  slow path (`_sa_block`, `_ff_block`, both `norm_first` orders), never the fused kernel.

(`nn.TransformerDecoderLayer` and `nn.TransformerDecoder` have no fused path: they call their submodules
and work as they are.) The manifest lists every replaced module (`unfused_modules`), and loading an
artifact replays the same replacement on the rebuilt float model (`restore_unfused`) before its quantized
layers go in; only the classes of this file's fixed table are ever built.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "out_proj")


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """An nn.Linear holding copies of `weight` [out, in] and `bias`."""
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device,
                    dtype=weight.dtype)
    with torch.no_grad():
        lin.weight.copy_(weight)
        if bias is not None:
            lin.bias.copy_(bias)
    return lin


class QuantMultiheadAttention(nn.Module):
    """`nn.MultiheadAttention` with its projections as separate layers (float `nn.Linear` until the recipe
    quantizes them, then `QuantLinear`): the same arguments, masks and outputs as PyTorch's module.

    Forward: `(query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
    average_attn_weights=True, is_causal=False) -> (output, weights or None)`, batched or unbatched input,
    `batch_first` either way, boolean or additive masks, `add_bias_kv` and `add_zero_attn`; dropout on the
    attention weights in training mode only, as in PyTorch.
    """

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True,
                 add_bias_kv: bool = False, add_zero_attn: bool = False, kdim: int | None = None,
                 vdim: int | None = None, batch_first: bool = False) -> None:
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, embed_dim // num_heads
        self.kdim = kdim if kdim is not None else embed_dim
        self.vdim = vdim if vdim is not None else embed_dim
        self._qkv_same_embed_dim = self.kdim == embed_dim and self.vdim == embed_dim
        self.dropout, self.batch_first, self.add_zero_attn = float(dropout), bool(batch_first), bool(add_zero_attn)
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.k_proj = nn.Linear(self.kdim, embed_dim, bias=bias)
        self.v_proj = nn.Linear(self.vdim, embed_dim, bias=bias)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        if add_bias_kv:
            self.bias_k = nn.Parameter(torch.zeros(1, 1, embed_dim))
            self.bias_v = nn.Parameter(torch.zeros(1, 1, embed_dim))
        else:
            self.bias_k = self.bias_v = None

    @classmethod
    def from_float(cls, mha: nn.MultiheadAttention) -> "QuantMultiheadAttention":
        """The same attention with the packed input projection split into q/k/v rows (exact copies)."""
        E = mha.embed_dim
        bias = mha.in_proj_bias is not None
        new = cls(E, mha.num_heads, mha.dropout, bias, mha.bias_k is not None, mha.add_zero_attn, mha.kdim,
                  mha.vdim, mha.batch_first)
        if mha._qkv_same_embed_dim:
            ws = mha.in_proj_weight.detach().chunk(3)
        else:
            ws = (mha.q_proj_weight.detach(), mha.k_proj_weight.detach(), mha.v_proj_weight.detach())
        bs = mha.in_proj_bias.detach().chunk(3) if bias else (None, None, None)
        new.q_proj, new.k_proj, new.v_proj = (_linear(w, b) for w, b in zip(ws, bs))
        ob = mha.out_proj.bias
        new.out_proj = _linear(mha.out_proj.weight.detach(), ob.detach() if ob is not None else None)
        if mha.bias_k is not None:
            with torch.no_grad():
                new.bias_k.copy_(mha.bias_k)
                new.bias_v.copy_(mha.bias_v)
        new.train(mha.training)
        return new.to(mha.out_proj.weight.dtype)

    def config(self) -> dict:
        """What the manifest records about the module (and loading checks against the rebuilt float one)."""
        return {"embed_dim": self.embed_dim, "num_heads": self.num_heads, "kdim": self.kdim, "vdim": self.vdim,
                "batch_first": self.batch_first, "bias": self.q_proj.bias is not None,
                "add_bias_kv": self.bias_k is not None, "add_zero_attn": self.add_zero_attn,
                "packed_in_proj": self._qkv_same_embed_dim, "projections": list(PROJECTIONS)}

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: torch.Tensor | None = None, need_weights: bool = True,
                attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        batched = query.dim() == 3
        # the projections see the caller's layout (batch first when the module is): per-sample hooks read them
        q, k, v = self.q_proj(query), self.k_proj(key), self.v_proj(value)
        if not batched:  # (L, E): one sequence
            q, k, v = q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif self.batch_first:  # (N, L, E) -> (L, N, E), the layout the rest follows (PyTorch's)
            q, k, v = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)
        tgt_len, bsz = q.shape[0], q.shape[1]
        key_padding_mask = F._canonical_mask(mask=key_padding_mask, mask_name="key_padding_mask",
                                             other_type=F._none_or_dtype(attn_mask), other_name="attn_mask",
                                             target_type=query.dtype)
        if is_causal and attn_mask is None:
            attn_mask = torch.triu(torch.full((tgt_len, k.shape[0]), float("-inf"), dtype=query.dtype,
                                              device=query.device), diagonal=1)
        attn_mask = F._canonical_mask(mask=attn_mask, mask_name="attn_mask", other_type=None, other_name="",
                                      target_type=query.dtype, check_other=False)
        if attn_mask is not None and attn_mask.dim() == 2:
            attn_mask = attn_mask.unsqueeze(0)
        if self.bias_k is not None:
            k = torch.cat([k, self.bias_k.expand(1, bsz, -1)])
            v = torch.cat([v, self.bias_v.expand(1, bsz, -1)])
            attn_mask = F.pad(attn_mask, (0, 1)) if attn_mask is not None else None
            key_padding_mask = F.pad(key_padding_mask, (0, 1)) if key_padding_mask is not None else None
        H, D = self.num_heads, self.head_dim
        q = q.reshape(tgt_len, bsz * H, D).transpose(0, 1)  # (N*H, L, D)
        k = k.reshape(k.shape[0], bsz * H, D).transpose(0, 1)
        v = v.reshape(v.shape[0], bsz * H, D).transpose(0, 1)
        if self.add_zero_attn:
            k = torch.cat([k, torch.zeros_like(k[:, :1])], dim=1)
            v = torch.cat([v, torch.zeros_like(v[:, :1])], dim=1)
            attn_mask = F.pad(attn_mask, (0, 1)) if attn_mask is not None else None
            key_padding_mask = F.pad(key_padding_mask, (0, 1)) if key_padding_mask is not None else None
        src_len = k.shape[1]
        if key_padding_mask is not None:  # (N, S) -> (N*H, 1, S), added to the attention mask
            kpm = key_padding_mask.reshape(bsz, 1, 1, src_len).expand(-1, H, -1, -1).reshape(bsz * H, 1, src_len)
            attn_mask = kpm if attn_mask is None else attn_mask + kpm
        scores = torch.bmm(q * math.sqrt(1.0 / D), k.transpose(1, 2))
        if attn_mask is not None:
            scores = scores + attn_mask
        weights = torch.softmax(scores, dim=-1)
        if self.training and self.dropout > 0.0:
            weights = F.dropout(weights, p=self.dropout)
        out = torch.bmm(weights, v).transpose(0, 1).reshape(tgt_len, bsz, self.embed_dim)
        if not batched:
            out = out.squeeze(1)
        elif self.batch_first:
            out = out.transpose(0, 1)
        out = self.out_proj(out)
        if not need_weights:
            return out, None
        weights = weights.reshape(bsz, H, tgt_len, src_len)
        if average_attn_weights:
            weights = weights.mean(dim=1)
        return out, (weights if batched else weights.squeeze(0))


class UnfusedTransformerEncoderLayer(nn.TransformerEncoderLayer):
    """`nn.TransformerEncoderLayer` that always runs PyTorch's slow path (its submodules, never the fused
    `torch._transformer_encoder_layer_fwd`, which reads their float weights)."""

    def forward(self, src: torch.Tensor, src_mask: torch.Tensor | None = None,
                src_key_padding_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        src_key_padding_mask = F._canonical_mask(mask=src_key_padding_mask, mask_name="src_key_padding_mask",
                                                 other_type=F._none_or_dtype(src_mask), other_name="src_mask",
                                                 target_type=src.dtype)
        src_mask = F._canonical_mask(mask=src_mask, mask_name="src_mask", other_type=None, other_name="",
                                     target_type=src.dtype, check_other=False)
        x = src
        if self.norm_first:
            x = x + self._sa_block(self.norm1(x), src_mask, src_key_padding_mask, is_causal=is_causal)
            return x + self._ff_block(self.norm2(x))
        x = self.norm1(x + self._sa_block(x, src_mask, src_key_padding_mask, is_causal=is_causal))
        return self.norm2(x + self._ff_block(x))


class UnfusedTransformerEncoder(nn.TransformerEncoder):
    """`nn.TransformerEncoder` without its nested-tensor fast path (which reads the first layer's float
    attention and feed-forward weights): masks canonicalized, causal masks detected, layers in turn."""

    def forward(self, src: torch.Tensor, mask: torch.Tensor | None = None,
                src_key_padding_mask: torch.Tensor | None = None, is_causal: bool | None = None) -> torch.Tensor:
        from torch.nn.modules.transformer import _detect_is_causal_mask, _get_seq_len

        src_key_padding_mask = F._canonical_mask(mask=src_key_padding_mask, mask_name="src_key_padding_mask",
                                                 other_type=F._none_or_dtype(mask), other_name="mask",
                                                 target_type=src.dtype)
        mask = F._canonical_mask(mask=mask, mask_name="mask", other_type=None, other_name="",
                                 target_type=src.dtype, check_other=False)
        is_causal = _detect_is_causal_mask(mask, is_causal, _get_seq_len(src, self.layers[0].self_attn.batch_first))
        out = src
        for layer in self.layers:
            out = layer(out, src_mask=mask, is_causal=is_causal, src_key_padding_mask=src_key_padding_mask)
        return self.norm(out) if self.norm is not None else out


def _activation_name(layer: nn.TransformerEncoderLayer) -> str:
    act = layer.activation
    return getattr(act, "__name__", None) or type(act).__name__


def _retype(mod: nn.Module, cls: type[nn.Module]) -> nn.Module:
    """`mod` as an instance of its subclass `cls`, in place: same submodules, tensors and attributes (only the
    forward differs)."""
    mod.__class__ = cls
    return mod


# float type -> (manifest type, replacement, what the manifest records); a fixed table: loading builds nothing else
UNFUSE: dict[str, tuple[type[nn.Module], Callable[[nn.Module], nn.Module], Callable[[nn.Module], dict]]] = {
    "MultiheadAttention": (nn.MultiheadAttention, QuantMultiheadAttention.from_float, lambda m: m.config()),
    "TransformerEncoderLayer": (nn.TransformerEncoderLayer, lambda m: _retype(m, UnfusedTransformerEncoderLayer),
                                lambda m: {"norm_first": bool(m.norm_first), "activation": _activation_name(m)}),
    "TransformerEncoder": (nn.TransformerEncoder, lambda m: _retype(m, UnfusedTransformerEncoder),
                           lambda m: {"num_layers": len(m.layers)}),
}
UNFUSED_CLASSES = {"MultiheadAttention": QuantMultiheadAttention,
                   "TransformerEncoderLayer": UnfusedTransformerEncoderLayer,
                   "TransformerEncoder": UnfusedTransformerEncoder}


def _float_kind(mod: nn.Module) -> str | None:
    for kind, (cls, _, _) in UNFUSE.items():
        if type(mod) is cls:  # exactly PyTorch's class: a user's subclass may have its own forward
            return kind
    return None


def _set(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, new)


def unfuse(model: nn.Module, keep: Callable[[str], bool] = lambda name: True) -> dict[str, dict]:
    """Replace, in place, every PyTorch attention module and transformer encoder layer/stack of `model` by its
    unfused equivalent (see the module docstring); an attention module for which `keep(name)` is False stays
    as it is (the recipe leaves it in float). Returns what `unfused_modules` would record."""
    for name, mod in list(model.named_modules()):
        kind = _float_kind(mod)
        if kind is None or (kind == "MultiheadAttention" and (not name or not keep(name))):
            continue
        new = UNFUSE[kind][1](mod)
        if new is not mod:
            _set(model, name, new)
    return unfused_modules(model)


def unfused_modules(model: nn.Module) -> dict[str, dict]:
    """name -> {"type", "config"} of every unfused module in `model` (what the manifest's `modules` holds)."""
    out = {}
    for name, mod in model.named_modules():
        for kind, cls in UNFUSED_CLASSES.items():
            if type(mod) is cls:
                out[name] = {"type": kind, "config": UNFUSE[kind][2](mod)}
    return out


def restore_unfused(root: nn.Module, entries: dict[str, dict]) -> None:
    """Replay a manifest's `modules` on a rebuilt float model: each named module must be the PyTorch module
    the entry says, with the same configuration (ValueError naming it otherwise)."""
    for name, entry in entries.items():
        kind = entry["type"]
        if kind not in UNFUSE:
            raise ValueError(f"module {name!r}: unknown type {str(kind)[:40]!r}")
        try:
            mod = root.get_submodule(name) if name else root
        except AttributeError:
            raise ValueError(f"module {name[:120]!r} does not exist in the rebuilt architecture") from None
        if _float_kind(mod) != kind:
            raise ValueError(f"module {name!r} is a {type(mod).__name__}, but the manifest says {kind}")
        new = UNFUSE[kind][1](mod)
        if UNFUSE[kind][2](new) != entry["config"]:
            raise ValueError(f"module {name!r} does not match the manifest's {kind} configuration")
        if new is not mod:
            _set(root, name, new)
