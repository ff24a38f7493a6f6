"""Weight algorithms by config type (torchao's `quantize_` handler-table idea).

A handler registers for its AlgorithmConfig subclass with `@handles(Config)`; the pipeline looks the
recipe's config up here and calls it with the model, the recipe and a `WeightPass` (the calibration
batches and what the scale search prepared). Adding an algorithm is a config class in quant.schema and
a decorated handler in its own module: no switch to edit.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from ...errors import RecipeError
from ..schema import AlgorithmConfig, Recipe

Tick = Callable[[int], None]
# (model, recipe, pass) -> (per-layer manifest entries, calibration samples read)
Handler = Callable[[nn.Module, Recipe, "WeightPass"], tuple[dict[str, dict], int]]
HANDLERS: dict[type[AlgorithmConfig], Handler] = {}


@dataclass
class WeightPass:
    """What a weight algorithm may use besides the model and recipe."""

    batches: Callable[[], Iterable] | None  # calibration batches, a fresh iterator per call
    run_batch: Callable[[nn.Module, Any], Any]
    progress: Callable[[str, int | None], Tick]
    n_batches: int  # expected batches per pass (for progress)
    prep: dict[str, Any] = field(default_factory=dict)  # layer -> LayerPrep from the scale search


def handles(config_type: type[AlgorithmConfig]) -> Callable[[Handler], Handler]:
    """Register `fn` as the weight algorithm for recipes whose `algorithm` is a `config_type`."""

    def register(fn: Handler) -> Handler:
        HANDLERS[config_type] = fn
        return fn

    return register


def handler_for(config: AlgorithmConfig) -> Handler:
    try:
        return HANDLERS[type(config)]
    except KeyError:
        raise RecipeError(f"no weight algorithm is registered for {type(config).__name__} "
                          f"(algorithm {config.name!r})") from None


class CountedBatches:
    """Iterates calibration batches and counts the samples that went through."""

    def __init__(self, batches: Iterable) -> None:
        self.batches, self.samples = batches, 0

    def __iter__(self):
        for b in self.batches:
            first = next(iter(b.values())) if isinstance(b, dict) else b
            self.samples += int(first.shape[0])
            yield b
