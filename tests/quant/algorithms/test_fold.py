"""BatchNorm folding before quantization, on a torchvision-style ResNet (conv-BN-ReLU, residual, downsample)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import secquant
from secquant.models.digits import splits
from secquant.quant.algorithms.fold import fold_batchnorm, producer_pairs


@pytest.fixture(scope="module")
def resnet_digits():
    from layers_models import resnet, train

    d = splits()
    torch.manual_seed(0)
    return train(resnet(), d["train_x"], d["train_y"], epochs=4)


def _accuracy(module, x, y) -> float:
    with torch.no_grad():
        return float((module(x).argmax(1) == y).float().mean())


def test_folding_keeps_the_float_outputs(resnet_digits):
    x = splits()["test_x"][:128]
    m = copy.deepcopy(resnet_digits)
    pairs = fold_batchnorm(m, {n for n, mod in m.named_modules() if isinstance(mod, nn.Conv2d)})
    assert pairs == {"bn1": "conv1", "layer1.bn1": "layer1.conv1", "layer1.bn2": "layer1.conv2",
                     "layer2.bn1": "layer2.conv1", "layer2.bn2": "layer2.conv2",
                     "layer2.downsample.1": "layer2.downsample.0"}
    with torch.no_grad():
        assert torch.allclose(m(x), resnet_digits(x), atol=1e-5, rtol=0)
        assert not torch.equal(m.conv1.weight, resnet_digits.conv1.weight)  # the scale went into the kernel
    assert float(m.bn1.running_var[0]) == pytest.approx(1 - m.bn1.eps) and m.conv1.bias is not None


def test_only_provable_eval_mode_pairs_are_folded():
    m = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4)).eval()
    m[1].train()
    assert fold_batchnorm(m, {"0"}) == {}  # batch statistics: not a fixed affine map
    m.eval()
    assert fold_batchnorm(copy.deepcopy(m), set()) == {}  # a conv the recipe leaves in float keeps its BatchNorm

    class Branch(nn.Module):  # the conv's output also feeds the residual: folding would change it
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(2, 2, 1), nn.BatchNorm2d(2)

        def forward(self, x):
            y = self.conv(x)
            return self.bn(y) + y

    assert producer_pairs(Branch()) == {}


@pytest.mark.parametrize("preset", ["w8a16", "w8a8"])
def test_quantized_resnet_keeps_its_accuracy_and_reloads(resnet_digits, tmp_path, preset):
    from layers_models import resnet

    d = splits()
    calib = tmp_path / "calib.safetensors"
    from safetensors.torch import save_file

    save_file({"inputs": d["train_x"][:128].contiguous()}, str(calib))
    out = tmp_path / preset
    qm = secquant.quantize(resnet_digits, preset, out=out, calib=calib if preset == "w8a8" else None)
    x, y = d["test_x"], d["test_y"]
    f_acc, q_acc = _accuracy(resnet_digits, x, y), _accuracy(qm, x, y)
    with torch.no_grad():
        agree = float((qm(x).argmax(1) == resnet_digits(x).argmax(1)).float().mean())
    print(f"\n{preset}: float {f_acc:.4f} quantized {q_acc:.4f} agreement {agree:.4f}")
    assert f_acc > 0.85 and q_acc >= f_acc - 0.02 and agree >= 0.97, (f_acc, q_acc, agree)
    conv1 = qm.manifest.layers["conv1"]
    assert conv1.config["folded_batchnorm"] == "bn1" and conv1.bias  # the float conv1 has no bias
    assert not qm.manifest.float_layers or all(e.reason.startswith("folded into") for e in qm.manifest.float_layers)
    back = secquant.load(out, model=resnet().eval(), allow_unsealed=True)
    assert torch.equal(back(x[:16]), qm(x[:16]))


def test_audits_compare_a_folded_layer_with_the_folded_float_weight(resnet_digits):
    """The divergence audit builds copies 'float weight + rounding-sized noise' of each quantized layer: for a
    layer with a folded BatchNorm that float weight must be the folded one (else the copies are another model)."""
    from secquant.audits.divergence import noisy_copy, predictions

    x = splits()["test_x"][:256]
    qm = secquant.quantize(resnet_digits, "w8a16")
    assert qm.module.get_submodule("conv1").folded_batchnorm == "bn1"
    agree = float((predictions(noisy_copy(qm.module, resnet_digits, seed=0), x)
                   == predictions(resnet_digits, x)).float().mean())
    assert agree > 0.97, agree
    unfolded = secquant.quantize(resnet_digits, secquant.PRESETS["w8a16"].model_copy(update={"fold_batchnorm": False}))
    assert "folded_batchnorm" not in unfolded.manifest.layers["conv1"].config
    assert {e.name: e.reason for e in unfolded.manifest.float_layers}["bn1"] == "normalization kept in float"
