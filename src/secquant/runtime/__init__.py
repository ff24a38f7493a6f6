"""Deployment: where quantized models run. One Backend interface (backend.py) with PyTorch and ONNX Runtime
implementations; ONNX export with integer kernels and ONNX Runtime sessions (onnx/); secret-shared inference
among parties in Z_p (private/).

    from secquant.runtime import export_onnx, Session
    export_onnx("digits-w8a8")               # writes digits-w8a8/model.onnx
    sess = Session("digits-w8a8", threads=2)
    logits = sess.run(batch)                 # same batches as the PyTorch adapters take

Exports are lazy (secquant._lazy): onnx, onnxruntime and torch are imported on first use, so a process that
needs one submodule (an MPC party) imports neither.
"""

from __future__ import annotations

from .._lazy import lazy_exports

_EXPORTS = {
    **dict.fromkeys(["Backend", "BACKENDS", "TorchBackend", "OnnxBackend", "backend_class"], "backend"),
    **dict.fromkeys(["DEFAULT_OPSET", "ONNX_NAME", "ExportFallbackWarning", "ExportInfo", "LayerExport", "Session",
                     "export_float_onnx", "export_info", "export_onnx", "export_causal_onnx"], "onnx"),
    "export_compressed_tensors": "compressed",
}
__getattr__, __dir__ = lazy_exports(__name__, globals(), _EXPORTS)
__all__ = list(_EXPORTS)
