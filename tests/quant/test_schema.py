"""Recipe schema and presets: the documented settings, validation rules, name resolution."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError
from torch import nn

import secquant
from secquant.errors import ModelError, RecipeError, SecquantError
from secquant.recipes import PRESETS, QuantArgs, Recipe, get_preset, recipe_from_dict

EXPECTED_PRESETS = {
    # name: (weights, activations); None = stays float
    "w8a8": (
        dict(bits=8, symmetric=True, granularity="channel", axis=0, group_size=None, dynamic=False),
        dict(bits=8, symmetric=False, granularity="tensor", dynamic=False, observer="percentile"),
    ),
    "w8a8-dynamic": (
        dict(bits=8, symmetric=True, granularity="channel", axis=0, group_size=None, dynamic=False),
        dict(bits=8, granularity="token", dynamic=True),
    ),
    "w8a16": (
        dict(bits=8, symmetric=True, granularity="channel", axis=0, group_size=None, dynamic=False),
        None,
    ),
    "w4a16": (
        dict(bits=4, symmetric=False, granularity="group", group_size=128, observer="mse", dynamic=False),
        None,
    ),
    "w4a8-dynamic": (
        dict(bits=4, symmetric=False, granularity="group", group_size=128, observer="mse", dynamic=False),
        dict(bits=8, granularity="token", dynamic=True),
    ),
}


def test_all_documented_presets_exist():
    assert set(EXPECTED_PRESETS) <= set(PRESETS)
    assert secquant.PRESETS is PRESETS


@pytest.mark.parametrize("name", sorted(EXPECTED_PRESETS))
def test_preset_settings(name):
    r = get_preset(name)
    assert isinstance(r, Recipe)
    assert r.name == name
    assert r.description
    assert r.algorithm.name == "rtn"
    w_exp, a_exp = EXPECTED_PRESETS[name]
    assert r.weights is not None
    for k, v in w_exp.items():
        assert getattr(r.weights, k) == v, (name, "weights", k)
    if a_exp is None:
        assert r.activations is None
    else:
        assert r.activations is not None
        for k, v in a_exp.items():
            assert getattr(r.activations, k) == v, (name, "activations", k)
    # every layer type is targeted, nothing ignored by default
    assert set(r.targets) >= {"Linear", "Conv1d", "Conv2d", "Embedding"}
    assert r.ignore == [] and r.overrides == []


@pytest.mark.parametrize("name", sorted(EXPECTED_PRESETS))
def test_presets_that_read_data_say_so(name):
    """Static activation ranges and the activation-aware scale search read calibration data."""
    r = get_preset(name)
    reads = (r.activations is not None and not r.activations.dynamic) or r.smoothing is not None
    assert r.needs_calibration == reads
    assert r.needs_calibration == (name in {"w8a8", "w4a16", "w4a8-dynamic"})


def test_data_free_presets():
    for name in ["w8a16", "w8a8-dynamic", "w4a16-rtn"]:
        assert not get_preset(name).needs_calibration


def test_presets_are_immutable():
    with pytest.raises(ValidationError):
        PRESETS["w8a8"].name = "x"
    with pytest.raises(ValidationError):
        PRESETS["w8a8"].weights.bits = 2


def test_unknown_preset_lists_presets():
    with pytest.raises(RecipeError) as ei:
        get_preset("w3a3")
    msg = str(ei.value)
    assert "w3a3" in msg
    for name in EXPECTED_PRESETS:
        assert name in msg
    assert isinstance(ei.value, SecquantError)


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
def test_bits_in_range_accepted(bits):
    assert QuantArgs(bits=bits).bits == bits


@pytest.mark.parametrize("bits", [0, 1, 9, 16, -8])
def test_bits_out_of_range_rejected(bits):
    with pytest.raises(RecipeError) as ei:
        recipe_from_dict({"weights": {"bits": bits}})
    assert "weights.bits" in str(ei.value)


def test_group_granularity_needs_group_size():
    with pytest.raises(RecipeError) as ei:
        recipe_from_dict({"weights": {"bits": 4, "granularity": "group"}})
    assert "weights" in str(ei.value) and "group_size" in str(ei.value)


def test_group_size_only_with_group():
    with pytest.raises(RecipeError) as ei:
        recipe_from_dict({"weights": {"bits": 4, "granularity": "channel", "group_size": 32}})
    assert "group_size" in str(ei.value)


def test_group_size_must_be_positive():
    with pytest.raises(RecipeError) as ei:
        recipe_from_dict({"weights": {"bits": 4, "granularity": "group", "group_size": 0}})
    assert "weights.group_size" in str(ei.value)


def test_token_granularity_needs_dynamic():
    with pytest.raises(RecipeError) as ei:
        recipe_from_dict({"weights": {"bits": 8}, "activations": {"bits": 8, "granularity": "token"}})
    msg = str(ei.value)
    assert "activations" in msg and "dynamic" in msg


def test_dynamic_weights_rejected():
    with pytest.raises(RecipeError) as ei:
        recipe_from_dict({"weights": {"bits": 8, "granularity": "token", "dynamic": True}})
    assert "weights" in str(ei.value) and "dynamic" in str(ei.value)


def test_recipe_must_quantize_something():
    with pytest.raises(RecipeError):
        recipe_from_dict({"name": "nothing"})


@pytest.mark.parametrize("field,value", [
    ("algorithm", "awq-v9"),
    ("targets", ["Linear", "Bilinear"]),  # LSTM became a target (issue 16)
])
def test_literal_fields_rejected(field, value):
    with pytest.raises(RecipeError) as ei:
        recipe_from_dict({"weights": {"bits": 8}, field: value})
    assert field in str(ei.value)


def test_unknown_fields_rejected_at_every_level():
    for data, where in [
        ({"weights": {"bits": 8}, "wieghts": {"bits": 8}}, "wieghts"),
        ({"weights": {"bits": 8, "bitz": 4}}, "weights.bitz"),
        ({"weights": {"bits": 8}, "calibration": {"samples": 3}}, "calibration.samples"),
        ({"weights": {"bits": 8}, "overrides": [{"pattern": "x", "skipp": True}]}, "overrides.0.skipp"),
    ]:
        with pytest.raises(RecipeError) as ei:
            recipe_from_dict(data)
        assert where in str(ei.value), (where, str(ei.value))
        assert "extra" in str(ei.value).lower()


def test_bad_regex_pattern_rejected():
    with pytest.raises(RecipeError) as ei:
        recipe_from_dict({"weights": {"bits": 8}, "ignore": ["re:(unclosed"]})
    assert "re:(unclosed" in str(ei.value)


def test_non_mapping_recipe_rejected():
    with pytest.raises(RecipeError) as ei:
        recipe_from_dict(["weights"])
    assert "mapping" in str(ei.value)


def test_resolve_ignore_overrides_and_skip():
    r = recipe_from_dict({
        "weights": {"bits": 8, "granularity": "channel"},
        "activations": {"bits": 8, "granularity": "token", "dynamic": True},
        "ignore": ["head"],
        "overrides": [
            {"pattern": "enc.*.attn", "weights": {"bits": 4, "granularity": "group", "group_size": 8}},
            {"pattern": "re:enc\\.[0-9]+\\.ffn", "activations": None},
            {"pattern": "enc.3.*", "skip": True},
        ],
    })
    assert r.resolve("head") is None
    w, a = r.resolve("enc.0.attn")
    assert w.bits == 4 and w.group_size == 8 and a.dynamic
    w, a = r.resolve("enc.12.ffn")
    assert w.bits == 8 and a is None
    assert r.resolve("enc.3.attn") is None
    w, a = r.resolve("other")
    assert w.bits == 8 and a.bits == 8
    assert not r.needs_calibration


def test_override_with_static_activations_needs_calibration():
    r = recipe_from_dict({"weights": {"bits": 8},
                          "overrides": [{"pattern": "x", "activations": {"bits": 8}}]})
    assert r.needs_calibration


def _act_recipe(granularity: str, **extra) -> dict:
    return {"name": f"a-{granularity}", "weights": None,
            "activations": {"bits": 4, "symmetric": True, "granularity": granularity, "dynamic": True, **extra}}


def test_activation_granularity_is_honoured_or_refused():
    """A recipe asking for per-channel (or per-group) activation ranges must not silently get per-tensor ones.

    Either the recipe is refused with a clear error, or the quantized model really uses finer ranges
    (which on inputs whose channels differ 1000x in scale changes the result).
    """
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 4))
    x = torch.randn(16, 8) * torch.tensor([1000.0, 1, 1, 1, 1, 1, 1, 1])
    for gran, extra in [("channel", {"axis": 1}), ("group", {"group_size": 4})]:
        try:
            r = recipe_from_dict(_act_recipe(gran, **extra))
            q_fine = secquant.quantize(model, r)
        except (RecipeError, ModelError):
            continue  # refused: fine
        q_tensor = secquant.quantize(model, recipe_from_dict(_act_recipe("tensor")))
        same = torch.equal(q_fine(x), q_tensor(x))
        assert not same, f"activations granularity {gran!r} was accepted but quantizes exactly like 'tensor'"
