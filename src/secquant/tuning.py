"""Accuracy-driven mixed precision: choose bits per layer to shrink the model within a tolerance.

    import secquant.tuning as tuning
    res = tuning.tune("builtin:digits", max_drop=1.0, out="digits-tuned")
    print(res.summary["statement"], res.summary["bits_per_layer"])

How it works (weights only, data-free round-to-nearest, activations stay in float):

1. Sensitivity: every quantizable layer is quantized alone at every candidate width while the rest
   of the model stays in float, and the metric drop is measured on a small tuning subset of the
   evaluation data (the first 256 samples for classifiers, 64 sentences for encoders).
2. Search (greedy): start with every layer at the widest candidate and verify on the full
   evaluation set. If that already breaks the tolerance, the most sensitive layers are put back in
   float one at a time (never all of them). Then, repeatedly, the layer whose next narrower width
   costs the least sensitivity per byte saved is narrowed and the full evaluation set is re-checked;
   a step that breaks the tolerance is undone and that layer is not narrowed again.
3. The result is a Recipe with one override per layer (exact name, its bits or `skip: true`), which
   is quantized with `secquant.quantize(..., tuning=summary)`: the manifest records the per-layer
   bits in `layers` and the search's decisions and measurements in `tuning`.

If no assignment meets the goal, the best model found (smallest drop) is still returned (and
saved when `out` is given), and the summary says plainly that the goal was not met.
"""

from __future__ import annotations

import copy
import math
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .errors import CalibrationError, ModelError, OutputExistsError, RecipeError
from .fidelity import compare, float_size_bytes
from .models import ModelHandle, load_model
from .quant.algorithms.rtn import check_finite, plan, set_submodule
from .quant.modules import quantize_module
from .quant.schema import Override, QuantArgs, Recipe

if TYPE_CHECKING:  # the api imports are done lazily (api.py may import this module)
    from .api import QuantizedModel

METRICS = ("accuracy", "cosine")
DEFAULT_CANDIDATES = (2, 3, 4, 8)
TUNING_SAMPLES = {"classifier": 256, "encoder": 64}
EVAL_BATCH_SIZE = 32
# For the accuracy metric the search orders moves by accuracy drop plus this many points per unit of
# (1 - cosine) of the logits: on a small subset most accuracy drops are 0, the cosine breaks the ties.
COSINE_POINTS = 100.0
_EPS = 1e-9
_SAFETENSORS_METADATA = {"format": "secquant.artifact", "format_version": "1"}

Progress = Callable[[str, int | None], Callable[[int], None]]


@dataclass
class TuneResult:
    """What `tune` decided: the recipe, the JSON-able summary (also in the manifest), the model."""

    recipe: Recipe
    summary: dict[str, Any]
    model: "QuantizedModel"
    goal_met: bool
    path: Path | None = field(default=None)

    @property
    def bits_per_layer(self) -> dict[str, int | str]:
        return dict(self.summary["bits_per_layer"])


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


def _check_args(max_drop, metric, size_budget, time_budget, candidates) -> tuple[float, tuple[int, ...]]:
    if isinstance(max_drop, bool) or not isinstance(max_drop, (int, float)) or math.isnan(max_drop):
        raise RecipeError(f"max_drop must be a number (accuracy points or cosine), got {max_drop!r}")
    if max_drop < 0:
        raise RecipeError(f"max_drop must be >= 0 (the largest metric drop you accept), got {max_drop}")
    if metric is not None and metric not in METRICS:
        raise RecipeError(f"unknown metric {metric!r}; choose 'accuracy' (classifiers, max_drop in accuracy "
                          "points) or 'cosine' (encoders, max_drop in mean cosine to the float model)")
    if size_budget is not None and (isinstance(size_budget, bool) or not isinstance(size_budget, int)
                                    or size_budget <= 0):
        raise RecipeError(f"size_budget must be a positive number of bytes, got {size_budget!r}")
    if time_budget is not None and (isinstance(time_budget, bool) or not isinstance(time_budget, (int, float))
                                    or math.isnan(time_budget) or time_budget < 0):
        raise RecipeError(f"time_budget must be a number of seconds >= 0, got {time_budget!r}")
    if isinstance(candidates, (int, str)) or not isinstance(candidates, Iterable):
        raise RecipeError(f"candidates must be a list of bit widths (2..8), got {candidates!r}")
    cands = list(candidates)
    if not cands or any(isinstance(b, bool) or not isinstance(b, int) or not 2 <= b <= 8 for b in cands):
        raise RecipeError(f"candidates must be a non-empty list of bit widths between 2 and 8, got {cands!r}")
    return float(max_drop), tuple(sorted(set(cands), reverse=True))


