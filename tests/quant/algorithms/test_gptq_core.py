"""GPTQ: lower output error than round-to-nearest, standard group layout, robust damping."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from secquant.errors import CalibrationError
from secquant.quant.algorithms import quantize_model
from secquant.quant.algorithms.gptq import HessianAccumulator, gptq_quantize
from secquant.quant.algorithms.gptq import gptq_stages
from secquant.quant.primitives import dequantize, qrange, quantize
from secquant.recipes import GPTQ, QuantArgs, Recipe


def _problem(seed=0, rows=96, cols=128, n=1024):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=g)
    x = torch.randn(n, cols, generator=g) @ mix  # correlated inputs: where GPTQ helps
    w = torch.randn(rows, cols, generator=g)
    acc = HessianAccumulator()
    for chunk in x.split(200):
        acc.add(chunk)
    return w, x, acc


def _out_err(x, w, wq):
    return float(((x @ w.t() - x @ wq.t()) ** 2).sum())


def test_hessian_accumulator_equals_one_shot():
    _, x, acc = _problem()
    assert acc.n == x.shape[0]
    assert torch.allclose(acc.H, 2.0 / x.shape[0] * x.double().t() @ x.double(), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("args", [
    QuantArgs(bits=4, symmetric=False, granularity="group", group_size=32),
    QuantArgs(bits=3, symmetric=False, granularity="group", group_size=64),
    QuantArgs(bits=4, symmetric=True, granularity="channel"),
    QuantArgs(bits=2, symmetric=False, granularity="group", group_size=32),
], ids=lambda a: f"w{a.bits}-{a.granularity}")
@pytest.mark.parametrize("act_order", [True, False])
def test_gptq_beats_rtn_with_same_layout(args, act_order):
    w, x, acc = _problem()
    q, s, z, info = gptq_quantize(w, acc.H, args, act_order=act_order)
    qmin, qmax = qrange(args.bits, args.is_signed)
    assert q.dtype == torch.int32 and int(q.min()) >= qmin and int(q.max()) <= qmax
    g = args.granule()
    rtn = dequantize(quantize(w, s, z, args.bits, args.is_signed, g), s, z, g)  # same qparams, plain rounding
    err_gptq = _out_err(x, w, dequantize(q, s, z, g))
    err_rtn = _out_err(x, w, rtn)
    assert err_gptq < 0.9 * err_rtn, (err_gptq / err_rtn)
    assert info["damp"] == pytest.approx(0.01) and info["act_order"] is act_order


def test_dead_inputs_and_zero_hessian_stay_finite():
    w, x, _ = _problem(cols=64)
    x[:, 5] = 0.0  # a dead input column
    acc = HessianAccumulator()
    acc.add(x)
    args = QuantArgs(bits=4, symmetric=False, granularity="group", group_size=16)
    q, s, z, _ = gptq_quantize(w, acc.H, args)
    assert torch.isfinite(dequantize(q, s, z, args.granule())).all()
    # no data at all: every input is dead, so its weight column is irrelevant (zeroed), still finite
    q0, s0, z0, _ = gptq_quantize(w, torch.zeros(64, 64), args)
    assert torch.isfinite(dequantize(q0, s0, z0, args.granule())).all()


def test_indefinite_hessian_gets_more_damping_or_a_clear_error():
    w, _, _ = _problem(cols=32)
    H = -torch.eye(32, dtype=torch.float64) + 0.5
    H.fill_diagonal_(1.0)
    H[0, 1] = H[1, 0] = 5.0  # not positive definite
    args = QuantArgs(bits=4, granularity="channel")
    try:
        q, s, z, info = gptq_quantize(w, H, args)
    except CalibrationError as e:
        assert "damp" in str(e)
    else:
        assert info["damp"] > 0.01
        assert torch.isfinite(dequantize(q, s, z, args.granule())).all()


def test_nan_inputs_are_refused():
    w, _, _ = _problem(cols=16)
    with pytest.raises(CalibrationError):
        gptq_quantize(w, torch.full((16, 16), float("nan")), QuantArgs(bits=4, granularity="channel"))


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(32, 32), nn.Linear(32, 32), nn.Linear(32, 32)
        self.o = nn.Linear(32, 32)

    def forward(self, x):
        return self.o(torch.tanh(self.q(x)) * self.k(x) + self.v(x))


def test_stages_group_layers_reading_the_same_input():
    torch.manual_seed(0)
    m = nn.Sequential(_Block(), nn.Linear(32, 8))
    stages = gptq_stages(m, ["0.q", "0.k", "0.v", "0.o", "1"], torch.randn(4, 32), lambda mod, b: mod(b))
    assert stages == [["0.q", "0.k", "0.v"], ["0.o"], ["1"]]


def test_gptq_recipe_end_to_end_beats_rtn():
    torch.manual_seed(0)
    m = nn.Sequential(_Block(), nn.Linear(32, 8)).eval()
    mix = torch.randn(32, 32)
    data = [torch.randn(64, 32) @ mix for _ in range(4)]
    test = torch.randn(256, 32) @ mix
    with torch.no_grad():
        ref = m(test)
    w3 = QuantArgs(bits=3, symmetric=False, granularity="group", group_size=16)
    results = {}
    for algo in ("rtn", "gptq"):
        import copy
        qm = copy.deepcopy(m)
        layers, n = quantize_model(qm, Recipe(weights=w3, algorithm=algo), lambda: iter(data), lambda mod, b: mod(b))
        with torch.no_grad():
            results[algo] = float(((qm(test) - ref) ** 2).mean())
        if algo == "gptq":
            assert n == 256
            assert all("gptq" in e["config"] for e in layers.values())
    assert results["gptq"] < 0.8 * results["rtn"], results


def test_gptq_without_data_is_refused():
    m = nn.Sequential(nn.Linear(8, 8))
    with pytest.raises(CalibrationError):
        quantize_model(m, Recipe(weights=QuantArgs(bits=4, granularity="channel"), algorithm="gptq"), None,
                       lambda mod, b: mod(b))


def test_gptq_with_smoothing_uses_the_scaled_hessian():
    """(x/s)(W s)^T: GPTQ quantizes W*s with the Hessian of x/s; the layer divides its input by s."""
    import copy

    from secquant.recipes import Smoothing

    torch.manual_seed(1)
    m = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 8)).eval()
    scale_in = torch.ones(32)
    scale_in[:3] = 30.0  # outlier input channels
    data = [torch.randn(64, 32) * scale_in for _ in range(4)]
    test = torch.randn(256, 32) * scale_in
    with torch.no_grad():
        ref = m(test)
    w3 = QuantArgs(bits=3, symmetric=False, granularity="group", group_size=16)
    errs = {}
    for label, recipe in {"rtn": Recipe(weights=w3),
                          "gptq+smooth": Recipe(weights=w3, algorithm="gptq", smoothing=Smoothing())}.items():
        qm = copy.deepcopy(m)
        layers, _ = quantize_model(qm, recipe, lambda: iter(data), lambda mod, b: mod(b))
        with torch.no_grad():
            errs[label] = float(((qm(test) - ref) ** 2).mean())
        if label == "gptq+smooth":
            assert layers["0"]["config"]["smooth"] is True and "gptq" in layers["0"]["config"]
            assert qm[0].smooth_scale is not None and float(qm[0].smooth_scale.max()) > 1.0
    assert errs["gptq+smooth"] < 0.8 * errs["rtn"], errs


def test_float_target_is_the_ridge_least_squares_fit_and_w_where_inputs_did_not_change():
    from secquant.quant.algorithms.gptq import float_target

    g = torch.Generator().manual_seed(3)
    x = torch.randn(2048, 24, generator=g, dtype=torch.float64) @ torch.randn(24, 24, generator=g, dtype=torch.float64)
    distort = torch.eye(24, dtype=torch.float64) + 0.1 * torch.randn(24, 24, generator=g, dtype=torch.float64)
    xq = x @ distort  # inputs after earlier quantized layers: a systematic change the layer can undo
    w = torch.randn(8, 24, generator=g, dtype=torch.float64)
    acc = HessianAccumulator()
    for a, b in zip(xq.split(500), x.split(500)):
        acc.add(a, b)
    assert torch.allclose(acc.C, 2.0 / x.shape[0] * xq.t() @ x, rtol=1e-9, atol=1e-9)
    # unchanged inputs (C = H): the target is the float weight itself, whatever the ridge
    same = HessianAccumulator()
    same.add(x, x)
    for ridge in (0.01, 1.0):
        assert torch.allclose(float_target(w, same.H, same.C, ridge), w, atol=1e-9)
    # changed inputs: the target reproduces the float outputs from the new inputs better than w does
    t = float_target(w, acc.H, acc.C, ridge=1e-6)
    err_w = float(((x @ w.t() - xq @ w.t()) ** 2).sum())
    err_t = float(((x @ w.t() - xq @ t.t()) ** 2).sum())
    assert err_t < 0.5 * err_w, (err_t, err_w)
    # the closed form: normal equations of ||X W^T - X~ T^T||^2 + lam ||T - W||^2
    lam = 1.0 * float(torch.diag(acc.H).mean())
    t1 = float_target(w, acc.H, acc.C, ridge=1.0)
    lhs = (acc.H + lam * torch.eye(24, dtype=torch.float64)) @ t1.t()
    assert torch.allclose(lhs, acc.C @ w.t() + lam * w.t(), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="float-model inputs"):
        acc.add(xq[:10])  # a batch without its float inputs


def test_gptq_aims_at_the_float_model_when_earlier_layers_are_quantized():
    """Two stacked layers: with float targets the second layer compensates the first one's error."""
    import copy

    torch.manual_seed(2)
    m = nn.Sequential(nn.Linear(32, 48), nn.Linear(48, 16)).eval()
    mix = torch.randn(32, 32)
    data = [torch.randn(128, 32) @ mix for _ in range(8)]
    test = torch.randn(512, 32) @ mix
    with torch.no_grad():
        ref = m(test)
    w3 = QuantArgs(bits=3, symmetric=False, granularity="group", group_size=16)
    errs = {}
    for ft in (False, True):
        qm = copy.deepcopy(m)
        recipe = Recipe(weights=w3, algorithm=GPTQ(float_targets=ft))
        layers, _ = quantize_model(qm, recipe, lambda: iter(data), lambda mod, b: mod(b))
        assert layers["1"]["config"]["gptq"]["float_targets"] is ft
        with torch.no_grad():
            errs[ft] = float(((qm(test) - ref) ** 2).mean())
    assert errs[True] < 0.9 * errs[False], errs


