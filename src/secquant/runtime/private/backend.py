"""The secret-shared backend: load a quantized classifier, run it among 3 parties, describe it.

    from secquant.runtime.private import PrivateBackend, private_evaluate
    be = PrivateBackend.load("digits-w8a8")          # integer program + field chosen from the bounds
    out = be.run(x)                                   # labels (and logits) computed under MPyC
    private_evaluate("digits-w8a8", samples=20)       # agreement, accuracy, cost
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ...errors import SecquantError
from .compile import DEFAULT_PRECISION_BITS, compile_program, encode_inputs
from .launch import run_local
from .program import Program, run_reference

ENGINE = "mpyc"
PROTOCOL = "Shamir secret sharing over GF(p), 3 parties, threshold 1 (honest majority, semi-honest), TLS between parties"


def _engine_version() -> str:
    from importlib.metadata import version

    return f"{ENGINE} {version('mpyc')}"


@dataclass
class PrivateResult:
    """What the client learns (labels; logits only when asked), and what the run cost."""

    labels: np.ndarray
    logits: np.ndarray | None      # float logits = integer logits / 2^shift
    int_logits: list[list[int]] | None
    seconds: float
    bytes_total: int
    bytes_by_party: list[int]
    p: int


class PrivateBackend:
    """A quantized classifier compiled to integer arithmetic in Z_p and run by 3 MPyC parties."""

    def __init__(self, program: Program, module: torch.nn.Module | None = None, sample_shape=None) -> None:
        self.program = program
        self.module = module
        self.sample_shape = sample_shape

    @classmethod
    def load(cls, artifact: Any, precision_bits: int = DEFAULT_PRECISION_BITS, exact: bool = True) -> "PrivateBackend":
        """From an artifact directory, a QuantizedModel, or a quantized nn.Module (with sample_shape known)."""
        qm = _as_quantized(artifact)
        shape = getattr(qm.handle.adapter, "sample_shape", None)
        if not qm.handle.adapter.labelled or shape is None:
            raise SecquantError(f"private inference runs tensor classifiers; {qm.manifest.model.spec} is an "
                                f"{qm.handle.kind} without a fixed input shape")
        return cls(compile_program(qm.module, tuple(shape), precision_bits, exact), qm.module, tuple(shape))

    def encode(self, x: torch.Tensor) -> np.ndarray:
        """The client's local step: raw inputs -> centered integer codes."""
        return encode_inputs(self.program.input, x)

    def reference(self, x: torch.Tensor) -> dict[str, np.ndarray]:
        """The plaintext integer arithmetic the parties compute (bit for bit)."""
        return run_reference(self.program, self.encode(x))

    def run(self, x: torch.Tensor, reveal_logits: bool = False, timeout: float = 1800.0) -> PrivateResult:
        """Run the secret-shared model on x [N, *sample_shape] with three local party processes."""
        codes = self.encode(x)
        return self.run_codes(codes, reveal_logits, timeout)

    def run_codes(self, codes: np.ndarray, reveal_logits: bool = False, timeout: float = 1800.0) -> PrivateResult:
        res = run_local(self.program, codes, reveal_logits=reveal_logits, timeout=timeout)
        ints = [[int(v) for v in row] for row in res["logits"]] if "logits" in res else None
        shift = self.program.ops[-1]["shift"]
        return PrivateResult(labels=np.asarray(res["labels"]),
                             logits=None if ints is None else np.array(ints, dtype=np.float64) / 2.0 ** shift,
                             int_logits=ints, seconds=res["seconds"], bytes_total=res["bytes_total"],
                             bytes_by_party=res["bytes_by_party"], p=res["p"])

    def describe(self) -> dict[str, Any]:
        """What every party knows in advance (public): the architecture, shifts, clamp bounds, bit lengths."""
        return {"engine": _engine_version(), "protocol": PROTOCOL, "bit_length": self.program.bit_length,
                "input": self.program.input, "ops": self.program.ops,
                "secret_shapes": {k: list(v.shape) for k, v in self.program.secrets.items()}}


def _as_quantized(artifact: Any):
    """A loaded model (anything with .module, .manifest, .handle: QuantizedModel, LoadedArtifact) or an
    artifact directory, loaded with its hashes verified (naming a plain directory is the opt-in, as in eval)."""
    if all(hasattr(artifact, a) for a in ("module", "manifest", "handle")):
        return artifact
    p = Path(artifact)
    if p.is_dir():
        from ...models import load_artifact

        return load_artifact(p)
    raise SecquantError(f"{p}: give an artifact directory or a loaded model (open a sealed file first with "
                        "`secquant open` or secquant.load(..., identity=, verify_key=))")


def _eval_samples(qm, data, samples: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    xs, ys = [], []
    got = 0
    for xb, yb in qm.handle.adapter.eval_batches(data, 64):
        xs.append(xb)
        ys.append(yb)
        got += len(xb)
        if got >= samples:
            break
    if not xs:
        raise SecquantError("no evaluation samples: pass --data FILE with 'inputs' (and 'labels')")
    x = torch.cat(xs)[:samples]
    y = None if any(v is None for v in ys) else torch.cat(ys)[:samples]
    return x, y


def private_evaluate(artifact: Any, *, samples: int = 10, parties: int = 3, data: str | Path | None = None,
                     precision_bits: int = DEFAULT_PRECISION_BITS, exact: bool = True, timeout: float = 1800.0,
                     log=lambda s: None) -> dict[str, Any]:
    """Run `samples` held-out inputs through the secret-shared model on localhost and compare with the
    plaintext quantized model: agreement (top-1), accuracy, plain_accuracy, cost per sample, p, engine."""
    if parties != 3:
        raise SecquantError(f"--parties {parties}: only 3 parties are supported (Shamir, threshold 1: any one "
                            "party learns nothing; two together could reconstruct)")
    if not 1 <= samples <= 256:
        raise SecquantError("--samples must be between 1 and 256 (one secure session holds them all)")
    qm = _as_quantized(artifact)
    backend = PrivateBackend.load(qm, precision_bits, exact)
    x, y = _eval_samples(qm, data, samples)
    with torch.no_grad():
        plain_logits = qm.module(x).numpy()
    plain = plain_logits.argmax(axis=1)
    ref = backend.reference(x)
    log(f"running {len(x)} sample(s) among 3 parties on 127.0.0.1 (MPyC, p of {backend.program.bit_length + 32} "
        "bits): seconds per sample")
    res = backend.run(x, reveal_logits=True, timeout=timeout)
    n = len(x)
    out = {
        "samples": n, "parties": parties, "engine": _engine_version(), "protocol": PROTOCOL,
        "agreement": float((res.labels == plain).mean()),
        "accuracy": None if y is None else float((res.labels == y.numpy()).mean()),
        "plain_accuracy": None if y is None else float((plain == y.numpy()).mean()),
        "bit_exact": res.int_logits == ref["logits"].tolist(),
        "max_logit_diff": float(np.abs(res.logits - plain_logits).max()),
        "seconds_per_sample": res.seconds / n, "bytes_per_sample": res.bytes_total / n,
        "p": str(res.p), "p_bits": res.p.bit_length(), "bit_length": backend.program.bit_length,
        "precision_bits": precision_bits, "exact_rounding": exact, "recipe": qm.manifest.recipe.name,
    }
    return out
