"""Weight algorithms are pluggable: a config class and a handler registered by its type, nothing else."""

from __future__ import annotations

from typing import Literal

import pytest
import torch
from pydantic import ValidationError
from torch import nn

from secquant.quant.algorithms import HANDLERS, handles, quantize_model
from secquant.quant.algorithms.rtn import apply_recipe
from secquant.quant.schema import GPTQ, RTN, AlgorithmConfig, QuantArgs, Recipe


class ZeroBias(AlgorithmConfig):
    """A toy algorithm for the test: round-to-nearest, then every bias set to `value`."""

    name: Literal["zero-bias-test"] = "zero-bias-test"
    value: float = 0.0


def test_a_new_algorithm_is_a_config_class_and_a_handler():
    calls = []

    @handles(ZeroBias)
    def run(model, recipe, wp):
        calls.append(recipe.algorithm.value)
        layers = apply_recipe(model, recipe)
        for m in model.modules():
            if getattr(m, "bias", None) is not None:
                m.bias.data.fill_(recipe.algorithm.value)
        return layers, 0

    try:
        recipe = Recipe.model_validate({"weights": {"bits": 8}, "algorithm": {"name": "zero-bias-test", "value": 2.5}})
        assert isinstance(recipe.algorithm, ZeroBias)
        assert Recipe.model_validate(recipe.model_dump(mode="json")).algorithm == recipe.algorithm  # round trip
        model = nn.Sequential(nn.Linear(4, 3))
        quantize_model(model, recipe, None, lambda m, b: m(b))
        assert calls == [2.5] and torch.all(model[0].bias == 2.5)
    finally:
        HANDLERS.pop(ZeroBias, None)


def test_recipe_algorithm_forms_and_refusals():
    assert Recipe(weights=QuantArgs()).algorithm == RTN()
    assert Recipe(weights=QuantArgs(), algorithm="gptq").algorithm == GPTQ()
    # written before algorithms were pluggable: `algorithm: gptq` plus a `gptq:` block (manifests carry the
    # default block next to `algorithm: rtn` too)
    old = Recipe.model_validate({"weights": {"bits": 4}, "algorithm": "gptq", "gptq": {"damp": 0.05}})
    assert old.algorithm == GPTQ(damp=0.05)
    assert Recipe.model_validate({"weights": {"bits": 4}, "algorithm": "rtn", "gptq": {"damp": 0.01}}).algorithm == RTN()
    with pytest.raises(ValidationError, match="unknown algorithm 'awq2'.*gptq.*rtn"):
        Recipe.model_validate({"weights": {"bits": 4}, "algorithm": "awq2"})
    with pytest.raises(ValidationError, match="inside `algorithm:`"):
        Recipe.model_validate({"weights": {"bits": 4}, "algorithm": {"name": "gptq"}, "gptq": {"damp": 0.05}})
    with pytest.raises(ValidationError, match="uniform integer weights"):
        Recipe.model_validate({"weights": {"bits": 4, "format": "nf4"}, "algorithm": "gptq"})
    with pytest.raises(ValidationError, match="Extra inputs"):
        Recipe.model_validate({"weights": {"bits": 4}, "algorithm": {"name": "gptq", "dmap": 0.1}})
