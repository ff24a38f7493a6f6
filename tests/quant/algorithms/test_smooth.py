"""Activation-aware scale search (search_scale), output-error clip search (search_clip),
calibration statistics (collect_input_stats) and QuantLinear with a searched LayerPrep."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from secquant.quant.algorithms import calibrate
from secquant.quant.algorithms.smooth import LayerPrep, collect_input_stats, search_clip, search_scale
from secquant.quant.modules import QuantLinear, build_empty
from secquant.quant.primitives import choose_qparams, dequantize, quantize, reduce_range
from secquant.quant.schema import QuantArgs, Smoothing

W4G = QuantArgs(bits=4, symmetric=False, granularity="group", group_size=16)
W4C = QuantArgs(bits=4, symmetric=True, granularity="channel", axis=0)
W3G = QuantArgs(bits=3, symmetric=False, granularity="group", group_size=8)
W8 = QuantArgs(bits=8, granularity="channel")
A8_DYN_T = QuantArgs(bits=8, symmetric=False, granularity="tensor", dynamic=True)  # per-tensor, range of the input
A8_STATIC = QuantArgs(bits=8, symmetric=False, granularity="tensor", observer="minmax")
OUTLIERS = [3, 17, 40, 59]
D_IN, D_OUT = 64, 32


def layer_data(seed=0, n=256, outliers=True, mag=50.0):
    """(w [out, in], x [n, in]); with `outliers`, 4 input channels are `mag` times larger."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, D_IN, generator=g)
    if outliers:
        x[:, OUTLIERS] *= mag
    w = torch.randn(D_OUT, D_IN, generator=g) * 0.1
    return w, x


def linear_from(w, bias=None):
    lin = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None)
    with torch.no_grad():
        lin.weight.copy_(w)
        if bias is not None:
            lin.bias.copy_(bias)
    return lin.eval()


def quant_layer(w, x, wargs, aargs, scale=None, alpha=0.0, w_range=None):
    """The QuantLinear the pipeline would build (static activations calibrated on x itself)."""
    prep = None if scale is None else LayerPrep(scale, alpha, w_range)
    q = QuantLinear.from_float(linear_from(w), wargs, aargs, prep)
    if aargs is not None and not aargs.dynamic:
        calibrate(nn.Sequential(q), [x], lambda m, b: m(b))
    return q


@torch.no_grad()
def out_err(q, w, x):
    return float(((q(x) - x @ w.t()) ** 2).mean())


def rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


# ---------------------------------------------------------------- search_scale

@pytest.mark.parametrize(("wargs", "aargs"), [(W4G, None), (W8, A8_DYN_T), (None, A8_DYN_T)],
                         ids=["w4-group", "w8a8", "a8-only"])
def test_alpha_zero_is_exactly_rtn(wargs, aargs):
    w, x = layer_data()
    s, a = search_scale(w, x.abs().mean(0), x, wargs, aargs, Smoothing(alpha=0.0))
    assert a == 0.0
    assert torch.equal(s, torch.ones(D_IN))
    smoothed = quant_layer(w, x, wargs, aargs, s, a)
    plain = quant_layer(w, x, wargs, aargs)
    with torch.no_grad():
        assert torch.equal(smoothed(x), plain(x))


@pytest.mark.parametrize("alpha", [0.25, 0.5, 0.8, 1.0])
def test_fixed_alpha_scale_is_normalized_mean_abs_power(alpha):
    w, x = layer_data(seed=1)
    absmean = x.abs().mean(0)
    s, a = search_scale(w, absmean, x, W4G, None, Smoothing(alpha=alpha))
    assert a == alpha
    expected = absmean.pow(alpha)
    expected = expected / (expected.max() * expected.min()).sqrt()
    torch.testing.assert_close(s, expected, rtol=1e-6, atol=0)
    assert float(s.max() * s.min()) == pytest.approx(1.0, rel=1e-5)
    # outlier channels get the largest scales, s_j / s_k = (m_j / m_k) ** alpha
    assert set(torch.topk(s, 4).indices.tolist()) == set(OUTLIERS)
    assert float(s[3] / s[0]) == pytest.approx(float(absmean[3] / absmean[0]) ** alpha, rel=1e-4)


