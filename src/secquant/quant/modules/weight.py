"""Quantized weight storage shared by all quantized layers.

Weights are viewed as a 2-D matrix [rows, cols]: rows = output channels (embedding rows),
cols = the reduction dimension (in_features, or in_channels * kernel for convolutions), so
groups always run along the reduction dimension. Stored as plain tensors, safetensors-ready:

- `qweight`:           uint8, b-bit unsigned codes packed little-endian (see primitives.packing)
- `weight_scale`:      float32, compact qparam shape ([], [rows], [cols] or [rows, n_groups])
- `weight_zero_point`: uint8, in the same unsigned code space as qweight

dequantized = (code - zero_point) * scale. Signed schemes are stored shifted by -qmin, which
is exact and lets 2..8-bit codes share one packer.

Codebook formats (nf4, pow2, kmeans) store indices in `qweight` and the table in `codebook`:
nf4 / pow2 tables are scaled by `weight_scale` (absmax per granule); kmeans tables ([1, K]
per tensor or [rows, K] per channel) hold the values themselves.
"""

from __future__ import annotations

import math

import torch

from ..schema import QuantArgs
from ..nonuniform import kmeans_codebook, nearest_index, nf4_codebook, pow2_codebook
from ..primitives import (
    PerChannel, PerGroup, PerTensor, choose_qparams, dequantize, group_view, pack, packed_nbytes,
    qrange, quantize, reduce_range, unpack,
)


def qparam_shape(args: QuantArgs, rows: int, cols: int) -> tuple[int, ...]:
    g = args.granule()
    if isinstance(g, PerTensor):
        return ()
    if isinstance(g, PerChannel):
        if g.axis not in (0, 1, -1, -2):
            raise ValueError("weight channel axis must be 0 (output) or 1 (input) of the 2-D view")
        return (rows,) if g.axis in (0, -2) else (cols,)
    if isinstance(g, PerGroup):
        return (rows, math.ceil(cols / g.group_size))
    raise ValueError(f"granularity {args.granularity!r} is not valid for weights")


def granule_sum(err: torch.Tensor, gran) -> torch.Tensor:
    """Sum an elementwise error over each granule of a 2-D weight (the compact qparam shape)."""
    if isinstance(gran, PerGroup):
        return group_view(err, gran.group_size, gran.axis).sum(-1)
    if isinstance(gran, PerChannel):
        return err.sum(dim=1 if gran.axis in (0, -2) else 0)
    return err.sum()


def best_ratio(ratios: list[float], error_at) -> torch.Tensor:
    """Per granule, the shrink ratio with the smallest error_at(ratio) (the first one wins ties)."""
    best_err = best_r = None
    for r in ratios:
        err = error_at(r)
        if best_err is None:
            best_err, best_r = err, torch.full_like(err, r)
            continue
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_r = torch.where(better, torch.full_like(err, r), best_r)
    return best_r


