"""An integer program: the quantized model as the exact integer arithmetic the parties compute.

A program is a list of ops on a batch of flat integer tensors [N, D] (D = C*H*W in torch's
flatten order). Public parts (shapes, shifts, clamp bounds, comparison bit lengths) go to every
party; secret parts (weight codes, requantization multipliers and offsets) only to the model owner,
who secret-shares them. `run_reference` is the plaintext arithmetic the secure run must reproduce
bit for bit, and `analyse` bounds every intermediate value from the secret values and the input
range, so the engine's field is chosen so that nothing wraps.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ...errors import SecquantError

INT64_SAFE_BITS = 62  # the reference computes in int64 only when every bound fits in 62 bits


@dataclass
class Program:
    """Public description (`ops`, `input`) plus the owner's secret arrays (`secrets`, by op index and name)."""

    ops: list[dict[str, Any]]
    input: dict[str, Any]           # client-side input quantizer: scale, zero_point, qmin, qmax, shape, smooth
    secrets: dict[str, np.ndarray] = field(default_factory=dict)
    bit_length: int | None = None   # secure integer bit length l (set by `analyse`); field p > 2^(l + k + 1)
    stats: dict[str, Any] = field(default_factory=dict)

    def public(self) -> dict[str, Any]:
        """Everything every party may see: no weight, multiplier or offset value (only their shapes)."""
        return {"ops": self.ops, "input": self.input, "bit_length": self.bit_length,
                "secret_shapes": {k: list(v.shape) for k, v in self.secrets.items()}}

    def public_json(self) -> str:
        return json.dumps(self.public(), sort_keys=True)


def conv_index(c: int, h: int, w: int, kernel, stride, padding) -> tuple[np.ndarray, int, int]:
    """im2col gather: idx [C*kh*kw, Ho*Wo] into a flat [C*H*W + 1] input whose last entry is the zero pad."""
    kh, kw = kernel
    sh, sw = stride
    ph, pw = padding
    ho = (h + 2 * ph - kh) // sh + 1
    wo = (w + 2 * pw - kw) // sw + 1
    if ho < 1 or wo < 1:
        raise SecquantError(f"a {kh}x{kw} kernel does not fit a {h}x{w} input")
    oy = np.arange(ho)[:, None] * sh + np.arange(kh)[None, :] - ph          # [ho, kh]
    ox = np.arange(wo)[:, None] * sw + np.arange(kw)[None, :] - pw          # [wo, kw]
    yy = oy.T[:, None, :, None]                                             # [kh, 1, ho, 1]
    xx = ox.T[None, :, None, :]                                             # [1, kw, 1, wo]
    inside = (yy >= 0) & (yy < h) & (xx >= 0) & (xx < w)                    # [kh, kw, ho, wo]
    flat = np.clip(yy, 0, h - 1) * w + np.clip(xx, 0, w - 1)
    ch = np.arange(c)[:, None, None, None, None] * (h * w)
    idx = np.where(inside[None], ch + flat[None], c * h * w)                # [c, kh, kw, ho, wo]
    return idx.reshape(c * kh * kw, ho * wo), ho, wo


def pool_index(c: int, h: int, w: int, kernel, stride) -> tuple[np.ndarray, int, int]:
    """Window gather for pooling without padding: idx [kh*kw, C*Ho*Wo] into a flat [C*H*W] input."""
    idx, ho, wo = conv_index(1, h, w, kernel, stride, (0, 0))               # [kh*kw, ho*wo]
    full = idx[:, None, :] + (np.arange(c) * h * w)[None, :, None]
    return full.reshape(idx.shape[0], c * ho * wo), ho, wo


def _pad(x: np.ndarray) -> np.ndarray:
    return np.concatenate([x, np.zeros((x.shape[0], 1), dtype=x.dtype)], axis=1)


def _floor_div_pow2(v: np.ndarray, f: int) -> np.ndarray:
    return v >> f if v.dtype != object else np.vectorize(lambda a: a >> f, otypes=[object])(v)


def run_reference(prog: Program, x: np.ndarray, dtype=None, trace: list | None = None) -> dict[str, np.ndarray]:
    """The integer arithmetic of `prog` on centered input codes x [N, D]: {'logits', 'labels'}.

    Computed in int64 when `analyse` proved every value fits, else in Python integers (exact either way).
    `trace`, if given, receives each op's output (and, for requant/logits, the value before truncation)."""
    if dtype is None:
        dtype = np.int64 if prog.stats.get("max_bits", INT64_SAFE_BITS + 1) <= INT64_SAFE_BITS else object
    v = np.asarray(x).astype(dtype)
    out: dict[str, np.ndarray] = {}
    for i, op in enumerate(prog.ops):
        kind = op["op"]
        if kind == "conv":
            w = prog.secrets[f"{i}.weight"].astype(dtype)
            idx = conv_index(*op["in_shape"], op["kernel"], op["stride"], op["padding"])[0]
            cols = _pad(v)[:, idx]                                             # [N, K, P]
            v = np.matmul(w[None], cols).reshape(v.shape[0], -1)
        elif kind == "dense":
            v = v @ prog.secrets[f"{i}.weight"].astype(dtype).T
        elif kind in ("sumpool", "maxpool"):
            idx, _, _ = pool_index(*op["in_shape"], op["kernel"], op["stride"])
            win = v[:, idx]                                                    # [N, k, D']
            v = win.sum(axis=1) if kind == "sumpool" else win.max(axis=1)
        elif kind == "requant":
            m, n = prog.secrets[f"{i}.mult"].astype(dtype), prog.secrets[f"{i}.offset"].astype(dtype)
            u = v * m + n
            if trace is not None:
                trace.append(u)
            v = np.clip(_floor_div_pow2(u, op["shift"]), op["lo"], op["hi"])
        elif kind == "logits":
            m, n = prog.secrets[f"{i}.mult"].astype(dtype), prog.secrets[f"{i}.offset"].astype(dtype)
            v = v * m + n
            out["logits"] = v
            out["labels"] = np.argmax(v, axis=1)
        else:
            raise ValueError(f"unknown op {kind!r}")
        if trace is not None:
            trace.append(v)
    return out


