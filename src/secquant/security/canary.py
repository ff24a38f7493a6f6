"""Secret canary inputs: the run-time check for copies of the weights no checksum can read (ONNX
Runtime keeps its own), and a second line behind the checksums for the PyTorch module.

The canaries are drawn once per process from a secret seed (`secrets`; the seed is neither stored
nor logged), so an attacker cannot choose flips that are silent on them. They are realistic inputs
(the model's built-in data: the training split of a classifier, never the held-out split accuracy is
measured on; the built-in calibration sentences and random-vocabulary sentences for encoders;
random inputs otherwise), and the draw is extended until every unit that any input of the pool
switches on is on for at least one canary. A unit is an input element of a layer that multiplies it
by weights it holds, as that layer reads it (after its input quantizer: a value that rounds to 0
reads no weight), and an element of a ReLU/GELU input that is positive; for sequences ([N, T, C])
a channel. A flipped weight then moves the output of some canary whenever it moves any input's.
An encoder's embedding table is read row by row (a sentence reads its own tokens' rows only): its
canaries also carry rows of the most frequent tokens of realistic text, and `vocabulary_sweep` gives
a server a secret sweep over the whole vocabulary, one batch per check.
The reference outputs are taken right after the model was verified; `outputs_match` compares later runs.
"""

from __future__ import annotations

import random
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

CLASSIFIER_CANARIES = 64  # drawn at random; the coverage pass adds more (bench/integrity.py measures the bar)
ENCODER_CANARIES = 8  # short sentences: a canary run costs about one small request
_POOL = 1024  # candidate inputs the coverage pass may add from
_ENCODER_POOL = 128
_MAX_WORDS = 16
_TOKEN_ROWS, _TOKEN_LEN = 2, 128  # encoders: the most frequent tokens, in two extra sequences
_ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.LeakyReLU, nn.ELU, nn.Mish, nn.Hardswish)


@dataclass
class Canaries:
    """A batch of secret inputs (as the model's adapter runs them) and how much of the model they cover.

    Encoders also get `tokens`: sequences of the most frequent tokens of realistic text (in a secret
    order), so a flip in the embedding row of any common token moves a canary's output; a sentence's
    embedding reads only the rows of its own tokens."""

    batch: Any
    count: int
    units: int  # units that some input of the pool switches on
    covered: int  # of those, the ones active on at least one canary
    tokens: Any = None

    @property
    def batches(self) -> list[Any]:
        """What a canary run feeds the model, one batch after the other."""
        return [self.batch] + ([self.tokens] if self.tokens is not None else [])


def _is_activation(m: nn.Module) -> bool:
    name = type(m).__name__
    return isinstance(m, _ACTIVATIONS) or (name.endswith("Activation") and "GELU" in name.upper())


def _active_units(x: torch.Tensor) -> torch.Tensor:
    """Per sample, which units are on (> 0) in `x` ([N, units] bool): every element of a [N, C, H, W]
    or [N, F] tensor, every channel (last dim, at any position) of a [N, T, C] sequence."""
    pos = x.detach() > 0
    if pos.dim() == 3:
        return pos.any(dim=1)
    return pos.reshape(pos.shape[0], -1)


def _holds_weight(m: nn.Module) -> bool:
    return any(n in ("weight", "qweight") for n in list(m._parameters) + list(m._buffers))


def _unit_masks(module: nn.Module, run: Callable[[Any], Any], batch: Any) -> torch.Tensor:
    """[N, total units] bool: the units each sample of `batch` switches on (see the module docstring)."""
    from ..quant.modules import ActQuant

    found: list[torch.Tensor] = []

    def record(x, positive: bool) -> None:
        if isinstance(x, torch.Tensor) and x.is_floating_point() and x.dim() >= 2:
            found.append(_active_units(x if positive else x.abs()))

    handles = []
    for m in module.modules():
        if _is_activation(m):
            handles.append(m.register_forward_hook(lambda _m, i, _o: record(i[0] if i else None, True)))
        elif isinstance(m, ActQuant):  # what the layer's weights read: the quantized input
            handles.append(m.register_forward_hook(lambda _m, _i, o: record(o, False)))
        elif _holds_weight(m) and getattr(m, "input_quant", None) is None:
            handles.append(m.register_forward_hook(lambda _m, i, _o: record(i[0] if i else None, False)))
    try:
        with torch.no_grad():
            run(batch)
    finally:
        for h in handles:
            h.remove()
    return torch.cat(found, dim=1) if found else torch.zeros(0, 0, dtype=torch.bool)