def test_fixed_alpha_clamps_dead_channels():
    w, x = layer_data(seed=2)
    x[:, 5] = 0.0
    absmean = x.abs().mean(0)
    s, _ = search_scale(w, absmean, x, W4G, None, Smoothing(alpha=0.5))
    base = absmean.clamp(min=1e-5).pow(0.5)
    torch.testing.assert_close(s, base / (base.max() * base.min()).sqrt(), rtol=1e-6, atol=0)
    assert torch.isfinite(s).all() and float(s.min()) > 0
    assert float(s[5]) == float(s.min())


@pytest.mark.parametrize(("wargs", "aargs"), [(W4G, None), (W8, A8_DYN_T), (W8, A8_STATIC)],
                         ids=["w4-group", "w8a8-dynamic-tensor", "w8a8-static"])
@pytest.mark.parametrize("seed", [0, 1])
def test_searched_scale_beats_rtn_with_outlier_channels(wargs, aargs, seed):
    w, x = layer_data(seed=seed)
    cfg = Smoothing()
    s, a = search_scale(w, x.abs().mean(0), x, wargs, aargs, cfg)
    assert a in torch.linspace(0, 1, cfg.grid).tolist()
    assert a > 0
    assert float(s.max() * s.min()) == pytest.approx(1.0, rel=1e-5)
    err_search = out_err(quant_layer(w, x, wargs, aargs, s, a), w, x)
    err_rtn = out_err(quant_layer(w, x, wargs, aargs), w, x)
    assert err_search <= err_rtn
    assert err_search < 0.5 * err_rtn  # outliers: migrating scale helps a lot (measured ~6-14x)


@pytest.mark.parametrize(("wargs", "aargs"), [(W4G, None), (W8, A8_DYN_T)], ids=["w4-group", "w8a8"])
def test_searched_alpha_is_the_grid_argmin_and_never_worse_than_rtn(wargs, aargs):
    """Without outliers the gain may be nil, but the search never loses to alpha=0 on its sample."""
    w, x = layer_data(seed=3, outliers=False)
    absmean = x.abs().mean(0)
    cfg = Smoothing(grid=6)
    s, a = search_scale(w, absmean, x, wargs, aargs, cfg)
    errs = {}
    for alpha in torch.linspace(0, 1, cfg.grid).tolist():
        sa, _ = search_scale(w, absmean, x, wargs, aargs, Smoothing(alpha=alpha))
        errs[alpha] = out_err(quant_layer(w, x, wargs, aargs, sa, alpha), w, x)
    err_search = out_err(quant_layer(w, x, wargs, aargs, s, a), w, x)
    assert err_search == pytest.approx(errs[a], rel=1e-6)
    assert err_search <= min(errs.values()) * (1 + 1e-5)
    assert err_search <= errs[0.0]


def test_search_scale_uses_only_the_given_grid():
    w, x = layer_data(seed=4)
    s, a = search_scale(w, x.abs().mean(0), x, W4G, None, Smoothing(grid=2))
    assert a in (0.0, 1.0)


# ---------------------------------------------------------------- search_clip

def _err_with_range(w, x, args, lo, hi):
    gran = args.granule()
    sc, z = choose_qparams(lo, hi, args.bits, args.is_signed, args.symmetric)
    wq = dequantize(quantize(w, sc, z, args.bits, args.is_signed, gran), sc, z, gran)
    return (x @ (wq - w).t()).pow(2).mean(0)  # per output channel


@pytest.mark.parametrize("wargs", [QuantArgs(bits=4), QuantArgs(bits=8, symmetric=False),
                                   QuantArgs(bits=4, granularity="channel", axis=1)],
                         ids=["w4-tensor", "w8-tensor-asym", "w4-input-channel"])
def test_search_clip_none_for_per_tensor_or_input_channel(wargs):
    w, x = layer_data()
    assert search_clip(w, x, wargs) is None


