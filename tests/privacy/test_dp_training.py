"""DP-SGD quantization-aware retraining (Opacus) and the BatchNorm folding it relies on."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import secquant
from secquant.errors import CalibrationError, ModelError, SecquantError
from secquant.privacy.dp_training import (
    PrivacyError,
    _per_sample_grad_fn,
    check_dp_args,
    dp_qat,
    fold_batchnorm,
)
from secquant.quant.algorithms import init_activation_ranges, prepare_qat
from secquant.quant.modules import QuantLinear
from secquant.recipes import get_preset


@pytest.fixture(scope="module")
def dp8(digits):
    """builtin:digits, w8a8, 2 epochs of DP-SGD at epsilon 8: (module, layer infos, training entry).
    RDP accountant here (its noise search takes ~1 s, PRV's ~5 s); the CLI test covers the PRV default."""
    x, y = digits.adapter.train_set(None)
    return dp_qat(digits.module, get_preset("w8a8"), x, y, digits.run, epochs=2, lr=1e-3, batch_size=64,
                  epsilon=8.0, delta=1e-5, sample_shape=(1, 8, 8), accountant="rdp",
                  synthetic_samples=64, synthetic_steps=100)


def _acc(module, digits) -> float:
    x, y = digits.adapter.builtin["test_x"], digits.adapter.builtin["test_y"]
    with torch.no_grad():
        return float((module(x).argmax(1) == y).float().mean())


def test_folding_batchnorm_keeps_the_function_and_the_layout(digits):
    m = copy.deepcopy(digits.module).eval()
    x = digits.adapter.builtin["test_x"][:64]
    with torch.no_grad():
        ref = m(x)
    keys = list(m.state_dict())
    pairs = fold_batchnorm(m)
    assert pairs == {"features.1": "features.0", "features.4": "features.3"}
    with torch.no_grad():
        got = m(x)
        assert torch.allclose(got, ref, atol=1e-4), (got - ref).abs().max()
        z = torch.randn(3, 16, 4, 4)
        assert torch.allclose(m.features[1](z), z, rtol=1e-6, atol=1e-6)  # the BN left behind is an identity
    assert list(m.state_dict()) == keys  # the float architecture's layout is kept, so the artifact rebuilds


def test_batchnorm_that_follows_no_layer_is_refused():
    m = nn.Sequential(nn.BatchNorm2d(1), nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(72, 2))
    with pytest.raises(ModelError, match="does not directly follow"):
        fold_batchnorm(m)


def test_dp_arguments_are_checked():
    check_dp_args(8.0, 1e-5, 1.0, 898, 64)
    for bad, match in [((0.0, 1e-5, 1.0, 898, 64), "epsilon"), ((float("inf"), 1e-5, 1.0, 898, 64), "epsilon"),
                       ((8.0, 0.01, 1.0, 898, 64), "1/n"), ((8.0, 1e-5, 0.0, 898, 64), "max-grad-norm"),
                       ((8.0, 1e-5, 1.0, 898, 5000), "batch size")]:
        with pytest.raises(PrivacyError, match=match) as e:
            check_dp_args(*bad)
        assert isinstance(e.value, SecquantError)


def test_per_sample_gradients_go_through_the_lsq_quantizers(digits):
    """vmap(grad) over the QAT model equals one backward pass per sample, step sizes included."""
    m = copy.deepcopy(digits.module).eval()
    for p in m.parameters():
        p.requires_grad_(True)
    fold_batchnorm(m)
    prepare_qat(m, get_preset("w4a4"))
    x, y = digits.adapter.builtin["train_x"][:4], digits.adapter.builtin["train_y"][:4]
    init_activation_ranges(m, [x], digits.run)
    params = {n: p.detach() for n, p in m.named_parameters() if p.requires_grad}
    assert any(n.endswith("wq.scale") for n in params) and any(n.endswith("aq.scale") for n in params)
    batched = _per_sample_grad_fn(m, F.cross_entropy)(params, x, y)
    for i in range(4):
        m.zero_grad()
        F.cross_entropy(m(x[i:i + 1]), y[i:i + 1]).backward()
        for n, p in m.named_parameters():
            if p.requires_grad:
                assert torch.allclose(batched[n][i], p.grad, atol=1e-5, rtol=1e-4), n
    assert batched["features.0.wq.scale"].abs().sum() > 0  # the step sizes get a (clipped, noised) gradient too


def test_dp_qat_spends_at_most_epsilon_and_keeps_accuracy(digits, dp8):
    module, layers, tr = dp8
    dp = tr["dp"]
    assert 7.0 <= dp["epsilon"] <= 8.0 and dp["target_epsilon"] == 8.0 and dp["delta"] == 1e-5
    assert dp["accountant"] == "rdp" and dp["noise_multiplier"] > 0.3 and dp["max_grad_norm"] == 1.0
    n = len(digits.adapter.builtin["train_y"])
    # sampling rate and steps come from the DP count (Laplace, scale 1 / (0.02 * 8) = 6.25), never from n itself
    assert "train_samples" not in dp and "train_samples" not in tr and "seed" not in tr
    assert abs(dp["train_samples_dp"] - n) < 60 and dp["epsilon_count"] == pytest.approx(0.16)
    assert dp["sample_rate"] == pytest.approx(64 / dp["train_samples_dp"], rel=1e-6)
    assert dp["steps"] == 2 * int(1 / dp["sample_rate"]) and dp["expected_batch_size"] == 64
    assert dp["epsilon"] == pytest.approx(dp["epsilon_count"] + dp["epsilon_sgd"], abs=2e-6)
    assert dp["folded_batchnorm"] == {"features.1": "features.0", "features.4": "features.3"}
    assert _acc(module, digits) >= 0.93  # measured 0.98 (fp32: 0.984)
    assert tr["losses"] is None  # per-epoch losses are statistics of the private data: not recorded
    assert tr["activation_init"].startswith("synthetic")
    assert len(layers) == 4 and all(e["activation"] is not None and e["weight"]["args"]["bits"] == 8
                                    for e in layers.values())


def test_smaller_epsilon_means_more_noise(digits, dp8):
    x, y = digits.adapter.builtin["train_x"], digits.adapter.builtin["train_y"]
    _, _, tr = dp_qat(digits.module, get_preset("w8a16"), x, y, digits.run, epochs=1, lr=1e-3, batch_size=128,
                      epsilon=1.0, delta=1e-5, accountant="rdp")
    dp = tr["dp"]
    assert dp["epsilon"] <= 1.0 and dp["noise_multiplier"] > dp8[2]["dp"]["noise_multiplier"]
    assert tr["activation_init"].startswith("none")  # weight-only: no data needed to start activation ranges


def test_static_activations_without_batchnorm_need_public_data(digits):
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    x, y = digits.adapter.builtin["train_x"][:256], digits.adapter.builtin["train_y"][:256]
    with pytest.raises(CalibrationError, match="--calib"):
        dp_qat(mlp, get_preset("w8a8"), x, y, lambda m, b: m(b), epochs=1, lr=1e-3, batch_size=32, epsilon=8.0,
               delta=1e-5, sample_shape=(1, 8, 8), accountant="rdp")
    q, layers, tr = dp_qat(mlp, get_preset("w8a8"), x, y, lambda m, b: m(b), epochs=1, lr=1e-3, batch_size=32,
                           epsilon=8.0, delta=1e-5, init_batches=[digits.adapter.builtin["test_x"][:64]],
                           accountant="rdp")
    assert set(layers) == {"1", "3"} and tr["activation_init"].startswith("caller-supplied")
    assert all(isinstance(q.get_submodule(n), QuantLinear) for n in ("1", "3"))
    assert tr["dp"]["folded_batchnorm"] == {}


def test_dp_artifact_round_trip_via_cli(tmp_path, cli, digits):
    out = tmp_path / "dp1"
    w8a8 = get_preset("w8a8")  # with 64 ZeroQ samples to start the activation ranges (test time)
    recipe = tmp_path / "w8a8-64.json"
    recipe.write_text(w8a8.model_copy(update={"calibration": w8a8.calibration.model_copy(
        update={"num_samples": 64})}).model_dump_json())
    r = cli("qat", "builtin:digits", "--recipe", recipe, "--epochs", "1", "--dp-epsilon", "1", "--max-grad-norm",
            "0.5", "--out", out)
    assert r.exit_code == 0, r.output
    s = json.loads(r.stdout.strip().splitlines()[-1])
    assert s["training"]["dp"]["epsilon"] <= 1.0 and s["training"]["dp"]["max_grad_norm"] == 0.5
    assert s["metric"] == "accuracy" and 0.5 < s["value"] <= 1.0
    assert s["training"]["dp"]["accountant"] == "prv"  # the default: tighter than RDP for the same noise
    assert s["training"]["activation_init"].startswith("synthetic") and "64 samples" in s["training"]["activation_init"]
    qm = secquant.load(out, allow_unsealed=True)
    cal = qm.manifest.calibration
    assert cal.data == "private" and cal.num_samples is None and "epsilon=" in cal.source
    assert qm.manifest.training["dp"]["delta"] == 1e-5 and qm.manifest.training["losses"] is None
    [entry] = qm.manifest.privacy.entries  # the artifact's privacy ledger names the DP-SGD spend too
    assert entry["stage"].startswith("quantization-aware retraining") and entry["epsilon"] <= 1.0
    assert abs(entry["num_samples_dp"] - 898) < 400 and entry["max_grad_norm"] == 0.5  # Laplace scale 50 at eps 1
    assert "add or remove one sample" in entry["neighbouring"] and "os.urandom" in entry["noise_source"]
    x = digits.adapter.builtin["test_x"]
    assert abs(_acc(qm.module, digits) - s["value"]) < 1e-6
    assert qm(x).shape == (len(x), 10)


def test_cli_refusals_are_one_line_and_write_nothing(tmp_path, cli, assert_user_error):
    out = tmp_path / "x"
    for args, words in [(["--dp-epsilon", "-1"], ("epsilon",)), (["--dp-delta", "1e-6"], ("--dp-epsilon",)),
                        (["--dp-epsilon", "8", "--dp-delta", "0.5"], ("delta",)),
                        (["--dp-epsilon", "8", "--checkpoints", str(tmp_path / "ck")], ("checkpoints",)),
                        (["--dp-epsilon", "8", "--seed", "3"], ("--seed", "replayable"))]:
        r = cli("qat", "builtin:digits", "--preset", "w8a8", "--epochs", "1", "--out", out, *args)
        assert_user_error(r, out, contains=words)
    assert not (tmp_path / "ck").exists()


def test_empty_poisson_batches_still_take_a_noisy_step():
    """With expected batch 1 over 20 samples, Poisson sampling draws empty batches (~37% of steps)."""
    from secquant.privacy.dp_training import train_dp

    torch.manual_seed(0)
    lin = nn.Sequential(nn.Linear(4, 2))
    w0 = lin[0].weight.detach().clone()
    x, y = torch.randn(20, 4), torch.randint(0, 2, (20,))
    rep = train_dp(lin, x, y, epochs=1, lr=1e-2, batch_size=1, epsilon=8.0, delta=1e-3, accountant="rdp")
    assert rep.sample_rate == pytest.approx(1 / rep.train_samples_dp) and rep.steps == int(1 / rep.sample_rate)
    assert rep.epsilon <= 8.0
    assert not torch.equal(lin[0].weight, w0)
    with pytest.raises(ModelError, match="BatchNorm"):
        train_dp(nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)), x, y, epochs=1, lr=1e-2, batch_size=4,
                 epsilon=8.0, delta=1e-3)
