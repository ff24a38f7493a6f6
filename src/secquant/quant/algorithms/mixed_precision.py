"""Accuracy-driven mixed precision: a search that returns a recipe (bits per layer, or float).

Registered by its config type (`MixedPrecision`) like the weight algorithms; `secquant.tune` runs it
on a model's evaluation data and quantizes with the recipe it returns. Weights only, data-free
round-to-nearest per candidate width; activations stay in float.

1. Sensitivity: every quantizable layer is quantized alone at every candidate width while the rest
   of the model stays in float, and the metric drop is measured on the first `tuning_samples` samples.
2. Search (greedy): start with every layer at the widest candidate and verify on the full evaluation
   set. If that already breaks the tolerance, the most sensitive layers are put back in float one at
   a time (never all of them). Then, repeatedly, the layer whose next narrower width costs the least
   sensitivity per byte saved is narrowed and the full set re-checked; a step that breaks the
   tolerance is undone and that layer is not narrowed again.
3. The result is a Recipe with one override per layer (exact name, its bits or `skip: true`), and a
   summary of the decisions and measurements (recorded in the artifact's manifest as `tuning`).
"""

from __future__ import annotations

import copy
import math
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ...errors import CalibrationError, ModelError, RecipeError
from ..modules import quantize_module, serialized_size
from ..schema import Override, QuantArgs, Recipe
from .base import handles
from .rtn import plan, set_submodule, unfuse_attention

METRICS = ("accuracy", "cosine")
DEFAULT_CANDIDATES = (2, 3, 4, 8)
# For the accuracy metric the search orders moves by accuracy drop plus this many points per unit of
# (1 - cosine) of the logits: on a small subset most accuracy drops are 0, the cosine breaks the ties.
COSINE_POINTS = 100.0
_EPS = 1e-9
Batch = tuple[Any, Any]  # (inputs, labels or None)


@dataclass(frozen=True)
class MixedPrecision:
    """What the search aims at: the largest metric drop (accuracy points, or mean cosine), an optional
    size budget (bytes of the saved weights) and time budget (seconds), and the widths to choose from."""

    max_drop: float
    metric: str | None = None
    size_budget: int | None = None
    time_budget: float | None = None
    candidates: tuple[int, ...] = DEFAULT_CANDIDATES

    def __post_init__(self) -> None:
        d = self.max_drop
        if isinstance(d, bool) or not isinstance(d, (int, float)) or math.isnan(d):
            raise RecipeError(f"max_drop must be a number (accuracy points or cosine), got {d!r}")
        if d < 0:
            raise RecipeError(f"max_drop must be >= 0 (the largest metric drop you accept), got {d}")
        if self.metric is not None and self.metric not in METRICS:
            raise RecipeError(f"unknown metric {self.metric!r}; choose 'accuracy' (classifiers, max_drop in accuracy "
                              "points) or 'cosine' (encoders, max_drop in mean cosine to the float model)")
        b = self.size_budget
        if b is not None and (isinstance(b, bool) or not isinstance(b, int) or b <= 0):
            raise RecipeError(f"size_budget must be a positive number of bytes, got {b!r}")
        t = self.time_budget
        if t is not None and (isinstance(t, bool) or not isinstance(t, (int, float)) or math.isnan(t) or t < 0):
            raise RecipeError(f"time_budget must be a number of seconds >= 0, got {t!r}")
        c = self.candidates
        if isinstance(c, (int, str)) or not isinstance(c, Iterable):
            raise RecipeError(f"candidates must be a list of bit widths (2..8), got {c!r}")
        cands = list(c)
        if not cands or any(isinstance(x, bool) or not isinstance(x, int) or not 2 <= x <= 8 for x in cands):
            raise RecipeError(f"candidates must be a non-empty list of bit widths between 2 and 8, got {cands!r}")
        object.__setattr__(self, "max_drop", float(d))
        object.__setattr__(self, "candidates", tuple(sorted(set(cands), reverse=True)))


def candidate_args(bits: int) -> QuantArgs:
    """The weight scheme used for one candidate width (data-free).

    8: int8 per output channel, symmetric; 3..7: asymmetric groups of 128 with an MSE-searched
    range; 2: asymmetric groups of 64, MSE. A group longer than a row simply covers the whole row.
    """
    if bits == 8:
        return QuantArgs(bits=8, symmetric=True, granularity="channel", axis=0)
    group = 64 if bits == 2 else 128
    return QuantArgs(bits=bits, symmetric=False, granularity="group", group_size=group, observer="mse")