def _state_nbytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())


def serialized_size(module: nn.Module) -> int:
    """Bytes of `module` saved as an artifact's model.safetensors (exact for the same metadata)."""
    from safetensors.torch import save

    from .artifact.store import tensors_for_save
    return len(save(tensors_for_save(module), metadata=_SAFETENSORS_METADATA))


class _Scorer:
    """Evaluation batches and float outputs, computed once; scores a module on all or the first samples."""

    def __init__(self, handle: ModelHandle, data, metric: str | None) -> None:
        self.handle = handle
        batches = list(handle.adapter.eval_batches(data, EVAL_BATCH_SIZE))
        if not batches:
            raise CalibrationError("the evaluation data is empty: tuning needs samples to measure the metric")
        labelled = all(y is not None for _, y in batches)
        if metric is None:
            metric = "accuracy" if handle.kind == "classifier" and labelled else "cosine"
        if metric == "accuracy" and handle.kind != "classifier":
            raise RecipeError("metric 'accuracy' is for classifiers; use metric 'cosine' for this encoder")
        if metric == "accuracy" and not labelled:
            raise CalibrationError("metric 'accuracy' needs labelled evaluation data (a 'labels' tensor); "
                                   "pass labelled data or use metric 'cosine'")
        self.metric = metric
        self.batches = batches
        with torch.no_grad():
            self.ref = [handle.run(handle.module, x) for x, _ in batches]
        self.sizes = [int(o.shape[0]) for o in self.ref]
        self.correct_f = [0 if y is None else int((o.argmax(-1) == y).sum()) for (_, y), o in zip(batches, self.ref)]
        self.n_total = sum(self.sizes)

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
            out_q = self.handle.run(module, x)
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


class _Workbench:
    """A private copy of the float model whose layers can be switched between float and candidates."""

    def __init__(self, handle: ModelHandle, layers: dict[str, str]) -> None:
        self.module = copy.deepcopy(handle.module).eval()
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


def _fmt_bits(b: int | None) -> int | str:
    return "float" if b is None else b