def mse_range(w: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, args: QuantArgs,
              grid: int = 40, min_ratio: float = 0.6,
              importance: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-granule range shrink that minimizes the weight's squared quantization error.

    Data-free: reads only the weight. Every granule picks its own ratio in [min_ratio, 1].
    `importance` [cols] weighs each input column's error (GPTQ passes diag(H): the error that
    reaches the output, not the error in the weight).
    """
    gran = args.granule()

    def error_at(r: float) -> torch.Tensor:
        s, z = choose_qparams(lo * r, hi * r, args.bits, args.is_signed, args.symmetric)
        err = (dequantize(quantize(w, s, z, args.bits, args.is_signed, gran), s, z, gran) - w) ** 2
        return granule_sum(err if importance is None else err * importance, gran)

    r = best_ratio(torch.linspace(1.0, min_ratio, grid).tolist(), error_at)
    return lo * r, hi * r


def fixed_codebook(args: QuantArgs) -> torch.Tensor:
    return nf4_codebook() if args.format == "nf4" else pow2_codebook(args.bits)


def _codebook_mse_absmax(w: torch.Tensor, absmax: torch.Tensor, cb: torch.Tensor, gran,
                         grid: int = 20, min_ratio: float = 0.6) -> torch.Tensor:
    """Per-granule absmax shrink minimizing the squared error of a scaled fixed codebook (data-free)."""

    def error_at(r: float) -> torch.Tensor:
        a = absmax * r
        zeros = torch.zeros_like(a)
        vals = cb[nearest_index(dequantize(w, 1.0 / a, zeros, gran), cb)]
        return granule_sum((dequantize(vals, a, zeros, gran) - w) ** 2, gran)

    return absmax * best_ratio(torch.linspace(1.0, min_ratio, grid).tolist(), error_at)


class QuantizedWeightMixin:
    """Holds a packed quantized 2-D weight and dequantizes it (cached) for the float kernels."""

    weight_args: QuantArgs | None
    weight_shape: tuple[int, ...]
    # Plain tensor attributes computed from the stored tensors. The integrity guard checksums them like
    # every tensor the module holds, accepts their absence (the forward then recomputes them from the
    # checked tensors) and repairs them with `refresh_derived`.
    derived_tensors: tuple[str, ...] = ("_w_cache",)

    def _init_weight(self, weight_shape: tuple[int, ...], args: QuantArgs | None) -> None:
        self.weight_args = args
        self.weight_shape = tuple(int(s) for s in weight_shape)
        rows = self.weight_shape[0]
        cols = math.prod(self.weight_shape[1:])
        self.rows, self.cols = rows, cols
        self._w_cache: torch.Tensor | None = None
        if args is None:
            self.register_buffer("weight", torch.zeros(self.weight_shape))
            return
        self.register_buffer("qweight", torch.zeros(packed_nbytes(rows * cols, args.bits), dtype=torch.uint8))
        if args.format == "kmeans":
            tables = rows if args.granularity == "channel" else 1
            self.register_buffer("codebook", torch.zeros(tables, args.codebook_entries))
            return
        shape = qparam_shape(args, rows, cols)
        self.register_buffer("weight_scale", torch.ones(shape))
        if args.format == "int":
            self.register_buffer("weight_zero_point", torch.zeros(shape, dtype=torch.uint8))
        else:
            self.register_buffer("codebook", fixed_codebook(args))

    def set_weight(self, w: torch.Tensor, w_range: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        """Quantize a float weight (RTN) into the packed buffers; `w_range` overrides the range choice."""
        w = w.detach().float().reshape(self.weight_shape)
        if not torch.isfinite(w).all():
            raise ValueError("weight contains NaN or Inf")
        self._w_cache = None
        args = self.weight_args
        if args is None:
            self.weight.copy_(w)
            return
        w2 = w.reshape(self.rows, self.cols)
        if args.format != "int":
            self._set_codebook_weight(w2, w_range)
            return
        gran = args.granule()
        lo, hi = reduce_range(w2, gran) if w_range is None else w_range
        if args.observer == "mse" and w_range is None:
            lo, hi = mse_range(w2, lo, hi, args)
        scale, zp = choose_qparams(lo, hi, args.bits, args.is_signed, args.symmetric)
        self.set_quantized(quantize(w2, scale, zp, args.bits, args.is_signed, gran), scale, zp)

    def _set_codebook_weight(self, w2: torch.Tensor, w_range=None) -> None:
        """Indices into a fixed table scaled by absmax (nf4, pow2) or into fitted k-means tables."""
        args = self.weight_args
        if args.format == "kmeans":
            per_channel = args.granularity == "channel"
            cb = kmeans_codebook(w2, args.codebook_entries, per_channel)
            idx = nearest_index(w2 if per_channel else w2.reshape(1, -1), cb)
            self.codebook.copy_(cb)
        else:
            gran = args.granule()
            lo, hi = reduce_range(w2, gran) if w_range is None else w_range
            absmax = torch.maximum(-lo, hi).clamp(min=1e-12)
            cb = self.codebook
            zeros = torch.zeros_like(absmax)
            if args.observer == "mse" and w_range is None:
                absmax = _codebook_mse_absmax(w2, absmax, cb, gran)
            idx = nearest_index(dequantize(w2, 1.0 / absmax, zeros, gran), cb)
            self.weight_scale.copy_(absmax.reshape(self.weight_scale.shape))
        self.qweight.copy_(pack(idx.reshape(-1).to(torch.int64), args.bits))
        self._w_cache = None

    def set_quantized(self, q: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor) -> None:
        """Store signed/unsigned integers q (2-D) with their qparams, shifted to unsigned codes."""
        args = self.weight_args
        qmin, _ = qrange(args.bits, args.is_signed)
        self.qweight.copy_(pack((q - qmin).to(torch.int64), args.bits))
        self.weight_scale.copy_(scale.reshape(self.weight_scale.shape))
        self.weight_zero_point.copy_((zp.to(torch.int64) - qmin).reshape(self.weight_zero_point.shape))
        self._w_cache = None

    def weight_codes(self) -> torch.Tensor:
        """Unpacked unsigned codes as a [rows, cols] uint8 tensor."""
        return unpack(self.qweight, self.weight_args.bits, self.rows * self.cols).reshape(self.rows, self.cols)

    def dequantized_weight(self) -> torch.Tensor:
        """The float weight the integer weight stands for, in the original shape (cached)."""
        if self.weight_args is None:
            return self.weight
        if self._w_cache is None:
            a = self.weight_args
            codes = self.weight_codes()
            if a.format == "int":
                deq = dequantize(codes, self.weight_scale, self.weight_zero_point, a.granule())
            elif a.format == "kmeans":
                idx = codes.long()
                deq = torch.gather(self.codebook.expand(self.rows, -1), 1, idx)
            else:
                vals = self.codebook[codes.long()]
                deq = dequantize(vals, self.weight_scale, torch.zeros_like(self.weight_scale), a.granule())
            self._w_cache = deq.reshape(self.weight_shape).contiguous()  # one dense copy: kernels and checksums read it as is
        return self._w_cache

    def refresh_derived(self) -> None:
        """Recompute the derived tensors (the dequantized-weight cache) from the stored ones, now."""
        self._w_cache = None
        self.dequantized_weight()

    def weight_space(self, w: torch.Tensor) -> torch.Tensor:
        """A float weight [rows, cols] mapped to what the codes quantize (identity here; QuantLinear
        folds in its smoothing scale and rotation)."""
        return w

    def float_weight(self) -> torch.Tensor:
        """The float weight [rows, cols] the layer computes with (QuantLinear undoes smoothing and rotation)."""
        return self.dequantized_weight().reshape(self.rows, self.cols).float()

    def _load_from_state_dict(self, *args, **kwargs):  # noqa: D401 - torch hook
        self._w_cache = None
        return super()._load_from_state_dict(*args, **kwargs)

    def weight_info(self) -> dict:
        a = self.weight_args
        return {
            "shape": list(self.weight_shape),
            "args": None if a is None else a.model_dump(exclude_defaults=False),
        }
