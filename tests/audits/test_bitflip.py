"""Bit-flip audit: single-bit edits of packed codes, progressive bit search vs random flips, integrity interplay."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import secquant
from secquant.errors import SecquantError
from secquant.models.digits import splits
from secquant.quant.primitives import unpack
from secquant.audits.bitflip import bitflip_audit, flip_bit, progressive_bit_search, quantized_layers, random_flips
from secquant.audits.robustness import accuracy


@pytest.fixture(scope="module")
def qmodels(digits):
    return {p: secquant.quantize(digits, p).module for p in ("w8a8", "w4a8-dynamic")}


@pytest.fixture(scope="module")
def data():
    d = splits()
    return (d["train_x"][:128], d["train_y"][:128]), (d["test_x"][:300], d["test_y"][:300])


def _bit_diff(a: torch.nn.Module, b: torch.nn.Module) -> int:
    la, lb = quantized_layers(a), quantized_layers(b)
    return sum(int(torch.bitwise_xor(la[n].qweight, lb[n].qweight).to(torch.int64).apply_(lambda v: bin(v).count("1"))
                   .sum()) for n in la)


@pytest.mark.parametrize("preset", ["w8a8", "w4a8-dynamic"])
def test_flip_bit_changes_exactly_one_stored_bit_and_flipping_back_restores(qmodels, preset):
    m = copy.deepcopy(qmodels[preset])
    layer = next(iter(quantized_layers(m).values()))
    bits = layer.weight_args.bits
    before = layer.qweight.clone()
    w_before = layer.dequantized_weight().clone()
    old, new = flip_bit(layer, 5, bits - 1)
    assert new == old ^ (1 << (bits - 1))
    assert int(unpack(layer.qweight, bits, layer.rows * layer.cols)[5]) == new
    assert _bit_diff(m, qmodels[preset]) == 1
    changed = (layer.dequantized_weight() != w_before).nonzero()
    assert changed.shape[0] == 1  # the dequantized weight (cache refreshed) changed in one element
    flip_bit(layer, 5, bits - 1)
    assert torch.equal(layer.qweight, before)


def test_progressive_bit_search_needs_few_flips_random_flips_do_nothing(qmodels, data):
    attack, evaluate = data
    m = copy.deepcopy(qmodels["w8a8"])
    flips = progressive_bit_search(m, attack, evaluate, max_flips=40)
    assert accuracy(m, *evaluate) < 0.2
    assert 1 <= len(flips) <= 40
    assert flips[-1].accuracy == pytest.approx(accuracy(m, *evaluate))
    assert len({(f.layer, f.index, f.bit) for f in flips}) == len(flips)  # never the same bit twice
    assert _bit_diff(m, qmodels["w8a8"]) == len(flips)
    r = copy.deepcopy(qmodels["w8a8"])
    random_flips(r, len(flips), seed=0)
    assert _bit_diff(r, qmodels["w8a8"]) == len(flips)
    assert accuracy(r, *evaluate) > 0.9


def test_audit_reports_attack_random_and_integrity(qmodels, data):
    attack, evaluate = data
    q = qmodels["w4a8-dynamic"]
    before = {n: m.qweight.clone() for n, m in quantized_layers(q).items()}
    res = bitflip_audit(q, attack, evaluate, max_flips=60, random_trials=2, integrity=True)
    assert all(torch.equal(m.qweight, before[n]) for n, m in quantized_layers(q).items())  # works on copies
    a = res["attack"]
    assert a["reached_target"] and a["final_accuracy"] < 0.2 and a["flips"] == len(a["flip_list"])
    assert res["random"]["accuracy_mean"] > 0.9 and len(res["random"]["accuracy_per_trial"]) == 2
    integ = res["integrity"]["attack"]
    assert integ["detection_rate"] == 1.0 and integ["detected_flips"] == a["flips"]
    assert integ["clean_after_repair"] is True
    assert integ["accuracy_after_repair"] > a["final_accuracy"] + 0.2
    assert res["integrity"]["random"]["detection_rate_mean"] == 1.0


def test_codebook_formats_and_float_models_are_refused(digits, data):
    nf4 = secquant.quantize(digits, "nf4").module
    with pytest.raises(SecquantError, match="uniform integer"):
        bitflip_audit(nf4, *data, max_flips=1)
    with pytest.raises(SecquantError, match="quantize it first"):
        bitflip_audit(digits.module, *data, max_flips=1)


def test_cli_bitflip(cli, digits_artifact, tmp_path, assert_user_error):
    art = digits_artifact("w8a8")
    out = tmp_path / "bf"
    r = cli("audit", "bitflip", art, "--max-flips", "40", "--integrity", "--random-trials", "1", "--out", out)
    assert r.exit_code == 0, r.stderr
    res = json.loads(r.stdout)
    assert json.loads((out / "bitflip.json").read_text()) == res
    assert res["recipe"] == "w8a8" and res["attack"]["attack_data"] == "training split (members)"
    assert res["attack"]["final_accuracy"] < 0.2 and res["integrity"]["attack"]["detection_rate"] == 1.0
    r = cli("audit", "bitflip", art, "--target-accuracy", "1.5", "--out", tmp_path / "x")
    assert_user_error(r, tmp_path / "x", contains=("--target-accuracy",))
    r = cli("audit", "bitflip", art, "--out", out)
    assert_user_error(r, out, existed=True, contains=("exists",))
