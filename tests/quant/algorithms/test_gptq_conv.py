"""GPTQ on convolutions (Hessian of the im2col view of the input, per group) and the per-layer algorithm record."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from secquant.quant.algorithms import quantize_model
from secquant.quant.algorithms.gptq_conv import conv_input_rows
from secquant.quant.schema import QuantArgs, Recipe

W3 = QuantArgs(bits=3, granularity="group", group_size=8, symmetric=False)


def _smooth_inputs(n: int, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """Inputs with correlated channels and neighbouring positions (like images): what makes GPTQ pay off."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, 2, *shape[1:], generator=g)
    for d in range(2, base.dim()):  # blur along each spatial dimension
        base = (base + base.roll(1, d) + base.roll(-1, d)) / 3
    mix = torch.randn(shape[0], 2, generator=torch.Generator().manual_seed(123))  # the same channels every draw
    return torch.einsum("nc...,kc->nk...", base, mix) + 0.05 * torch.randn(n, *shape, generator=g)


def test_unfolded_rows_reproduce_the_convolution():
    torch.manual_seed(0)
    for conv, shape in [(nn.Conv2d(6, 4, 3, stride=2, padding=1, groups=2, bias=False), (2, 6, 7, 7)),
                        (nn.Conv1d(4, 6, 3, padding="same", dilation=2, bias=False), (2, 4, 11)),
                        (nn.Conv2d(4, 4, (2, 3), padding="valid", groups=4, bias=False), (2, 4, 5, 6))]:
        x = torch.randn(*shape)
        rows = conv_input_rows(conv, x)
        og = conv.out_channels // conv.groups
        w = conv.weight.detach().reshape(conv.out_channels, -1)
        y = torch.cat([r @ w[i * og:(i + 1) * og].t() for i, r in enumerate(rows)], 1)  # [N * L, out]
        ref = conv(x).detach()
        assert torch.allclose(y, ref.flatten(2).transpose(1, 2).reshape(-1, conv.out_channels), atol=1e-5)


CONVS = [("conv2d", lambda: nn.Conv2d(8, 16, 3, padding=1), (8, 10, 10)),
         ("grouped", lambda: nn.Conv2d(16, 16, 3, padding="same", groups=4), (16, 10, 10)),
         ("depthwise", lambda: nn.Conv2d(8, 8, 5, padding=2, groups=8), (8, 12, 12)),
         ("conv1d-strided", lambda: nn.Conv1d(8, 16, 5, stride=2), (8, 40))]


@pytest.mark.parametrize("name,make,shape", CONVS, ids=[c[0] for c in CONVS])
def test_gptq_lowers_a_conv_s_output_error_and_says_so(name, make, shape):
    torch.manual_seed(0)
    m = nn.Sequential(make()).eval()
    x, held_out = _smooth_inputs(128, shape), _smooth_inputs(64, shape, seed=1)
    err, entry = {}, {}
    for algo in ("rtn", "gptq"):
        q = copy.deepcopy(m)
        r = Recipe(name=algo, weights=W3, algorithm=algo, calibration={"num_samples": 128, "batch_size": 32})
        layers, _ = quantize_model(q, r, lambda: (x[i:i + 32] for i in range(0, 128, 32)), lambda mod, b: mod(b))
        with torch.no_grad():
            err[algo] = float(((q(held_out) - m(held_out)) ** 2).mean())
        entry[algo] = layers["0"]
    assert entry["gptq"]["algorithm"] == "gptq" and entry["rtn"]["algorithm"] == "rtn"
    assert entry["gptq"]["config"]["gptq"].get("groups", 1) == m[0].groups
    print(f"\n{name}: output MSE on held-out inputs, rtn {err['rtn']:.3g}, gptq {err['gptq']:.3g}")
    assert err["gptq"] < 0.8 * err["rtn"], err


def test_gptq_presets_record_rtn_where_gptq_cannot_run():
    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 8)
            self.rnn = nn.LSTM(8, 8, batch_first=True)
            self.conv = nn.Conv1d(8, 8, 3, padding=1)
            self.conv3 = nn.Conv3d(1, 1, 1)
            self.fc = nn.Linear(8, 4)

        def forward(self, ids):
            h, _ = self.rnn(self.emb(ids))
            h = self.conv(h.transpose(1, 2)).transpose(1, 2)
            h = self.conv3(h[:, None, None])[:, 0, 0]
            return self.fc(h.mean(1))

    torch.manual_seed(0)
    m = Mixed().eval()
    ids = torch.randint(0, 10, (64, 6))
    r = Recipe(name="g", weights=QuantArgs(bits=4, granularity="channel"), algorithm="gptq",
               calibration={"num_samples": 64, "batch_size": 32})
    layers, _ = quantize_model(m, r, lambda: (ids[i:i + 32] for i in range(0, 64, 32)), lambda mod, b: mod(b))
    assert {n: e["algorithm"] for n, e in layers.items()} == {
        "emb": "rtn", "rnn": "rtn", "conv": "gptq", "conv3": "rtn", "fc": "gptq"}
