"""Run an integer `Program` under MPyC: Shamir secret sharing over GF(p), 3 parties, threshold 1.

Party 0 is the client (inputs its codes, alone receives the output), party 1 the model owner (inputs
the weights, multipliers and offsets), party 2 a helper holding nothing of its own. Every protocol is
MPyC's: secure matrix products, `np_trunc` (truncation), `np_sgn` (comparison), `np_argmax`. secquant's
part is the mapping: exact floor division as MPyC's truncation corrected by one MPyC comparison, and
every comparison run at the bit length `analyse` proved sufficient.
"""

from __future__ import annotations

import sys
import time

import numpy as np

from .program import conv_index, pool_index

CLIENT, OWNER, HELPER = 0, 1, 2
MAX_BATCH = 256


def import_mpyc(argv: list[str]):
    """MPyC's runtime object, configured from `argv`: MPyC reads its options (parties, TLS, logging)
    from sys.argv when first imported, so the real command line is set aside while it does."""
    if "mpyc.runtime" in sys.modules:
        return sys.modules["mpyc.runtime"].mpc
    saved = sys.argv
    sys.argv = ["secquant-party", *argv]
    try:
        from mpyc.runtime import mpc
    finally:
        sys.argv = saved
    return mpc


def _input(mpc, sectype, value, shape, sender):
    """Secret-share `value` (held by `sender`; the others pass zeros of the public shape)."""
    arr = value if mpc.pid == sender else np.zeros(shape, dtype=np.int64)
    return mpc.input(sectype.array(np.asarray(arr, dtype=np.int64)), senders=sender)


def _less_than_zero(mpc, a, bits: int):
    return mpc.np_sgn(a, l=bits, LT=True)


def _maximum(mpc, a, b, bits: int):
    return a + _less_than_zero(mpc, a - b, bits) * (b - a)


def _requant(mpc, v, m, n, op):
    """clamp(floor((m v + n) / 2^F), lo, hi): MPyC's probabilistic truncation gives floor or floor + 1;
    one comparison of the remainder (in (-2^F, 2^F]) removes the + 1, so the result is exact (op "exact":
    False keeps MPyC's probabilistic rounding: cheaper, off by one now and then)."""
    f = op["shift"]
    u = v * m + n
    y = mpc.np_trunc(u, f=f, l=op["trunc_bits"])
    if op.get("exact", True):
        y = y - _less_than_zero(mpc, u - y * (1 << f), op["fix_bits"])
    lo, hi = op["lo"], op["hi"]
    y = y + _less_than_zero(mpc, y - lo, op["clamp_bits"]) * (lo - y)
    return y + _less_than_zero(mpc, hi - y, op["clamp_bits"]) * (hi - y)


def _conv(mpc, sectype, v, w, op):
    n = v.shape[0]
    idx, ho, wo = conv_index(*op["in_shape"], op["kernel"], op["stride"], op["padding"])
    padded = mpc.np_concatenate((v, sectype.array(np.zeros((n, 1), dtype=np.int64))), axis=1)
    cols = padded.T[idx.reshape(-1)].reshape(idx.shape[0], idx.shape[1] * n)      # [K, P*N]
    acc = (w @ cols).reshape(w.shape[0], idx.shape[1], n)                          # [O, P, N]
    return mpc.np_transpose(acc, (2, 0, 1)).reshape(n, w.shape[0] * ho * wo)


async def run_program(mpc, public: dict, secrets: dict | None, codes: np.ndarray | None,
                      reveal_logits: bool = False) -> dict:
    """One session: share inputs, compute, open the labels (and logits if asked) to the client only.
    Returns what this party learns plus timing and the bytes it sent."""
    await mpc.start()
    t0 = time.perf_counter()
    sectype = mpc.SecInt(public["bit_length"])
    d = int(np.prod(public["input"]["shape"]))
    # the batch size is the client's public input (the others cap it: a session costs them work)
    n = int(await mpc.output(mpc.input(sectype(len(codes) if mpc.pid == CLIENT else 0), senders=CLIENT)))
    if not 1 <= n <= MAX_BATCH:
        await mpc.shutdown()
        raise ValueError(f"batch of {n} samples refused (1..{MAX_BATCH})")
    v = _input(mpc, sectype, codes, (n, d), CLIENT)
    sec = {k: _input(mpc, sectype, None if secrets is None else secrets[k], tuple(shape), OWNER)
           for k, shape in public["secret_shapes"].items()}
    labels = logits = None
    for i, op in enumerate(public["ops"]):
        kind = op["op"]
        if kind == "conv":
            v = _conv(mpc, sectype, v, sec[f"{i}.weight"], op)
        elif kind == "dense":
            v = v @ sec[f"{i}.weight"].T
        elif kind in ("sumpool", "maxpool"):
            idx, _, _ = pool_index(*op["in_shape"], op["kernel"], op["stride"])
            windows = [v[:, idx[j]] for j in range(idx.shape[0])]
            while len(windows) > 1:  # a tree of pairwise sums or maxima: log2(k*k) rounds
                pairs = [(windows[j], windows[j + 1]) for j in range(0, len(windows) - 1, 2)]
                merged = [a + b if kind == "sumpool" else _maximum(mpc, a, b, op["cmp_bits"]) for a, b in pairs]
                windows = merged + ([windows[-1]] if len(windows) % 2 else [])
            v = windows[0]
        elif kind == "requant":
            v = _requant(mpc, v, sec[f"{i}.mult"], sec[f"{i}.offset"], op)
        elif kind == "logits":
            v = v * sec[f"{i}.mult"] + sec[f"{i}.offset"]
            labels = await mpc.output(mpc.np_argmax(v, axis=1), receivers=[CLIENT])
            if reveal_logits:
                logits = await mpc.output(v, receivers=[CLIENT])
    seconds = time.perf_counter() - t0
    sent = sum(p.protocol.nbytes_sent for p in mpc.parties if p.pid != mpc.pid)
    await mpc.shutdown()
    out = {"pid": mpc.pid, "seconds": seconds, "bytes_sent": int(sent), "samples": n,
           "p": int(sectype.field.order)}
    if mpc.pid == CLIENT:
        out["labels"] = [int(x) for x in labels]
        if logits is not None:
            out["logits"] = [[str(int(x)) for x in row] for row in np.asarray(logits).reshape(n, -1)]
    return out
