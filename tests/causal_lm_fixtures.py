"""Tiny causal language models built, trained and saved by the tests themselves (no hub).

`tiny_causal_lm(style)` returns a Hugging Face model directory (config.json, model.safetensors, tokenizer
files, generation_config.json) of a Llama-, GPT-2- or Qwen2-style model: 2 decoder layers, hidden size 64,
a byte-level BPE tokenizer of 512 tokens trained on secquant's built-in sentences, and 80 AdamW
steps on those sentences (not the 256 held-out ones evaluation reads), so perplexity means something.
Each style is built once per process (under the test session's SECQUANT_CACHE).

The styles differ where loaders trip: GPT-2 has Conv1D layers, absolute positions, a tokenizer with no pad
token and no BOS; Llama has a BOS token, grouped-query attention and no pad token; Qwen2 has q/k/v biases and
a pad token. All three tie lm_head to the input embeddings (as GPT-2 and small Qwen2 models do).
"""

from __future__ import annotations

import functools
import os
import tempfile
from pathlib import Path

import torch

STYLES = ("llama", "gpt2", "qwen2")
VOCAB = 512
HIDDEN = 64
TRAIN_STEPS = 80  # held-out perplexity ~100 of 512 tokens; longer overfits the 256 training sentences


def _sentences() -> tuple[list[str], list[str]]:
    from secquant.models.encoder import builtin_sentences

    return builtin_sentences()


def _tokenizer(style: str):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = {"gpt2": ["<|endoftext|>"], "qwen2": ["<|endoftext|>", "<|im_end|>"],
                "llama": ["<unk>", "<s>", "</s>"]}[style]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    ev, cal = _sentences()
    tok.train_from_iterator(ev + cal, trainer)
    if style == "llama":  # a BOS token before every text, as Llama tokenizers add
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                           special_tokens=[("<s>", tok.token_to_id("<s>"))])
        kw = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}  # no pad token
    elif style == "gpt2":
        kw = {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}  # no pad
    else:
        kw = {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}
    return PreTrainedTokenizerFast(tokenizer_object=tok, **kw)


def _model(style: str, tok):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    n = len(tok)
    eos = tok.eos_token_id
    if style == "gpt2":
        cfg = GPT2Config(vocab_size=n, n_positions=128, n_embd=HIDDEN, n_layer=2, n_head=4, bos_token_id=eos,
                         eos_token_id=eos, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        return GPT2LMHeadModel(cfg)
    common = dict(vocab_size=n, hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, eos_token_id=eos,
                  tie_word_embeddings=True)
    if style == "llama":
        return LlamaForCausalLM(LlamaConfig(bos_token_id=tok.bos_token_id, **common))
    return Qwen2ForCausalLM(Qwen2Config(pad_token_id=tok.pad_token_id, **common))


def _train(model, tok, steps: int = TRAIN_STEPS, batch: int = 32) -> None:
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    texts = _sentences()[1]
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        idx = torch.randint(len(texts), (batch,), generator=g).tolist()
        enc = tok([texts[i] for i in idx], padding=True, truncation=True, max_length=64, return_tensors="pt")
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        loss = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


@functools.cache
def tiny_causal_lm(style: str) -> Path:
    """A saved tiny causal LM directory of `style` (llama, gpt2 or qwen2), built once per process. Do not modify
    it: copy it first."""
    from transformers import GenerationConfig

    if style not in STYLES:
        raise ValueError(f"style must be one of {STYLES}")
    torch.manual_seed(0)
    tok = _tokenizer(style)
    model = _model(style, tok)
    _train(model, _tokenizer(style))  # a copy: the saved tokenizer keeps its own (missing) pad token
    root = Path(os.environ.get("SECQUANT_CACHE") or tempfile.mkdtemp()) / "tiny-causal-lms"
    d = root / style
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    model.save_pretrained(d, safe_serialization=True)
    tok.save_pretrained(d)
    GenerationConfig(eos_token_id=tok.eos_token_id, max_new_tokens=20).save_pretrained(d)
    return d
