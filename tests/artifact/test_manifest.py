"""secquant.json: its content, and every way a tampered or inconsistent artifact must fail clearly."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import secquant
from secquant.recipes import get_preset
from secquant.artifact import FORMAT_VERSION, file_sha256, read_manifest, state_dict_sha256
from secquant.artifact.manifest import MAX_MANIFEST_BYTES
from secquant.errors import ArtifactError, SecquantError

DIGITS_LAYERS = {
    "features.0": ("Conv2d", [16, 1, 3, 3]),
    "features.3": ("Conv2d", [32, 16, 3, 3]),
    "classifier.1": ("Linear", [64, 512]),
    "classifier.3": ("Linear", [10, 64]),
}
EXPECTED_W = {  # preset: (bits, granularity, group_size)
    "w8a8": (8, "channel", None), "w8a8-dynamic": (8, "channel", None), "w8a16": (8, "channel", None),
    "w4a16": (4, "group", 128), "w4a8-dynamic": (4, "group", 128),
}
EXPECTED_A = {"w8a8": (8, False, "tensor"), "w8a8-dynamic": (8, True, "token"), "w8a16": None, "w4a16": None,
              "w4a8-dynamic": (8, True, "token")}


def _manifest(d: Path) -> dict:
    return json.loads((d / "secquant.json").read_text())


def _write_manifest(d: Path, m: dict) -> None:
    (d / "secquant.json").write_text(json.dumps(m, indent=2))


@pytest.fixture
def art(digits_artifact, tmp_path) -> Path:
    """A private copy of a builtin:digits w8a8 artifact, free to tamper with."""
    dst = tmp_path / "art"
    shutil.copytree(digits_artifact("w8a8"), dst)
    return dst


def _rewrite_weights(d: Path, edit) -> None:
    """Change model.safetensors and re-hash it in the manifest, so only the tensor checks can object."""
    sd = load_file(str(d / "model.safetensors"))
    edit(sd)
    save_file(sd, str(d / "model.safetensors"), metadata={"format": "secquant.artifact", "format_version": "1"})
    m = _manifest(d)
    m["files"]["model.safetensors"] = file_sha256(d / "model.safetensors")
    _write_manifest(d, m)


def _load_error(d: Path) -> str:
    with pytest.raises(ArtifactError) as ei:
        secquant.load(d, allow_unsealed=True)
    assert isinstance(ei.value, SecquantError)
    msg = str(ei.value)
    assert msg and "\n" not in msg, msg
    return msg


@pytest.mark.parametrize("preset", sorted(EXPECTED_W))
def test_manifest_content(digits_artifact, digits, preset):
    d = digits_artifact(preset)
    m = _manifest(d)
    assert m["format"] == "secquant.artifact"
    assert m["format_version"] == FORMAT_VERSION == 1
    assert m["secquant_version"] == secquant.__version__
    assert m["model"]["spec"] == "builtin:digits" and m["model"]["kind"] == "classifier"
    assert m["recipe"] == secquant.PRESETS[preset].model_dump(mode="json")
    assert set(m["layers"]) == set(DIGITS_LAYERS)
    bits, gran, gs = EXPECTED_W[preset]
    for name, (typ, shape) in DIGITS_LAYERS.items():
        e = m["layers"][name]
        assert e["type"] == typ and e["source_type"] == typ
        assert e["weight"]["shape"] == shape
        assert e["weight"]["args"]["bits"] == bits
        assert e["weight"]["args"]["granularity"] == gran
        assert e["weight"]["args"]["group_size"] == gs
        a = EXPECTED_A[preset]
        if a is None:
            assert e["activation"] is None
        else:
            assert (e["activation"]["bits"], e["activation"]["dynamic"], e["activation"]["granularity"]) == a
    src = m["source"]
    assert re.fullmatch(r"[0-9a-f]{64}", src["weights_sha256"])
    assert src["weights_sha256"] == state_dict_sha256(digits.module.state_dict())
    assert src["num_parameters"] == sum(p.numel() for p in digits.module.parameters())
    assert src["float_size_bytes"] > 0
    assert set(m["files"]) == {"model.safetensors"}
    assert m["files"]["model.safetensors"] == file_sha256(d / "model.safetensors")
    # presets that read data (static activations or the activation-aware scale search) say so
    if get_preset(preset).needs_calibration:
        assert m["calibration"]["data"] == "raw" and m["calibration"]["num_samples"] > 0
    else:
        assert m["calibration"]["data"] == "none" and m["calibration"]["num_samples"] == 0


def test_describe_rows(digits_artifact):
    qm = secquant.load(digits_artifact("w4a8-dynamic"), allow_unsealed=True)
    rows = {r["layer"]: r for r in qm.layers()}
    assert set(rows) == set(DIGITS_LAYERS)
    assert rows["classifier.1"]["w_bits"] == 4 and rows["classifier.1"]["w_granularity"] == "group128"
    assert rows["classifier.1"]["a_bits"] == 8 and rows["classifier.1"]["a_mode"] == "dynamic/token"


def test_source_hash_is_order_independent_and_content_sensitive():
    sd = {"a": torch.arange(4.0), "b": torch.ones(2, 2)}
    h = state_dict_sha256(sd)
    assert re.fullmatch(r"[0-9a-f]{64}", h)
    assert state_dict_sha256({"b": sd["b"], "a": sd["a"]}) == h
    assert state_dict_sha256({"a": torch.arange(4.0), "b": torch.tensor([[1.0, 1.0], [1.0, 1.5]])}) != h
    assert state_dict_sha256({"a": torch.arange(4.0).reshape(2, 2), "b": sd["b"]}) != h
    assert state_dict_sha256({"a": torch.arange(4.0).double(), "b": sd["b"]}) != h


# ---------------------------------------------------------------- failures


@pytest.mark.parametrize("version", [2, 0, "1", None])
def test_unknown_format_version(art, version):
    m = _manifest(art)
    m["format_version"] = version
    _write_manifest(art, m)
    msg = _load_error(art)
    assert "format_version" in msg and repr(version) in msg


def test_missing_format_version(art):
    m = _manifest(art)
    del m["format_version"]
    _write_manifest(art, m)
    assert "format_version" in _load_error(art)


def test_wrong_format(art):
    m = _manifest(art)
    m["format"] = "something.else"
    _write_manifest(art, m)
    assert "format" in _load_error(art)


@pytest.mark.parametrize("where", ["top", "layer", "source", "recipe"])
def test_unknown_manifest_field(art, where):
    m = _manifest(art)
    if where == "top":
        m["surprise"] = 1
        field = "surprise"
    elif where == "layer":
        m["layers"]["classifier.3"]["surprise"] = 1
        field = "layers.classifier.3.surprise"
    elif where == "source":
        m["source"]["surprise"] = 1
        field = "source.surprise"
    else:
        m["recipe"]["weights"]["surprise"] = 1
        field = "recipe.weights.surprise"
    _write_manifest(art, m)
    msg = _load_error(art)
    assert field in msg and "extra" in msg.lower(), msg


def test_manifest_not_json(art):
    (art / "secquant.json").write_text("{not json")
    assert "not valid JSON" in _load_error(art)


def test_manifest_missing(art):
    (art / "secquant.json").unlink()
    assert "secquant.json" in _load_error(art)


def test_not_a_directory(tmp_path):
    assert "not an artifact directory" in _load_error(tmp_path / "nope")


def test_bad_source_hash_format(art):
    m = _manifest(art)
    m["source"]["weights_sha256"] = "abc"
    _write_manifest(art, m)
    assert "source.weights_sha256" in _load_error(art)


def test_missing_tensor(art):
    _rewrite_weights(art, lambda sd: sd.pop("classifier.3.bias"))
    msg = _load_error(art)
    assert "classifier.3.bias" in msg and "lacks" in msg


def test_missing_qweight(art):
    _rewrite_weights(art, lambda sd: sd.pop("features.3.qweight"))
    assert "features.3.qweight" in _load_error(art)


def test_misshaped_tensor(art):
    def edit(sd):
        sd["classifier.3.weight_scale"] = torch.ones(11)

    _rewrite_weights(art, edit)
    msg = _load_error(art)
    assert "classifier.3.weight_scale" in msg and "(11,)" in msg and "(10,)" in msg


def test_wrong_dtype_tensor(art):
    def edit(sd):
        sd["classifier.1.qweight"] = sd["classifier.1.qweight"].to(torch.int16)

    _rewrite_weights(art, edit)
    assert "classifier.1.qweight" in _load_error(art)


def test_unexpected_tensor(art):
    def edit(sd):
        sd["classifier.9.weight"] = torch.zeros(3)

    _rewrite_weights(art, edit)
    assert "classifier.9.weight" in _load_error(art)


@pytest.mark.parametrize("bits", [4, 2, 7])
def test_layer_bits_do_not_match_tensors(art, bits):
    """The manifest says the layer is `bits`-bit but its packed tensor holds 8-bit codes."""
    m = _manifest(art)
    m["layers"]["classifier.1"]["weight"]["args"]["bits"] = bits
    _write_manifest(art, m)
    msg = _load_error(art)
    assert "classifier.1.qweight" in msg


def test_layer_granularity_does_not_match_tensors(art):
    m = _manifest(art)
    m["layers"]["features.3"]["weight"]["args"]["granularity"] = "tensor"
    _write_manifest(art, m)
    assert "features.3.weight_scale" in _load_error(art)


def test_layer_shape_does_not_match_tensors(art):
    m = _manifest(art)
    m["layers"]["classifier.3"]["weight"]["shape"] = [10, 32]
    m["layers"]["classifier.3"]["config"]["in_features"] = 32
    _write_manifest(art, m)
    assert "classifier.3" in _load_error(art)


def test_layer_missing_from_manifest(art):
    m = _manifest(art)
    del m["layers"]["classifier.1"]
    _write_manifest(art, m)
    assert "classifier.1" in _load_error(art)


def test_layer_not_in_architecture(art):
    m = _manifest(art)
    m["layers"]["classifier.7"] = m["layers"]["classifier.3"]
    _write_manifest(art, m)
    assert "classifier.7" in _load_error(art)


def test_activation_mode_does_not_match_tensors(art):
    m = _manifest(art)
    m["layers"]["classifier.1"]["activation"] = {**m["layers"]["classifier.1"]["activation"],
                                                 "granularity": "token", "dynamic": True}
    _write_manifest(art, m)
    assert "classifier.1" in _load_error(art)


def test_weights_modified_after_saving(art):
    raw = bytearray((art / "model.safetensors").read_bytes())
    raw[-1] ^= 0x01  # flip one bit of the last tensor's data: still a valid safetensors file
    (art / "model.safetensors").write_bytes(bytes(raw))
    msg = _load_error(art)
    assert "model.safetensors" in msg and "sha256" in msg


def test_weights_replaced_with_other_valid_weights(art, digits_artifact):
    """A different, self-consistent model.safetensors (e.g. another preset's) is caught by the hash."""
    shutil.copyfile(digits_artifact("w8a8-dynamic") / "model.safetensors", art / "model.safetensors")
    assert "model.safetensors" in _load_error(art)


def test_weights_file_missing(art):
    (art / "model.safetensors").unlink()
    msg = _load_error(art)
    assert "model.safetensors" in msg and "missing" in msg


def test_manifest_without_weights_entry(art):
    m = _manifest(art)
    m["files"] = {}
    _write_manifest(art, m)
    assert "model.safetensors" in _load_error(art)


@pytest.mark.parametrize("name", ["extra.txt", "sub/extra.bin", ".hidden"])
def test_extra_file(art, name):
    p = art / name
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(b"surprise")
    msg = _load_error(art)
    assert name in msg and "not listed" in msg


@pytest.mark.parametrize("name", ["../outside.txt", "sub/../../outside.txt", "/etc/hostname", "a\\..\\b",
                                  "C:/x", "./model.safetensors", "", "a//b"])
def test_unsafe_file_name_in_manifest(art, name):
    (art.parent / "outside.txt").write_text("outside")
    m = _manifest(art)
    m["files"][name] = "0" * 64
    _write_manifest(art, m)
    msg = _load_error(art)
    assert "unsafe file name" in msg


def test_bad_file_digest(art):
    m = _manifest(art)
    m["files"]["model.safetensors"] = "XYZ"
    _write_manifest(art, m)
    assert "sha256" in _load_error(art)


def test_oversize_manifest(art):
    m = _manifest(art)
    text = json.dumps(m)
    pad = MAX_MANIFEST_BYTES + 16 - len(text)
    (art / "secquant.json").write_text(text[:-1] + " " * pad + "}")  # still valid JSON
    assert (art / "secquant.json").stat().st_size > MAX_MANIFEST_BYTES
    msg = _load_error(art)
    assert "limit" in msg and str(MAX_MANIFEST_BYTES) in msg


def test_unknown_loader(art):
    m = _manifest(art)
    m["model"]["rebuild"]["loader"] = "pickle"
    _write_manifest(art, m)
    assert "loader" in _load_error(art)


def test_factory_artifact_needs_confirmation(art):
    """An artifact cannot make secquant import and run code just by naming it."""
    m = _manifest(art)
    m["model"]["rebuild"] = {"loader": "factory", "factory": "os:getcwd", "sample_shape": None}
    _write_manifest(art, m)
    msg = _load_error(art)
    assert "os:getcwd" in msg and "factory" in msg


def test_read_manifest_ok(digits_artifact):
    m = read_manifest(digits_artifact("w8a16"))
    assert m.format_version == 1 and m.recipe.name == "w8a16"
