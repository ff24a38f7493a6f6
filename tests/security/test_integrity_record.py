"""Integrity records made at seal time: carried in the signed payload, checked on load, usable while serving."""

from __future__ import annotations

import json

import pytest
import torch

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
    assert set(sums) == set(m.layers)


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
    x, y = splits()["test_x"], splits()["test_y"]
    clean = float((qm(x).argmax(1) == y).float().mean())
    layer = qm.integrity.layers["features.3"]
    layer.qweight.view(-1)[100] ^= 0x80  # a high-bit flip in memory, as a rowhammer attack would
    layer._w_cache = None
    found = qm.check_integrity()
    assert [(c.layer, c.group) for c in found] == [("features.3", 100 // 64)]
    assert qm.check_integrity(repair=True) and qm.check_integrity() == []
    repaired = float((qm(x).argmax(1) == y).float().mean())
    assert repaired >= clean - 0.02


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
    sums = {n: v.copy() for n, v in sums.items()}
    sums["classifier.1"][5] ^= 1  # one checksum altered: as if those weights had been changed
    (d / INTEGRITY_NAME).write_bytes(make_record(sums, key, gb))
    raw["files"][INTEGRITY_NAME] = file_sha256(d / INTEGRITY_NAME)
    (d / "secquant.json").write_text(json.dumps(raw))
    with pytest.raises(ArtifactError, match="integrity check failed"):
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
    assert_user_error(cli("integrity", art), contains=("no integrity record",))
    assert_user_error(cli("integrity", tmp_path / "missing.age"), contains=("does not exist",))
