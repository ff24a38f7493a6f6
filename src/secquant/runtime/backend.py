"""Where a quantized model runs: one interface and a table of backends.

A backend is made from a loaded model (`load`), runs the batches the model's adapter produces (`run`)
and says what it is (`describe`). `evaluate`, the server and the CLI look backends up by name in
BACKENDS, so adding one (the secret-shared Z_p backend, say) is a class and a line in that table.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch

from ..errors import SecquantError


class Backend(ABC):
    """A quantized model ready to run on one engine."""

    name: ClassVar[str]
    aliases: ClassVar[tuple[str, ...]] = ()

    @classmethod
    @abstractmethod
    def load(cls, qm: Any, *, threads: int = 2, export: bool = True) -> Backend:
        """The backend for a QuantizedModel (`export=False`: refuse rather than build what is missing)."""

    @abstractmethod
    def run(self, batch: Any) -> torch.Tensor:
        """Outputs (float) for one batch as the model's adapter makes them."""

    @abstractmethod
    def describe(self) -> str:
        """The engine, its version and settings, for reports."""

    def facts(self) -> dict[str, Any]:
        """Measurements of what the backend runs that belong in an evaluation report."""
        return {}


class TorchBackend(Backend):
    """Eager PyTorch on the quantized module (integer weights dequantized for float kernels)."""

    name = "torch"
    aliases = ("pytorch",)

    def __init__(self, qm: Any) -> None:
        self.qm = qm

    @classmethod
    def load(cls, qm: Any, *, threads: int = 2, export: bool = True) -> TorchBackend:
        return cls(qm)

    @torch.no_grad()
    def run(self, batch: Any) -> torch.Tensor:
        return self.qm.handle.run(self.qm.module, batch).float()

    def describe(self) -> str:
        return f"torch-eager ({torch.get_num_threads()} threads; integer math simulated in float)"


class OnnxBackend(Backend):
    """ONNX Runtime on the artifact's model.onnx (exported, and registered in the manifest, if missing)."""

    name = "onnx"
    aliases = ("onnxruntime",)

    def __init__(self, session: Any, threads: int) -> None:
        self.session, self.threads = session, threads

    @classmethod
    def load(cls, qm: Any, *, threads: int = 2, export: bool = True) -> OnnxBackend:
        from .onnx import Session

        if qm.path is None:
            raise SecquantError("the ONNX Runtime backend needs an artifact directory: save the model (out=...) "
                                "first")
        return cls(Session(qm.path, threads=threads, export=export), threads)

    def run(self, batch: Any) -> torch.Tensor:
        return self.session.run(batch)

    def facts(self) -> dict[str, Any]:
        return {"onnx_size_bytes": (self.session.path / "model.onnx").stat().st_size}

    def describe(self) -> str:
        import onnxruntime

        return f"onnxruntime {onnxruntime.__version__} ({self.threads} threads, CPU)"


BACKENDS: dict[str, type[Backend]] = {b.name: b for b in (TorchBackend, OnnxBackend)}


def backend_class(name: str) -> type[Backend]:
    """The backend registered under `name` (or one of its aliases)."""
    for b in BACKENDS.values():
        if name == b.name or name in b.aliases:
            return b
    names = list(BACKENDS)
    raise SecquantError(f"unknown runtime {name!r}: use {', '.join(names[:-1])} or {names[-1]}")