@pytest.mark.parametrize("wargs", [W4G, W4C, W3G], ids=["w4-group16", "w4-channel", "w3-group8"])
@pytest.mark.parametrize("seed", [0, 5])
def test_search_clip_ranges_shrink_and_lower_output_error(wargs, seed):
    w, x = layer_data(seed=seed)
    got = search_clip(w, x, wargs)
    assert got is not None
    lo, hi = got
    mlo, mhi = reduce_range(w, wargs.granule())
    assert lo.shape == mlo.shape and hi.shape == mhi.shape
    expected_shape = (D_OUT,) if wargs.granularity == "channel" else (D_OUT, D_IN // wargs.group_size)
    assert tuple(lo.shape) == expected_shape
    assert (lo.abs() <= mlo.abs() + 1e-7).all() and (hi.abs() <= mhi.abs() + 1e-7).all()
    # one shrink ratio per granule, from the default grid [0.5, 1]
    ratio = hi / mhi
    torch.testing.assert_close(lo / mlo, ratio, rtol=1e-5, atol=0)
    assert float(ratio.min()) >= 0.5 - 1e-6 and float(ratio.max()) <= 1 + 1e-6
    assert float(ratio.min()) < 1  # some granule was clipped

    err_clip = _err_with_range(w, x, wargs, lo, hi)
    err_mm = _err_with_range(w, x, wargs, mlo, mhi)
    assert float(err_clip.sum()) <= float(err_mm.sum())
    assert float(err_clip.sum()) < 0.9 * float(err_mm.sum())
    if wargs.granularity == "channel":  # per output channel the searched error is exactly the output error
        assert (err_clip <= err_mm * (1 + 1e-5)).all()


def test_search_clip_channel_picks_best_ratio_per_row():
    w, x = layer_data(seed=6)
    lo, hi = search_clip(w, x, W4C, ratios=6, min_ratio=0.5)
    mlo, mhi = reduce_range(w, W4C.granule())
    per_ratio = torch.stack([_err_with_range(w, x, W4C, mlo * r, mhi * r)
                             for r in torch.linspace(1.0, 0.5, 6).tolist()])  # [ratios, out]
    chosen = _err_with_range(w, x, W4C, lo, hi)
    torch.testing.assert_close(chosen, per_ratio.min(0).values, rtol=1e-4, atol=1e-7)


def test_search_clip_reads_only_max_rows():
    w, x = layer_data(seed=7, n=64)
    junk = torch.randn(100, D_IN) * 1e3
    a = search_clip(w, x, W4G, max_rows=64)
    b = search_clip(w, torch.cat([x, junk]), W4G, max_rows=64)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_layer_with_clip_range_uses_it_and_lowers_error():
    w, x = layer_data(seed=8)
    s, a = search_scale(w, x.abs().mean(0), x, W4G, None, Smoothing())
    rng = search_clip(w * s, x / s, W4G)
    q_clip = quant_layer(w, x, W4G, None, s, a, rng)
    q_noclip = quant_layer(w, x, W4G, None, s, a)
    sc, _ = choose_qparams(rng[0], rng[1], 4, False, False)
    torch.testing.assert_close(q_clip.weight_scale, sc.reshape(q_clip.weight_scale.shape))
    assert out_err(q_clip, w, x) <= out_err(q_noclip, w, x)


# ---------------------------------------------------------------- collect_input_stats

def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval()


def _batches(seed=0, n=3, shape=(5, 6)):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, 8, generator=g) * torch.arange(1, 9) for _ in range(n)]


def run(model, batch):
    return model(batch)


