"""Block-by-block GPTQ (gptq_blocks): taken only for a real chain of blocks, with the whole-model pass's codes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import secquant.quant.algorithms.gptq as gptq_mod
from secquant.quant.algorithms import quantize_model
from secquant.quant.algorithms.gptq import gptq_stages
from secquant.quant.algorithms.gptq_blocks import chained_blocks
from secquant.recipes import get_preset


class Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x, scale=None):
        y = self.b(torch.relu(self.a(x)))
        return x + (y if scale is None else y * scale)


class Chain(nn.Module):
    """Blocks run one after another, each reading the previous one's output; a head after them."""

    def __init__(self, d: int = 16, n: int = 3) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block(d) for _ in range(n))
        self.head = nn.Linear(d, 4)

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return self.head(x)


class Parallel(Chain):
    """Every block reads the model's input (no chain)."""

    def forward(self, x):
        return self.head(sum(b(x) for b in self.blocks))


class SharedBias(Chain):
    """Later blocks read something block 0 made besides the hidden state (as T5's position bias)."""

    def forward(self, x):
        scale = None
        for b in self.blocks:
            x = b(x, scale=scale)
            scale = x.mean(-1, keepdim=True).sigmoid() if scale is None else scale
        return self.head(x)


def _stages(model, x):
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    return gptq_stages(model, names, x, lambda m, b: m(b))


@pytest.mark.parametrize("cls,chained", [(Chain, True), (Parallel, False), (SharedBias, False)])
def test_only_a_real_chain_runs_block_by_block(cls, chained):
    torch.manual_seed(0)
    model, x = cls().eval(), torch.randn(8, 5, 16)
    found = chained_blocks(model, _stages(model, x), x, lambda m, b: m(b))
    assert (found is not None and found[0] == "blocks") == chained


def test_block_by_block_codes_equal_the_whole_model_pass(monkeypatch):
    torch.manual_seed(0)
    model = Chain().eval()
    data = [torch.randn(8, 5, 16) for _ in range(3)]
    recipe = get_preset("w4a16-gptq").model_copy(update={"smoothing": None, "rotation": None})
    runs = {}
    for mode in ("blocks", "whole"):
        if mode == "whole":
            monkeypatch.setattr(gptq_mod, "chained_blocks", lambda *a: None)
        calls = {"n": 0}
        m = Chain().eval()
        m.load_state_dict(model.state_dict())
        m.blocks[0].register_forward_pre_hook(lambda *a: calls.__setitem__("n", calls["n"] + 1))
        quantize_model(m, recipe, lambda: iter(data), lambda mod, b: mod(b))
        runs[mode] = (m.state_dict(), calls["n"])
    (a, calls_blocks), (b, calls_whole) = runs["blocks"], runs["whole"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert calls_blocks < calls_whole  # block 0 runs for its own stages only, not for every later stage
