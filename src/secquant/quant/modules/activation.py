"""Activation (operation) quantizers: static (calibrated ranges) or dynamic (run-time ranges)."""

from __future__ import annotations

import torch
from torch import nn

from ..schema import QuantArgs
from ..observers import OBSERVERS, MSEObserver, Observer, PercentileObserver
from ..primitives import PerTensor, PerToken, choose_qparams, fake_quantize, reduce_range


def make_observer(args: QuantArgs) -> Observer:
    if args.observer == "percentile":
        return PercentileObserver(args.percentile)
    if args.observer == "mse":
        return MSEObserver(bits=args.bits, signed=args.is_signed, symmetric=args.symmetric)
    return OBSERVERS[args.observer]()


class ActQuant(nn.Module):
    """Fake-quantizes a tensor flowing into a layer, as an integer kernel would see it.

    Static: `scale`/`zero_point` buffers, set by `freeze()` after an observer watched the
    calibration batches (while observing, values pass through unchanged). Dynamic: the range
    is computed from each input at run time, per token or per tensor; no buffers, no data.
    """

    def __init__(self, args: QuantArgs) -> None:
        super().__init__()
        self.args = args
        self.observer: Observer | None = None
        if not args.dynamic:
            self.register_buffer("scale", torch.ones(()))
            self.register_buffer("zero_point", torch.zeros((), dtype=torch.int32))
            self.calibrated = False

    def start_observing(self) -> None:
        if self.args.dynamic:
            return
        self.observer = make_observer(self.args)

    def freeze(self) -> None:
        """Turn the observed range into qparams and stop observing."""
        if self.args.dynamic or self.observer is None:
            return
        lo, hi = self.observer.compute_range()
        s, z = choose_qparams(torch.tensor(lo), torch.tensor(hi), self.args.bits,
                              self.args.is_signed, self.args.symmetric)
        self.scale.copy_(s)
        self.zero_point.copy_(z)
        self.observer = None
        self.calibrated = True

    def _load_from_state_dict(self, *args, **kwargs):
        if not self.args.dynamic:
            self.calibrated = True
        return super()._load_from_state_dict(*args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.args
        if a.dynamic:
            gran = PerToken() if a.granularity == "token" else PerTensor()
            lo, hi = reduce_range(x.detach().float(), gran)
            s, z = choose_qparams(lo, hi, a.bits, a.is_signed, a.symmetric)
            return fake_quantize(x, s, z, a.bits, a.is_signed, gran)
        if self.observer is not None:
            self.observer.update(x)
            return x
        if not self.calibrated:
            raise RuntimeError("static activation quantizer used before calibration")
        return fake_quantize(x, self.scale, self.zero_point, a.bits, a.is_signed, PerTensor())

    def extra_repr(self) -> str:
        a = self.args
        return f"bits={a.bits}, {'dynamic' if a.dynamic else 'static'}, {a.granularity}, symmetric={a.symmetric}"