def test_without_act_order_groups_take_their_qparams_from_the_updated_columns():
    w, x, acc = _problem(cols=96)
    args = QuantArgs(bits=3, symmetric=False, granularity="group", group_size=32)
    q, s, z, info = gptq_quantize(w, acc.H, args, act_order=False, block_size=40)  # block rounded to 32
    assert info["static_groups"] is False
    _, s_static, _, info_static = gptq_quantize(w, acc.H, args, act_order=True)
    assert info_static["static_groups"] is True
    assert torch.equal(s[:, 0], s_static[:, 0])  # the first group sees no earlier error: same qparams
    assert not torch.equal(s[:, 1:], s_static[:, 1:])  # later groups: ranges of the updated columns
    qmin, qmax = qrange(args.bits, args.is_signed)
    assert int(q.min()) >= qmin and int(q.max()) <= qmax
    g = args.granule()
    rtn = dequantize(quantize(w, s, z, args.bits, args.is_signed, g), s, z, g)
    assert _out_err(x, w, dequantize(q, s, z, g)) < 0.9 * _out_err(x, w, rtn)


def test_padding_positions_stay_out_of_the_hessians():
    """Token batches with an attention mask: only real tokens' rows count (padding is not an activation in use)."""
    from secquant.quant.algorithms import gptq as gptq_mod

    class Tok(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(8, 4)

        def forward(self, input_ids, attention_mask):
            return self.lin(input_ids)

    torch.manual_seed(0)
    x = torch.randn(2, 5, 8)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    x[mask == 0] = 1e3  # padding rows that would dominate H
    seen = {}
    real = gptq_mod.HessianAccumulator.add

    def spy(self, rows, x_float=None):
        seen.setdefault("rows", []).append(rows.reshape(-1, rows.shape[-1]).shape[0])
        return real(self, rows, x_float)

    mp = pytest.MonkeyPatch()
    mp.setattr(gptq_mod.HessianAccumulator, "add", spy)
    try:
        layers, _ = quantize_model(Tok().eval(), Recipe(weights=QuantArgs(bits=4, granularity="channel"),
                                                          algorithm="gptq"),
                                   lambda: iter([{"input_ids": x, "attention_mask": mask}]), lambda m, b: m(**b))
    finally:
        mp.undo()
    assert seen["rows"] == [8]  # 3 + 5 real tokens, not 10
    assert "gptq" in layers["lin"]["config"]


def test_gptq_with_rotation_quantizes_the_rotated_weight_under_the_rotated_hessian():
    """y = (x R)(W R)^T: GPTQ runs on W R with R^T H R; on weights with outliers that beats plain GPTQ."""
    import copy

    from secquant.recipes import Rotation

    g = torch.Generator().manual_seed(4)
    m = nn.Sequential(nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 16)).eval()
    for lin in (m[0], m[2]):
        w = torch.randn(lin.weight.shape, generator=g) * 0.02
        w[torch.arange(w.shape[0]), torch.randint(0, w.shape[1], (w.shape[0],), generator=g)] = 0.5
        lin.weight.data.copy_(w)
    mix = torch.randn(128, 128, generator=g) / 128 ** 0.5
    data = [torch.randn(128, 128, generator=g) @ mix for _ in range(4)]
    test = torch.randn(512, 128, generator=g) @ mix
    with torch.no_grad():
        ref = m(test)
    w4 = QuantArgs(bits=4, symmetric=False, granularity="group", group_size=32)
    errs = {}
    for label, rot in (("gptq", None), ("gptq+rot", Rotation(block=32))):
        qm = copy.deepcopy(m)
        layers, _ = quantize_model(qm, Recipe(weights=w4, algorithm="gptq", rotation=rot),
                                   lambda: iter(data), lambda mod, b: mod(b))
        with torch.no_grad():
            errs[label] = float(((qm(test) - ref) ** 2).mean())
        if rot is not None:
            assert all(e["config"]["rotation"] == 32 and "gptq" in e["config"] for e in layers.values())
            with torch.no_grad():  # the layer computes with the unrotated float weight it stores Q(W R) of
                torch.testing.assert_close(qm[0](test), test @ qm[0].float_weight().t() + m[0].bias,
                                           atol=1e-5, rtol=1e-5)
    assert errs["gptq+rot"] < 0.7 * errs["gptq"], errs
