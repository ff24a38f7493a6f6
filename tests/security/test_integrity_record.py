"""Integrity records made at seal time: carried in the signed payload, checked on load, usable while serving."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.numpy import save as st_save

import secquant
from secquant.artifact import read_manifest
from secquant.artifact.hashing import file_sha256
from secquant.errors import ArtifactError, SecquantError
from secquant.models.digits import splits
from secquant.security import keygen, open_sealed, seal
from secquant.security.checksums import INTEGRITY_NAME, make_record, read_record, write_record_for_weights
from secquant.security.integrity import IntegrityGuard


@pytest.fixture(scope="module")
def sealed(digits_artifact, tmp_path_factory):
    d = tmp_path_factory.mktemp("integrity")
    alice = keygen(d / "alice")
    art = digits_artifact("w8a8")
    return seal(art, [alice.recipient.read_text().strip()], alice.sign_key, d / "m.age"), alice, art


def test_seal_adds_a_signed_record_and_leaves_the_source_alone(sealed, tmp_path):
    path, alice, art = sealed
    assert INTEGRITY_NAME not in read_manifest(art).files and not (art / INTEGRITY_NAME).exists()
    assert not [p for p in art.parent.iterdir() if ".seal-" in p.name]  # staging area removed
    opened = open_sealed(path, alice.identity, alice.verify_key, tmp_path / "o")
    m = read_manifest(opened)
    assert m.files[INTEGRITY_NAME] == file_sha256(opened / INTEGRITY_NAME)
    key, group_bytes, sums = read_record((opened / INTEGRITY_NAME).read_bytes())
    assert len(key) == 32 and group_bytes == 64
    with safe_open(str(opened / "model.safetensors"), "np") as f:  # every tensor of the file, not only the codes
        stored = set(f.keys())
    assert set(sums) == stored and {f"{n}.qweight" for n in m.layers} < stored
    assert {"classifier.1.bias", "classifier.1.smooth_scale", "features.1.running_var",
            "features.0.input_quant.scale"} < stored


def test_fresh_key_per_seal(sealed, tmp_path):
    path, alice, art = sealed
    again = seal(art, [alice.recipient.read_text().strip()], alice.sign_key, tmp_path / "again.age")
    a = open_sealed(path, alice.identity, alice.verify_key, tmp_path / "a")
    b = open_sealed(again, alice.identity, alice.verify_key, tmp_path / "b")
    assert read_record((a / INTEGRITY_NAME).read_bytes())[0] != read_record((b / INTEGRITY_NAME).read_bytes())[0]


def test_load_checks_and_keeps_the_guard_for_serving(sealed):
    path, alice, _ = sealed
    qm = secquant.load(path, identity=alice.identity, verify_key=alice.verify_key)
    assert qm.check_integrity() == []
    assert "classifier.3._w_cache" in qm.integrity.tensors  # the cache, covered after the codes were verified
    x, y = splits()["test_x"], splits()["test_y"]
    clean = float((qm(x).argmax(1) == y).float().mean())
    layer = qm.integrity.layers["features.3"]
    layer.qweight.view(-1)[100] ^= 0x80  # a high-bit flip in memory, as a rowhammer attack would
    found = qm.check_integrity()
    assert [(c.layer, c.group) for c in found] == [("features.3", 100 // 64)]
    assert qm.check_integrity(repair=True) and qm.check_integrity() == []
    repaired = float((qm(x).argmax(1) == y).float().mean())
    assert repaired >= clean - 0.02
    qm.module.get_submodule("features.0.input_quant").scale.view(torch.int32).view(-1)[0] ^= 1 << 30
    assert [c.name for c in qm.check_integrity()] == ["features.0.input_quant.scale"]


def test_a_mismatching_record_refuses_the_load(sealed, tmp_path):
    path, alice, _ = sealed
    d = open_sealed(path, alice.identity, alice.verify_key, tmp_path / "o")
    key, gb, sums = read_record((d / INTEGRITY_NAME).read_bytes())
    # a record for other weights (here: the same weights under another key) no longer matches
    write_record_for_weights(d / "model.safetensors", d / INTEGRITY_NAME, key=b"k" * 32)
    raw = json.loads((d / "secquant.json").read_text())
    raw["files"][INTEGRITY_NAME] = file_sha256(d / INTEGRITY_NAME)
    (d / "secquant.json").write_text(json.dumps(raw))
    qm = secquant.load(d, allow_unsealed=True)  # key and checksums agree with each other: loads
    assert qm.check_integrity() == []
    for name, group in (("classifier.1.qweight", 5), ("classifier.1.bias", 0), ("features.1.running_mean", 0)):
        bad = {n: v.copy() for n, v in sums.items()}
        bad[name][group] ^= 1  # one checksum altered: as if that tensor had been changed after sealing
        (d / INTEGRITY_NAME).write_bytes(make_record(bad, key, gb))
        raw["files"][INTEGRITY_NAME] = file_sha256(d / INTEGRITY_NAME)
        (d / "secquant.json").write_text(json.dumps(raw))
        with pytest.raises(ArtifactError, match=f"integrity check failed: 1 group.* in {name}"):
            secquant.load(d, allow_unsealed=True)


def test_an_old_codes_only_record_is_refused_with_what_to_do(sealed, tmp_path):
    path, alice, _ = sealed
    d = open_sealed(path, alice.identity, alice.verify_key, tmp_path / "o")
    key, gb, sums = read_record((d / INTEGRITY_NAME).read_bytes())
    v2 = {"__scheme__": np.frombuffer(b"secquant.keyed-group-sum.v2", dtype=np.uint8),
          "__key__": np.frombuffer(key, dtype=np.uint8), "__group_bytes__": np.array([gb], dtype=np.int64),
          **{n[: -len(".qweight")]: v for n, v in sums.items() if n.endswith(".qweight")}}
    (d / INTEGRITY_NAME).write_bytes(st_save(v2))
    raw = json.loads((d / "secquant.json").read_text())
    raw["files"][INTEGRITY_NAME] = file_sha256(d / INTEGRITY_NAME)
    (d / "secquant.json").write_text(json.dumps(raw))
    with pytest.raises(ArtifactError, match=r"covers only the packed weight codes.*seal the artifact again"):
        secquant.load(d, allow_unsealed=True)


def test_malformed_records_and_models_without_one(digits_artifact):
    with pytest.raises(ArtifactError, match="malformed"):
        read_record(b"not a safetensors file")
    qm = secquant.load(digits_artifact("w8a8"), allow_unsealed=True)
    assert qm.integrity is None
    with pytest.raises(SecquantError, match="seal"):
        qm.check_integrity()
    with pytest.raises(ArtifactError, match="does not describe"):
        IntegrityGuard(qm.module, b"k" * 32, reference={"nope": torch.zeros(1)})


def test_cli_integrity(sealed, cli, assert_user_error, tmp_path):
    path, alice, art = sealed
    r = cli("integrity", path, "--identity", alice.identity, "--verify-key", alice.verify_key)
    assert r.exit_code == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["intact"] is True and res["layers"] == 4 and res["groups"] > 0
    assert res["tensors"] == 40  # 36 stored in model.safetensors + the 4 dequantized-weight caches
    assert_user_error(cli("integrity", art), contains=("no integrity record",))
    assert_user_error(cli("integrity", tmp_path / "missing.age"), contains=("does not exist",))
