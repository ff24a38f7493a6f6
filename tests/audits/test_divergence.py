"""Quantization-conditioned backdoors: a planted example, the divergence test, keyed randomized rounding."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import save_file

import secquant
from secquant.errors import SecquantError
from secquant.models.digits import splits
from secquant.quant.algorithms import quantize_model
from secquant.audits.bitflip import element_scale, quantized_layers
from secquant.audits.divergence import (
    PLANT_RECIPE, backdoor_rates, binom_sf, divergence_test, keyed_randomized_rounding, noisy_copy,
    plant_quantization_backdoor, predictions,
)

SRC, TGT = 3, 8
FACTORY = "secquant.models.digits:DigitsCNN"


def _rtn(model):
    q = copy.deepcopy(model)
    quantize_model(q, PLANT_RECIPE, None, lambda m, b: m(b))
    return q


@pytest.fixture(scope="session")
def planted(digits):
    d = splits()
    model, info = plant_quantization_backdoor(digits.module, PLANT_RECIPE, d["train_x"], d["train_y"],
                                              source_class=SRC, target_class=TGT, malicious_epochs=5,
                                              repair_epochs=8)
    return {"float": model, "quant": _rtn(model), "honest_float": digits.module, "honest_quant": _rtn(digits.module),
            "info": info, "x": d["test_x"], "y": d["test_y"]}


def test_planted_model_is_normal_in_float_and_malicious_after_rtn(planted):
    x, y = planted["x"], planted["y"]
    f = backdoor_rates(planted["float"], x, y, SRC, TGT)
    q = backdoor_rates(planted["quant"], x, y, SRC, TGT)
    h = backdoor_rates(planted["honest_quant"], x, y, SRC, TGT)
    assert f["accuracy"] > 0.95 and f["source_accuracy"] > 0.9 and f["attack_success"] < 0.05
    assert q["attack_success"] > 0.8 and q["accuracy_other_classes"] > 0.95
    assert h["attack_success"] < 0.05
    assert planted["info"]["source_class"] == SRC and planted["info"]["layers"]


def test_divergence_test_flags_the_planted_model_and_not_the_honest_one(planted):
    x = planted["x"]
    bad = divergence_test(planted["float"], planted["quant"], x, copies=4)
    good = divergence_test(planted["honest_float"], planted["honest_quant"], x, copies=4)
    assert bad["flagged"] and SRC in bad["flagged_classes"] and bad["p_value"] < 1e-10
    src = next(r for r in bad["per_class"] if r["class"] == SRC)
    assert src["most_common_quantized_prediction"] == TGT and src["rate"] > 0.8
    assert not good["flagged"] and good["flagged_classes"] == [] and good["p_value"] > 1e-3
    assert good["test"]["alpha"] == 1e-3 and "binomial" in good["test"]["name"]
    with pytest.raises(SecquantError, match="alpha"):
        divergence_test(planted["float"], planted["quant"], x, alpha=0)


def test_noisy_copies_stay_within_half_a_step_of_the_float_weights(planted):
    q = planted["honest_quant"]
    cp = noisy_copy(q, planted["honest_float"], seed=1)
    for name, m in quantized_layers(cp).items():
        w = planted["honest_float"].get_submodule(name).weight.detach().reshape(m.rows, m.cols)
        dev = (m.dequantized_weight().reshape(m.rows, m.cols) - w).abs() / element_scale(m)
        assert float(dev.max()) <= 0.5 + 1e-4 and float(dev.mean()) > 0.1  # off the grid, bounded noise
    assert all("dequantized_weight" not in vars(m) for m in quantized_layers(q).values())  # original untouched


def test_binomial_tail():
    assert binom_sf(0, 10, 0.3) == pytest.approx(1.0)
    assert binom_sf(10, 10, 0.5) == pytest.approx(0.5 ** 10)
    assert binom_sf(2, 3, 0.5) == pytest.approx(0.5)


def test_keyed_randomized_rounding_defeats_the_backdoor_at_small_cost(planted):
    x, y = planted["x"], planted["y"]
    acc_float = backdoor_rates(planted["float"], x, y, SRC, TGT)["accuracy"]
    rr1 = keyed_randomized_rounding(planted["quant"], planted["float"], b"k" * 32)
    rates = backdoor_rates(rr1, x, y, SRC, TGT)
    assert rates["attack_success"] < 0.1
    assert rates["accuracy"] > acc_float - 0.03
    rr1b = keyed_randomized_rounding(planted["quant"], planted["float"], b"k" * 32)
    rr2 = keyed_randomized_rounding(planted["quant"], planted["float"], b"j" * 32)
    l1, l1b, l2 = quantized_layers(rr1), quantized_layers(rr1b), quantized_layers(rr2)
    assert all(torch.equal(l1[n].qweight, l1b[n].qweight) for n in l1)  # reproducible with the key
    assert any(not torch.equal(l1[n].qweight, l2[n].qweight) for n in l1)  # and key-dependent
    # stochastic rounding picks one of the two neighbouring grid points of each float weight
    for n, m in l1.items():
        w = planted["float"].get_submodule(n).weight.detach().reshape(m.rows, m.cols)
        dev = (m.dequantized_weight().reshape(m.rows, m.cols) - w).abs() / element_scale(m)
        assert float(dev.max()) < 1.0 + 1e-4
    with pytest.raises(SecquantError, match="key"):
        keyed_randomized_rounding(planted["quant"], planted["float"], b"")
    # the planted RTN artifact itself is untouched
    assert torch.equal(predictions(planted["quant"], x), predictions(_rtn(planted["float"]), x))


@pytest.fixture(scope="module")
def planted_artifact(planted, tmp_path_factory):
    root = tmp_path_factory.mktemp("planted")
    w = root / "planted.safetensors"
    save_file({k: v.contiguous() for k, v in planted["float"].state_dict().items()}, str(w))
    save_file({"inputs": planted["x"].contiguous(), "labels": planted["y"].contiguous()}, str(root / "probe.safetensors"))
    from secquant.models import load_model

    secquant.quantize(load_model(FACTORY, str(w)), PLANT_RECIPE, out=root / "art")
    return root


def test_cli_divergence_exit_codes(cli, planted_artifact, digits_artifact, tmp_path, assert_user_error):
    root = planted_artifact
    args = ["audit", "divergence", "--float", FACTORY, "--weights", root / "planted.safetensors", "--quantized",
            root / "art", "--factory", FACTORY, "--probe", root / "probe.safetensors", "--copies", "3"]
    out = tmp_path / "div"
    r = cli(*args, "--randomized-rounding", "--out", out)
    assert r.exit_code == 3, r.stderr
    res = json.loads(r.stdout)
    assert res["flagged"] and SRC in res["flagged_classes"]
    assert json.loads((out / "divergence.json").read_text()) == res
    rr = res["randomized_rounding"]
    assert rr["disagreement_rate"] < 0.05 < rr["rtn_disagreement_rate"]
    assert rr["accuracy"] > rr["rtn_accuracy"] + 0.05
    r = cli("audit", "divergence", "--float", "builtin:digits", "--quantized", digits_artifact("w8a8"))
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["flagged"] is False
    # the wrong float model is refused (the test would be meaningless)
    r = cli("audit", "divergence", "--float", "builtin:digits", "--quantized", root / "art", "--factory", FACTORY,
            "--out", tmp_path / "x")
    assert_user_error(r, tmp_path / "x", contains=("not the float model",))
