"""Quantized LSTM and GRU: every weight_ih / weight_hh (per layer and direction) quantized, the recurrence run here.

Each weight is a `QuantMatrix` child named like torch's parameter (`weight_ih_l0`, `weight_hh_l1_reverse`, ...),
biases stay float under torch's names, so a state dict reads like nn.LSTM's. With activation quantization the
input of every layer (the sequence, once per layer) and the hidden state fed back at every step are
fake-quantized as an integer kernel would see them (dynamic per token, or static ranges per layer and
direction), as torch's dynamic quantized LSTM does. Supports num_layers, bidirectional, batch_first, unbatched
input, initial states and packed sequences (each sequence stops at its own length); proj_size is refused.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..schema import QuantArgs
from .activation import ActQuant
from .weight import QuantizedWeightMixin


class QuantMatrix(QuantizedWeightMixin, nn.Module):
    """One quantized 2-D weight (rows x cols) that a recurrent layer multiplies by."""

    layer_type = "Matrix"

    def __init__(self, rows: int, cols: int, wargs: QuantArgs) -> None:
        nn.Module.__init__(self)
        self._init_weight((rows, cols), wargs)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return F.linear(x, self.dequantized_weight(), bias)


class _QuantRecurrent(nn.Module):
    layer_type = "RNN"
    gates = 1

    def __init__(self, input_size: int, hidden_size: int, num_layers: int, bias: bool, batch_first: bool,
                 bidirectional: bool, wargs: QuantArgs, aargs: QuantArgs | None) -> None:
        super().__init__()
        self.input_size, self.hidden_size, self.num_layers = input_size, hidden_size, num_layers
        self.bias, self.batch_first, self.bidirectional = bias, batch_first, bidirectional
        self.weight_args = wargs
        ndir = 2 if bidirectional else 1
        rows = self.gates * hidden_size
        for sfx, layer, _ in self._cells():
            cols = input_size if layer == 0 else hidden_size * ndir
            self.add_module(f"weight_ih{sfx}", QuantMatrix(rows, cols, wargs))
            self.add_module(f"weight_hh{sfx}", QuantMatrix(rows, hidden_size, wargs))
            for kind in ("ih", "hh"):
                setattr(self, f"bias_{kind}{sfx}",
                        nn.Parameter(torch.zeros(rows), requires_grad=False) if bias else None)
        self.input_quants = nn.ModuleList(ActQuant(aargs) for _ in range(num_layers)) if aargs else None
        self.hidden_quants = nn.ModuleList(ActQuant(aargs) for _ in self._cells()) if aargs else None

    def _cells(self):
        """(suffix, layer, direction) in torch's order."""
        for layer in range(self.num_layers):
            for d in range(2 if self.bidirectional else 1):
                yield f"_l{layer}" + ("_reverse" if d else ""), layer, d

    @classmethod
    def from_float(cls, mod: nn.RNNBase, wargs: QuantArgs, aargs: QuantArgs | None):
        if getattr(mod, "proj_size", 0):
            raise ValueError("LSTM with proj_size is not supported")
        q = cls(mod.input_size, mod.hidden_size, mod.num_layers, mod.bias, mod.batch_first, mod.bidirectional,
                wargs, aargs)
        for sfx, _, _ in q._cells():
            for kind in ("ih", "hh"):
                getattr(q, f"weight_{kind}{sfx}").set_weight(getattr(mod, f"weight_{kind}{sfx}"))
                if mod.bias:
                    getattr(q, f"bias_{kind}{sfx}").data.copy_(getattr(mod, f"bias_{kind}{sfx}").detach().float())
        return q

    def config(self) -> dict:
        return {"input_size": self.input_size, "hidden_size": self.hidden_size, "num_layers": self.num_layers,
                "batch_first": self.batch_first, "bidirectional": self.bidirectional}

    def layer_info(self, source_type: str) -> dict:
        w = self.weight_ih_l0
        return {"type": self.layer_type, "source_type": source_type, "weight": w.weight_info(),
                "activation": None if self.input_quants is None else self.input_quants[0].args.model_dump(),
                "bias": self.bias, "config": self.config()}

    @staticmethod
    def _q(quants: nn.ModuleList | None, i: int, x: torch.Tensor) -> torch.Tensor:
        return x if quants is None else quants[i](x)

    def _initial(self, hx, batch: int, like: torch.Tensor):
        raise NotImplementedError

    def _step(self, xp: torch.Tensor, gh: torch.Tensor, state):
        """One time step from the input and hidden projections: (h, state)."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor | nn.utils.rnn.PackedSequence, hx=None):
        if isinstance(x, nn.utils.rnn.PackedSequence):  # run padded, each sequence stopping at its own length
            padded, lengths = nn.utils.rnn.pad_packed_sequence(x, batch_first=True)  # the original batch order
            out, h = self._run(padded, hx, True, lengths)
            return _repack(out, x), h
        return self._run(x, hx, self.batch_first, None)

    def _run(self, x: torch.Tensor, hx, batch_first: bool, lengths: torch.Tensor | None):
        """The recurrence; with `lengths` (x padded), steps past a sequence's length keep its state."""
        if lengths is not None:
            valid = torch.arange(x.shape[1])[None, :] < lengths[:, None]  # [batch, time]
        unbatched = x.dim() == 2
        if unbatched:  # computed as a batch of one; every tensor inside is [batch, ...] (canaries read it so)
            x = x.unsqueeze(0)
            hx = None if hx is None else tuple(h.unsqueeze(1) for h in hx) if isinstance(hx, tuple) \
                else hx.unsqueeze(1)
        elif not batch_first:
            x = x.transpose(0, 1)
        states = self._initial(hx, x.shape[0], x)
        finals = []
        layer_in = x  # [batch, time, features]
        for layer in range(self.num_layers):
            xq = self._q(self.input_quants, layer, layer_in)
            outs = []
            for idx, (sfx, lyr, d) in enumerate(self._cells()):
                if lyr != layer:
                    continue
                xp = getattr(self, f"weight_ih{sfx}")(xq, getattr(self, f"bias_ih{sfx}"))
                w_hh, b_hh = getattr(self, f"weight_hh{sfx}"), getattr(self, f"bias_hh{sfx}")
                state = states[idx]
                ys = []
                for t in (range(x.shape[1] - 1, -1, -1) if d else range(x.shape[1])):
                    gh = w_hh(self._q(self.hidden_quants, idx, state[0]), b_hh)
                    h, new = self._step(xp[:, t], gh, state)
                    if lengths is not None:
                        m = valid[:, t, None]
                        h, new = h * m, tuple(torch.where(m, n, o) for n, o in zip(new, state))
                    state = new
                    ys.append(h)
                outs.append(torch.stack(ys[::-1] if d else ys, 1))
                finals.append(state)
            layer_in = torch.cat(outs, -1)
        out = layer_in.squeeze(0) if unbatched else layer_in if batch_first else layer_in.transpose(0, 1)
        return out, self._final(finals, unbatched)

    def _final(self, finals, unbatched: bool):
        raise NotImplementedError