def bits_signed(lo: int, hi: int) -> int:
    """Smallest l with -2^(l-1) <= lo and hi < 2^(l-1)."""
    m = max(-int(lo), int(hi) + 1, 1)
    return (m - 1).bit_length() + 1


def analyse(prog: Program) -> Program:
    """Interval bounds of every intermediate value over all inputs in the input code range (exact
    integers, from the secret values), the comparison bit length of each secure comparison and
    truncation, and the secure integer bit length l: every value and difference stays below 2^(l-1)."""
    inp = prog.input
    d = int(np.prod(inp["shape"]))
    lo = np.full((1, d), inp["lo"], dtype=object)
    hi = np.full((1, d), inp["hi"], dtype=object)
    need = [bits_signed(inp["lo"], inp["hi"])]
    bounds: list[tuple[np.ndarray, np.ndarray]] = []  # per element, in run_reference's trace order (owner only)
    for i, op in enumerate(prog.ops):
        kind = op["op"]
        if kind in ("conv", "dense"):
            w = prog.secrets[f"{i}.weight"].astype(object)
            wp, wn = np.where(w > 0, w, 0), np.where(w < 0, w, 0)
            if kind == "conv":
                idx = conv_index(*op["in_shape"], op["kernel"], op["stride"], op["padding"])[0]
                clo, chi = _pad(lo)[:, idx], _pad(hi)[:, idx]
                lo, hi = ((np.matmul(wp[None], clo) + np.matmul(wn[None], chi)).reshape(1, -1),
                          (np.matmul(wp[None], chi) + np.matmul(wn[None], clo)).reshape(1, -1))
            else:
                lo, hi = lo @ wp.T + hi @ wn.T, hi @ wp.T + lo @ wn.T
        elif kind in ("sumpool", "maxpool"):
            idx, _, _ = pool_index(*op["in_shape"], op["kernel"], op["stride"])
            wlo, whi = lo[:, idx], hi[:, idx]
            if kind == "maxpool":
                op["cmp_bits"] = bits_signed(int((wlo.min(axis=1) - whi.max(axis=1)).min()),
                                             int((whi.max(axis=1) - wlo.min(axis=1)).max()))
                need.append(op["cmp_bits"])
                lo, hi = wlo.max(axis=1), whi.max(axis=1)
            else:
                lo, hi = wlo.sum(axis=1), whi.sum(axis=1)
        elif kind in ("requant", "logits"):
            m = prog.secrets[f"{i}.mult"].astype(object)
            n = prog.secrets[f"{i}.offset"].astype(object)
            if (m < 0).any():
                raise ValueError("requantization multipliers must be non-negative (sign folded into weights)")
            vlo, vhi = lo * m + n, hi * m + n
            if kind == "requant":
                bounds.append((vlo, vhi))
            vb = bits_signed(int(vlo.min()), int(vhi.max()))
            need.append(vb)
            if kind == "logits":
                op["value_bits"] = vb
                # the engine's argmax compares differences of logits at the full bit length l
                need.append(bits_signed(int(vlo.min() - vhi.max()), int(vhi.max() - vlo.min())))
                lo, hi = vlo, vhi
                bounds.append((lo, hi))
                continue
            f = op["shift"]
            tlo, thi = np.floor_divide(vlo, 1 << f), np.floor_divide(vhi, 1 << f)
            op["trunc_bits"] = vb                                   # l for the engine's truncation
            op["fix_bits"] = f + 2                                  # y*2^f - v lies in (-2^f, 2^f]
            # + 1: probabilistic rounding (op "exact" False) may give floor + 1
            op["clamp_bits"] = bits_signed(int(tlo.min()) - op["hi"], int(thi.max()) + 1 - op["lo"])
            need += [op["fix_bits"], op["clamp_bits"]]
            lo, hi = np.clip(tlo, op["lo"], op["hi"]), np.clip(thi, op["lo"], op["hi"])
        else:
            raise ValueError(f"unknown op {kind!r}")
        bounds.append((lo, hi))
        need.append(bits_signed(int(lo.min()), int(hi.max())))
    prog.bit_length = max(need)
    prog.stats["max_bits"] = max(need)
    prog.stats["bounds"] = bounds
    return prog


def worst_case_input(prog: Program, channel: int = 0) -> np.ndarray:
    """The input [1, D] that maximizes the first layer's accumulator `channel` (each input code at the end
    of its range that its weight pulls towards): a value `analyse` must bound exactly, not loosely."""
    op = prog.ops[0]
    w = prog.secrets["0.weight"]
    lo, hi = prog.input["lo"], prog.input["hi"]
    d = int(np.prod(prog.input["shape"]))
    x = np.full(d, lo, dtype=np.int64)
    if op["op"] == "dense":
        x[w[channel] > 0] = hi
        return x[None]
    idx = conv_index(*op["in_shape"], op["kernel"], op["stride"], op["padding"])[0]
    interior = np.flatnonzero((idx < d).all(axis=0))        # an output position whose window has no padding
    taps = idx[:, interior[0] if len(interior) else 0]
    for k, t in enumerate(taps):
        if t < d:
            x[t] = hi if w[channel, k] > 0 else lo
    return x[None]
