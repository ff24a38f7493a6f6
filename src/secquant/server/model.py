"""The model a server answers from: opened and verified once, kept decrypted in memory only,
run by ONNX Runtime when the artifact carries an exported model.onnx, else by PyTorch; and
checked for corruption while it serves.

What the integrity check covers (`ServedModel.check`):

- keyed checksums (`secquant.security.integrity.IntegrityGuard`) over every tensor the PyTorch
  module holds (codes, scales, zero points, biases, normalization and activation-quantizer
  parameters, codebooks, rotation and smoothing tensors, the dequantized-weight caches), judged
  against the record sealed with the model right after the signature and hashes were verified;
- secret canaries (`secquant.security.canary`): inputs drawn once per process from a secret seed,
  run through the serving backend at start and compared on every check. With the ONNX Runtime
  backend they are the only check of ORT's own copy of the weights, which Python cannot read: a
  flip there is seen only if it moves a canary's outputs (bench/integrity.py measures how well
  that holds). An encoder served by ORT also runs, at each check, the next batch of a secret sweep
  over its whole vocabulary, so a flip in the embedding row of a rare token is seen within one
  sweep (`vocabulary_sweep_batches` checks).

A failed check is final: the model is marked corrupted and never answers again until the
server is restarted from the sealed file.
"""

from __future__ import annotations

import logging
import os
import secrets
import threading
from pathlib import Path
from typing import Any

import torch

from ..artifact.fsutil import private_dir
from ..errors import SecquantError

log = logging.getLogger("secquant.server")


class ServedModel:
    """A loaded QuantizedModel plus an optional ONNX Runtime session that answers instead of it."""

    def __init__(self, qm, ort_session=None, *, integrity_key: bytes | None = None) -> None:
        from ..security.canary import draw_canaries, vocabulary_sweep
        from ..security.integrity import IntegrityGuard

        self.qm = qm
        self.kind: str = qm.handle.kind  # for messages and /v1/info
        self.task: str = qm.handle.adapter.task  # the route that answers: /v1/predict, /v1/embed or /v1/generate
        self.spec: str = qm.manifest.model.spec
        self.recipe: str = qm.manifest.recipe.name
        self.ort = ort_session
        self.backend = "onnxruntime" if ort_session is not None else "pytorch"
        self._lock = threading.Lock()  # one forward pass at a time on the shared module
        # The checksums sealed with the model when it carries them (checked once already by load);
        # otherwise the only place the server builds a guard: a fresh random key per process.
        self.guard = qm.integrity if qm.integrity is not None and integrity_key is None else \
            IntegrityGuard(qm.module, integrity_key or secrets.token_bytes(32))
        self.corruption: str | None = None
        rb = qm.manifest.model.rebuild
        shape = getattr(qm.handle.adapter, "sample_shape", None) or rb.get("sample_shape")
        self.sample_shape: tuple[int, ...] | None = tuple(shape) if shape else None
        self.sample_dtype: str = getattr(qm.handle.adapter, "sample_dtype", "float32")  # int64: token ids
        self.id_high: int | None = getattr(qm.handle.adapter, "id_high", None)
        # secret canaries, drawn from a per-process secret seed: never logged, never stored
        self.canaries = draw_canaries(qm.handle, qm.module)
        if self.canaries is None and self.ort is not None:
            raise SecquantError("no canary inputs can be made for this model (its input shape is unknown), and "
                                "without them nothing would check ONNX Runtime's copy of the weights: serve it "
                                "with --backend pytorch")
        self._canary_out = self._canary_run() if self.canaries is not None else None
        # ORT's copy of an encoder's embedding table: a rare token's row is read by no canary, so each check
        # also runs the next batch of a secret sweep over the whole vocabulary (its outputs recorded now)
        self._sweep = vocabulary_sweep(qm.handle.adapter) if self.ort is not None else []
        self._sweep_out = [self._forward(b) for b in self._sweep]
        self._sweep_next = 0
        self.checks = 0

    # -- inference -------------------------------------------------------------------------------

    def _forward(self, batch) -> torch.Tensor:
        with self._lock, torch.no_grad():
            if self.ort is not None:
                return self.ort.run(batch)
            return self.qm.handle.run(self.qm.module, batch).float()

    def _canary_run(self) -> list[torch.Tensor]:
        return [self._forward(b) for b in self.canaries.batches]

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        if self.task != "predict":
            raise SecquantError(f"this model is a {self.kind}: use /v1/{self.task}")
        return self._forward(x)

    def embed(self, texts: list[str]) -> torch.Tensor:
        if self.task != "embed":
            raise SecquantError(f"this model is a {self.kind}: use /v1/{self.task}")
        return self._forward(self.qm.handle.adapter.encode(list(texts)))

    def generate(self, prompt: str, **options) -> dict[str, Any]:
        """Text continuing `prompt` (causal LMs), generated by the PyTorch module whichever backend serves."""
        if self.task != "generate":
            raise SecquantError(f"this model is a {self.kind}: use /v1/{self.task}")
        with self._lock, torch.no_grad():
            return self.qm.handle.adapter.generate(self.qm.module, prompt, **options)

    # -- integrity -------------------------------------------------------------------------------

    def check(self) -> str | None:
        """Run the integrity checks; returns (and keeps) a description of the corruption, or None.

        The checksums run without the forward lock (they only read the tensors), so serving goes on
        while they run; the canaries run through the serving backend like any request."""
        from ..security.canary import outputs_match

        if self.corruption is not None:
            return self.corruption
        bad = self.guard.check()
        problem = None
        if bad:
            where = ", ".join(c.describe() for c in bad[:5])
            problem = f"{len(bad)} corrupted weight group(s): {where}" + (" ..." if len(bad) > 5 else "")
        elif self._canary_out is not None and not all(map(outputs_match, self._canary_out, self._canary_run())):
            problem = f"the secret canary inputs no longer give the outputs recorded at start ({self.backend} backend)"
        elif self._sweep:
            i, self._sweep_next = self._sweep_next, (self._sweep_next + 1) % len(self._sweep)
            if not outputs_match(self._sweep_out[i], self._forward(self._sweep[i])):
                problem = (f"the secret vocabulary sweep (batch {i}) no longer gives the outputs recorded at start "
                           f"({self.backend} backend): an embedding row is corrupted")
        self.checks += 1
        if problem is not None:
            self.corruption = problem
            log.error("integrity check failed, no longer serving this model: %s", problem)
        return problem

    def info(self) -> dict[str, Any]:
        c = self.canaries
        return {"model": self.spec, "kind": self.kind, "recipe": self.recipe, "backend": self.backend,
                "input_shape": list(self.sample_shape) if self.sample_shape else None,
                "quantized_layers_checked": len(self.guard.layers), "tensors_checked": len(self.guard.tensors),
                "canaries": c.count if c else 0,
                "canary_unit_coverage": round(c.covered / c.units, 4) if c and c.units else None,
                "vocabulary_sweep_batches": len(self._sweep),
                "integrity_checks": self.checks, "corrupted": self.corruption is not None,
                "corruption": self.corruption}