class QuantLSTM(_QuantRecurrent):
    layer_type = "LSTM"
    gates = 4

    def _initial(self, hx, batch: int, like: torch.Tensor):
        n = self.num_layers * (2 if self.bidirectional else 1)
        if hx is None:
            z = like.new_zeros(n, batch, self.hidden_size)
            hx = (z, z)
        return [(hx[0][i], hx[1][i]) for i in range(n)]

    def _step(self, xp, gh, state):
        i, f, g, o = (xp + gh).chunk(4, -1)
        c = torch.sigmoid(f) * state[1] + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        return h, (h, c)

    def _final(self, finals, unbatched: bool):
        h, c = torch.stack([s[0] for s in finals]), torch.stack([s[1] for s in finals])
        return (h.squeeze(1), c.squeeze(1)) if unbatched else (h, c)


class QuantGRU(_QuantRecurrent):
    layer_type = "GRU"
    gates = 3

    def _initial(self, hx, batch: int, like: torch.Tensor):
        n = self.num_layers * (2 if self.bidirectional else 1)
        if hx is None:
            hx = like.new_zeros(n, batch, self.hidden_size)
        return [(hx[i],) for i in range(n)]

    def _step(self, xp, gh, state):
        xr, xz, xn = xp.chunk(3, -1)
        hr, hz, hn = gh.chunk(3, -1)
        r, z = torch.sigmoid(xr + hr), torch.sigmoid(xz + hz)
        n = torch.tanh(xn + r * hn)
        h = (1 - z) * n + z * state[0]
        return h, (h,)

    def _final(self, finals, unbatched: bool):
        h = torch.stack([s[0] for s in finals])
        return h.squeeze(1) if unbatched else h


RECURRENT = {"LSTM": QuantLSTM, "GRU": QuantGRU}


def _repack(out: torch.Tensor, like: nn.utils.rnn.PackedSequence) -> nn.utils.rnn.PackedSequence:
    """A padded output [batch, time, ...] (original batch order) packed in the layout of `like`."""
    o = out if like.sorted_indices is None else out.index_select(0, like.sorted_indices)
    data = torch.cat([o[:int(n), t] for t, n in enumerate(like.batch_sizes)])
    return nn.utils.rnn.PackedSequence(data, like.batch_sizes, like.sorted_indices, like.unsorted_indices)


def build_recurrent(t: str, info: dict, wargs: QuantArgs, aargs: QuantArgs | None) -> nn.Module:
    cfg = info["config"]
    return RECURRENT[t](int(cfg["input_size"]), int(cfg["hidden_size"]), int(cfg["num_layers"]), bool(info["bias"]),
                        bool(cfg["batch_first"]), bool(cfg["bidirectional"]), wargs, aargs)


def recurrent_sizes(layer: nn.RNNBase) -> tuple[list[int], dict]:
    """The first weight's shape and the sizes a manifest entry must match for a float LSTM/GRU."""
    return [int(s) for s in layer.weight_ih_l0.shape], {
        "input_size": layer.input_size, "hidden_size": layer.hidden_size, "num_layers": layer.num_layers,
        "batch_first": layer.batch_first, "bidirectional": layer.bidirectional}
