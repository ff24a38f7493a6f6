"""DP calibration of activation ranges, data-free (synthetic) calibration and encrypted calibration files."""

from __future__ import annotations

import copy
import math
import os

import pytest
import torch
from safetensors.torch import save_file

import secquant
from secquant.errors import SecquantError
from secquant.models.digits import splits
from secquant.privacy.dp_calibration import gaussian_scale
from secquant.privacy.encrypted_data import encrypt_file
from secquant.models.encoder import random_vocabulary_sentences
from secquant.recipes import get_preset
from secquant.security import keygen


@pytest.fixture(scope="module")
def calib_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("dpcal") / "calib.safetensors"
    save_file({"inputs": splits()["train_x"][:256].contiguous()}, str(p))
    return p


def _acc(qm) -> float:
    x, y = splits()["test_x"], splits()["test_y"]
    return float((qm(x).argmax(1) == y).float().mean())


@pytest.fixture(scope="module")
def private_and_plain(digits, calib_file):
    plain = secquant.quantize(digits, "w8a8", calib=calib_file)
    private = secquant.quantize(digits, "w8a8", calib=calib_file, dp_epsilon=1.0, dp_delta=1e-5)
    return private, plain


def test_dp_w8a8_digits_within_a_point_and_ledger(private_and_plain):
    private, plain = private_and_plain
    a_dp, a_plain = _acc(private), _acc(plain)
    print(f"digits w8a8 accuracy: DP epsilon=1 {a_dp:.4f}, non-private {a_plain:.4f}")
    assert a_dp >= a_plain - 0.01  # bar: within 1.0 accuracy point
    m = private.manifest
    # the exact count of private samples is not published (add/remove-one neighbours: it is private)
    assert m.calibration.data == "private" and m.calibration.num_samples is None
    (entry,) = m.privacy.entries
    assert entry["epsilon"] == 1.0 and entry["delta"] == 1e-5
    assert "OpenDP" in entry["mechanism"] and "zCDP" in entry["accountant"]
    assert "add or remove one sample" in entry["neighbouring"] and "num_samples" not in entry
    # a DP count: the noise on it has sd noise_scale (~12 here), so 256 +- 7 sd
    assert abs(entry["num_samples_dp"] - 256) < 7 * entry["noise_scale"]
    assert entry["statistics"] == 2 * 4  # lo and hi of 4 quantizers (4 inputs); the count is one more coordinate
    assert entry["noise_scale"] > 0 and "ZeroQ" in entry["public_prior"]
    assert "trained without differential privacy" in entry["public_prior"]  # the prior is not independent
    assert plain.manifest.privacy.entries == [] and plain.manifest.calibration.data == "raw"


def test_dp_ranges_differ_from_the_exact_ones_by_noise(private_and_plain, calib_file):
    """The DP ranges against the exact (non-private) ranges of the same model on the same data.

    The exact ranges are computed on the DP model itself: its SmoothQuant-style scales were searched on
    synthetic inputs (alpha 0.8 for the last Linear, 0.5 on real data), and a quantizer's range is in the
    units of its smoothed input x / s, so the scales of the separately calibrated non-private model are not
    comparable (that model's last input range is ~7x larger in its own units)."""
    from secquant.quant.algorithms.rtn import calibrate
    from secquant.quant.modules import ActQuant

    private, _ = private_and_plain

    def scales(module):
        return torch.stack([m.scale for m in module.modules() if isinstance(m, ActQuant) and not m.args.dynamic])

    exact = copy.deepcopy(private.module)
    calibrate(exact, private.handle.adapter.calibration_batches(calib_file, 256, 32), private.handle.run)
    s_dp, s_exact = scales(private.module), scales(exact)
    assert not torch.equal(s_dp, s_exact)  # noise was added
    # the ranges keep their order of magnitude: measured ratios 0.74-2.11 over 5 runs (the input image's range
    # comes from the ZeroQ prior's shape, which DP rescales but cannot reshape)
    ratio = s_dp / s_exact
    assert float(ratio.max()) < 4 and float(ratio.min()) > 0.25, ratio.tolist()


def test_gaussian_scale_meets_the_budget():
    s1, rho1 = gaussian_scale(8, 1.0, 1e-5)
    s8, _ = gaussian_scale(8, 8.0, 1e-5)
    s48, _ = gaussian_scale(48, 1.0, 1e-5)
    assert s8 < s1 < s48  # more budget, less noise; more statistics, more noise
    # zCDP -> (eps, delta): eps = rho + 2 sqrt(rho ln(1/delta)) is an upper bound on what OpenDP certifies
    assert rho1 + 2 * math.sqrt(rho1 * math.log(1e5)) >= 1.0 - 1e-6
    assert rho1 == pytest.approx(8 / (2 * s1**2), rel=1e-9)  # L2 sensitivity sqrt(k): rho = k / (2 sigma^2)


