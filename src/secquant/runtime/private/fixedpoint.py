"""The peer for the quantization claim: the float model under the same engine with MPyC's own secure
fixed-point numbers (SecFxp: every product truncated back to f fractional bits, ReLU and max pooling by
full-length comparisons), as in MPyC's CNN demo. BatchNorm is folded into the preceding layer in float.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.fx
from torch import nn

from .compile import UnsupportedLayerError
from .program import conv_index, pool_index


@dataclass
class FixedPointProgram:
    """Same interface as Program for the launcher: public ops, the owner's float arrays, the input shape."""

    ops: list[dict[str, Any]]
    input: dict[str, Any]
    secrets: dict[str, np.ndarray] = field(default_factory=dict)
    bit_length: int = 32
    frac_bits: int = 16

    def public_json(self) -> str:
        return json.dumps({"mode": "fixed-point", "ops": self.ops, "input": self.input, "bit_length": self.bit_length,
                           "frac_bits": self.frac_bits,
                           "secret_shapes": {k: list(v.shape) for k, v in self.secrets.items()}}, sort_keys=True)


def float_program(module: nn.Module, sample_shape: tuple[int, ...], bit_length: int = 32,
                  frac_bits: int = 16) -> FixedPointProgram:
    """A float chain (Conv2d/Linear [+ BatchNorm], ReLU, MaxPool2d, Flatten) as a fixed-point program."""
    graph = torch.fx.Tracer().trace(module)
    mods = dict(module.named_modules())
    shape = tuple(sample_shape)
    prog = FixedPointProgram(ops=[], input={"shape": list(shape), "sample_shape": list(shape)}, bit_length=bit_length,
                             frac_bits=frac_bits)
    last = None
    for node in graph.nodes:
        if node.op in ("placeholder", "output"):
            continue
        m = mods.get(node.target) if node.op == "call_module" else None
        if isinstance(m, nn.Conv2d):
            _, ho, wo = conv_index(*shape, m.kernel_size, m.stride, m.padding)
            last = len(prog.ops)
            prog.ops.append({"op": "conv", "in_shape": list(shape), "kernel": list(m.kernel_size),
                             "stride": list(m.stride), "padding": list(m.padding)})
            prog.secrets[f"{last}.weight"] = m.weight.detach().double().reshape(m.out_channels, -1).numpy()
            prog.secrets[f"{last}.bias"] = _bias(m, m.out_channels)[:, None].repeat(ho * wo, 1).reshape(-1)
            shape = (m.out_channels, ho, wo)
        elif isinstance(m, nn.Linear):
            last = len(prog.ops)
            prog.ops.append({"op": "dense"})
            prog.secrets[f"{last}.weight"] = m.weight.detach().double().numpy()
            prog.secrets[f"{last}.bias"] = _bias(m, m.out_features)
            shape = (m.out_features,)
        elif isinstance(m, nn.BatchNorm2d):
            g = (m.weight / torch.sqrt(m.running_var + m.eps)).detach().double().numpy()
            h = (m.bias - m.running_mean * (m.weight / torch.sqrt(m.running_var + m.eps))).detach().double().numpy()
            w, b = prog.secrets[f"{last}.weight"], prog.secrets[f"{last}.bias"].reshape(len(g), -1)
            prog.secrets[f"{last}.weight"] = w * g[:, None]
            prog.secrets[f"{last}.bias"] = (b * g[:, None] + h[:, None]).reshape(-1)
        elif isinstance(m, nn.ReLU):
            prog.ops.append({"op": "relu"})
        elif isinstance(m, nn.MaxPool2d):
            _, ho, wo = pool_index(*shape, (m.kernel_size,) * 2, (m.stride,) * 2)
            prog.ops.append({"op": "maxpool", "in_shape": list(shape), "kernel": [m.kernel_size] * 2,
                             "stride": [m.stride] * 2})
            shape = (shape[0], ho, wo)
        elif isinstance(m, nn.Flatten) or (node.op == "call_function" and node.target is torch.flatten):
            shape = (int(np.prod(shape)),)
        else:
            raise UnsupportedLayerError(f"fixed-point peer: unsupported {node.op} {node.target}")
    prog.ops.append({"op": "argmax"})
    return prog


def _bias(m: nn.Module, n: int) -> np.ndarray:
    return m.bias.detach().double().numpy() if m.bias is not None else np.zeros(n)


async def run_fixed_point(mpc, public: dict, secrets: dict | None, x: np.ndarray | None) -> dict:
    """One session of the fixed-point peer (party roles as in engine.run_program)."""
    import time

    from .engine import CLIENT, OWNER, _conv

    await mpc.start()
    t0 = time.perf_counter()
    secfxp = mpc.SecFxp(public["bit_length"], public["frac_bits"])
    d = int(np.prod(public["input"]["shape"]))
    n = int(await mpc.output(mpc.input(mpc.SecInt(16)(len(x) if mpc.pid == CLIENT else 0), senders=CLIENT)))

    def share(value, shape, sender):
        # integral=False for everyone: MPyC would mark the others' zeros integral and skip truncations they
        # then do not run in step with the sender (a deadlock)
        arr = value if mpc.pid == sender else np.zeros(shape)
        return mpc.input(secfxp.array(np.asarray(arr, dtype=np.float64), integral=False), senders=sender)

    v = share(x, (n, d), CLIENT)
    sec = {k: share(None if secrets is None else secrets[k], tuple(s), OWNER)
           for k, s in public["secret_shapes"].items()}
    for i, op in enumerate(public["ops"]):
        kind = op["op"]
        if kind == "conv":
            v = _conv(mpc, secfxp, v, sec[f"{i}.weight"], op) + sec[f"{i}.bias"]
        elif kind == "dense":
            v = v @ sec[f"{i}.weight"].T + sec[f"{i}.bias"]
        elif kind == "relu":
            v = (v >= 0) * v
        elif kind == "maxpool":
            idx, _, _ = pool_index(*op["in_shape"], op["kernel"], op["stride"])
            w = [v[:, idx[j]] for j in range(idx.shape[0])]
            while len(w) > 1:
                w = [mpc.np_maximum(w[j], w[j + 1]) for j in range(0, len(w) - 1, 2)] + ([w[-1]] if len(w) % 2 else [])
            v = w[0]
        elif kind == "argmax":
            labels = await mpc.output(mpc.np_argmax(v, axis=1), receivers=[CLIENT])
    seconds = time.perf_counter() - t0
    sent = sum(p.protocol.nbytes_sent for p in mpc.parties if p.pid != mpc.pid)
    await mpc.shutdown()
    out = {"pid": mpc.pid, "seconds": seconds, "bytes_sent": int(sent), "samples": n, "p": int(secfxp.field.order)}
    if mpc.pid == CLIENT:
        out["labels"] = [int(float(a)) for a in labels]
    return out