def _pattern(name: str) -> str:
    """A recipe pattern matching exactly this module name."""
    if any(c in name for c in "*?[]") or name.startswith("re:"):
        return "re:" + re.escape(name)
    return name


def tuned_recipe(bits_per_layer: dict[str, int | None], *, name: str = "tuned", description: str = "") -> Recipe:
    """A Recipe with one override per layer: its candidate scheme, or `skip: true` for float (None)."""
    widths = [b for b in bits_per_layer.values() if b is not None]
    if not widths:
        raise ModelError("a tuned recipe must quantize at least one layer")
    overrides = [Override(pattern=_pattern(n), skip=True) if b is None else
                 Override(pattern=_pattern(n), weights=candidate_args(b))
                 for n, b in bits_per_layer.items()]
    return Recipe(name=name, description=description, weights=candidate_args(max(widths)),
                  activations=None, overrides=overrides)


def _state_nbytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())


class Scorer:
    """Evaluation batches and the float model's outputs, computed once; scores a module on all of them
    or on the first samples. Accuracy needs labels on every batch; the metric is in percent points."""

    def __init__(self, batches: list[Batch], run_batch: Callable[[nn.Module, Any], torch.Tensor],
                 float_module: nn.Module, metric: str) -> None:
        if not batches:
            raise CalibrationError("the evaluation data is empty: tuning needs samples to measure the metric")
        if metric == "accuracy" and any(y is None for _, y in batches):
            raise CalibrationError("metric 'accuracy' needs labelled evaluation data (a 'labels' tensor); "
                                   "pass labelled data or use metric 'cosine'")
        self.metric, self.batches, self.run = metric, batches, run_batch
        with torch.no_grad():
            self.ref = [run_batch(float_module, x) for x, _ in batches]
        self.sizes = [int(o.shape[0]) for o in self.ref]
        self.correct_f = [0 if y is None else int((o.argmax(-1) == y).sum()) for (_, y), o in zip(batches, self.ref)]

    def n_batches(self, limit: int | None) -> int:
        if limit is None:
            return len(self.batches)
        n = k = 0
        while k < len(self.batches) and n < limit:
            n += self.sizes[k]
            k += 1
        return k

    @torch.no_grad()
    def score(self, module: nn.Module, limit: int | None = None, abort_above: float | None = None) -> dict[str, Any]:
        """value, float_value, drop (metric units: accuracy in percent / points) and cos_loss.

        With `abort_above`, stops as soon as the drop over all the batches scored is certain to exceed
        it whatever the remaining batches hold; `drop` is then a lower bound and `aborted` is True.
        """
        k = self.n_batches(limit)
        n_all = sum(self.sizes[:k])
        f_all = sum(self.correct_f[:k])
        n = correct_q = correct_f = 0
        cos = 0.0
        for i, ((x, y), out_f) in enumerate(zip(self.batches[:k], self.ref[:k])):
            out_q = self.run(module, x)
            if y is not None:
                correct_q += int((out_q.argmax(-1) == y).sum())
                correct_f += self.correct_f[i]
            a, b = out_q.reshape(out_q.shape[0], -1).float(), out_f.reshape(out_f.shape[0], -1).float()
            cos += float(torch.nn.functional.cosine_similarity(a, b, dim=-1).sum())
            n += int(out_q.shape[0])
            if abort_above is not None and n < n_all:
                if self.metric == "accuracy":  # even if every remaining sample were right
                    bound = 100.0 * (f_all - correct_q - (n_all - n)) / n_all
                else:  # 1 - cos >= 0 for every remaining sample
                    bound = (n - cos) / n_all
                if bound > abort_above:
                    return {"value": None, "float_value": None, "drop": bound, "cos_loss": None, "n": n,
                            "aborted": True}
        cos_loss = 1.0 - cos / n
        if self.metric == "accuracy":
            value, fvalue = 100.0 * correct_q / n, 100.0 * correct_f / n
            return {"value": value, "float_value": fvalue, "drop": 100.0 * (correct_f - correct_q) / n,
                    "cos_loss": cos_loss, "n": n, "aborted": False}
        return {"value": cos / n, "float_value": 1.0, "drop": cos_loss, "cos_loss": cos_loss, "n": n,
                "aborted": False}


