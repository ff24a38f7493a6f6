#!/usr/bin/env python
"""Requantization precision of private inference (builtin:digits w8a8), in plaintext: the integer
program's arithmetic (which the secure run reproduces bit for bit) against the PyTorch quantized model,
for several multiplier precisions P: label agreement, logit error, and the share of activation codes
that differ at each requantization. The secure cost grows with P (truncation and comparison bit lengths).

    PYTHONPATH=src .venv/bin/python bench/private_precision.py [--bits 12 16 20 24 32]

Prints one JSON line per precision.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import torch

torch.set_num_threads(1)

import secquant  # noqa: E402
from secquant.models.digits import splits  # noqa: E402
from secquant.quant.modules import ActQuant  # noqa: E402
from secquant.quant.primitives import PerTensor, quantize  # noqa: E402
from secquant.runtime.private import compile_program, encode_inputs, run_reference  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bits", type=int, nargs="+", default=[12, 16, 20, 24, 32])
    args = ap.parse_args()
    x = splits()["test_x"]
    with tempfile.TemporaryDirectory() as tmp:
        qm = secquant.quantize("builtin:digits", "w8a8", out=Path(tmp) / "w8a8")
    codes: list[np.ndarray] = []  # what PyTorch's activation quantizers produce (centered), layer by layer

    def hook(mod, inp, _out):
        a = mod.args
        q = quantize(inp[0].float(), mod.scale, mod.zero_point, a.bits, a.is_signed, PerTensor())
        codes.append((q.reshape(len(q), -1).long() - int(mod.zero_point)).numpy())

    for m in qm.module.modules():
        if isinstance(m, ActQuant):
            m.register_forward_hook(hook)
    with torch.no_grad():
        plain = qm.module(x).numpy()
    for p_bits in args.bits:
        prog = compile_program(qm.module, (1, 8, 8), p_bits)
        trace: list = []
        out = run_reference(prog, encode_inputs(prog.input, x), trace=trace)
        requant_out = requant_outputs(prog, trace)
        mismatch = [float((a != b).mean()) for a, b in zip(requant_out, codes[1:])]
        logits = out["logits"].astype(np.float64) / 2.0 ** prog.ops[-1]["shift"]
        print(json.dumps({"precision_bits": p_bits, "bit_length": prog.bit_length,
                          "label_agreement": float((out["labels"] == plain.argmax(1)).mean()),
                          "max_logit_diff": float(np.abs(logits - plain).max()),
                          "code_mismatch_per_requant": mismatch,
                          "shifts": [op["shift"] for op in prog.ops if "shift" in op]}), flush=True)


def requant_outputs(prog, trace: list) -> list[np.ndarray]:
    """The requantized codes in run_reference's trace (a requant op adds its pre-truncation value first)."""
    k, outs = 0, []
    for op in prog.ops:
        if op["op"] == "requant":
            outs.append(trace[k + 1])
            k += 2
        else:
            k += 1
    return outs


if __name__ == "__main__":
    main()
