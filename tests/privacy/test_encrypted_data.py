"""Audit data given as age-encrypted files: decrypted in memory, same results as the plain file."""

from __future__ import annotations

import json
import os

from safetensors.torch import save_file

from secquant.models.digits import splits
from secquant.privacy.encrypted_data import encrypt_file
from secquant.security import keygen


def test_robustness_audit_reads_an_encrypted_data_file(cli, digits_artifact, tmp_path, assert_user_error):
    alice = keygen(tmp_path / "alice")
    data = tmp_path / "eval.safetensors"
    s = splits()
    save_file({"inputs": s["test_x"][:64].contiguous(), "labels": s["test_y"][:64].contiguous()}, str(data))
    enc = encrypt_file(data, [alice.recipient.read_text().strip()])
    args = ["audit", "robustness", "--float", "builtin:digits", "--quantized", digits_artifact("w8a8"),
            "--eps", "0,0.05", "--steps", "2"]
    before = set(os.listdir("/dev/shm"))
    plain = cli(*args, "--data", data)
    sealed = cli(*args, "--data", enc, "--identity", alice.identity)
    assert plain.exit_code == 0 and sealed.exit_code == 0, sealed.stderr
    a, b = json.loads(plain.stdout), json.loads(sealed.stdout)
    assert a["n_samples"] == b["n_samples"] == 64 and a["models"] == b["models"]
    assert set(os.listdir("/dev/shm")) == before
    assert_user_error(cli(*args, "--data", enc), contains=("--identity",))
