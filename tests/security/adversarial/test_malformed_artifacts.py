"""Malformed unsealed artifact directories get one `error:` line, never a traceback or a huge allocation
(issue 13, item 9). Every shape is bounded by the architecture before anything is allocated."""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import secquant
from secquant.errors import SecquantError


def _variant(src: Path, dst: Path, edit_manifest=None, files: dict[str, bytes] | None = None) -> Path:
    """A copy of `src` with its manifest edited and/or files replaced (their hashes fixed in the manifest, as an
    attacker holding the unsealed directory would)."""
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst)
    m = json.loads((dst / "secquant.json").read_text())
    for name, data in (files or {}).items():
        (dst / name).write_bytes(data)
        m["files"][name] = hashlib.sha256(data).hexdigest()
    text = json.dumps(m)
    if edit_manifest is not None:
        text = edit_manifest(m) or json.dumps(m)
    (dst / "secquant.json").write_text(text)
    return dst


def _first_layer(m: dict) -> dict:
    return next(iter(m["layers"].values()))


def _set(path: list, value):
    def edit(m):
        node = m
        for k in path[:-1]:
            node = node[k] if not callable(k) else k(node)
        node[path[-1]] = value
    return edit


DIGITS_CASES = {
    "deep-nesting": (lambda m: json.dumps({**m, "tuning": "X"}).replace('"X"', "[" * 100_000 + "]" * 100_000),
                     "nests JSON"),
    "nesting-under-the-parser-limit": (lambda m: json.dumps({**m, "tuning": "X"}).replace('"X"', "[" * 900 + "]" * 900),
                                       "levels deep"),
    "5000-digit-integer": (lambda m: json.dumps(m).replace('"num_parameters": ', '"num_parameters": ' + "9" * 5000
                                                           + ", \"x\": "), "not valid JSON"),
    "72-PB-layer-shape": (_set([_first_layer, "weight", "shape"], [2**40, 2**40, 3, 3]), "less than or equal"),
    "shape-within-schema-bounds": (_set([_first_layer, "weight", "shape"], [2**30, 1, 3, 3]),
                                   "does not match the architecture"),
    "linear-in-features": (lambda m: _set(["layers", "classifier.1", "config", "in_features"], 2**40)(m),
                           "does not match the architecture"),
    "wrong-layer-type": (_set([_first_layer, "source_type"], "Embedding"), "architecture has a Conv2d"),
    "unknown-loader": (_set(["model", "rebuild", "loader"], "\x1b[31mevil"), "unknown model loader"),
}


@pytest.mark.parametrize("case", list(DIGITS_CASES))
def test_hostile_manifest_is_one_clean_error(digits_artifact, tmp_path, cli, assert_user_error, case):
    edit, says = DIGITS_CASES[case]
    d = _variant(digits_artifact("w8a16"), tmp_path / "a", edit)
    with pytest.raises(SecquantError, match=says):
        secquant.load(d, allow_unsealed=True)
    line = assert_user_error(cli("eval", d))
    assert "\x1b" not in line and len(line) <= 420