def tune(
    model: str | ModelHandle,
    *,
    max_drop: float,
    metric: str | None = None,
    size_budget: int | None = None,
    time_budget: float | None = None,
    candidates: Iterable[int] = DEFAULT_CANDIDATES,
    data: str | Path | None = None,
    calib: str | Path | None = None,
    out: str | Path | None = None,
    overwrite: bool = False,
    progress: Progress | None = None,
    log: Callable[[str], Any] | None = print,
) -> TuneResult:
    """Choose weight bits per layer (or float) to minimize size with the metric drop <= max_drop.

    max_drop is in accuracy points for metric 'accuracy' (1.0 = one percentage point) and in mean
    cosine to the float outputs for 'cosine' (e.g. 0.01). The metric defaults to accuracy for
    classifiers with labelled data, cosine otherwise. size_budget (bytes of model.safetensors) is a
    second constraint; time_budget (seconds) stops the search early, keeping the best model so far.
    The best model found is always returned, and saved when `out` is given, even if the goal was not
    met (summary['goal_met'] is False and summary['statement'] says why).
    """
    from .api import quantize  # lazy: api.py may import this module

    t0 = time.perf_counter()
    max_drop, cands = _check_args(max_drop, metric, size_budget, time_budget, candidates)
    say = log or (lambda msg: None)
    progress = progress or (lambda label, total: (lambda n: None))
    if out is not None and Path(out).exists() and not overwrite:
        raise OutputExistsError(f"{out} already exists: choose another --out or remove it first")
    if isinstance(model, ModelHandle):
        handle = model
    elif isinstance(model, (str, Path)):
        handle = load_model(str(model))
    else:
        raise ModelError(f"tune() takes a model spec string or a ModelHandle, got {type(model).__name__}")
    deadline = None if time_budget is None else t0 + float(time_budget)

    def time_up() -> bool:
        return deadline is not None and time.perf_counter() >= deadline

    check_finite(handle.module)
    base = Recipe(name="tune-base", weights=candidate_args(cands[0]))
    layers = {n: t for n, (t, _, _) in plan(handle.module, base).items()}
    if not layers:
        raise ModelError("the model has no quantizable layer (Linear, Conv1d/2d, Embedding): nothing to tune")
    names = list(layers)
    scorer = _Scorer(handle, data, metric)
    metric = scorer.metric
    unit = "accuracy points" if metric == "accuracy" else "mean cosine"
    n_tune = TUNING_SAMPLES.get(handle.kind, 256)
    bench = _Workbench(handle, layers)
    say(f"tuning {handle.spec}: {len(names)} layers, candidates {list(cands)} bits, metric {metric}, "
        f"max_drop {max_drop:g} {unit}" + (f", size_budget {size_budget} B" if size_budget else "")
        + (f", time_budget {time_budget:g} s" if time_budget is not None else ""))

    # 1. Sensitivity of each layer alone at each width, on the tuning subset.
    sens: dict[str, dict[int, float]] = {n: {} for n in names}
    closs: dict[str, dict[int, float]] = {n: {} for n in names}
    stopped = None
    tick = progress("measuring sensitivity", len(names) * len(cands))
    for n in names:
        for b in cands:
            if time_up():
                stopped = "time_budget"
                break
            bench.set(n, b)
            s = scorer.score(bench.module, n_tune)
            sens[n][b], closs[n][b] = s["drop"], s["cos_loss"]
            tick(1)
        bench.set(n, None)
        if stopped:
            break
    n_tuned = sum(scorer.sizes[:scorer.n_batches(n_tune)])
    t_sens = time.perf_counter() - t0
    say(f"sensitivity of {len(names)} layers x {len(cands)} widths on {n_tuned} samples: {t_sens:.1f} s")

    def proxy(n: str, b: int | None) -> float | None:
        if b is None:
            return 0.0
        if b not in sens[n]:
            return None
        extra = COSINE_POINTS * closs[n][b] if metric == "accuracy" else 0.0
        return max(sens[n][b], 0.0) + extra

    # 2. Greedy search, verified on the full evaluation set.
    state: dict[str, int | None] = {n: cands[0] for n in names}
    bench.apply(state)
    const_bytes = serialized_size(bench.module) - sum(bench.nbytes(n, b) for n, b in state.items())

    def est_size(st: dict[str, int | None]) -> int:
        return const_bytes + sum(bench.nbytes(n, b) for n, b in st.items())

    tried: list[tuple[dict[str, int | None], float, int]] = []
    steps = 0

    def verify(st: dict[str, int | None], early_stop: bool = False) -> tuple[bool, float]:
        """Full evaluation set; with early_stop a hopeless state is abandoned (and never chosen)."""
        nonlocal steps
        bench.apply(st)
        s = scorer.score(bench.module, abort_above=max_drop + _EPS if early_stop else None)
        steps += 1
        if not s["aborted"]:
            tried.append((dict(st), s["drop"], est_size(st)))
        return s["drop"] <= max_drop + _EPS, s["drop"]

    search_tick = progress("searching bits", None)
    ok, drop = verify(state)
    say(f"all layers at {cands[0]} bits: drop {drop:.4g} {unit}, ~{est_size(state)} B")
    frozen: set[str] = set()
    if not ok:
        # The widest width already breaks the tolerance: put the most sensitive layers back in float.
        order = sorted(names, key=lambda n: proxy(n, cands[0]) or 0.0, reverse=True)
        for n in order[:-1]:  # at least one layer stays quantized
            if time_up():
                stopped = "time_budget"
                break
            state[n] = None
            frozen.add(n)
            ok, drop = verify(state)
            search_tick(1)
            say(f"  {n} -> float: drop {drop:.4g} {unit}" + (" (within tolerance)" if ok else ""))
            if ok:
                break
    while ok and not stopped:
        moves = []
        for n in names:
            cur = state[n]
            if n in frozen or cur is None:
                continue
            cur_cost, cur_bytes = proxy(n, cur), bench.nbytes(n, cur)
            for b in (c for c in cands if c < cur):
                cost = proxy(n, b)
                if cost is None:
                    break
                saved = cur_bytes - bench.nbytes(n, b)
                if saved > 0:
                    moves.append((max(cost - (cur_cost or 0.0), 0.0) / saved, -saved, n, b))
                    break
        if not moves:
            break
        if time_up():
            stopped = "time_budget"
            break
        _, _, n, b = min(moves)
        old = state[n]
        state[n] = b
        good, d = verify(state, early_stop=True)
        search_tick(1)
        if good:
            drop = d
            say(f"  {n}: {old} -> {b} bits: drop {d:.4g} {unit}, ~{est_size(state)} B")
        else:
            state[n] = old
            frozen.add(n)
            say(f"  {n}: {old} -> {b} bits breaks the tolerance (drop >= {d:.4g} {unit}): kept at {old}")

    # 3. The best model found: the smallest one within the tolerance, else the smallest drop.
    feasible = [t for t in tried if t[1] <= max_drop + _EPS]
    if feasible:
        best_state = min(feasible, key=lambda t: (t[2], t[1]))[0]
    else:
        best_state = min(tried, key=lambda t: (t[1], t[2]))[0]
    bench.apply(best_state)
    final = compare(bench.module, handle.module, handle, data, EVAL_BATCH_SIZE)
    if metric == "accuracy":
        value, fvalue = 100.0 * final["value"], 100.0 * final["float_value"]
    else:
        value, fvalue = final["mean_cosine_to_float"], 1.0
    drop = fvalue - value
    size = serialized_size(bench.module)
    fsize = float_size_bytes(handle.module)
    drop_ok = drop <= max_drop + _EPS
    size_ok = size_budget is None or size <= size_budget
    goal_met = drop_ok and size_ok
    bits_per_layer = {n: _fmt_bits(b) for n, b in best_state.items()}
    counts: dict[str, int] = {}
    for b in bits_per_layer.values():
        counts[str(b)] = counts.get(str(b), 0) + 1
    mix = ", ".join(f"{c} x {b}{'' if b == 'float' else '-bit'}" for b, c in
                    sorted(counts.items(), key=lambda kv: (kv[0] == "float", -int(kv[0]) if kv[0] != "float" else 0)))
    where = "saved" if out is not None else "returned"
    if goal_met:
        statement = (f"goal met: {metric} drop {drop:.4g} {unit} <= max_drop {max_drop:g}"
                     + (f" and size {size} B <= size_budget {size_budget} B" if size_budget is not None else "")
                     + f"; {size} B = {size / fsize:.1%} of float ({mix})")
    else:
        why = []
        if not drop_ok:
            why.append(f"best model found has drop {drop:.4g} {unit} > max_drop {max_drop:g}")
        if not size_ok:
            why.append(f"smallest model found within the search is {size} B > size_budget {size_budget} B")
        statement = f"goal NOT met: {'; '.join(why)}; {where} anyway ({mix}, {size / fsize:.1%} of float)"
    if stopped == "time_budget":
        statement += f" [search stopped at the time budget of {time_budget:g} s]"
    r6 = lambda x: round(float(x), 6)  # noqa: E731
    summary: dict[str, Any] = {
        "metric": metric,
        "unit": unit,
        "max_drop": max_drop,
        "size_budget": size_budget,
        "time_budget": time_budget,
        "goal_met": goal_met,
        "float_value": r6(fvalue),
        "value": r6(value),
        "drop": r6(drop),
        "size_bytes": size,
        "float_size_bytes": fsize,
        "size_ratio": r6(size / fsize),
        "bits_per_layer": bits_per_layer,
        "candidates": list(cands),
        "schemes": {str(b): candidate_args(b).model_dump(mode="json", exclude_defaults=True) for b in cands},
        "sensitivity": {n: {str(b): r6(v) for b, v in sens[n].items()} for n in names},
        "sensitivity_cosine_loss": {n: {str(b): r6(v) for b, v in closs[n].items()} for n in names},
        "tuning_samples": n_tuned,
        "eval_samples": final["n_samples"],
        "verifications": steps,
        "stopped": stopped or "converged",
        "seconds": None,
        "statement": statement,
    }
    recipe = tuned_recipe(best_state, name="tuned", description=(
        f"mixed precision chosen by secquant.tuning: {metric} drop <= {max_drop:g} {unit}; "
        f"weights only ({mix}), activations in float"))
    summary["seconds"] = round(time.perf_counter() - t0, 3)
    qm = quantize(handle, recipe, out=out, calib=calib, overwrite=overwrite, progress=progress, tuning=summary)
    summary = dict(summary)
    # The saved model is rebuilt from the recipe by the same code: check it is the one measured.
    mine, theirs = bench.module.state_dict(), qm.module.state_dict()
    same = mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    if not same:
        say("warning: the saved model differs from the one measured during tuning; re-measuring it")
        again = compare(qm.module, handle.module, handle, data, EVAL_BATCH_SIZE)
        summary["value"] = r6(100.0 * again["value"] if metric == "accuracy" else again["mean_cosine_to_float"])
        summary["drop"] = r6(summary["float_value"] - summary["value"])
    if qm.path is not None:
        summary["size_bytes"] = (qm.path / "model.safetensors").stat().st_size
        summary["size_ratio"] = r6(summary["size_bytes"] / fsize)
    summary["seconds"] = round(time.perf_counter() - t0, 3)
    say(statement)
    return TuneResult(recipe=recipe, summary=summary, model=qm, goal_met=goal_met, path=qm.path)
