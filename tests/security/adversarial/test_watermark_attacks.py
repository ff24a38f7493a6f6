"""Attacks on the watermark by someone holding the marked model but not the key: noise on the codes, Gaussian
noise on the weights, re-quantization with another preset, one epoch of fine-tuning, and function-preserving
channel rescaling and permutation of hidden units. Each asserts the mark is still found (p <= 1e-6) and that the same
attack on an unmarked model is not mistaken for a mark."""

from __future__ import annotations

import copy
import hashlib

import pytest
import torch

import secquant
from secquant.audits.watermark_attacks import code_noise, finetune, gaussian_noise
from secquant.models import ModelHandle
from secquant.models.digits import splits
from secquant.security.watermark import (
    dequantized_float,
    embed_watermark,
    verify_watermark,
)

THRESHOLD = 1e-6


def key(i: int) -> bytes:
    return hashlib.sha256(f"test-watermark-attack-key-{i}".encode()).digest()


def acc(module, d) -> float:
    with torch.no_grad():
        return float((module(d["test_x"]).argmax(1) == d["test_y"]).float().mean()) * 100


@pytest.fixture(scope="module")
def owner(digits):
    """Per preset: the unmarked quantization and the owner's marked copy (key 0, default band)."""
    out = {}
    for preset in ("w8a8", "w8a16", "w4a8-dynamic"):  # SmoothQuant-style scales, none, AWQ-style scales + groups
        qm = secquant.quantize(digits, preset)
        marked = copy.deepcopy(qm.module)
        embed_watermark(marked, digits.module, key(0))
        out[preset] = (qm.module, marked)
    return digits, splits(), out


def check(suspect, unmarked_suspect, marked, h, **kw):
    """The mark is found in the attacked marked model and not in the same attack on the unmarked one."""
    r = verify_watermark(suspect, key(0), reference=marked, float_model=h.module, **kw)
    clean = verify_watermark(unmarked_suspect, key(0), reference=marked, float_model=h.module, **kw)
    assert not clean.detected and clean.p_value > 1e-4, clean.z
    return r


def test_pm1_on_half_the_codes_keeps_the_mark(owner):
    """Issue 15's bar: +-1 on a random 50% of the codes (which removed the parity mark at a 0.11-point cost)."""
    h, d, models = owner
    for preset, (unmarked, marked) in models.items():
        for seed in range(3):
            for fraction in (0.5, 1.0):
                r = check(code_noise(marked, fraction, seed), code_noise(unmarked, fraction, seed), marked, h)
                assert r.detected and r.p_value <= THRESHOLD, (preset, seed, fraction, r.z)
                if fraction == 0.5:
                    assert r.z > 10, (preset, seed, r.z)  # margin: detection needs z >= 4.98
        # undoing (absent) reparametrizations must not wreck a layer: w8a8's SmoothQuant scales make a code step
        # up to 1000x larger in float space on some input channels, so the fit runs where rounding noise is even
        attacked = code_noise(marked, 0.5, 0)
        plain = verify_watermark(attacked, key(0), reference=marked, float_model=h.module, align=False)
        for name, v in verify_watermark(attacked, key(0), reference=marked, float_model=h.module).layers.items():
            assert v["noise_rms_steps"] < 1.5 * plain.layers[name]["noise_rms_steps"], (preset, name)


def test_gaussian_noise_on_the_dequantized_weights(owner):
    h, d, models = owner
    unmarked, marked = models["w8a16"]
    base = acc(marked, d)
    # 3% of the weight RMS is about one int8 step: it costs accuracy, yet the mark stays far above threshold
    for sigma in (0.01, 0.03):
        noisy = gaussian_noise(h.module, marked, sigma, seed=1)
        r = check(noisy, gaussian_noise(h.module, unmarked, sigma, seed=1), marked, h)
        assert r.detected and r.z > 8, (sigma, r.z, base - acc(noisy, d))


def _requant(h, float_like: torch.nn.Module, preset: str):
    return secquant.quantize(ModelHandle(float_like, h.spec, h.rebuild, h.adapter), preset).module


def test_requantization_with_another_8bit_preset(owner):
    """Re-rounding the dequantized marked weights onto another grid (static w8a8 re-searches SmoothQuant scales)
    keeps the rounding bias measured against the float weights on the owner's grid."""
    h, _, models = owner
    unmarked, marked = models["w8a16"]
    for preset in ("w8a8", "w8a8-dynamic"):
        again = _requant(h, dequantized_float(h.module, marked), preset)
        clean = _requant(h, dequantized_float(h.module, unmarked), preset)
        r = check(again, clean, marked, h)
        assert r.detected and r.z > 15, (preset, r.z)