def _pool(handle, rng: random.Random) -> list[Any]:
    """Candidate canaries: realistic inputs for the model (its adapter's), in a secret random order."""
    return handle.adapter.realistic_inputs(rng, _ENCODER_POOL if handle.adapter.takes_text else _POOL)


def draw_canaries(handle, module: nn.Module, count: int | None = None, *, seed: int | None = None,
                  max_extra: int | None = None) -> Canaries | None:
    """Secret canaries for `module` (run through `handle`): `count` drawn at random from a pool of realistic
    inputs, then inputs of the pool added (at most `max_extra`) until every unit the pool activates is
    active on some canary. `seed` is for tests and benchmarks only; by default it is secret and forgotten.
    None when no input can be made (a classifier of unknown input shape)."""
    rng = random.Random(secrets.randbits(128) if seed is None else seed)
    pool = _pool(handle, rng)
    if not pool:
        return None
    adapter = handle.adapter
    texts = adapter.takes_text
    count = min(len(pool), count or (ENCODER_CANARIES if texts else CLASSIFIER_CANARIES))
    max_extra = count if max_extra is None and texts else (3 * count if max_extra is None else max_extra)
    batch_of = adapter.collate

    def masks(items: list[Any]) -> torch.Tensor:
        step = 16 if texts else 256
        parts = [_unit_masks(module, lambda b: handle.run(module, b), batch_of(items[i:i + step]))
                 for i in range(0, len(items), step)]
        return torch.cat(parts, dim=0)

    all_masks = masks(pool)
    chosen = list(range(count))
    covered = all_masks[:count].any(dim=0) if all_masks.numel() else torch.zeros(0, dtype=torch.bool)
    extra = 0
    for i in range(count, len(pool)):
        if extra >= max_extra or not all_masks.numel():
            break
        if bool((all_masks[i] & ~covered).any()):
            chosen.append(i)
            covered |= all_masks[i]
            extra += 1
    reachable = all_masks.any(dim=0) if all_masks.numel() else covered
    items = [pool[i] for i in chosen]
    tokens = _frequent_token_batch(adapter, rng) if adapter.vocabulary_ids() else None
    return Canaries(batch_of(items), len(items), int(reachable.sum()), int((covered & reachable).sum()), tokens)


def vocabulary_sweep(adapter, rows_per_batch: int = 2) -> list[Any]:
    """Every token of the vocabulary, in a secret order, as batches of token rows: a server whose weights
    ORT holds runs one batch per check, so a flip in the embedding row of any token, however rare, is
    seen within len(batches) checks (the checksums cover every row of the PyTorch copy at every check).
    [] for models read by no vocabulary."""
    tokens = adapter.vocabulary_ids()
    random.Random(secrets.randbits(128)).shuffle(tokens)
    step = rows_per_batch * (_TOKEN_LEN - 2)
    return [adapter.token_rows(tokens[i:i + step], _TOKEN_LEN) for i in range(0, len(tokens), step)]


def _frequent_token_batch(adapter, rng: random.Random) -> Any:
    """Rows holding the most frequent tokens of realistic text (not the evaluation sentences), shuffled with
    the secret generator."""
    top = adapter.frequent_token_ids(_TOKEN_ROWS * (_TOKEN_LEN - 2))
    rng.shuffle(top)
    return adapter.token_rows(top, _TOKEN_LEN)


def outputs_match(ref: torch.Tensor, got: torch.Tensor, rel: float = 1e-5) -> bool:
    """Whether a canary run gives the reference outputs (up to float noise): same shape, finite, every
    element within `rel` of the largest reference magnitude."""
    if got.shape != ref.shape or not bool(torch.isfinite(got).all()):
        return False
    tol = rel * float(ref.abs().max()) + 1e-6
    return float((got.float() - ref.float()).abs().max()) <= tol
