"""Quantization-aware retraining (LSQ): gradients, conversion, and the digits accuracy bars."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from secquant.quant.algorithms import apply_recipe, calibrate
from secquant.quant.algorithms.qat import (
    QATLayer, convert_qat, grad_scale, init_activation_ranges, prepare_qat, round_ste, train_qat,
)
from secquant.quant.modules import QuantLinear
from secquant.recipes import QuantArgs, Recipe, get_preset


def test_ste_and_grad_scale():
    x = torch.tensor([0.4, 1.6], requires_grad=True)
    round_ste(x).sum().backward()
    assert torch.equal(round_ste(x.detach()), torch.tensor([0.0, 2.0]))
    assert torch.equal(x.grad, torch.ones(2))
    s = torch.tensor(2.0, requires_grad=True)
    (grad_scale(s, 0.25) * 3).backward()
    assert float(s.grad) == pytest.approx(0.75)


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))


@pytest.mark.parametrize("acts", [None, QuantArgs(bits=8, symmetric=False), QuantArgs(bits=8, symmetric=False,
                                                                                     granularity="token", dynamic=True)])
def test_gradients_reach_weights_and_step_sizes(acts):
    m = _mlp()
    recipe = Recipe(weights=QuantArgs(bits=4, symmetric=False, granularity="group", group_size=8), activations=acts)
    prepare_qat(m, recipe)
    x = torch.randn(64, 16)
    init_activation_ranges(m, [x], lambda mod, b: mod(b))
    m(x).pow(2).sum().backward()
    layer = m[0]
    assert isinstance(layer, QATLayer)
    assert layer.float_mod.weight.grad is not None and layer.float_mod.weight.grad.abs().sum() > 0
    assert layer.wq.scale.grad is not None and layer.wq.scale.grad.abs().sum() > 0
    assert layer.wq.zero.grad is not None  # asymmetric: learnable zero point


def test_converted_model_matches_qat_eval_output():
    m = _mlp()
    recipe = Recipe(weights=QuantArgs(bits=3, granularity="channel"), activations=QuantArgs(bits=6, symmetric=False))
    prepare_qat(m, recipe)
    data = torch.randn(256, 16)
    init_activation_ranges(m, data.split(64), lambda mod, b: mod(b))
    target = torch.randint(0, 4, (256,))
    train_qat(m, lambda: [(data, target)], nn.functional.cross_entropy, epochs=3, lr=1e-2)
    with torch.no_grad():
        before = m(data)
    infos = convert_qat(m)
    assert set(infos) == {"0", "2"} and isinstance(m[0], QuantLinear)
    with torch.no_grad():
        after = m(data)
    assert float((after - before).abs().max()) < 1e-4
    assert m[0].input_quant.calibrated


@pytest.fixture(scope="module")
def digits_model(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("SECQUANT_CACHE", str(tmp_path_factory.mktemp("cache")))
    from secquant.models.digits import pretrained_digits, splits
    yield pretrained_digits(), splits()
    mp.undo()


def _acc(m, d):
    with torch.no_grad():
        return float((m(d["test_x"]).argmax(1) == d["test_y"]).float().mean()) * 100


@pytest.mark.parametrize("preset", ["w4a4", "w2a8"])
def test_digits_qat_within_one_point_and_not_worse_than_ptq(digits_model, preset):
    """The issue's bar: W4A4 and W2A8 retrained within 1 point of fp32; PTQ alone is reported beside it."""
    model, d = digits_model
    recipe = get_preset(preset)
    fp32 = _acc(model, d)
    ptq = copy.deepcopy(model)
    apply_recipe(ptq, recipe)
    calibrate(ptq, d["train_x"][:256].split(64), lambda mod, b: mod(b))
    q = copy.deepcopy(model)
    for p in q.parameters():
        p.requires_grad_(True)
    prepare_qat(q, recipe)
    init_activation_ranges(q, d["train_x"][:256].split(64), lambda mod, b: mod(b))
    g = torch.Generator().manual_seed(0)

    def batches():
        perm = torch.randperm(len(d["train_y"]), generator=g)
        for i in range(0, len(perm), 64):
            b = perm[i:i + 64]
            yield d["train_x"][b], d["train_y"][b]

    train_qat(q, batches, nn.functional.cross_entropy, epochs=15, lr=1e-3)
    convert_qat(q)
    qat_acc, ptq_acc = _acc(q, d), _acc(ptq, d)
    print(f"{preset}: fp32 {fp32:.2f} PTQ {ptq_acc:.2f} QAT {qat_acc:.2f}")
    assert qat_acc >= fp32 - 1.0
    # never meaningfully worse than PTQ (two held-out samples = 0.22 points of noise) ...
    assert qat_acc >= ptq_acc - 0.25
    if ptq_acc < fp32 - 1.0:
        # ... and clearly better where PTQ alone drops more than the tolerance
        assert qat_acc > ptq_acc + 5.0
    if preset == "w2a8":
        assert ptq_acc < fp32 - 1.0  # 2-bit PTQ alone drops far more than a point


def test_rotated_recipes_are_refused_for_retraining():
    from secquant.errors import RecipeError
    from secquant.recipes import Rotation

    recipe = Recipe(weights=QuantArgs(bits=4, granularity="group", group_size=16), rotation=Rotation(block=16))
    with pytest.raises(RecipeError, match="remove `rotation`"):
        prepare_qat(nn.Sequential(nn.Linear(32, 4)), recipe)