def test_requantization_to_4_bits_needs_enough_weights():
    """Re-rounding an 8-bit mark onto a 16x coarser 4-bit grid adds ~20 steps^2 of noise per weight; z still grows
    like sqrt(N), so 1 M weights keep it (digits' 38 k do not: the bench measures z ~ 3 there)."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(1024, 1024))
    qm = secquant.quantize(net, "w8a16")
    unmarked = copy.deepcopy(qm.module)
    embed_watermark(qm.module, net, key(1))  # default band: tau ~ 0.06
    again = secquant.quantize(dequantized_float(net, qm.module), "w4a16-rtn").module
    clean = secquant.quantize(dequantized_float(net, unmarked), "w4a16-rtn").module
    r = verify_watermark(again, key(1), reference=qm.module, float_model=net)
    assert r.detected and r.z > 8, r.z
    assert not verify_watermark(clean, key(1), reference=qm.module, float_model=net).detected


def _finetune(f: torch.nn.Module, d, opt: str, lr: float) -> torch.nn.Module:
    return finetune(f, d["train_x"], d["train_y"], opt, lr, seed=0)  # one epoch on the member split


def test_one_epoch_of_finetuning_then_requantization(owner):
    h, d, models = owner
    unmarked, marked = models["w4a8-dynamic"]
    for opt, lr in (("sgd", 1e-2), ("adam", 1e-3)):
        ft = _finetune(dequantized_float(h.module, marked), d, opt, lr)
        moved = max(float((a.detach() - b.detach()).abs().max())
                    for a, b in zip(ft.parameters(), h.module.parameters()))
        assert moved > 1e-3  # it really trained
        again = _requant(h, ft, "w4a8-dynamic")
        clean = _requant(h, _finetune(dequantized_float(h.module, unmarked), d, opt, lr), "w4a8-dynamic")
        for suspect, control in ((ft, clean), (again, clean)):
            r = check(suspect, control, marked, h)
            assert r.detected and r.z > 10, (opt, r.z)


def _rescale(h, module, seed: int) -> torch.nn.Module:
    return _rescale_module(dequantized_float(h.module, module), seed)


@torch.no_grad()
def _rescale_module(f: torch.nn.Module, seed: int) -> torch.nn.Module:
    """A function-preserving reparametrization of a float digits CNN, in place: every conv channel scaled by a
    random signed factor (exp(N(0,1)), either sign) and its BatchNorm statistics and sign compensated; every hidden
    unit of the first Linear scaled by a positive factor and the next Linear's input column divided by it (ReLU)."""
    g = torch.Generator().manual_seed(seed)
    for conv, bn in ((f.features[0], f.features[1]), (f.features[3], f.features[4])):
        n = conv.out_channels
        c = torch.exp(torch.randn(n, generator=g)) * torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
        conv.weight.mul_(c[:, None, None, None])
        conv.bias.mul_(c)
        bn.running_mean.mul_(c)
        bn.running_var.mul_(c * c)
        bn.weight.mul_(torch.sign(c))
    l1, l2 = f.classifier[1], f.classifier[3]
    c = torch.exp(torch.randn(l1.out_features, generator=g))
    l1.weight.mul_(c[:, None])
    l1.bias.mul_(c)
    l2.weight.div_(c[None, :])
    return f


