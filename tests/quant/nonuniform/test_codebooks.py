"""NF4, power-of-two and k-means codebooks, and codebook-format quantized layers."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from secquant.quant.modules import QuantLinear, build_empty
from secquant.quant.nonuniform import kmeans_codebook, nearest_index, nf4_codebook, pow2_codebook
from secquant.quant.primitives import packed_nbytes
from secquant.recipes import QuantArgs, Recipe

# QLoRA's published NF4 table (Dettmers et al. 2023, appendix), to 4 decimals.
NF4_PUBLISHED = [-1.0, -0.6962, -0.5251, -0.3949, -0.2844, -0.1848, -0.0911, 0.0,
                 0.0796, 0.1609, 0.2461, 0.3379, 0.4407, 0.5626, 0.7230, 1.0]


def test_nf4_matches_published_table():
    cb = nf4_codebook()
    assert cb.shape == (16,)
    assert torch.allclose(cb, torch.tensor(NF4_PUBLISHED), atol=2e-4)
    assert float(cb[7]) == 0.0  # exact zero


@pytest.mark.parametrize("bits", [2, 3, 4, 5])
def test_pow2_levels(bits):
    cb = pow2_codebook(bits)
    assert cb.numel() == 2 ** bits - 1
    nz = cb[cb != 0].abs()
    assert torch.equal(torch.log2(nz), torch.round(torch.log2(nz)))  # every level is a power of two
    assert torch.equal(cb, -cb.flip(0))  # symmetric
    assert torch.all(cb[1:] > cb[:-1])


def test_nearest_index_is_nearest():
    cb = torch.tensor([-1.0, -0.25, 0.0, 0.5, 2.0])
    x = torch.linspace(-3, 3, 1001)
    idx = nearest_index(x, cb)
    brute = (x[:, None] - cb[None]).abs().argmin(1)
    assert torch.equal((cb[idx] - x).abs(), (cb[brute] - x).abs())


def test_nearest_index_per_row_tables():
    g = torch.Generator().manual_seed(0)
    cb = torch.sort(torch.randn(6, 8, generator=g), dim=1).values
    x = torch.randn(6, 50, generator=g)
    idx = nearest_index(x, cb)
    brute = (x[:, :, None] - cb[:, None, :]).abs().argmin(2)
    assert torch.allclose(torch.gather(cb, 1, idx), torch.gather(cb, 1, brute))


def test_kmeans_beats_uniform_grid_on_clustered_weights():
    g = torch.Generator().manual_seed(1)
    centers = torch.tensor([-2.0, -0.1, 0.3, 3.0])
    w = centers[torch.randint(0, 4, (4, 512), generator=g)] + 0.01 * torch.randn(4, 512, generator=g)
    cb = kmeans_codebook(w, 4, per_channel=True)
    assert cb.shape == (4, 4)
    err_km = float((torch.gather(cb, 1, nearest_index(w, cb)) - w).pow(2).mean())
    lo, hi = w.min(1, keepdim=True).values, w.max(1, keepdim=True).values
    grid = lo + (hi - lo) * torch.linspace(0, 1, 4)
    err_uni = float((torch.gather(grid, 1, nearest_index(w, grid)) - w).pow(2).mean())
    assert err_km < 0.01 * err_uni
    # deterministic
    assert torch.equal(cb, kmeans_codebook(w, 4, per_channel=True))


def _lin(seed=0, out=48, inp=200):
    torch.manual_seed(seed)
    return torch.nn.Linear(inp, out)


@pytest.mark.parametrize("args", [
    QuantArgs(bits=4, format="nf4", granularity="group", group_size=64),
    QuantArgs(bits=4, format="nf4", granularity="channel", observer="mse"),
    QuantArgs(bits=4, format="pow2", granularity="channel"),
    QuantArgs(bits=3, format="pow2", granularity="group", group_size=32),
    QuantArgs(bits=4, format="kmeans", granularity="channel"),
    QuantArgs(bits=2, format="kmeans", granularity="tensor"),
    QuantArgs(bits=3, format="kmeans", granularity="channel", codebook_size=6),
], ids=lambda a: f"{a.format}{a.bits}-{a.granularity}")
def test_codebook_layer_round_trip(args):
    lin = _lin()
    x = torch.randn(8, 200)
    q = QuantLinear.from_float(lin, args, None)
    assert q.qweight.dtype == torch.uint8 and q.qweight.numel() == packed_nbytes(48 * 200, args.bits)
    with torch.no_grad():
        rel = float((q(x) - lin(x)).pow(2).mean() / lin(x).pow(2).mean())
    assert rel < (0.08 if args.bits >= 3 else 0.3)
    # every dequantized value is a table entry (scaled, for nf4/pow2)
    w = q.dequantized_weight()
    if args.format == "kmeans":
        table = q.codebook
        assert table.shape[1] == args.codebook_entries
        rows = table if table.shape[0] == 48 else table.expand(48, -1)
        assert all(torch.isin(w[r], rows[r]).all() for r in range(48))
    # state dict is plain tensors and rebuilds identically
    q2 = build_empty(q.layer_info("Linear"))
    q2.load_state_dict(q.state_dict())
    assert torch.equal(q2(x), q(x))


def test_mse_shrink_never_worse_for_nf4():
    lin = _lin(3)
    w = lin.weight.detach()
    a = QuantLinear.from_float(lin, QuantArgs(bits=4, format="nf4", granularity="group", group_size=64), None)
    b = QuantLinear.from_float(lin, QuantArgs(bits=4, format="nf4", granularity="group", group_size=64,
                                              observer="mse"), None)
    assert float((b.dequantized_weight() - w).pow(2).sum()) <= float((a.dequantized_weight() - w).pow(2).sum())


@pytest.mark.parametrize("bad,needle", [
    ({"bits": 3, "format": "nf4"}, "nf4"),
    ({"bits": 2, "format": "kmeans", "codebook_size": 8}, "codebook_size"),
    ({"bits": 4, "format": "kmeans", "granularity": "group", "group_size": 64}, "kmeans"),
    ({"bits": 4, "format": "pow2", "codebook_size": 4}, "codebook_size"),
])
def test_bad_codebook_args(bad, needle):
    with pytest.raises(ValidationError) as ei:
        QuantArgs(**bad)
    assert needle in str(ei.value)


def test_codebook_formats_are_for_weights_only():
    with pytest.raises(ValidationError) as ei:
        Recipe(weights=QuantArgs(bits=8), activations=QuantArgs(bits=4, format="nf4"))
    assert "activations" in str(ei.value)