def test_bad_safetensors_headers(digits_artifact, tmp_path, cli, assert_user_error):
    good = (digits_artifact("w8a16") / "model.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", good[:8])
    header = json.loads(good[8:8 + n])
    name = next(k for k in header if k != "__metadata__")
    lying = dict(header)
    lying[name] = {**header[name], "data_offsets": [0, 2**40]}
    lying_bytes = json.dumps(lying).encode()
    bodies = {
        "huge-header-length": b"\xff" * 8 + b"{}",
        "truncated": good[: len(good) // 2],
        "not-json": struct.pack("<Q", 9) + b"{not json" + b"\0" * 64,
        "offsets-beyond-the-file": struct.pack("<Q", len(lying_bytes)) + lying_bytes + good[8 + n:],
    }
    for label, body in bodies.items():
        d = _variant(digits_artifact("w8a16"), tmp_path / label, files={"model.safetensors": body})
        with pytest.raises(SecquantError):
            secquant.load(d, allow_unsealed=True)
        assert_user_error(cli("eval", d), contains=("model.safetensors",))


def test_hf_config_unknown_type_and_giant_config(tiny_bert, tmp_path, cli, assert_user_error):
    art = tmp_path / "art"
    secquant.quantize(str(tiny_bert), "w8a16", out=art)
    cfg = json.loads((art / "config.json").read_text())
    for label, change, says in [("unknown-type", {"model_type": "no-such-model"}, "config"),
                                ("giant", {"vocab_size": 2**36}, "refusing to allocate")]:
        d = _variant(art, tmp_path / label, files={"config.json": json.dumps({**cfg, **change}).encode()})
        with pytest.raises(SecquantError, match=says):
            secquant.load(d, allow_unsealed=True)
        assert_user_error(cli("eval", d, "--against", str(tiny_bert)))


def test_factory_sample_shape_is_bounded(tmp_path):
    import torch
    from safetensors.torch import save_file

    from tiny_factory import tiny

    save_file({k: v.contiguous() for k, v in tiny().state_dict().items()}, str(tmp_path / "w.safetensors"))
    art = tmp_path / "art"
    secquant.quantize("tiny_factory:tiny", "w8a16", weights=str(tmp_path / "w.safetensors"), out=art)
    for bad in ([2**20, 2**20, 2**20], [0], "6", [True]):
        d = _variant(art, tmp_path / "bad", _set(["model", "rebuild", "sample_shape"], bad))
        with pytest.raises(SecquantError, match="sample_shape"):
            secquant.load(d, factory="tiny_factory:tiny", allow_unsealed=True)
    assert secquant.load(art, factory="tiny_factory:tiny", allow_unsealed=True)(torch.zeros(1, 6)).shape == (1, 3)


# ------------------------------------------------------------------------------------------------- fuzzing

JSON_LEAVES = st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True) | \
    st.text(max_size=20) | st.sampled_from(["builtin", "factory", "hf-encoder", "Linear", "os:abort", "..", "/etc"])
JSON_VALUES = st.recursive(JSON_LEAVES, lambda inner: st.lists(inner, max_size=4) |
                           st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)


def _paths(node, prefix=()):
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, prefix + (i,))


@pytest.fixture(scope="module")
def fuzz_base(digits_artifact, tmp_path_factory):
    src = digits_artifact("w8a16")
    return src, json.loads((src / "secquant.json").read_text()), tmp_path_factory.mktemp("fuzz")


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                   HealthCheck.too_slow])
@given(data=st.data())
def test_fuzzed_manifests_load_or_refuse_cleanly(fuzz_base, data):
    src, manifest, root = fuzz_base
    paths = [p for p in _paths(manifest) if p and p[0] != "files"]
    m = json.loads(json.dumps(manifest))
    for _ in range(data.draw(st.integers(1, 3))):
        path = data.draw(st.sampled_from(paths))
        node = m
        try:
            for k in path[:-1]:
                node = node[k]
            node[path[-1]] = data.draw(JSON_VALUES)
        except (KeyError, IndexError, TypeError):
            continue
    d = root / "case"
    shutil.rmtree(d, ignore_errors=True)
    shutil.copytree(src, d)
    (d / "secquant.json").write_text(json.dumps(m))
    try:
        secquant.load(d, allow_unsealed=True)
    except SecquantError:
        pass


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                   HealthCheck.too_slow])
@given(header=st.dictionaries(st.text(max_size=30), st.fixed_dictionaries({
    "dtype": st.sampled_from(["F32", "U8", "F16", "I64", "BOOL", "XX"]),
    "shape": st.lists(st.integers(-2, 2**40), max_size=4),
    "data_offsets": st.lists(st.integers(-1, 2**40), min_size=2, max_size=2)}), max_size=3),
    tail=st.binary(max_size=256))
def test_fuzzed_safetensors_load_or_refuse_cleanly(fuzz_base, header, tail):
    src, _, root = fuzz_base
    good = (src / "model.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", good[:8])
    real = json.loads(good[8:8 + n])
    real.update(header)
    h = json.dumps(real).encode()
    d = _variant(src, root / "st", files={"model.safetensors": struct.pack("<Q", len(h)) + h + good[8 + n:] + tail})
    try:
        secquant.load(d, allow_unsealed=True)
    except SecquantError:
        pass
