"""Sequential GPTQ block by block (decoder layer by decoder layer), for models that run a list of blocks as a chain.

Without this, every GPTQ stage re-runs the calibration set through the model from the start up to that stage
(memory-light, but the work grows with the square of the depth). With a chain of blocks (a transformer's layers:
block i+1 reads exactly the tensor block i returned, checked on a batch), the inputs of the first block are
captured once for every calibration batch; each block then runs on those cached inputs alone: its stages are
quantized one after another (each stage's Hessians from inputs that went through the quantized stages before
it), and its outputs replace the cache as the next block's inputs. Only one block's inputs (hidden states and the
per-batch arguments the model passes every block: attention mask, position embeddings) are held in memory, twice
when GPTQ aims at the float model's outputs (the float model's own stream). The codes are those the model-level
pass would compute: every layer sees the same inputs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


class StageDone(Exception):
    """Raised from a hook once every layer of the current stage has seen the batch."""


@dataclass
class BlockInput:
    """One calibration batch as a block receives it."""

    hidden: torch.Tensor
    args: tuple
    kwargs: dict[str, Any]
    mask: torch.Tensor | None  # the batch's attention mask [batch, tokens] (real tokens), if any


def _hidden_of(args: tuple, kwargs: dict) -> tuple[torch.Tensor | None, tuple, dict]:
    if args and isinstance(args[0], torch.Tensor):
        return args[0], tuple(args[1:]), dict(kwargs)
    if isinstance(kwargs.get("hidden_states"), torch.Tensor):
        rest = dict(kwargs)
        return rest.pop("hidden_states"), tuple(args), rest
    return None, tuple(args), dict(kwargs)


def _output_hidden(out: Any) -> torch.Tensor | None:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    return None


def run_block(block: nn.Module, x: BlockInput) -> torch.Tensor:
    return _output_hidden(block(x.hidden, *x.args, **x.kwargs))


def batch_mask(batch: Any) -> torch.Tensor | None:
    m = batch.get("attention_mask") if isinstance(batch, dict) else None
    return m.bool() if isinstance(m, torch.Tensor) and m.dim() == 2 else None


@torch.no_grad()
def chained_blocks(model: nn.Module, stages: list[list[str]], batch: Any,
                   run_batch: Callable[[nn.Module, Any], Any]) -> tuple[str, nn.ModuleList] | None:
    """(name, blocks) of the module list holding the most GPTQ layers, if the model runs its blocks as a chain
    (each once, block i+1 reading the very tensor block i returned and otherwise the very arguments block 0 read)
    and every stage outside the blocks comes after them in forward order; else None (the caller then runs stage
    by stage over the whole model)."""
    names = [n for s in stages for n in s]
    best, count = None, 0
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) >= 2:
            k = sum(n.startswith(name + ".") for n in names)
            if k > count:
                best, count = (name, mod), k
    if best is None:
        return None
    prefix, blocks = best
    inside = [all(n.startswith(prefix + ".") for n in s) for s in stages]
    if any(not a and any(n.startswith(prefix + ".") for n in s) for s, a in zip(stages, inside)):
        return None  # a stage mixing layers inside and outside the blocks
    if False in inside and True in inside[inside.index(False):]:
        return None  # a GPTQ layer before (or between) the blocks
    ins: list[list[torch.Tensor | None]] = [[] for _ in blocks]
    outs: list[list[torch.Tensor | None]] = [[] for _ in blocks]
    others: list[tuple[tuple, dict]] = []  # what else each block reads besides the hidden state

    def pre(i: int, args: tuple, kwargs: dict) -> None:
        hidden, rest, kw = _hidden_of(args, kwargs)
        ins[i].append(hidden)
        others.append((rest, kw))

    hooks = []
    for i, b in enumerate(blocks):
        hooks.append(b.register_forward_pre_hook(lambda m, a, kw, i=i: pre(i, a, kw), with_kwargs=True))
        hooks.append(b.register_forward_hook(lambda m, a, o, i=i: outs[i].append(_output_hidden(o))))
    try:
        run_batch(model, batch)
    finally:
        for h in hooks:
            h.remove()
    if any(len(x) != 1 or x[0] is None for x in (*ins, *outs)):
        return None
    if any(ins[i + 1][0] is not outs[i][0] for i in range(len(blocks) - 1)):
        return None
    if not all(_same(o, others[0]) for o in others[1:]):
        return None  # a block reads something an earlier block made (T5's position bias): no cached replay
    return prefix, blocks


def _same(a: Any, b: Any) -> bool:
    """The very same arguments: tensors by identity, containers element by element, other values by equality."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return a is b
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    try:
        return bool(a == b)
    except Exception:
        return a is b


@torch.no_grad()
def capture_inputs(model: nn.Module, first: nn.Module, batches, run_batch) -> list[BlockInput]:
    """The first block's inputs for every batch (the forward stops there)."""
    got: list[BlockInput] = []
    mask: list[torch.Tensor | None] = [None]

    def pre(mod, args, kwargs):
        hidden, rest, kw = _hidden_of(args, kwargs)
        got.append(BlockInput(hidden.detach(), rest, kw, mask[0]))
        raise StageDone

    h = first.register_forward_pre_hook(pre, with_kwargs=True)
    try:
        for b in batches:
            mask[0] = batch_mask(b)
            try:
                run_batch(model, b)
            except StageDone:
                pass
    finally:
        h.remove()
    return got


@torch.no_grad()
def gptq_by_block(model: nn.Module, reference: nn.Module | None, prefix: str, stages: list[list[str]], batches,
                  run_batch, stage_inputs: Callable, quantize_stage: Callable[[list[str], Any], None],
                  tick: Callable[[int], None]) -> None:
    """Quantize the `stages` (all inside the blocks `prefix`.0, .1, ...) block by block on cached inputs.

    `stage_inputs(stage)` makes the stage's hook set (attach/start_batch/remove, as run_gptq's), and
    `quantize_stage(stage, hooks)` quantizes the stage from what the hooks gathered."""
    blocks = model.get_submodule(prefix)
    ref_blocks = reference.get_submodule(prefix) if reference is not None else None
    cache = capture_inputs(model, blocks[0], batches(), run_batch)
    ref_cache = capture_inputs(reference, ref_blocks[0], batches(), run_batch) if reference is not None else None
    by_block: dict[int, list[list[str]]] = {}
    for s in stages:
        by_block.setdefault(int(s[0][len(prefix) + 1:].split(".")[0]), []).append(s)
    for i, block in enumerate(blocks):
        for stage in by_block.get(i, []):
            hooks = stage_inputs(stage)
            try:
                for j, x in enumerate(cache):
                    hooks.start_batch(x.mask)
                    runs = [(ref_blocks[i], ref_cache[j])] if ref_cache is not None else []
                    for blk, inp in [*runs, (block, x)]:
                        try:
                            run_block(blk, inp)
                        except StageDone:
                            pass
            finally:
                hooks.remove()
            quantize_stage(stage, hooks)
            tick(1)
        for x in cache:  # this block's outputs are the next block's inputs
            x.hidden = run_block(block, x).detach()
        if ref_cache is not None:
            for x in ref_cache:
                x.hidden = run_block(ref_blocks[i], x).detach()
