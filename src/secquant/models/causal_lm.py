"""Causal language models (`kind: causal-lm`): Hugging Face directories of the Llama, Qwen2, Mistral, Gemma, Phi
and GPT-2 families, loaded through transformers' own classes (safetensors only, no remote code), `lm_head` kept.

Text in, next-token logits out. Evaluation scores the quantized model's next-token predictions against the
float model's on held-out text: perplexity of each, the mean KL divergence KL(float || quantized) of the
next-token distributions and how often both agree on the most likely next token. Generation runs
transformers' own `generate` on the quantized module (greedy unless sampling is asked for).

Tied input/output embeddings: the float model's `lm_head.weight` may be the embedding table itself. The
quantized `lm_head` is a layer of its own (its own codes), so quantizing it never writes into the embedding
table; the manifest records `tie_word_embeddings` and the rebuilt architecture unties the two the same way.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from ..errors import ModelError, SecquantError
from . import hf
from .base import GraphIO, ModelHandle
from .encoder import MAX_FLOAT_BYTES_PER_WEIGHT_BYTE, SAMPLE_TEXTS, EncoderAdapter, _max_length, arch_files_of, \
    with_tokenizer

LM_INPUTS = ("input_ids", "attention_mask")
MAX_LENGTH = 256  # tokens per calibration / evaluation text (longer texts are truncated)
MAX_NEW_TOKENS = 4096


class NextTokenScorer:
    """Perplexity of the quantized and the float model, KL(float || quantized) and top-1 agreement, over the
    real (unpadded) next-token positions of every evaluation text."""

    def __init__(self) -> None:
        self.nll_q = self.nll_f = self.kl = 0.0
        self.agree = self.tokens = 0

    def add(self, batch: Mapping[str, torch.Tensor], out_q: torch.Tensor, out_f: torch.Tensor) -> None:
        ids = batch["input_ids"]
        mask = batch.get("attention_mask")
        real = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
        keep = real[:, 1:] & real[:, :-1]  # predict token t+1 from the prefix up to t
        target = ids[:, 1:][keep]
        lq = torch.log_softmax(out_q[:, :-1].float(), dim=-1)[keep]
        lf = torch.log_softmax(out_f[:, :-1].float(), dim=-1)[keep]
        self.nll_q -= float(lq.gather(1, target[:, None]).sum())
        self.nll_f -= float(lf.gather(1, target[:, None]).sum())
        self.kl += float((lf.exp() * (lf - lq)).sum())
        self.agree += int((lq.argmax(-1) == lf.argmax(-1)).sum())
        self.tokens += int(keep.sum())

    def result(self) -> dict[str, Any]:
        from ..errors import CalibrationError

        if self.tokens == 0:
            raise CalibrationError("the evaluation texts are too short: perplexity needs texts of two tokens or more")
        n = self.tokens
        return {"metric": "perplexity", "value": math.exp(self.nll_q / n), "float_value": math.exp(self.nll_f / n),
                "kl_divergence": self.kl / n, "top1_agreement": self.agree / n, "n_tokens": n}


class CausalLMAdapter(EncoderAdapter):
    """Hugging Face causal LMs: texts in (the model's own tokenizer, padded on the right with the attention mask
    marking the padding), next-token logits out; scored by perplexity against the float model."""

    kind = "causal-lm"
    loaders = ("hf-causal-lm",)
    task = "generate"
    synthetic_description = "synthetic: random whole words from the model's tokenizer vocabulary (data-free)"

    def __init__(self, model_dir: Path, max_length: int, tokenizer_dir: Path | None = None) -> None:
        self.model_dir = model_dir
        self.max_length = max_length
        self.tokenizer = hf.load_tokenizer(tokenizer_dir or model_dir, decoder=True)

    def encode(self, texts: list[str]) -> dict[str, torch.Tensor]:
        enc = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        return {n: enc[n] for n in LM_INPUTS if n in enc}

    graph_style: ClassVar[str] = "causal-lm"  # a decoder graph: runtime.onnx.causal (logits, no KV cache)

    def run(self, module: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return module(**batch, use_cache=False).logits

    def scorer(self) -> NextTokenScorer:
        return NextTokenScorer()

    def token_rows(self, ids: list[int], length: int) -> dict[str, torch.Tensor]:
        """Rows of `length` tokens holding `ids` in order (a decoder reads no [CLS]/[SEP])."""
        rows = [ids[i:i + length] for i in range(0, len(ids), length)]
        out = torch.full((len(rows), length), self.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(out)
        for i, r in enumerate(rows):
            out[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = 1
        return {"input_ids": out, "attention_mask": mask}

    def sample_batch(self) -> dict[str, torch.Tensor]:
        return self.encode(SAMPLE_TEXTS)

    def graph_io(self, sample: dict[str, torch.Tensor]) -> GraphIO:
        names = [n for n in LM_INPUTS if n in sample]
        axes = {n: {0: "batch", 1: "sequence"} for n in names}
        return GraphIO(names, (), {n: sample[n] for n in names}, "logits",
                       {**axes, "logits": {0: "batch", 1: "sequence"}})

    # -- generation ----------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, module: nn.Module, prompt: str, max_new_tokens: int = 32, temperature: float | None = None,
                 top_k: int | None = None, seed: int | None = None) -> dict[str, Any]:
        """Continue `prompt` with transformers' `generate` on `module`: greedy unless `temperature` > 0 or `top_k`
        is given (then sampled, reproducibly with `seed`). One prompt at a time, so no padding is involved."""
        from transformers import GenerationConfig

        sample = check_generation(prompt, max_new_tokens, temperature, top_k, seed)
        tok = self.tokenizer
        ids = tok(prompt, return_tensors="pt")["input_ids"]
        limit = _max_positions(module)
        if limit is not None and ids.shape[1] + max_new_tokens > limit:
            raise SecquantError(f"the prompt ({ids.shape[1]} tokens) plus --max-new-tokens {max_new_tokens} exceeds "
                                f"the model's {limit} positions: shorten one of them")
        eos = tok.eos_token_id if tok.eos_token_id is not None else getattr(module.config, "eos_token_id", None)
        cfg = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=sample, num_beams=1,
                               pad_token_id=tok.pad_token_id, eos_token_id=eos, bos_token_id=tok.bos_token_id,
                               **({"temperature": temperature or 1.0, "top_k": top_k or 0} if sample else {}))
        with hf.quiet_transformers(), torch.random.fork_rng(devices=[]):
            if seed is not None:
                torch.manual_seed(seed)
            out = module.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=cfg)
        new = out[0, ids.shape[1]:]
        return {"prompt": prompt, "text": tok.decode(new, skip_special_tokens=True),
                "prompt_tokens": int(ids.shape[1]), "generated_tokens": int(new.shape[0]),
                "decoding": "sampling" if sample else "greedy"}

    # -- artifacts -----------------------------------------------------------------------------------
    @classmethod
    def for_artifact(cls, directory: Path, rebuild: dict) -> "CausalLMAdapter":
        return cls(directory, _max_length(rebuild))

    @classmethod
    def rebuild(cls, d: Path, rebuild: dict, spec: str, model: nn.Module | None,
                factory: str | None) -> tuple[nn.Module, "CausalLMAdapter"]:
        """The float architecture from the artifact's own config.json (an allowed causal LM family, sized on the
        meta device against the weights file first), and the adapter with the artifact's tokenizer."""
        from transformers import AutoModelForCausalLM

        hf.check_causal_lm_type(hf.read_config(d), d)
        max_bytes = MAX_FLOAT_BYTES_PER_WEIGHT_BYTE * (d / "model.safetensors").stat().st_size
        return hf.from_config(AutoModelForCausalLM, d, max_bytes), cls(d, _max_length(rebuild))


