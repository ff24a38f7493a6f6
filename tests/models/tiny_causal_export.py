"""Tiny causal LMs for the export tests: built from transformers' config classes (no hub), byte-level token ids
(vocabulary 256), trained for a few dozen steps on the built-in sentences so their weights are not random."""

from __future__ import annotations

import copy
from functools import lru_cache
from importlib import resources

import torch

VOCAB = 256


def sentences() -> list[str]:
    text = resources.files("secquant.data").joinpath("sentences.txt").read_text(encoding="utf-8")
    return [s for s in text.splitlines() if s.strip()]


def byte_batch(texts: list[str], length: int = 32) -> dict[str, torch.Tensor]:
    """Right-padded byte ids with an attention mask (pad id 0)."""
    ids = torch.zeros(len(texts), length, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, t in enumerate(texts):
        b = list(t.encode("utf-8"))[:length]
        ids[i, :len(b)] = torch.tensor(b)
        mask[i, :len(b)] = 1
    return {"input_ids": ids, "attention_mask": mask}


def _build(family: str):
    import transformers as tf

    common = dict(vocab_size=VOCAB, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64)
    if family == "llama":
        return tf.LlamaForCausalLM(tf.LlamaConfig(hidden_size=64, intermediate_size=128, num_key_value_heads=2,
                                                  tie_word_embeddings=False, **common))
    if family == "qwen2":
        return tf.Qwen2ForCausalLM(tf.Qwen2Config(hidden_size=64, intermediate_size=128, num_key_value_heads=2,
                                                  tie_word_embeddings=True, **common))
    if family == "gpt2":
        return tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64))
    raise ValueError(family)


@lru_cache(maxsize=None)
def _trained(family: str, steps: int):
    torch.manual_seed(0)
    model = _build(family)
    texts = sentences()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for step in range(steps):
        b = byte_batch(texts[(step * 16) % 400:(step * 16) % 400 + 16])
        labels = b["input_ids"].masked_fill(b["attention_mask"] == 0, -100)
        loss = model(**b, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def tiny_causal_lm(family: str = "llama", steps: int = 30):
    """A fresh copy of the (cached) trained model: callers quantize it in place."""
    return copy.deepcopy(_trained(family, steps))
