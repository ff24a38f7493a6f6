"""Hugging Face model directories, read through transformers' own loading (safetensors only, no remote code).

Shared by the encoder and causal-LM adapters: which kind a directory holds (from config.json, read as JSON:
nothing executable), its tokenizer (refused when the directory has none, unless another directory is named),
the float model with transformers' own key conversion (`from_pretrained`), and the float architecture an
artifact's config describes (`from_config`, sized on the meta device first).
"""

from __future__ import annotations

import contextlib
import json
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ModelError, UnsafeInputError

# A directory holds a tokenizer if it has one of these (fast tokenizer, WordPiece, BPE, SentencePiece).
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "tokenizer.model", "spiece.model",
                   "sentencepiece.bpe.model")
TOKENIZER_SIDE_FILES = ("tokenizer_config.json", "special_tokens_map.json", "merges.txt", "added_tokens.json")
# model_type values of the causal LM families secquant loads (through transformers' own classes)
CAUSAL_LM_TYPES = ("llama", "mistral", "qwen2", "gemma", "gemma2", "phi", "phi3", "gpt2")
SAFETENSORS_INDEX = "model.safetensors.index.json"


def first_line(e: BaseException, limit: int = 200) -> str:
    text = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return text if len(text) <= limit else text[:limit] + "..."


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """transformers' load reports and progress bars off (secquant reports what matters itself)."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def read_config(model_dir: Path) -> dict[str, Any]:
    """config.json as plain JSON (a dict), checked to be a regular file inside the directory."""
    p = model_file(model_dir, "config.json")
    if p is None:
        raise ModelError(f"{model_dir} is not a Hugging Face model directory (no config.json)")
    try:
        cfg = json.loads(p.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise ModelError(f"{p} is not valid JSON: {first_line(e)}") from None
    if not isinstance(cfg, dict):
        raise ModelError(f"{p} is not a JSON object")
    return cfg


def is_causal_lm(cfg: dict[str, Any]) -> bool:
    """A causal language model: an architecture named *ForCausalLM (or GPT-2's *LMHeadModel), or, with no
    architectures listed, a model_type of the causal LM families."""
    archs = cfg.get("architectures")
    if isinstance(archs, list) and archs:
        return any(isinstance(a, str) and a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs)
    return cfg.get("model_type") in CAUSAL_LM_TYPES


def check_causal_lm_type(cfg: dict[str, Any], where: Path) -> str:
    model_type = cfg.get("model_type")
    if model_type not in CAUSAL_LM_TYPES:
        raise ModelError(f"{where}: causal LMs of model_type {str(model_type)[:40]!r} are not supported; secquant "
                         f"loads the {', '.join(CAUSAL_LM_TYPES)} families (transformers' own classes, no remote code)")
    return model_type


def weight_files(model_dir: Path) -> list[Path]:
    """The safetensors weight files of a directory (one file, or the shards its index names), each checked to be
    a regular file inside it. Pickle checkpoints are refused: convert them to safetensors first."""
    if (p := model_file(model_dir, "model.safetensors")) is not None:
        return [p]
    if (idx := model_file(model_dir, SAFETENSORS_INDEX)) is not None:
        try:
            shards = sorted(set(json.loads(idx.read_text(encoding="utf-8"))["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ModelError(f"{idx} is not a safetensors index: {first_line(e)}") from None
        files = []
        for name in shards:
            if not isinstance(name, str) or "/" in name or "\\" in name or name.startswith(".") or \
                    (f := model_file(model_dir, name)) is None:
                raise ModelError(f"{idx} names a shard {str(name)[:80]!r} that is not a file of {model_dir}")
            files.append(f)
        return files
    if any((model_dir / n).exists() for n in ("pytorch_model.bin", "model.bin", "pytorch_model.bin.index.json")):
        raise UnsafeInputError(f"{model_dir} holds pickle weights (pytorch_model.bin) and no model.safetensors: "
                               "secquant reads safetensors only; convert the checkpoint (e.g. save_pretrained("
                               "safe_serialization=True) in a trusted environment)")
    raise ModelError(f"{model_dir} has no model.safetensors (or {SAFETENSORS_INDEX} with its shards)")


def tokenizer_files(tok_dir: Path) -> dict[str, Path]:
    """The tokenizer files of a directory; refused (naming them) when it has none."""
    found = {n: p for n in (*TOKENIZER_FILES, *TOKENIZER_SIDE_FILES) if (p := model_file(tok_dir, n)) is not None}
    if not any(n in found for n in TOKENIZER_FILES):
        raise ModelError(f"{tok_dir} has no tokenizer files (none of {', '.join(TOKENIZER_FILES)}): without them "
                         "every word would be an unknown token; pass the tokenizer's directory with --tokenizer DIR "
                         "(API: tokenizer=)")
    return found


def load_tokenizer(tok_dir: Path, decoder: bool = False):
    """The tokenizer of a directory (offline, no remote code). A decoder's tokenizer without a pad token pads
    with its end-of-sequence token, on the right (the attention mask marks the padding)."""
    from transformers import AutoTokenizer

    tokenizer_files(tok_dir)
    try:
        with quiet_transformers():
            tok = AutoTokenizer.from_pretrained(str(tok_dir), local_files_only=True, trust_remote_code=False)
    except Exception as e:
        raise ModelError(f"{tok_dir}: cannot load the tokenizer offline: {first_line(e)}") from None
    if decoder:
        if tok.pad_token is None:
            if tok.eos_token is None:
                raise ModelError(f"{tok_dir}: the tokenizer has neither a pad nor an end-of-sequence token; add a "
                                 "pad_token to its tokenizer_config.json")
            tok.pad_token = tok.eos_token
        tok.padding_side = "right"
    return tok


def from_pretrained(auto_cls, model_dir: Path, ignorable_missing: tuple[str, ...] = ()) -> nn.Module:
    """The float model of a directory through transformers' own loading and key conversion: safetensors only,
    no remote code, fp32. Weights the checkpoint lacks are refused (naming them), except `ignorable_missing`
    prefixes (parts the caller never uses)."""
    weight_files(model_dir)  # checked (regular files inside the directory, no pickle) before transformers reads
    try:
        with quiet_transformers():
            model, info = auto_cls.from_pretrained(
                str(model_dir), use_safetensors=True, trust_remote_code=False, local_files_only=True,
                dtype=torch.float32, output_loading_info=True)
    except Exception as e:
        raise ModelError(f"{model_dir}: transformers cannot load the model: {first_line(e)}") from None
    missing = sorted(k for k in info.get("missing_keys", ()) if not k.startswith(ignorable_missing))
    if missing:
        raise ModelError(f"{model_dir}: weights missing for {missing[:5]} ({len(missing)} tensors); is this the "
                         "right model directory?")
    if mismatched := list(info.get("mismatched_keys", ())):
        raise ModelError(f"{model_dir}: weights of the wrong shape for {[str(m)[:80] for m in mismatched[:3]]}")
    return model.float().eval()


def from_config(auto_cls, model_dir: Path, max_bytes: int | None = None) -> nn.Module:
    """The float architecture config.json describes, randomly initialized (weights come later). With `max_bytes`
    it is first built on the meta device (no memory) and refused if its tensors would take more than that."""
    from transformers import AutoConfig

    try:
        with quiet_transformers():
            config = AutoConfig.from_pretrained(str(model_dir), local_files_only=True, trust_remote_code=False)
    except Exception as e:
        raise ModelError(f"{model_dir}: cannot read config.json as a Hugging Face config: {first_line(e)}") from None
    try:
        with quiet_transformers():
            if max_bytes is not None:
                with torch.device("meta"):
                    probe = auto_cls.from_config(config, trust_remote_code=False)
                need = sum(t.numel() * t.element_size() for t in [*probe.parameters(), *probe.buffers()])
                if need > max_bytes:
                    raise ModelError(f"{model_dir}/config.json describes a model of {need} bytes, far more than its "
                                     f"weights file could hold (at most {max_bytes}): refusing to allocate it")
            return auto_cls.from_config(config, trust_remote_code=False).float().eval()
    except ModelError:
        raise
    except Exception as e:
        raise ModelError(f"{model_dir}: cannot build the model config.json describes: {first_line(e)}") from None


def _allowed_roots(model_dir: Path) -> list[Path]:
    """Where a model directory's files may really live: the directory itself, and for a Hugging Face cache
    snapshot (`models--org--name/snapshots/REV`, whose files are links) that repository's blob store."""
    d = model_dir.resolve()
    roots = [d]
    if d.parent.name == "snapshots" and d.parent.parent.name.startswith("models--"):
        roots.append(d.parent.parent / "blobs")
    return roots


def model_file(model_dir: Path, name: str) -> Path | None:
    """`model_dir/name` if it exists as a regular file that resolves inside the model directory (or its Hugging
    Face blob store); None if absent. A link out of the directory, or a device, FIFO or directory in its place, is
    refused by name: a third-party repository must not make secquant read, copy, sign and seal other files
    of this machine."""
    p = model_dir / name
    if not p.exists() and not p.is_symlink():
        return None
    try:
        real = p.resolve(strict=True)
        regular = stat.S_ISREG(real.stat().st_mode)
    except (OSError, RuntimeError):  # a dangling link or a link loop
        raise UnsafeInputError(f"{p} is a broken or looping link: remove it from the model directory") from None
    if not regular or not any(real.is_relative_to(r) for r in _allowed_roots(model_dir)):
        what = "a link to a file outside the model directory" if regular else "not a regular file"
        raise UnsafeInputError(f"{p} is {what} ({real}): refusing to read it; copy the real file into the model "
                               "directory if it belongs to the model")
    return p
