"""Recipe files: YAML and JSON load; malformed ones fail with errors naming the field and the problem."""

from __future__ import annotations

import json

import pytest
import yaml

from secquant.api import resolve_recipe
from secquant.errors import RecipeError
from secquant.recipes import PRESETS, Recipe, load_recipe

YAML_RECIPE = """\
name: my-w4
description: 4-bit weights, first conv kept in float
weights:
  bits: 4
  symmetric: false
  granularity: group
  group_size: 32
  observer: mse
activations:
  bits: 8
  symmetric: false
  granularity: token
  dynamic: true
targets: [Linear, Conv2d]
ignore: ["features.0"]
overrides:
  - pattern: "classifier.*"
    weights: {bits: 8, granularity: channel}
calibration:
  num_samples: 64
  batch_size: 16
"""


def _check_yaml_recipe(r: Recipe) -> None:
    assert r.name == "my-w4"
    assert r.weights.bits == 4 and r.weights.group_size == 32 and not r.weights.symmetric
    assert r.weights.observer == "mse"
    assert r.activations.dynamic and r.activations.granularity == "token"
    assert r.targets == ["Linear", "Conv2d"]
    assert r.ignore == ["features.0"]
    assert r.overrides[0].weights.bits == 8
    assert r.calibration.num_samples == 64 and r.calibration.batch_size == 16
    assert not r.needs_calibration


@pytest.mark.parametrize("suffix", [".yaml", ".yml"])
def test_yaml_recipe_loads(tmp_path, suffix):
    p = tmp_path / f"r{suffix}"
    p.write_text(YAML_RECIPE)
    _check_yaml_recipe(load_recipe(p))


def test_json_recipe_loads(tmp_path):
    data = yaml.safe_load(YAML_RECIPE)
    p = tmp_path / "r.json"
    p.write_text(json.dumps(data))
    r = load_recipe(p)
    _check_yaml_recipe(r)
    assert r == load_recipe(_write(tmp_path, "r.yaml", YAML_RECIPE))


def _write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return p


@pytest.mark.parametrize("name", sorted(PRESETS))
@pytest.mark.parametrize("fmt", ["yaml", "json"])
def test_preset_round_trips_through_a_file(tmp_path, name, fmt):
    data = PRESETS[name].model_dump(mode="json")
    text = yaml.safe_dump(data) if fmt == "yaml" else json.dumps(data)
    assert load_recipe(_write(tmp_path, f"p.{fmt}", text)) == PRESETS[name]


def test_minimal_recipe_defaults(tmp_path):
    r = load_recipe(_write(tmp_path, "m.yaml", "weights: {bits: 6}\n"))
    assert r.weights.bits == 6 and r.activations is None and r.name == "custom"


def test_resolve_recipe_file_preset_and_object(tmp_path):
    p = _write(tmp_path, "r.yaml", YAML_RECIPE)
    assert resolve_recipe(p).name == "my-w4"
    assert resolve_recipe(str(p)).name == "my-w4"
    assert resolve_recipe("w4a16") == PRESETS["w4a16"]
    assert resolve_recipe(PRESETS["w8a8"]) is PRESETS["w8a8"]


BAD_FILES = [
    # (file name, text, substrings the error must contain)
    ("bits.yaml", "weights:\n  bits: 12\n", ["weights.bits", "less than or equal to 8"]),
    ("bits1.yaml", "weights:\n  bits: 1\n", ["weights.bits", "greater than or equal to 2"]),
    ("bits-type.yaml", "weights:\n  bits: eight\n", ["weights.bits", "integer"]),
    ("unknown.yaml", "weights:\n  bits: 8\n  bitz: 4\n", ["weights.bitz", "extra"]),
    ("unknown-top.yaml", "weights: {bits: 8}\nactivation: {bits: 8}\n", ["activation", "extra"]),
    ("group.yaml", "weights:\n  bits: 4\n  granularity: group\n", ["weights", "group_size"]),
    ("token.yaml", "weights: {bits: 8}\nactivations:\n  bits: 8\n  granularity: token\n",
     ["activations", "token", "dynamic"]),
    ("gran.yaml", "weights:\n  bits: 8\n  granularity: row\n", ["weights.granularity", "tensor"]),
    ("observer.yaml", "weights:\n  bits: 8\n  observer: magic\n", ["weights.observer"]),
    ("percentile.yaml", "weights: {bits: 8}\nactivations: {bits: 8, observer: percentile, percentile: 120}\n",
     ["activations.percentile"]),
    ("calib.yaml", "weights: {bits: 8}\ncalibration: {num_samples: 0}\n", ["calibration.num_samples"]),
    ("override.yaml", "weights: {bits: 8}\noverrides:\n  - weights: {bits: 4}\n", ["overrides.0.pattern", "required"]),
    ("invalid.yaml", "weights:\n  bits: [8\n", ["not valid YAML"]),
    ("tabs.yaml", "weights:\n\tbits: 8\n", ["not valid YAML"]),
    ("invalid.json", '{"weights": {"bits": 8,}}', ["not valid JSON"]),
    ("list.yaml", "- weights\n- activations\n", ["mapping"]),
    ("scalar.json", "42", ["mapping"]),
    ("empty.yaml", "", ["mapping"]),
    ("nothing.yaml", "name: x\n", ["weights, activations or both"]),
]


@pytest.mark.parametrize("fname,text,needles", BAD_FILES, ids=[b[0] for b in BAD_FILES])
def test_malformed_recipe_file_error_names_field_and_problem(tmp_path, fname, text, needles):
    p = _write(tmp_path, fname, text)
    with pytest.raises(RecipeError) as ei:
        load_recipe(p)
    msg = str(ei.value)
    assert str(p) in msg or fname in msg, msg
    for n in needles:
        assert n.lower() in msg.lower(), f"{n!r} not in {msg!r}"


def test_missing_recipe_file(tmp_path):
    with pytest.raises(RecipeError) as ei:
        load_recipe(tmp_path / "nope.yaml")
    assert "nope.yaml" in str(ei.value) and "does not exist" in str(ei.value)
    with pytest.raises(RecipeError) as ei:
        resolve_recipe(str(tmp_path / "nope.yml"))
    assert "does not exist" in str(ei.value)


def test_yaml_is_loaded_safely(tmp_path):
    """A YAML file with a Python object tag is refused, not constructed."""
    p = _write(tmp_path, "evil.yaml", "weights: !!python/object/apply:os.system ['touch pwned']\n")
    with pytest.raises(RecipeError):
        load_recipe(p)
    assert not (tmp_path / "pwned").exists()
