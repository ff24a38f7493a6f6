"""Fixtures for the adversarial tests: small stand-ins for what an attacker hands over."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

TOKENIZER_FILES = ["vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    """A small BERT encoder directory (random weights, MiniLM's tokenizer files): a stand-in for a downloaded repo."""
    from safetensors.torch import save_file
    from transformers import BertConfig, BertModel

    from secquant.models.encoder import minilm_dir

    d = tmp_path_factory.mktemp("repo") / "tiny-bert"
    d.mkdir()
    cfg = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64)
    torch.manual_seed(0)
    model = BertModel(cfg)
    cfg.save_pretrained(d)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(d / "model.safetensors"))
    for name in TOKENIZER_FILES:
        shutil.copyfile(minilm_dir() / name, d / name)
    return d