def test_abs_mean_is_exact_over_all_batches():
    m = _mlp()
    batches = _batches(shape=(5, 6))  # 3-D inputs: rows are flattened over all leading dims
    stats = collect_input_stats(m, ["0", "2"], batches, run, max_rows=1000)
    x0 = torch.cat([b.reshape(-1, 8) for b in batches])
    with torch.no_grad():
        x2 = torch.relu(m[0](x0))
    torch.testing.assert_close(stats["0"][0], x0.abs().mean(0), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(stats["2"][0], x2.abs().mean(0), rtol=1e-5, atol=1e-7)
    # all 90 rows fit: every input row is kept exactly once
    rows = stats["0"][1]
    assert rows.shape == (90, 8)
    assert torch.equal(torch.sort(rows[:, 0]).values, torch.sort(x0[:, 0]).values)


def test_uneven_batches_weight_rows_not_batches():
    m = _mlp()
    g = torch.Generator().manual_seed(1)
    batches = [torch.randn(2, 8, generator=g), torch.randn(30, 8, generator=g) * 10]
    stats = collect_input_stats(m, ["0"], batches, run, max_rows=16)
    x = torch.cat(batches)
    torch.testing.assert_close(stats["0"][0], x.abs().mean(0), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("max_rows", [1, 16, 40])
def test_at_most_max_rows_real_distinct_input_rows(max_rows):
    m = _mlp()
    batches = _batches(shape=(5, 6))  # 3 x 30 rows
    _, rows = collect_input_stats(m, ["0"], batches, run, max_rows=max_rows)["0"]
    x0 = torch.cat([b.reshape(-1, 8) for b in batches])
    assert rows.shape == (max_rows, 8)
    match = (rows[:, None, :] == x0[None, :, :]).all(-1)  # [kept, all]
    assert (match.sum(1) == 1).all()  # every kept row is one real input row
    assert int(match.any(0).sum()) == max_rows  # no row kept twice


def test_hooks_removed_and_progress_ticks():
    m = _mlp()
    ticks = []
    collect_input_stats(m, ["0", "2"], _batches(n=4), run, max_rows=16, progress=ticks.append)
    assert ticks == [1, 1, 1, 1]
    assert all(len(mod._forward_pre_hooks) == 0 for mod in m.modules())


def test_hooks_removed_when_a_batch_fails():
    m = _mlp()

    def bad_run(model, batch):
        model(batch)
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        collect_input_stats(m, ["0", "2"], _batches(), bad_run, max_rows=16)
    assert all(len(mod._forward_pre_hooks) == 0 for mod in m.modules())
    with torch.no_grad():  # the model still runs and records nothing
        m(_batches()[0])


def test_seeded_sampling_is_reproducible():
    batches = _batches(n=4)
    a = collect_input_stats(_mlp(), ["0", "2"], batches, run, max_rows=20, seed=3)
    b = collect_input_stats(_mlp(), ["0", "2"], batches, run, max_rows=20, seed=3)
    c = collect_input_stats(_mlp(), ["0", "2"], batches, run, max_rows=20, seed=4)
    for n in ("0", "2"):
        assert torch.equal(a[n][1], b[n][1]) and torch.equal(a[n][0], b[n][0])
    assert not torch.equal(a["0"][1], c["0"][1])
    torch.testing.assert_close(a["0"][0], c["0"][0])  # the mean does not depend on the seed


def test_unreached_layers_are_left_out():
    m = nn.ModuleDict({"used": nn.Linear(8, 8), "unused": nn.Linear(8, 8)})
    stats = collect_input_stats(m, ["used", "unused"], _batches(n=2), lambda mod, b: mod["used"](b), max_rows=16)
    assert list(stats) == ["used"]
    assert collect_input_stats(m, ["used"], [], lambda mod, b: mod["used"](b), max_rows=16) == {}


# ---------------------------------------------------------------- QuantLinear with a LayerPrep

def _smoothed_layer(wargs=W8, aargs=None, seed=0, bias=True, clip=False):
    w, x = layer_data(seed=seed)
    b = torch.randn(D_OUT, generator=torch.Generator().manual_seed(seed + 100)) if bias else None
    s, a = search_scale(w, x.abs().mean(0), x, wargs, aargs, Smoothing(alpha=0.5))
    rng = search_clip(w * s, x / s, wargs) if clip else None
    lin = linear_from(w, b)
    return lin, x, LayerPrep(s, a, rng), QuantLinear.from_float(lin, wargs, aargs, LayerPrep(s, a, rng))


def test_smoothed_linear_divides_input_by_scale():
    lin, x, prep, q = _smoothed_layer()
    assert torch.equal(q.smooth_scale, prep.scale) and q.smooth_alpha == 0.5
    with torch.no_grad():
        ref = lin(x)
        out = q(x)
        w_deq = q.dequantized_weight()
        assert torch.equal(out, F.linear(x / prep.scale, w_deq, q.bias))
        # the stored weight is W * s (per input column), within half an int8 step per row
        step = (lin.weight * prep.scale).abs().amax(1, keepdim=True) / 127
        assert ((w_deq - lin.weight * prep.scale).abs() <= step / 2 + 1e-6).all()
        assert rel(out, ref) < 0.01
        # forgetting the division would be far off: the scale really is applied
        assert rel(F.linear(x, w_deq, q.bias), ref) > 0.5


def test_smoothed_linear_with_static_activations_tracks_float():
    lin, x, prep, q = _smoothed_layer(aargs=A8_STATIC)
    calibrate(nn.Sequential(q), [x], run)
    plain = QuantLinear.from_float(lin, W8, A8_STATIC)
    calibrate(nn.Sequential(plain), [x], run)
    with torch.no_grad():
        ref = lin(x)
        # observed range is that of x / s, not x
        assert float(q.input_quant.scale) == pytest.approx(
            float(((x / prep.scale).max() - (x / prep.scale).min()) / 255), rel=1e-5)
        assert rel(q(x), ref) < 0.02
        assert rel(q(x), ref) < rel(plain(x), ref)


def test_smoothed_linear_config_and_plain_config():
    _, _, prep, q = _smoothed_layer()
    assert q.config() == {"in_features": D_IN, "out_features": D_OUT, "smooth": True, "smooth_alpha": 0.5}
    plain = QuantLinear.from_float(linear_from(torch.zeros(4, 8)), W8, None)
    assert plain.config() == {"in_features": 8, "out_features": 4}
    assert plain.smooth_scale is None and "smooth_scale" not in plain.state_dict()


@pytest.mark.parametrize(("wargs", "aargs", "clip"), [(W8, None, False), (W4G, None, True), (W8, A8_STATIC, False),
                                                     (W4G, A8_DYN_T, True)],
                         ids=["w8", "w4-clip", "w8a8-static", "w4a8-dyn-clip"])
def test_build_empty_and_state_dict_reproduce_smoothed_layer(wargs, aargs, clip):
    lin, x, prep, q = _smoothed_layer(wargs, aargs, seed=1, clip=clip)
    if aargs is not None and not aargs.dynamic:
        calibrate(nn.Sequential(q), [x], run)
    sd = q.state_dict()
    assert "smooth_scale" in sd and torch.equal(sd["smooth_scale"], prep.scale)
    info = json.loads(json.dumps(q.layer_info("Linear")))
    fresh = build_empty(info)
    assert isinstance(fresh, QuantLinear) and fresh.smooth_alpha == 0.5
    assert torch.equal(fresh.smooth_scale, torch.ones(D_IN))  # empty until loaded
    fresh.load_state_dict({k: v.clone() for k, v in sd.items()}, strict=True)
    assert torch.equal(fresh.smooth_scale, prep.scale)
    g = torch.Generator().manual_seed(42)
    xs = [x, torch.randn(7, D_IN, generator=g) * 3]
    with torch.no_grad():
        for xi in xs:
            assert torch.equal(fresh(xi), q(xi))


def test_hf_conv1d_with_prep_matches_linear():
    """GPT-2 style Conv1D stores [in, out]: the scale must multiply the input columns after transposing."""
    lin, x, prep, q_lin = _smoothed_layer(W8, None, seed=2)
    conv = Conv1D(D_OUT, D_IN)
    with torch.no_grad():
        conv.weight.copy_(lin.weight.t())
        conv.bias.copy_(lin.bias)
    q_conv = QuantLinear.from_float(conv, W8, None, prep)
    with torch.no_grad():
        assert torch.equal(q_conv(x), q_lin(x))
        assert rel(q_conv(x), conv(x)) < 0.01
