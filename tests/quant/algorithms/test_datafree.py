"""ZeroQ-style synthetic calibration data from BatchNorm statistics."""

from __future__ import annotations


import pytest
import torch
from torch import nn

import secquant
from secquant.errors import CalibrationError, SecquantError
from secquant.models.data import write_tensors
from secquant.quant.algorithms.datafree import bn_mismatch, synthesize_from_batchnorm


@pytest.fixture(scope="module")
def synth_and_before(digits):
    m = digits.module
    before = ({k: v.clone() for k, v in m.state_dict().items()},
              [None if p.grad is None else p.grad.clone() for p in m.parameters()])
    return synthesize_from_batchnorm(m, 128, (1, 8, 8), steps=150, seed=0), before


@pytest.fixture(scope="module")
def synth(synth_and_before):
    return synth_and_before[0]


def test_synthetic_inputs_match_the_batchnorm_statistics(digits, synth_and_before):
    synth, (before, grads) = synth_and_before
    m = digits.module
    assert synth.shape == (128, 1, 8, 8) and torch.isfinite(synth).all()
    noise = torch.randn(128, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    real = digits.adapter.builtin["train_x"][:128]
    got, rnd, ref = bn_mismatch(m, synth), bn_mismatch(m, noise), bn_mismatch(m, real)
    # the optimization matches what BN remembers at least as well as real training samples do
    assert got < 0.01 * rnd and got < 2 * ref, (got, rnd, ref)
    # the model is untouched: same tensors, its .grad fields as they were (only the inputs moved), mode restored
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    for g, p in zip(grads, m.parameters()):
        assert (g is None and p.grad is None) or torch.equal(g, p.grad)
    assert not m.training


def test_seeded_and_shaped(digits):
    a = synthesize_from_batchnorm(digits.module, 5, (1, 8, 8), steps=5, seed=3)
    b = synthesize_from_batchnorm(digits.module, 5, (1, 8, 8), steps=5, seed=3)
    c = synthesize_from_batchnorm(digits.module, 5, (1, 8, 8), steps=5, seed=4)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert next(iter(digits.adapter.synthetic_batches(digits.module, 3)(3))).shape == (3, 1, 8, 8)


def test_diversity_spreads_the_samples_over_the_classes(digits):
    x = synthesize_from_batchnorm(digits.module, 40, (1, 8, 8), steps=60, seed=0, diversity=1.0)
    with torch.no_grad():
        counts = torch.bincount(digits.module(x).argmax(1), minlength=10)
    assert (counts > 0).sum() >= 9, counts.tolist()


def test_w8a8_on_synthetic_data_is_within_a_point_of_real_calibration(digits, synth, tmp_path):
    f = write_tensors(synth, tmp_path / "synthetic.safetensors")
    real = secquant.evaluate(secquant.quantize(digits, "w8a8"))
    syn = secquant.evaluate(secquant.quantize(digits, "w8a8", calib=f))
    assert real["metric"] == syn["metric"] == "accuracy"
    assert abs(real["value"] - syn["value"]) <= 0.01, (real["value"], syn["value"])
    assert syn["value"] > 0.95


def test_calibration_file_round_trip_and_refusals(synth, tmp_path):
    from secquant.models.data import read_tensors

    p = write_tensors(synth[:4], tmp_path / "s.safetensors")
    assert torch.equal(read_tensors(p)["inputs"], synth[:4])
    assert [q.name for q in tmp_path.iterdir()] == ["s.safetensors"]  # no temp file left
    with pytest.raises(CalibrationError, match="safetensors"):
        write_tensors(synth[:4], tmp_path / "s.pt")


def test_models_without_batchnorm_are_refused_clearly():
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    with pytest.raises(CalibrationError, match="no BatchNorm") as e:
        synthesize_from_batchnorm(mlp, 4, (1, 8, 8), steps=1)
    assert isinstance(e.value, SecquantError) and "--calib" in str(e.value)
    # a BatchNorm that keeps no running statistics gives nothing to match either
    bn_batch_only = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2, track_running_stats=False))
    with pytest.raises(CalibrationError, match="no BatchNorm"):
        synthesize_from_batchnorm(bn_batch_only, 4, (1, 8, 8), steps=1)


def test_models_without_a_known_input_shape_are_refused(digits):
    from secquant.models import Adapter, TensorClassifierAdapter

    with pytest.raises(CalibrationError, match="--calib"):
        TensorClassifierAdapter(None).synthetic_batches(digits.module, 2)
    with pytest.raises(SecquantError, match="--calib"):  # a kind with no data-free inputs at all
        Adapter().synthetic_batches(digits.module, 2)
