"""Adversarial robustness audit: STE gradients through quantizers, FGSM/PGD, defensive (Lipschitz) QAT, CLI."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import secquant
from secquant.errors import SecquantError
from secquant.models.digits import splits
from secquant.recipes import get_preset
from secquant.audits.robustness import (
    _input_grad, accuracy, defensive_qat, fgsm, lipschitz_penalty, pgd, robust_accuracy, ste_gradients,
)


@pytest.fixture(scope="module")
def data(digits):
    d = splits()
    return d["test_x"][:200], d["test_y"][:200]


@pytest.fixture(scope="module")
def w8a8(digits):
    return secquant.quantize(digits, "w8a8").module


def test_ste_gives_gradients_through_static_activation_quantizers_and_keeps_the_forward(w8a8, data):
    x, y = data[0][:16], data[1][:16]
    assert float(_input_grad(w8a8, x, y).abs().sum()) == 0.0  # rounding: zero gradient almost everywhere
    with torch.no_grad():
        before = w8a8(x)
    with ste_gradients(w8a8):
        g = _input_grad(w8a8, x, y)
        with torch.no_grad():
            inside = w8a8(x)
    assert float(g.abs().sum()) > 0
    assert torch.equal(before, inside)  # the forward pass is the exact fake-quantized one
    assert float(_input_grad(w8a8, x, y).abs().sum()) == 0.0  # restored on exit


def test_fgsm_and_pgd_stay_in_the_ball_and_hurt_accuracy(digits, data):
    x, y = data
    m = digits.module
    for adv in (fgsm(m, x, y, 0.1), pgd(m, x, y, 0.1, steps=5)):
        assert float((adv - x).abs().max()) <= 0.1 + 1e-6
        assert float(adv.min()) >= 0.0 and float(adv.max()) <= 1.0
    assert torch.equal(pgd(m, x, y, 0.0), x)
    clean = accuracy(m, x, y)
    a_fgsm, a_pgd = accuracy(m, fgsm(m, x, y, 0.1), y), accuracy(m, pgd(m, x, y, 0.1, steps=10), y)
    assert clean > 0.95
    assert a_pgd < a_fgsm < clean - 0.15  # PGD (iterated) is the stronger attack
    assert accuracy(m, pgd(m, x, y, 0.2, steps=10), y) < 0.1


def test_robust_accuracy_grid_white_box_and_transfer(digits, w8a8, data):
    x, y = data
    res = robust_accuracy({"fp32": digits.module, "w8a8": w8a8}, x, y, [0.0, 0.05, 0.2], steps=5)
    assert res["eps"] == [0.0, 0.05, 0.2]
    f, q = res["models"]["fp32"], res["models"]["w8a8"]
    assert f["pgd"][0] == f["clean"] and q["pgd"][0] == q["clean"]
    assert "pgd_transfer" in q and "pgd_transfer" not in f
    for r in (f, q):
        assert r["pgd"][0] > r["pgd"][1] > r["pgd"][2]
        assert r["pgd"][2] < 0.15
    assert q["pgd_transfer"][2] < 0.5  # float-crafted examples transfer to the int8 model
    assert "straight-through" in res["attack"]["quantized_gradients"]
    with pytest.raises(SecquantError, match="eps"):
        robust_accuracy({"fp32": digits.module}, x, y, [1.5])
    with pytest.raises(SecquantError, match="input range"):
        robust_accuracy({"fp32": digits.module}, x * 3, y, [0.1])


def test_lipschitz_penalty_is_zero_for_orthogonal_weights_and_differentiable():
    lin = nn.Linear(8, 8, bias=False)
    nn.init.orthogonal_(lin.weight)
    assert float(lipschitz_penalty(nn.Sequential(lin), 1.0).detach()) < 1e-8
    with torch.no_grad():
        lin.weight.mul_(2.0)  # singular values 2: ||W W^T - I||^2 = 8 * (4 - 1)^2
    pen = lipschitz_penalty(nn.Sequential(lin), 0.5)
    assert float(pen.detach()) == pytest.approx(0.5 * 8 * 9, rel=1e-4)
    pen.backward()
    assert lin.weight.grad is not None and float(lin.weight.grad.abs().sum()) > 0


def _dequantized_penalty(model: nn.Module) -> float:
    from secquant.quant.modules import QuantizedWeightMixin

    total = 0.0
    for m in model.modules():
        if isinstance(m, QuantizedWeightMixin):
            w = m.dequantized_weight().reshape(m.rows, -1)
            gram = w @ w.t() if w.shape[0] <= w.shape[1] else w.t() @ w
            total += float(((gram - torch.eye(gram.shape[0])) ** 2).sum())
    return total


def test_defensive_qat_applies_the_penalty_through_train_qat(digits):
    d = splits()
    x, y = d["train_x"][:384], d["train_y"][:384]
    plain, lp = defensive_qat(digits.module, get_preset("w4a4"), x, y, epochs=2, beta=0.0)
    defended, ld = defensive_qat(digits.module, get_preset("w4a4"), x, y, epochs=2, beta=1e-2)
    assert _dequantized_penalty(defended) < 0.8 * _dequantized_penalty(plain)
    assert ld[0] > lp[0]  # the reported loss includes the penalty term
    xt, yt = d["test_x"], d["test_y"]
    assert accuracy(defended, xt, yt) > 0.9 and accuracy(plain, xt, yt) > 0.9
    with pytest.raises(SecquantError):
        defensive_qat(digits.module, get_preset("w4a4"), x, y, epochs=1, beta=-1.0)


def test_cli_robustness_writes_json_and_plot(cli, digits_artifact, tmp_path):
    art = digits_artifact("w8a8-dynamic")
    out = tmp_path / "rob"
    r = cli("audit", "robustness", "--float", "builtin:digits", "--quantized", art, "--eps", "0,0.1",
            "--steps", "2", "--samples", "64", "--out", out)
    assert r.exit_code == 0, r.stderr
    res = json.loads(r.stdout)
    assert json.loads((out / "robustness.json").read_text()) == res
    assert (out / "robustness.svg").read_text().lstrip().startswith("<?xml")
    page = (out / "report.html").read_text()
    assert "<svg" in page and f"{100 * res['models']['w8a8-dynamic']['pgd'][1]:.1f}%" in page
    assert set(res["models"]) == {"fp32", "w8a8-dynamic"} and res["n_samples"] == 64
    q = res["models"]["w8a8-dynamic"]
    assert q["fgsm"][0] == q["clean"] and q["pgd"][1] < q["clean"]


def test_cli_robustness_refuses_bad_input(cli, digits_artifact, tmp_path, assert_user_error):
    art = digits_artifact("w8a8-dynamic")
    out = tmp_path / "rob"
    r = cli("audit", "robustness", "--float", "builtin:digits", "--quantized", art, "--eps", "0,abc", "--out", out)
    assert_user_error(r, out, contains=("--eps",))
    r = cli("audit", "robustness", "--float", "builtin:digits", "--quantized", tmp_path / "missing", "--out", out)
    assert_user_error(r, out)


def test_cli_robustness_defensive_qat_reports_before_and_after(cli, digits_artifact, tmp_path):
    out = tmp_path / "rob"
    r = cli("audit", "robustness", "--float", "builtin:digits", "--quantized", digits_artifact("w8a8-dynamic"),
            "--eps", "0,0.1", "--steps", "2", "--samples", "64", "--defensive-qat", "w4a4", "--epochs", "1",
            "--beta", "0.01", "--out", out)
    assert r.exit_code == 0, r.stderr
    dq = json.loads(r.stdout)["defensive"]
    assert set(dq["models"]) == {"qat", "qat+lipschitz"}
    assert dq["defensive_qat"]["beta"] == 0.01 and dq["defensive_qat"]["recipe"] == "w4a4"
    assert dq["defensive_qat"]["losses_defensive"][0] > dq["defensive_qat"]["losses_plain"][0]
    assert all(0.5 < m["clean"] <= 1.0 for m in dq["models"].values())
    assert (out / "defensive_qat.svg").is_file() and page_has(out / "report.html", "Lipschitz")


def page_has(path, text: str) -> bool:
    return text in path.read_text()


def test_cli_robustness_on_a_factory_classifier_with_its_own_data(cli, tmp_path):
    from safetensors.torch import save_file
    from tiny_factory import tiny

    torch.manual_seed(0)
    m = tiny().eval()
    x = torch.rand(64, 6)
    with torch.no_grad():
        y = m(x).argmax(-1)
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(tmp_path / "w.safetensors"))
    save_file({"inputs": x, "labels": y}, str(tmp_path / "data.safetensors"))
    art = tmp_path / "art"
    secquant.quantize("tiny_factory:tiny", "w8a16", out=art, weights=str(tmp_path / "w.safetensors"))
    r = cli("audit", "robustness", "--float", "tiny_factory:tiny", "--weights", tmp_path / "w.safetensors",
            "--quantized", art, "--factory", "tiny_factory:tiny", "--data", tmp_path / "data.safetensors",
            "--eps", "0,0.5", "--steps", "5")
    assert r.exit_code == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["models"]["fp32"]["clean"] == 1.0  # labels are the float model's own predictions
    assert res["models"]["w8a16"]["pgd"][1] < res["models"]["w8a16"]["clean"]