class Workbench:
    """A private copy of the float model whose layers can be switched between float and candidates."""

    def __init__(self, float_module: nn.Module, layers: dict[str, str]) -> None:
        self.module = copy.deepcopy(float_module).eval()
        self.types = layers
        self.floats = {n: self.module.get_submodule(n) for n in layers}
        self.float_bytes = {n: _state_nbytes(m) for n, m in self.floats.items()}
        self.cache: dict[tuple[str, int], nn.Module] = {}
        self.qbytes: dict[tuple[str, int], int] = {}
        self.current: dict[str, int | None] = {n: None for n in layers}

    def quantized(self, name: str, bits: int) -> nn.Module:
        key = (name, bits)
        if key not in self.cache:
            try:
                q = quantize_module(self.floats[name], self.types[name], candidate_args(bits), None).eval()
            except (RuntimeError, ValueError) as e:
                raise ModelError(f"layer {name!r} cannot be quantized to {bits} bits: {e}") from None
            self.cache[key] = q
            self.qbytes[key] = _state_nbytes(q)
        return self.cache[key]

    def nbytes(self, name: str, bits: int | None) -> int:
        if bits is None:
            return self.float_bytes[name]
        self.quantized(name, bits)
        return self.qbytes[(name, bits)]

    def set(self, name: str, bits: int | None) -> None:
        if self.current[name] == bits:
            return
        old = self.current[name]
        if old is not None:
            self.cache[(name, old)]._w_cache = None  # drop the dequantized copy of a layer not in use
        set_submodule(self.module, name, self.floats[name] if bits is None else self.quantized(name, bits))
        self.current[name] = bits

    def apply(self, state: dict[str, int | None]) -> None:
        for n, b in state.items():
            self.set(n, b)


@dataclass
class SearchOutcome:
    """The recipe found, the JSON-able summary (without timing), and the measured model (its weights are
    what quantizing with the recipe gives, which the caller can check)."""

    recipe: Recipe
    summary: dict[str, Any]
    module: nn.Module
    goal_met: bool