def test_channel_scale_and_sign_changes_are_undone(owner):
    h, d, models = owner
    unmarked, marked = models["w8a16"]
    f = _rescale(h, marked, seed=0)
    with torch.no_grad():
        x = d["test_x"]
        before, after = dequantized_float(h.module, marked)(x), f(x)
        # free for the attacker: the same predictions (logits move only through BatchNorm's eps)
        assert torch.equal(after.argmax(1), before.argmax(1)) and float((after - before).abs().max()) < 0.2
    r = check(f, _rescale(h, unmarked, seed=0), marked, h)
    assert r.detected and r.z > 20, r.z
    # the attack flipped the signs of some of features.0's kernels (compensated by its BatchNorm's sign) ...
    w_attacked = f.features[0].weight.flatten(1)
    w_owner = dequantized_float(h.module, marked).features[0].weight.flatten(1)
    assert bool(((w_attacked * w_owner).sum(1) < 0).any())
    # ... and they were undone: by the alignment, or by folding the suspect's own BatchNorm into the kernel as
    # quantizing folded the owner's (which cancels the compensating sign)
    from secquant.quant.algorithms.fold import fold_into_rows

    bn = getattr(marked.get_submodule("features.0"), "folded_batchnorm", None)
    w_seen = fold_into_rows(f, bn, f.features[0].weight).flatten(1)  # the suspect's weight, as the verifier reads it
    owner_seen = fold_into_rows(h.module, bn, h.module.features[0].weight).flatten(1)
    flipped_back = bool(((w_seen * owner_seen).sum(1) > 0).all())
    assert r.layers["features.0"]["align"]["negative_rows"] > 0 or (bn is not None and flipped_back)
    # without the alignment the rescaled Linear layer (no BatchNorm to fold) reads as unmarked: the alignment is
    # what keeps its share of the mark
    plain = verify_watermark(f, key(0), reference=marked, float_model=h.module, align=False)
    assert abs(plain.layers["classifier.1"]["z"]) < 3 < r.layers["classifier.1"]["z"], (
        plain.layers["classifier.1"]["z"], r.layers["classifier.1"]["z"])


@torch.no_grad()
def _permute(h, module, seed: int) -> torch.nn.Module:
    """Another function-preserving reparametrization: permute the hidden units of every layer (conv channels with
    their BatchNorm and the next layer's input channels, the first Linear's units and the last Linear's inputs),
    then rescale them as in _rescale."""
    f = dequantized_float(h.module, module)
    g = torch.Generator().manual_seed(seed)
    (c1, b1, c2, b2), (l1, l2) = (f.features[i] for i in (0, 1, 3, 4)), (f.classifier[1], f.classifier[3])
    p = torch.randperm(16, generator=g)
    for t in (c1.weight, c1.bias, b1.weight, b1.bias, b1.running_mean, b1.running_var):
        t.copy_(t[p])
    c2.weight.copy_(c2.weight[:, p])
    q = torch.randperm(32, generator=g)
    for t in (c2.weight, c2.bias, b2.weight, b2.bias, b2.running_mean, b2.running_var):
        t.copy_(t[q])
    l1.weight.copy_(l1.weight[:, (q[:, None] * 16 + torch.arange(16)).reshape(-1)])  # flattened 32 x 4 x 4
    r = torch.randperm(64, generator=g)
    l1.weight.copy_(l1.weight[r])
    l1.bias.copy_(l1.bias[r])
    l2.weight.copy_(l2.weight[:, r])
    return f


def test_permuted_and_rescaled_hidden_units_are_matched_back(owner):
    h, d, models = owner
    for preset, (unmarked, marked) in models.items():
        base = dequantized_float(h.module, marked)
        for rescale in (False, True):
            f = _permute(h, marked, seed=1)
            control = _permute(h, unmarked, seed=1)
            if rescale:
                f, control = _rescale_module(f, seed=2), _rescale_module(control, seed=2)
            with torch.no_grad():
                assert torch.equal(f(d["test_x"]).argmax(1), base(d["test_x"]).argmax(1))
            r = check(f, control, marked, h)
            assert r.detected and r.z > 20, (preset, rescale, r.z)
            assert r.layers["classifier.1"]["align"]["rows_moved"] > 50
            assert not verify_watermark(f, key(0), reference=marked, float_model=h.module, align=False).detected


def test_a_few_planted_nonsense_values_do_not_hide_the_mark(owner):
    """NaN, inf or huge values where they cost nothing (an unused embedding row, the column of a unit that never
    fires) must not poison the scale fit or the per-row noise estimate: one such value per row of the big layer and
    a whole column of the last one."""
    h, _, models = owner
    unmarked, marked = models["w8a16"]
    for bad in (float("nan"), float("inf"), 1e30):
        suspects = []
        for module in (marked, unmarked):
            f = dequantized_float(h.module, module)
            with torch.no_grad():
                w1 = f.classifier[1].weight
                w1[torch.arange(w1.shape[0]), torch.arange(w1.shape[0]) * 7] = bad
                f.classifier[3].weight[:, 5] = -bad
            suspects.append(f)
        r = check(*suspects, marked, h)
        assert r.detected and r.z > 20, (bad, r.z)
