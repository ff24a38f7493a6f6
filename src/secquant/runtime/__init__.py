"""Deployment: export quantized artifacts to ONNX and run them with ONNX Runtime.

    from secquant.runtime import export_onnx, Session
    export_onnx("digits-w8a8")               # writes digits-w8a8/model.onnx
    sess = Session("digits-w8a8", threads=2)
    logits = sess.run(batch)                 # same batches as the PyTorch adapters take

onnx / onnxruntime are imported lazily: importing this package needs neither.
"""

from .backend import BACKENDS, Backend, OnnxBackend, TorchBackend, backend_class
from .onnx import (
    DEFAULT_OPSET, ONNX_NAME, ExportFallbackWarning, ExportInfo, LayerExport, Session, export_float_onnx, export_info,
    export_onnx,
)

__all__ = ["Backend", "BACKENDS", "TorchBackend", "OnnxBackend", "backend_class", "export_onnx", "export_info", "export_float_onnx", "Session", "ExportInfo", "LayerExport",
           "ExportFallbackWarning", "ONNX_NAME", "DEFAULT_OPSET"]