class _Search:
    """One run of the search over a Workbench, verified against a Scorer (see the module docstring)."""

    def __init__(self, float_module: nn.Module, config: MixedPrecision, scorer: Scorer, tuning_samples: int,
                 progress, say, artifact_metadata: dict[str, str] | None) -> None:
        self.cfg, self.scorer, self.say, self.progress = config, scorer, say, progress
        self.t0 = time.perf_counter()
        self.deadline = None if config.time_budget is None else self.t0 + float(config.time_budget)
        base = Recipe(name="tune-base", weights=candidate_args(config.candidates[0]))
        float_module = copy.deepcopy(float_module).eval()
        unfuse_attention(float_module, base)  # attention projections are layers too (named as quantizing names them)
        layers = {n: t for n, (t, _, _) in plan(float_module, base).items()}
        if not layers:
            raise ModelError("the model has no quantizable layer (Linear, Conv1d/2d, Embedding): nothing to tune")
        self.names = list(layers)
        self.bench = Workbench(float_module, layers)
        self.n_tune = tuning_samples
        self.metadata = artifact_metadata
        self.unit = "accuracy points" if scorer.metric == "accuracy" else "mean cosine"
        self.sens: dict[str, dict[int, float]] = {n: {} for n in self.names}
        self.closs: dict[str, dict[int, float]] = {n: {} for n in self.names}
        self.stopped: str | None = None
        self.tried: list[tuple[dict[str, int | None], float, int]] = []
        self.steps = 0
        self.const_bytes = 0

    def time_up(self) -> bool:
        if self.deadline is not None and time.perf_counter() >= self.deadline:
            self.stopped = "time_budget"
        return self.stopped is not None

    def sensitivity(self) -> None:
        """Each layer alone at each width, on the tuning subset."""
        tick = self.progress("measuring sensitivity", len(self.names) * len(self.cfg.candidates))
        for n in self.names:
            for b in self.cfg.candidates:
                if self.time_up():
                    break
                self.bench.set(n, b)
                s = self.scorer.score(self.bench.module, self.n_tune)
                self.sens[n][b], self.closs[n][b] = s["drop"], s["cos_loss"]
                tick(1)
            self.bench.set(n, None)
            if self.stopped:
                break

    def proxy(self, n: str, b: int | None) -> float | None:
        if b is None:
            return 0.0
        if b not in self.sens[n]:
            return None
        extra = COSINE_POINTS * self.closs[n][b] if self.scorer.metric == "accuracy" else 0.0
        return max(self.sens[n][b], 0.0) + extra

    def est_size(self, st: dict[str, int | None]) -> int:
        return self.const_bytes + sum(self.bench.nbytes(n, b) for n, b in st.items())

    def verify(self, st: dict[str, int | None], early_stop: bool = False) -> tuple[bool, float]:
        """Full evaluation set; with early_stop a hopeless state is abandoned (and never chosen)."""
        self.bench.apply(st)
        s = self.scorer.score(self.bench.module, abort_above=self.cfg.max_drop + _EPS if early_stop else None)
        self.steps += 1
        if not s["aborted"]:
            self.tried.append((dict(st), s["drop"], self.est_size(st)))
        return s["drop"] <= self.cfg.max_drop + _EPS, s["drop"]

    def greedy(self) -> None:
        cands, unit = self.cfg.candidates, self.unit
        state: dict[str, int | None] = {n: cands[0] for n in self.names}
        self.bench.apply(state)
        self.const_bytes = serialized_size(self.bench.module, self.metadata) - \
            sum(self.bench.nbytes(n, b) for n, b in state.items())
        tick = self.progress("searching bits", None)
        ok, drop = self.verify(state)
        self.say(f"all layers at {cands[0]} bits: drop {drop:.4g} {unit}, ~{self.est_size(state)} B")
        frozen: set[str] = set()
        if not ok:  # the widest width already breaks the tolerance: the most sensitive layers back to float
            order = sorted(self.names, key=lambda n: self.proxy(n, cands[0]) or 0.0, reverse=True)
            for n in order[:-1]:  # at least one layer stays quantized
                if self.time_up():
                    break
                state[n] = None
                frozen.add(n)
                ok, drop = self.verify(state)
                tick(1)
                self.say(f"  {n} -> float: drop {drop:.4g} {unit}" + (" (within tolerance)" if ok else ""))
                if ok:
                    break
        while ok and not self.stopped:
            move = self._cheapest_move(state, frozen)
            if move is None or self.time_up():
                break
            n, b = move
            old, state[n] = state[n], b
            good, d = self.verify(state, early_stop=True)
            tick(1)
            if good:
                self.say(f"  {n}: {old} -> {b} bits: drop {d:.4g} {unit}, ~{self.est_size(state)} B")
            else:
                state[n] = old
                frozen.add(n)
                self.say(f"  {n}: {old} -> {b} bits breaks the tolerance (drop >= {d:.4g} {unit}): kept at {old}")

    def _cheapest_move(self, state: dict[str, int | None], frozen: set[str]) -> tuple[str, int] | None:
        """The narrowing with the least sensitivity per byte saved, or None."""
        moves = []
        for n in self.names:
            cur = state[n]
            if n in frozen or cur is None:
                continue
            cur_cost, cur_bytes = self.proxy(n, cur), self.bench.nbytes(n, cur)
            for b in (c for c in self.cfg.candidates if c < cur):
                cost = self.proxy(n, b)
                if cost is None:
                    break
                saved = cur_bytes - self.bench.nbytes(n, b)
                if saved > 0:
                    moves.append((max(cost - (cur_cost or 0.0), 0.0) / saved, -saved, n, b))
                    break
        return min(moves)[2:] if moves else None

    def best(self) -> dict[str, int | None]:
        """The smallest state within the tolerance, else the one with the smallest drop."""
        feasible = [t for t in self.tried if t[1] <= self.cfg.max_drop + _EPS]
        if feasible:
            return min(feasible, key=lambda t: (t[2], t[1]))[0]
        return min(self.tried, key=lambda t: (t[1], t[2]))[0]


