"""The recipe rule that keeps small embedding tables (under 1% of the parameters) at 8 bits in low-bit presets."""

from __future__ import annotations

import torch
from torch import nn

from secquant.quant.algorithms import apply_recipe, plan
from secquant.quant.schema import Override, QuantArgs
from secquant.recipes import get_preset


class Tables(nn.Module):
    def __init__(self, small_rows: int = 16) -> None:
        super().__init__()
        self.words = nn.Embedding(2000, 32)  # 64,000 parameters
        self.positions = nn.Embedding(small_rows, 32)
        self.fc = nn.Linear(32, 32)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.fc(self.words(idx) + self.positions(torch.arange(idx.shape[1]) % self.positions.num_embeddings))


def test_small_table_stays_8bit_per_row_and_is_recorded():
    torch.manual_seed(0)
    recipe = get_preset("w4a16-rtn")
    model = Tables()
    table = model.positions.weight.detach().clone()
    layers = apply_recipe(model, recipe)
    assert layers["words"]["weight"]["args"]["bits"] == 4 and "small_table" not in layers["words"]["config"]
    small = layers["positions"]
    assert small["weight"]["args"]["bits"] == 8 and small["weight"]["args"]["granularity"] == "channel"
    assert small["config"]["small_table"] == {"share": round(512 / (64000 + 512 + 32 * 32 + 32), 6), "max_share": 0.01}
    assert layers["fc"]["weight"]["args"]["bits"] == 4
    q = model.positions  # one scale per row, each value within half a step of it
    assert q.weight_scale.shape == (16,)
    assert ((q.dequantized_weight() - table).abs() <= q.weight_scale[:, None] / 2 + 1e-7).all()


def test_rule_is_a_share_of_the_parameters_not_a_name():
    recipe = get_preset("w4a16-rtn")
    assert plan(Tables(small_rows=16), recipe)["positions"][1].bits == 8
    assert plan(Tables(small_rows=40), recipe)["positions"][1].bits == 4  # 1,280 of 66,336: 1.9%, not small
    renamed = nn.ModuleDict({"a": nn.Embedding(2000, 32), "b": nn.Embedding(16, 32)})
    assert plan(renamed, recipe)["b"][1].bits == 8


def test_rule_off_without_small_tables_at_8_bits_and_under_an_override():
    model = Tables()
    assert plan(model, get_preset("w4a16-rtn").model_copy(update={"small_tables": None}))["positions"][1].bits == 4
    w8 = plan(model, get_preset("w8a16"))
    assert w8["positions"][1] == get_preset("w8a16").weights
    mine = QuantArgs(bits=3, granularity="channel")
    over = get_preset("w4a16-rtn").model_copy(update={"overrides": [Override(pattern="positions", weights=mine)]})
    assert plan(model, over)["positions"][1] == mine
    layers = apply_recipe(Tables(), over)
    assert "small_table" not in layers["positions"]["config"]


def test_low_bit_presets_carry_the_rule():
    for name in ("w4a16", "w4a16-gptq", "w3a16-gptq", "w3a16", "w2a16-gptq", "nf4"):
        assert get_preset(name).small_tables is not None and get_preset(name).small_tables.max_share == 0.01
    assert get_preset("w8a8").small_tables is None