def check_generation(prompt: str, max_new_tokens: int, temperature: float | None, top_k: int | None,
                     seed: int | None) -> bool:
    """Generation options checked (before any model loads, for the CLI); whether they ask for sampling."""
    if not isinstance(prompt, str) or not prompt:
        raise SecquantError("the prompt must be a non-empty text")
    if not 1 <= max_new_tokens <= MAX_NEW_TOKENS:
        raise SecquantError(f"--max-new-tokens must be between 1 and {MAX_NEW_TOKENS}")
    if temperature is not None and not (temperature >= 0 and math.isfinite(temperature)):
        raise SecquantError("--temperature must be 0 (greedy) or a positive number")
    if top_k is not None and top_k < 1:
        raise SecquantError("--top-k must be at least 1")
    sample = bool(temperature) or top_k is not None
    if seed is not None and not sample:
        raise SecquantError("--seed is for sampling: greedy decoding is deterministic; pass --temperature T or "
                            "--top-k K to sample")
    return sample


def _max_positions(module: nn.Module) -> int | None:
    cfg = getattr(module, "config", None)
    for name in ("max_position_embeddings", "n_positions"):
        if isinstance(v := getattr(cfg, name, None), int):
            return v
    return None


def tied_embeddings(module: nn.Module) -> bool:
    """Whether the model's output projection is its input embedding table (the same tensor)."""
    out, inp = module.get_output_embeddings(), module.get_input_embeddings()
    return out is not None and inp is not None and out.weight is inp.weight


def load_causal_lm_dir(model_dir: str | Path, spec: str | None = None,
                       tokenizer: str | Path | None = None) -> ModelHandle:
    """A Hugging Face causal LM directory through transformers' AutoModelForCausalLM (safetensors only, no remote
    code, an allowed model_type), with its tokenizer (or the one of `tokenizer`) and its generation config."""
    from transformers import AutoModelForCausalLM

    d = Path(model_dir)
    hf.check_causal_lm_type(hf.read_config(d), d)
    files = with_tokenizer(arch_files_of(d), d, tokenizer)  # every file copied, checked before any is read
    tok_dir = Path(tokenizer) if tokenizer is not None else None
    hf.load_tokenizer(tok_dir or d, decoder=True)  # a tokenizer that cannot load fails before the weights are read
    module = hf.from_pretrained(AutoModelForCausalLM, d)
    if module.get_output_embeddings() is None:
        raise ModelError(f"{d}: the model has no output projection (lm_head)")
    max_length = min(MAX_LENGTH, _max_positions(module) or MAX_LENGTH)
    adapter = CausalLMAdapter(d, max_length, tok_dir)
    rebuild = {"loader": "hf-causal-lm", "max_length": max_length, "model_type": module.config.model_type,
               "tie_word_embeddings": tied_embeddings(module)}
    return ModelHandle(module=module, spec=spec or str(d), rebuild=rebuild, adapter=adapter, arch_files=files)
