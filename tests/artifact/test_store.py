"""Artifact round trips: what `secquant.load` rebuilds from disk equals the in-memory quantized model,
and nothing in an artifact is (or needs) pickle."""

from __future__ import annotations

import json
import pickle
import shutil

import pytest
import torch
from safetensors import safe_open

import secquant
from secquant.artifact import file_sha256
from secquant.errors import ArtifactError, OutputExistsError

PRESETS = ["w8a8", "w8a8-dynamic", "w8a16", "w4a16", "w4a8-dynamic"]


@pytest.mark.parametrize("preset", PRESETS)
def test_digits_round_trip_identical_outputs(digits, tmp_path, preset):
    out = tmp_path / f"digits-{preset}"
    qm = secquant.quantize(digits, preset, out=out)
    assert qm.path == out
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors", "secquant.json"]
    loaded = secquant.load(out, allow_unsealed=True)
    x = digits.adapter.builtin["test_x"][:128]
    y_mem, y_disk = qm(x), loaded(x)
    assert torch.equal(y_mem, y_disk)
    # ...and it is a working classifier, not just a consistent one
    acc = (y_disk.argmax(-1) == digits.adapter.builtin["test_y"][:128]).float().mean().item()
    assert acc > 0.85, (preset, acc)
    assert loaded.manifest.recipe == qm.manifest.recipe
    assert loaded.manifest.layers.keys() == qm.manifest.layers.keys()
    assert loaded.manifest.source == qm.manifest.source
    # no temp dirs next to the artifact
    assert [p.name for p in tmp_path.iterdir()] == [out.name]


@pytest.mark.parametrize("preset", ["w8a8", "w4a16"])
def test_round_trip_state_dict_identical(digits_artifact, digits, preset):
    qm_disk = secquant.load(digits_artifact(preset), allow_unsealed=True)
    qm_mem = secquant.quantize(digits, preset)
    a, b = qm_mem.module.state_dict(), qm_disk.module.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def test_artifact_sizes_shrink_with_bits(digits_artifact):
    size = {p: (digits_artifact(p) / "model.safetensors").stat().st_size for p in ["w8a16", "w4a16"]}
    float_size = secquant.load(digits_artifact("w8a16"), allow_unsealed=True).manifest.source.float_size_bytes
    assert size["w4a16"] < size["w8a16"] < float_size
    assert size["w8a16"] < 0.4 * float_size


def _is_safetensors(path) -> bool:
    try:
        with safe_open(str(path), "pt") as f:
            list(f.keys())
        return True
    except Exception:
        return False


def _assert_no_pickle_files(d):
    for p in sorted(d.rglob("*")):
        if not p.is_file():
            continue
        head = p.read_bytes()[:4]
        assert not head.startswith(b"PK\x03\x04"), f"{p} is a zip (torch.save) archive"
        if p.suffix == ".safetensors":
            assert _is_safetensors(p), p
            continue
        assert not head.startswith(b"\x80"), f"{p} starts with the pickle PROTO opcode"
        # every other file is text (JSON / tokenizer files), and JSON files are JSON
        text = p.read_bytes().decode("utf-8")
        if p.suffix == ".json":
            json.loads(text)


@pytest.mark.parametrize("preset", ["w8a8", "w4a8-dynamic"])
def test_no_pickle_in_digits_artifact(digits_artifact, preset):
    d = digits_artifact(preset)
    _assert_no_pickle_files(d)
    assert _is_safetensors(d / "model.safetensors")
    json.loads((d / "secquant.json").read_text())


def test_load_needs_no_pickle(digits_artifact, digits, monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("pickle / torch.load used while loading an artifact")

    class RefusingUnpickler:
        def __init__(self, *a, **k):
            refuse()

    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "Unpickler", RefusingUnpickler)
    monkeypatch.setattr(torch, "load", refuse)
    qm = secquant.load(digits_artifact("w8a8"), allow_unsealed=True)
    x = digits.adapter.builtin["test_x"][:16]
    assert qm(x).shape == (16, 10)


def test_minilm_artifact_has_arch_files_and_matches(minilm_artifact, sentences_file, monkeypatch):
    out, qm_mem = minilm_artifact
    names = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    for required in ["model.safetensors", "secquant.json", "config.json", "tokenizer.json", "tokenizer_config.json",
                     "vocab.txt", "special_tokens_map.json"]:
        assert required in names, f"{required} missing from the minilm artifact: {sorted(names)}"
    _assert_no_pickle_files(out)
    manifest = json.loads((out / "secquant.json").read_text())
    assert set(manifest["files"]) == names - {"secquant.json"}
    for name, digest in manifest["files"].items():
        assert file_sha256(out / name) == digest
    assert manifest["model"]["kind"] == "encoder"
    assert manifest["model"]["rebuild"]["loader"] == "hf-encoder"
    # embeddings and token embeddings are quantized too
    assert any(e["type"] == "Embedding" for e in manifest["layers"].values())
    assert any(e["type"] == "Linear" for e in manifest["layers"].values())

    monkeypatch.setattr(pickle, "loads", lambda *a, **k: (_ for _ in ()).throw(AssertionError("pickle used")))
    monkeypatch.setattr(torch, "load", lambda *a, **k: (_ for _ in ()).throw(AssertionError("torch.load used")))
    loaded = secquant.load(out, allow_unsealed=True)
    texts = sentences_file.read_text().splitlines()[:8]
    e_mem, e_disk = qm_mem.encode(texts), loaded.encode(texts)
    assert e_disk.shape == (8, 384)
    torch.testing.assert_close(e_disk, e_mem, rtol=0, atol=1e-6)
    # the loaded tokenizer is the artifact's own copy
    assert loaded.handle.adapter.model_dir == out


def test_save_refuses_existing_dir_and_overwrite_replaces(digits, tmp_path):
    out = tmp_path / "a"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(OutputExistsError):
        secquant.quantize(digits, "w8a16", out=out)
    assert (out / "keep.txt").read_text() == "precious"
    secquant.quantize(digits, "w8a16", out=out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors", "secquant.json"]
    secquant.load(out, allow_unsealed=True)
    assert [p.name for p in tmp_path.iterdir()] == ["a"]


def test_failed_save_leaves_nothing(digits, tmp_path, monkeypatch):
    import secquant.artifact.store as store

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(store, "save_file", boom)
    out = tmp_path / "x"
    with pytest.raises(RuntimeError):
        secquant.quantize(digits, "w8a16", out=out)
    assert list(tmp_path.iterdir()) == []


def test_load_of_module_artifact_needs_the_module(tmp_path):
    from tiny_factory import tiny

    torch.manual_seed(0)
    m = tiny()
    out = tmp_path / "m"
    qm = secquant.quantize(m, "w8a16", out=out)
    with pytest.raises(ArtifactError, match="model="):
        secquant.load(out, allow_unsealed=True)
    loaded = secquant.load(out, model=tiny(), allow_unsealed=True)
    x = torch.randn(5, 6)
    assert torch.equal(loaded(x), qm(x))


def test_copied_artifact_loads(digits_artifact, tmp_path, digits):
    dst = tmp_path / "copy"
    shutil.copytree(digits_artifact("w4a8-dynamic"), dst)
    x = digits.adapter.builtin["test_x"][:8]
    assert torch.equal(secquant.load(dst, allow_unsealed=True)(x), secquant.load(digits_artifact("w4a8-dynamic"), allow_unsealed=True)(x))
