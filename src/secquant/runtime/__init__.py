"""Deployment: export quantized artifacts to ONNX and run them with ONNX Runtime.

    from secquant.runtime import export_onnx, Session
    export_onnx("digits-w8a8")               # writes digits-w8a8/model.onnx
    sess = Session("digits-w8a8", threads=2)
    logits = sess.run(batch)                 # same batches as the PyTorch adapters take

onnx / onnxruntime are imported lazily: importing this package needs neither. Exports are lazy too
(secquant._lazy), so a process that needs one submodule (an MPC party) does not import torch.
"""

from .._lazy import lazy_exports

_EXPORTS = {name: "export" for name in ("DEFAULT_OPSET", "ONNX_NAME", "ExportFallbackWarning", "ExportInfo",
                                        "LayerExport", "export_float_onnx", "export_info", "export_onnx")}
_EXPORTS["Session"] = "session"
__getattr__, __dir__ = lazy_exports(__name__, globals(), _EXPORTS)

__all__ = ["export_onnx", "export_info", "export_float_onnx", "Session", "ExportInfo", "LayerExport",
           "ExportFallbackWarning", "ONNX_NAME", "DEFAULT_OPSET"]
