"""What an export wrote (ExportInfo, stored in the ONNX metadata), the names and constants the ONNX
modules share, and the check that onnx/onnxruntime are installed."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

import torch

from ...errors import SecquantError

ONNX_NAME = "model.onnx"
DEFAULT_OPSET = 21  # blocked QuantizeLinear / DequantizeLinear and 4-bit tensors need opset 21
TORCH_MAX_OPSET = 20  # the TorchScript exporter's newest opset; the graph is converted up from there
METADATA_KEY = "secquant.export"
MS = "com.microsoft"
EPS = float(torch.finfo(torch.float32).eps)
ENCODER_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
PLACEHOLDER, PLACEHOLDER_DOMAIN = "QuantLayer", "secquant"
SAMPLE_TEXTS = ["secquant keeps integer weights as integers.",
                 "A second, somewhat longer sentence makes the batch need padding and an attention mask."]


class ExportFallbackWarning(UserWarning):
    """Some layers were exported with dequantized float weights (see the message)."""


@dataclass
class LayerExport:
    """How one quantized layer was exported.

    kernel: int8 (integer GEMM), nbits (low-bit weight kernel, float activations), dequantize
    (integer weights dequantized at run time, then a float op) or float. weights: int (the
    artifact's codes are in the file), float (dequantized float initializer: a fallback) or
    none (the recipe left the weights in float).
    """

    name: str
    type: str
    ops: str
    kernel: str
    weights: str = "int"
    fallback: str | None = None  # why the weights are a float initializer
    note: str | None = None  # other departures from an all-integer layer


@dataclass
class ExportInfo:
    """What export_onnx wrote; stored as JSON in the ONNX metadata under `secquant.export`."""

    secquant_version: str
    opset: int
    kind: str
    inputs: list[str]
    output: str
    layers: list[LayerExport] = field(default_factory=list)

    @property
    def fallbacks(self) -> list[LayerExport]:
        return [x for x in self.layers if x.fallback is not None]

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> ExportInfo:
        d = json.loads(text)
        d["layers"] = [LayerExport(**x) for x in d.get("layers", [])]
        return cls(**d)


def placeholder_layer(node) -> str:
    """The quantized layer a placeholder node stands for."""
    return next(a.s.decode() for a in node.attribute if a.name == "layer")


def require_onnx() -> None:
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        raise SecquantError("ONNX export and inference need the packages onnx and onnxruntime "
                            "(pip install onnx onnxruntime)") from None