@handles(MixedPrecision)
def search_mixed_precision(float_module: nn.Module, config: MixedPrecision, scorer: Scorer, *,
                           tuning_samples: int = 256, float_size: int, progress=None, log=None,
                           artifact_metadata: dict[str, str] | None = None, saved: bool = False) -> SearchOutcome:
    """Choose weight bits per layer (or float) to minimize size with the metric drop <= config.max_drop.

    `float_size` is the float model's saved size (for ratios); `saved` only changes the wording of a
    statement about a goal not met ("saved anyway" rather than "returned anyway").
    """
    say = log or (lambda msg: None)
    progress = progress or (lambda label, total: (lambda n: None))
    s = _Search(float_module, config, scorer, tuning_samples, progress, say, artifact_metadata)
    cands, metric, unit = config.candidates, scorer.metric, s.unit
    say(f"tuning: {len(s.names)} layers, candidates {list(cands)} bits, metric {metric}, max_drop "
        f"{config.max_drop:g} {unit}" + (f", size_budget {config.size_budget} B" if config.size_budget else "")
        + (f", time_budget {config.time_budget:g} s" if config.time_budget is not None else ""))
    s.sensitivity()
    n_tuned = sum(scorer.sizes[:scorer.n_batches(s.n_tune)])
    say(f"sensitivity of {len(s.names)} layers x {len(cands)} widths on {n_tuned} samples: "
        f"{time.perf_counter() - s.t0:.1f} s")
    s.greedy()  # verifies the all-widest start even when the time budget is already spent
    best = s.best()
    s.bench.apply(best)
    final = scorer.score(s.bench.module)
    value, fvalue = final["value"], final["float_value"]
    drop = fvalue - value
    size = serialized_size(s.bench.module, s.metadata)
    drop_ok = drop <= config.max_drop + _EPS
    size_ok = config.size_budget is None or size <= config.size_budget
    bits = {n: "float" if b is None else b for n, b in best.items()}
    summary = _summary(config, s, bits, value, fvalue, drop, size, float_size, drop_ok, size_ok, n_tuned,
                       final["n"], saved)
    recipe = tuned_recipe(best, name="tuned", description=(
        f"mixed precision chosen by secquant.tune: {metric} drop <= {config.max_drop:g} {unit}; "
        f"weights only ({summary['mix']}), activations in float"))
    return SearchOutcome(recipe, summary, s.bench.module, drop_ok and size_ok)


def _summary(config: MixedPrecision, s: _Search, bits: dict[str, int | str], value: float, fvalue: float,
             drop: float, size: int, fsize: int, drop_ok: bool, size_ok: bool, n_tuned: int, n_eval: int,
             saved: bool) -> dict[str, Any]:
    counts: dict[str, int] = {}
    for b in bits.values():
        counts[str(b)] = counts.get(str(b), 0) + 1
    mix = ", ".join(f"{c} x {b}{'' if b == 'float' else '-bit'}" for b, c in
                    sorted(counts.items(), key=lambda kv: (kv[0] == "float", -int(kv[0]) if kv[0] != "float" else 0)))
    metric, unit, max_drop, budget = s.scorer.metric, s.unit, config.max_drop, config.size_budget
    if drop_ok and size_ok:
        statement = (f"goal met: {metric} drop {drop:.4g} {unit} <= max_drop {max_drop:g}"
                     + (f" and size {size} B <= size_budget {budget} B" if budget is not None else "")
                     + f"; {size} B = {size / fsize:.1%} of float ({mix})")
    else:
        why = []
        if not drop_ok:
            why.append(f"best model found has drop {drop:.4g} {unit} > max_drop {max_drop:g}")
        if not size_ok:
            why.append(f"smallest model found within the search is {size} B > size_budget {budget} B")
        statement = (f"goal NOT met: {'; '.join(why)}; {'saved' if saved else 'returned'} anyway ({mix}, "
                     f"{size / fsize:.1%} of float)")
    if s.stopped == "time_budget":
        statement += f" [search stopped at the time budget of {config.time_budget:g} s]"
    r6 = lambda x: round(float(x), 6)  # noqa: E731
    return {
        "metric": metric, "unit": unit, "max_drop": max_drop, "size_budget": budget,
        "time_budget": config.time_budget, "goal_met": drop_ok and size_ok,
        "float_value": r6(fvalue), "value": r6(value), "drop": r6(drop),
        "size_bytes": size, "float_size_bytes": fsize, "size_ratio": r6(size / fsize),
        "bits_per_layer": bits, "mix": mix, "candidates": list(config.candidates),
        "schemes": {str(b): candidate_args(b).model_dump(mode="json", exclude_defaults=True) for b in config.candidates},
        "sensitivity": {n: {str(b): r6(v) for b, v in s.sens[n].items()} for n in s.names},
        "sensitivity_cosine_loss": {n: {str(b): r6(v) for b, v in s.closs[n].items()} for n in s.names},
        "tuning_samples": n_tuned, "eval_samples": n_eval, "verifications": s.steps,
        "stopped": s.stopped or "converged", "seconds": None, "statement": statement,
    }
