"""apply_recipe / plan / calibrate: which layers get replaced, with what, and calibration."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from secquant.errors import CalibrationError, ModelError
from secquant.quant.algorithms import apply_recipe, calibrate, check_finite, plan
from secquant.quant.modules import ActQuant, QuantConv1d, QuantEmbedding, QuantLinear
from secquant.recipes.presets import PRESETS
from secquant.quant.schema import Override, QuantArgs, Recipe

W8 = QuantArgs(bits=8, granularity="channel")
W4 = QuantArgs(bits=4, symmetric=False, granularity="group", group_size=8)
A8 = QuantArgs(bits=8, symmetric=False, observer="minmax")
A8_DYN = QuantArgs(bits=8, symmetric=False, granularity="token", dynamic=True)


class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.q = nn.Linear(d, d)
        self.k = nn.Linear(d, d)
        self.norm = nn.LayerNorm(d)

    def forward(self, x):
        return self.norm(x + torch.relu(self.q(x)) * torch.sigmoid(self.k(x)))


class Net(nn.Module):
    """Embedding -> 2 blocks -> Conv1d over the sequence -> HF Conv1D -> head."""

    def __init__(self, vocab=20, d=16):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.encoder = nn.ModuleList([Block(d), Block(d)])
        self.conv = nn.Conv1d(d, d, 3, padding=1)
        self.proj = Conv1D(d, d)
        self.head = nn.Linear(d, 4)

    def forward(self, idx):
        h = self.emb(idx)
        for blk in self.encoder:
            h = blk(h)
        h = self.conv(h.transpose(1, 2)).transpose(1, 2).contiguous()
        return self.head(torch.relu(self.proj(h)))


LINEARS = ["encoder.0.q", "encoder.0.k", "encoder.1.q", "encoder.1.k", "head"]
ALL_QUANT = ["emb", *LINEARS, "conv", "proj"]


def net(seed=0):
    torch.manual_seed(seed)
    return Net().eval()


def ids(seed=0, n=3):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 20, (2, 6), generator=g) for _ in range(n)]


def run(model, batch):
    return model(batch)


def quantized_names(model):
    return sorted(n for n, m in model.named_modules() if isinstance(m, (QuantLinear, QuantConv1d, QuantEmbedding)))


def test_weight_only_replaces_every_target_and_keeps_output_close():
    m = net()
    x = ids()[0]
    with torch.no_grad():
        ref = m(x)
    infos = apply_recipe(m, Recipe(weights=W8))
    assert sorted(infos) == sorted(ALL_QUANT)
    assert quantized_names(m) == sorted(ALL_QUANT)
    assert isinstance(m.emb, QuantEmbedding) and isinstance(m.conv, QuantConv1d)
    assert isinstance(m.proj, QuantLinear) and infos["proj"]["source_type"] == "Conv1D"
    assert infos["head"]["type"] == "Linear" and infos["emb"]["type"] == "Embedding"
    assert isinstance(m.encoder[0].norm, nn.LayerNorm)  # non-targets untouched
    assert all(q.input_quant is None for q in (m.head, m.conv, m.proj))
    with torch.no_grad():
        out = m(x)
    assert float((out - ref).abs().max() / ref.abs().max()) < 0.03


def test_targets_restrict_layer_types():
    m = net()
    infos = apply_recipe(m, Recipe(weights=W8, targets=["Linear"]))
    assert sorted(infos) == sorted(LINEARS)
    assert isinstance(m.emb, nn.Embedding) and isinstance(m.conv, nn.Conv1d) and isinstance(m.proj, Conv1D)


@pytest.mark.parametrize(
    ("ignore", "kept_float"),
    [
        (["encoder.*.k"], ["encoder.0.k", "encoder.1.k"]),
        (["encoder.0.*"], ["encoder.0.q", "encoder.0.k"]),
        (["head", "emb"], ["head", "emb"]),
        (["re:encoder\\.[01]\\.q"], ["encoder.0.q", "encoder.1.q"]),
        (["re:.*\\.k|conv"], ["encoder.0.k", "encoder.1.k", "conv"]),
        (["re:encoder"], []),              # regex must match the whole name
        (["encoder"], []),                 # shell pattern must match the whole name too
        (["*.?"], ["encoder.0.q", "encoder.0.k", "encoder.1.q", "encoder.1.k"]),
    ],
)
def test_ignore_patterns(ignore, kept_float):
    m = net()
    infos = apply_recipe(m, Recipe(weights=W8, ignore=ignore))
    assert sorted(infos) == sorted(set(ALL_QUANT) - set(kept_float))
    for name in kept_float:
        assert not isinstance(m.get_submodule(name), (QuantLinear, QuantConv1d, QuantEmbedding))


def test_override_bits_for_matched_names():
    m = net()
    r = Recipe(weights=W8, overrides=[Override(pattern="encoder.*.q", weights=W4)])
    apply_recipe(m, r)
    for name in ALL_QUANT:
        q = m.get_submodule(name)
        expected = 4 if name in ("encoder.0.q", "encoder.1.q") else 8
        assert q.weight_args.bits == expected
        assert q.qweight.numel() == q.rows * q.cols * expected // 8
    assert tuple(m.encoder[0].q.weight_scale.shape) == (16, 2)  # groups of 8 over 16 inputs


def test_override_activations_null_disables_activation_quant():
    m = net()
    r = Recipe(weights=W8, activations=A8_DYN, overrides=[Override(pattern="re:head|proj", activations=None)])
    apply_recipe(m, r)
    assert m.head.input_quant is None and m.proj.input_quant is None
    assert m.head.weight_args.bits == 8  # weights still from the recipe
    for blk in m.encoder:
        assert isinstance(blk.q.input_quant, ActQuant) and blk.q.input_quant.args.dynamic
    assert isinstance(m.conv.input_quant, ActQuant)
    assert m.emb.input_quant is None  # embeddings take indices: never activation-quantized


def test_override_weights_only_keeps_recipe_activations():
    m = net()
    r = Recipe(weights=W8, activations=A8_DYN, overrides=[Override(pattern="head", weights=W4)])
    apply_recipe(m, r)
    assert m.head.weight_args.bits == 4
    assert m.head.input_quant is not None and m.head.input_quant.args == A8_DYN


def test_override_skip_leaves_float():
    m = net()
    r = Recipe(weights=W8, overrides=[Override(pattern="encoder.1.*", skip=True)])
    infos = apply_recipe(m, r)
    assert isinstance(m.encoder[1].q, nn.Linear) and isinstance(m.encoder[1].k, nn.Linear)
    assert "encoder.1.q" not in infos and "encoder.0.q" in infos


def test_later_override_wins():
    r = Recipe(weights=W8, overrides=[Override(pattern="head", weights=W4),
                                      Override(pattern="h*", weights=QuantArgs(bits=2))])
    m = net()
    apply_recipe(m, r)
    assert m.head.weight_args.bits == 2


def test_activation_only_recipe_keeps_float_weights():
    m = net()
    apply_recipe(m, Recipe(activations=A8_DYN, targets=["Linear"]))
    assert m.head.weight_args is None
    assert torch.equal(m.head.dequantized_weight(), net().head.weight.detach())
    assert isinstance(m.head.input_quant, ActQuant)


def test_plan_reports_args_without_changing_model():
    m = net()
    p = plan(m, Recipe(weights=W8, activations=A8, ignore=["conv"]))
    assert set(p) == set(ALL_QUANT) - {"conv"}
    assert p["emb"] == ("Embedding", W8, None)
    assert p["head"] == ("Linear", W8, A8)
    assert p["proj"][0] == "Conv1D"
    assert isinstance(m.head, nn.Linear)


@pytest.mark.parametrize(
    "model",
    [nn.Sequential(nn.ReLU(), nn.LayerNorm(4)), nn.Sequential(nn.Sequential(nn.Tanh()))],
)
def test_no_quantizable_layer_raises_model_error(model):
    with pytest.raises(ModelError):
        apply_recipe(model, Recipe(weights=W8))


def test_everything_ignored_or_untargeted_raises_model_error():
    with pytest.raises(ModelError):
        apply_recipe(net(), Recipe(weights=W8, ignore=["*"]))
    with pytest.raises(ModelError):
        apply_recipe(nn.Sequential(nn.Linear(3, 3)), Recipe(weights=W8, targets=["Conv2d"]))


@pytest.mark.parametrize("where", ["param", "buffer"])
def test_nan_weights_raise_model_error_before_any_change(where):
    m = net()
    m.encoder.append(nn.BatchNorm1d(16))
    with torch.no_grad():
        if where == "param":
            m.encoder[1].k.weight[0, 0] = float("nan")
        else:
            m.encoder[2].running_var[0] = float("inf")
    with pytest.raises(ModelError):
        check_finite(m)
    with pytest.raises(ModelError):
        apply_recipe(m, Recipe(weights=W8))
    assert isinstance(m.head, nn.Linear) and isinstance(m.encoder[0].q, nn.Linear)


def test_integer_buffers_are_not_checked():
    m = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))  # num_batches_tracked is int64
    check_finite(m)
    assert len(apply_recipe(m, Recipe(weights=W8))) == 1


def test_nested_replacement_paths():
    m = nn.Sequential(nn.Sequential(nn.Linear(4, 4), nn.ReLU()), nn.ModuleDict({"a": nn.Linear(4, 2)}))
    infos = apply_recipe(m, Recipe(weights=W8))
    assert sorted(infos) == ["0.0", "1.a"]
    assert isinstance(m[0][0], QuantLinear) and isinstance(m[1]["a"], QuantLinear)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_presets_apply_to_small_model(preset):
    """Groups of 128 are larger than these 16-wide rows: one (partial) group per row."""
    m = net()
    x = ids()
    with torch.no_grad():
        ref = m(x[0])
    recipe = PRESETS[preset]
    apply_recipe(m, recipe)
    n = calibrate(m, x, run)
    static = recipe.activations is not None and not recipe.activations.dynamic
    assert n == (len(x) if static else 0)
    with torch.no_grad():
        out = m(x[0])
    tol = 0.05 if recipe.weights.bits == 8 else 0.4
    assert float((out - ref).abs().max() / ref.abs().max()) < tol


# ---------------------------------------------------------------- calibration

def _float_inputs(model, names, batches):
    """max/min of the inputs each named float layer sees over the batches (the min-max oracle)."""
    seen = {n: [float("inf"), float("-inf")] for n in names}
    hooks = []
    for n in names:
        def hook(mod, inp, out, n=n):
            x = inp[0]
            seen[n][0] = min(seen[n][0], float(x.min()))
            seen[n][1] = max(seen[n][1], float(x.max()))
        hooks.append(model.get_submodule(n).register_forward_hook(hook))
    with torch.no_grad():
        for b in batches:
            model(b)
    for h in hooks:
        h.remove()
    return seen


def test_static_recipe_produces_calibrated_quantizers():
    m = net()
    batches = ids(n=4)
    # the first layers see exactly the float activations during observation
    expected = _float_inputs(net(), ["encoder.0.q", "encoder.0.k"], batches)
    apply_recipe(m, Recipe(weights=W8, activations=A8))
    quantizers = {n: q for n, q in m.named_modules() if isinstance(q, ActQuant)}
    assert len(quantizers) == len(ALL_QUANT) - 1  # all but the embedding
    assert not any(q.calibrated for q in quantizers.values())
    steps = []
    n = calibrate(m, batches, run, progress=steps.append)
    assert n == 4 and steps == [1, 1, 1, 1]
    for name, q in quantizers.items():
        assert q.calibrated and q.observer is None, name
        assert float(q.scale) > 0 and 0 <= int(q.zero_point) <= 255
    for name in ["encoder.0.q", "encoder.0.k"]:
        lo, hi = expected[name]
        q = m.get_submodule(name).input_quant
        assert float(q.scale) == pytest.approx((max(hi, 0) - min(lo, 0)) / 255, rel=1e-5)
        assert int(q.zero_point) == round(-min(lo, 0) / float(q.scale))
    assert not m.training


def test_calibrated_model_tracks_float_model():
    m, ref_m = net(), net()
    batches = ids(n=4)
    apply_recipe(m, Recipe(weights=W8, activations=A8))
    calibrate(m, batches, run)
    with torch.no_grad():
        for b in batches:
            ref, out = ref_m(b), m(b)
            assert float((out - ref).abs().max() / ref.abs().max()) < 0.05


@pytest.mark.parametrize("batches", [[], iter(()), (b for b in [])])
def test_calibrate_empty_batches_raises(batches):
    m = net()
    apply_recipe(m, Recipe(weights=W8, activations=A8))
    with pytest.raises(CalibrationError):
        calibrate(m, batches, run)


def test_calibrate_unreached_layer_raises():
    m = net()
    m.unused = nn.Linear(16, 16)
    apply_recipe(m, Recipe(weights=W8, activations=A8))
    with pytest.raises(CalibrationError):
        calibrate(m, ids(), run)


def test_calibrate_dynamic_or_weight_only_needs_nothing():
    for r in (Recipe(weights=W8), Recipe(weights=W8, activations=A8_DYN)):
        m = net()
        apply_recipe(m, r)
        assert calibrate(m, [], run) == 0
        assert not r.needs_calibration


def test_static_recipe_uncalibrated_forward_raises():
    m = net()
    apply_recipe(m, Recipe(weights=W8, activations=A8))
    with pytest.raises(RuntimeError):
        m(ids()[0])


def test_bare_layer_model_is_not_reported_as_quantized_while_left_float():
    """A model that *is* one quantizable layer cannot be replaced in place: it must not be
    silently reported as quantized (either refuse with ModelError or really quantize it)."""
    m = nn.Linear(4, 4)
    try:
        infos = apply_recipe(m, Recipe(weights=W8))
    except ModelError:
        return
    assert "" not in m._modules  # no stray child registered under the empty name
    for name in infos:
        assert isinstance(m.get_submodule(name), QuantLinear), name


@pytest.mark.parametrize("recipe", [Recipe(weights=W4, activations=A8), Recipe(weights=W8, activations=A8_DYN)],
                         ids=["w4a8-static", "w8a8-dynamic"])
def test_quantized_model_round_trips_through_safetensors(recipe, tmp_path):
    import json

    from safetensors.torch import load_file, save_file

    from secquant.quant.algorithms.rtn import set_submodule
    from secquant.quant.modules import build_empty

    m = net()
    infos = apply_recipe(m, recipe)
    calibrate(m, ids(n=2), run)
    sd = m.state_dict()
    assert all(isinstance(v, torch.Tensor) for v in sd.values())
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "m.safetensors"))
    infos = json.loads(json.dumps(infos))

    fresh = net(seed=123)  # different float weights: everything must come from the file
    for name, info in infos.items():
        set_submodule(fresh, name, build_empty(info))
    fresh.load_state_dict(load_file(str(tmp_path / "m.safetensors")), strict=True)
    fresh.eval()
    with torch.no_grad():
        for b in ids(seed=9, n=2):
            assert torch.equal(fresh(b), m(b))