def open_served(sealed: str | os.PathLike, identity: str | os.PathLike, verify_key: str | os.PathLike, *,
                passphrase: str | None = None, backend: str = "auto", threads: int = 1,
                factory: str | None = None, min_release: int | None = None) -> ServedModel:
    """Decrypt and verify a sealed model into a private /dev/shm directory, load it (and its
    model.onnx into ONNX Runtime, from the verified bytes), then delete the directory: from then on
    the model exists only in this process's memory."""
    from ..api import QuantizedModel, _integrity_guard
    from ..models import load_artifact
    from ..security import open_sealed, read_release

    from ..runtime.backend import OnnxBackend, backend_class

    try:  # "auto", or any name (or alias) of the runtime's backends
        engine = None if backend == "auto" else backend_class(backend)
    except SecquantError as e:
        raise SecquantError(f"--backend {backend!r}: use auto or a runtime ({e})") from None
    p = Path(sealed)
    if not p.is_file():
        raise SecquantError(f"{p} is not a sealed model file: seal an artifact with `secquant seal` first")
    with private_dir("serve", "the server keeps the decrypted model off disk and cannot run without it") as work:
        art = open_sealed(p, identity, verify_key, work / "artifact", identity_passphrase=passphrase,
                          min_release=min_release)
        la = load_artifact(art, factory=factory)
        # the sealed integrity record is checked now, against every stored tensor (a mismatch refuses)
        qm = QuantizedModel(la.module, la.manifest, la.handle, None, _integrity_guard(la), read_release(art))
        has_onnx = "model.onnx" in la.manifest.files
        if engine is OnnxBackend and not has_onnx:
            raise SecquantError(f"{p} carries no model.onnx: export it (`secquant export`) before sealing, or "
                                "serve with --backend pytorch")
        sess = None
        if has_onnx and engine in (None, OnnxBackend):
            from ..runtime import Session

            sess = Session(art, threads=threads, export=False)
        return ServedModel(qm, sess)