def test_dp_bad_input(digits, calib_file):
    with pytest.raises(SecquantError, match="nothing to spend"):
        secquant.quantize(digits, "w8a8", calib="synthetic", dp_epsilon=1.0)
    with pytest.raises(SecquantError, match="--calib"):
        secquant.quantize(digits, "w8a8", dp_epsilon=1.0)
    small = get_preset("w8a8").model_copy(update={"calibration": get_preset("w8a8").calibration.model_copy(
        update={"num_samples": 32})})
    with pytest.raises(SecquantError, match="positive"):
        secquant.quantize(digits, small, calib=calib_file, dp_epsilon=0.0)
    with pytest.raises(SecquantError, match="delta"):
        secquant.quantize(digits, small, calib=calib_file, dp_epsilon=1.0, dp_delta=1.5)
    with pytest.raises(SecquantError, match="--dp-epsilon"):
        secquant.quantize(digits, small, calib=calib_file, dp_delta=1e-6)


def test_too_few_samples_for_the_epsilon_is_refused(digits, tmp_path):
    few = tmp_path / "few.safetensors"
    save_file({"inputs": splits()["train_x"][:20].contiguous()}, str(few))
    small = get_preset("w8a8").model_copy(update={"calibration": get_preset("w8a8").calibration.model_copy(
        update={"num_samples": 32})})  # 32 ZeroQ prior samples: test time
    with pytest.raises(SecquantError, match=r"too few for epsilon=0.5.*use at least \d+ samples"):
        secquant.quantize(digits, small, calib=few, dp_epsilon=0.5, dp_delta=1e-3)


def test_synthetic_calibration_reads_no_data(digits):
    qm = secquant.quantize(digits, "w8a8", calib="synthetic")
    assert qm.manifest.calibration.data == "synthetic" and "ZeroQ" in qm.manifest.calibration.source
    assert _acc(qm) >= _acc(secquant.quantize(digits, "w8a8")) - 0.01


def test_random_vocabulary_sentences_are_seeded_and_data_free():
    class Tok:
        def get_vocab(self):
            return {w: i for i, w in enumerate(["alpha", "beta", "##ing", "[CLS]", "7"]
                    + [chr(97 + i // 26) + chr(97 + i % 26) for i in range(200)])}

    a = random_vocabulary_sentences(Tok(), 5, seed=1)
    assert a == random_vocabulary_sentences(Tok(), 5, seed=1) != random_vocabulary_sentences(Tok(), 5, seed=2)
    words = {w.strip(".").lower() for s in a for w in s.split()}
    assert not words & {"##ing", "[cls]", "7"}


def test_encrypted_calibration_file_is_decrypted_in_memory(digits, calib_file, tmp_path):
    alice, bob = keygen(tmp_path / "alice"), keygen(tmp_path / "bob")
    enc = encrypt_file(calib_file, [alice.recipient.read_text().strip()], tmp_path / "calib.safetensors.age")
    assert enc.read_bytes().startswith(b"age-encryption.org/v1")
    before = set(os.listdir("/dev/shm"))
    from_plain = secquant.quantize(digits, "w8a8", calib=calib_file)
    from_age = secquant.quantize(digits, "w8a8", calib=enc, identity=alice.identity)
    x = splits()["test_x"][:64]
    assert torch.equal(from_age(x), from_plain(x))
    assert set(os.listdir("/dev/shm")) == before  # the plaintext is gone
    with pytest.raises(SecquantError, match="--identity"):
        secquant.quantize(digits, "w8a8", calib=enc)
    with pytest.raises(SecquantError, match="cannot be decrypted"):
        secquant.quantize(digits, "w8a8", calib=enc, identity=bob.identity)
    assert set(os.listdir("/dev/shm")) == before


def test_cli_quantize_with_dp(cli, calib_file, tmp_path):
    r = cli("quantize", "builtin:digits", "--preset", "w8a8", "--calib", calib_file, "--dp-epsilon", "2",
            "--out", tmp_path / "a")
    assert r.exit_code == 0, r.stderr
    assert "spent epsilon=2" in r.stderr and "calibration data: private" in r.stderr
    key = r.stderr.split("commitment key")[1].split(":")[-1].split()[0]  # printed once, stored nowhere
    m = secquant.load(tmp_path / "a", allow_unsealed=True).manifest
    from secquant.privacy.provenance import verify_commitment
    assert verify_commitment(calib_file, m.calibration.source_hmac_sha256, key) and key not in m.to_json()
    ev = cli("inspect", tmp_path / "a")
    assert ev.exit_code == 0
