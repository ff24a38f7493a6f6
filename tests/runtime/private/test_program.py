"""The integer program: fidelity to the PyTorch quantized model, proved bounds (no wrap), refusals."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from secquant.quant.modules import ActQuant, QuantConv2d, QuantLinear
from secquant.runtime.private import UnsupportedLayerError, compile_program, encode_inputs, run_reference
from secquant.runtime.private.program import worst_case_input

from .conftest import A8, W8, hostile_mlp, quant_linear


def _check_within_bounds(prog, codes):
    trace: list = []
    run_reference(prog, codes, dtype=object, trace=trace)
    bounds = prog.stats["bounds"]
    assert len(trace) == len(bounds)
    limit = 1 << (prog.bit_length - 1)
    for v, (lo, hi) in zip(trace, bounds):
        assert (v >= lo).all() and (v <= hi).all()
        assert (np.abs(v.astype(object)) < limit).all()
    return trace


def test_integer_reference_reproduces_the_pytorch_quantized_digits_model(digits_w8a8):
    from secquant.models.digits import splits

    x = splits()["test_x"][:300]
    prog = compile_program(digits_w8a8.module, (1, 8, 8))
    out = run_reference(prog, encode_inputs(prog.input, x))
    with torch.no_grad():
        plain = digits_w8a8.module(x).numpy()
    agree = (out["labels"] == plain.argmax(1)).mean()
    logits = out["logits"].astype(np.float64) / 2.0 ** prog.ops[-1]["shift"]
    assert agree >= 0.995, agree
    assert np.median(np.abs(logits - plain)) < 1e-4      # most samples: the same codes at every layer
    assert np.abs(logits - plain).max() < 0.2            # the rest: a code one step off (float32 rounding ties)
    assert [o["op"] for o in prog.ops] == ["conv", "requant", "conv", "maxpool", "requant", "dense", "requant",
                                           "dense", "logits"]


def test_bound_is_attained_by_the_worst_case_input_and_nothing_exceeds_it():
    prog = compile_program(hostile_mlp(), (1, 8, 8))
    acc_hi = prog.stats["bounds"][0][1]
    for c in range(16):
        trace = _check_within_bounds(prog, worst_case_input(prog, c))
        assert trace[0][0, c] == acc_hi[0, c]            # tight: the bound is reached, not just respected
    rng = np.random.default_rng(0)
    _check_within_bounds(prog, rng.integers(0, 256, size=(64, 64)))
    # the requantization products outgrow MPyC's default 32-bit secure integers: the bit length comes from here
    assert prog.bit_length > 32


def test_values_beyond_int64_switch_the_reference_to_exact_integers():
    prog = compile_program(hostile_mlp(), (1, 8, 8), precision_bits=48)
    assert prog.stats["max_bits"] > 62
    x = worst_case_input(prog, 3)
    exact = run_reference(prog, x)["logits"]             # chooses Python integers by itself
    assert exact.dtype == object
    wrapped = run_reference(prog, x, dtype=np.int64)["logits"]
    assert (exact != wrapped.astype(object)).any()       # int64 would have wrapped silently


def _quantize_chain(model: nn.Sequential, calib: torch.Tensor) -> nn.Sequential:
    for name, m in list(model.named_children()):
        if isinstance(m, nn.Conv2d):
            setattr(model, name, QuantConv2d.from_float(m, W8, A8))
        elif isinstance(m, nn.Linear):
            setattr(model, name, QuantLinear.from_float(m, W8, A8))
    quants = [m for m in model.modules() if isinstance(m, ActQuant)]
    for q in quants:
        q.start_observing()
    with torch.no_grad():
        model(calib)
    for q in quants:
        q.freeze()
    return model.eval()


def test_batchnorm_negative_slopes_and_pooling_fold_exactly():
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(6)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([1.5, -0.7, 0.3, -2.0, 1.0, -0.1]))
        bn.running_mean.uniform_(-0.2, 0.2)
        bn.running_var.uniform_(0.5, 2.0)
    model = nn.Sequential(nn.Conv2d(2, 6, 3, padding=1), nn.AvgPool2d(2), bn, nn.MaxPool2d(2), nn.ReLU(),
                          nn.Flatten(), nn.Dropout(0.1), nn.Linear(6 * 2 * 2, 5)).eval()
    x = torch.rand(256, 2, 8, 8)
    q = _quantize_chain(model, x[:128])
    prog = compile_program(q, (2, 8, 8))
    assert [o["op"] for o in prog.ops] == ["conv", "sumpool", "maxpool", "requant", "dense", "logits"]
    out = run_reference(prog, encode_inputs(prog.input, x[128:]))
    with torch.no_grad():
        plain = q(x[128:]).numpy()
    logits = out["logits"].astype(np.float64) / 2.0 ** prog.ops[-1]["shift"]
    assert (out["labels"] == plain.argmax(1)).mean() >= 0.99
    assert np.median(np.abs(logits - plain)) < 1e-4


@pytest.mark.parametrize("case, needle", [
    ("sigmoid", "'2' (sigmoid)"),
    ("float-linear", "'3' (linear): it is not quantized"),
    ("bn-after-relu", "batchnorm after a relu"),
    ("residual", "branch"),
])
def test_unsupported_layers_are_refused_by_name(case, needle):
    codes = torch.ones(16, 64, dtype=torch.int64)
    if case == "sigmoid":
        model = nn.Sequential(nn.Flatten(), quant_linear(codes, 0.01, 0.01), nn.Sigmoid(), quant_linear(codes[:4, :16], 0.01, 0.01))
    elif case == "float-linear":
        model = nn.Sequential(nn.Flatten(), quant_linear(codes, 0.01, 0.01), nn.ReLU(), nn.Linear(16, 4))
    elif case == "bn-after-relu":
        model = nn.Sequential(nn.Flatten(), quant_linear(codes, 0.01, 0.01), nn.ReLU(), nn.BatchNorm1d(16).eval(),
                              quant_linear(codes[:4, :16], 0.01, 0.01))
    else:
        class Residual(nn.Module):
            def __init__(self):
                super().__init__()
                self.a = quant_linear(torch.ones(64, 64, dtype=torch.int64), 0.01, 0.01)

            def forward(self, x):
                x = x.flatten(1)
                return self.a(x) + x

        model = Residual()
    with pytest.raises(UnsupportedLayerError) as e:
        compile_program(model.eval(), (1, 8, 8))
    assert needle in str(e.value).lower()


@pytest.mark.parametrize("preset, needle", [("w8a16", "float activations"), ("w8a8-dynamic", "dynamic activation")])
def test_artifacts_without_static_integer_activations_are_refused(digits_artifact, preset, needle):
    import secquant

    qm = secquant.load(digits_artifact(preset), allow_unsealed=True)
    with pytest.raises(UnsupportedLayerError) as e:
        compile_program(qm.module, (1, 8, 8))
    assert "'features.0'" in str(e.value) and needle in str(e.value)


def test_one_party_share_is_independent_of_the_input():
    """A single party's view of the client's input (what mpc.input sends it: one Shamir share per value, from
    MPyC's own np_random_split) has the same distribution whatever the input; two shares do not."""
    from scipy.stats import ks_2samp

    from secquant.runtime.private.engine import import_mpyc

    mpc = import_mpyc(["--no-log"])
    from mpyc import thresha

    field = mpc.SecInt(47).field
    p = field.order
    n = 3000
    a = field.array(np.zeros(n, dtype=np.int64))          # input A: every code 0
    b = field.array(np.full(n, 255, dtype=np.int64))      # input B: every code 255
    sa, sb = thresha.np_random_split(field, a, 1, 3), thresha.np_random_split(field, b, 1, 3)
    as_unit = lambda s: np.array([int(v) / p for v in s])  # noqa: E731 - a one-line helper
    for party in range(3):
        assert ks_2samp(as_unit(sa[party]), as_unit(sb[party])).pvalue > 1e-3
    # the same test has power: shares of parties 1 and 2 together (2*s1 - s2 interpolates the secret) tell A from B
    two_a = [(2 * int(x) - int(y)) % p / p for x, y in zip(sa[0], sa[1])]
    two_b = [(2 * int(x) - int(y)) % p / p for x, y in zip(sb[0], sb[1])]
    assert ks_2samp(two_a, two_b).pvalue < 1e-12
