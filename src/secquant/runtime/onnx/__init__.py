"""Export a secquant artifact to ONNX, keeping its integer weights as integers.

The float parts of the model (LayerNorm, attention, pooling, convolution glue) are traced by
``torch.onnx.export(..., dynamo=False)``; every quantized layer is traced as one placeholder
node (a ``torch.autograd.Function`` with a ``symbolic``) which is then rewritten with
``onnx.helper`` into the operators below, built from the artifact's own packed codes, scales
and zero points. Nothing is re-quantized: the ONNX file holds the codes of ``model.safetensors``.

Which operators each scheme becomes, and why:

- int8 weights (per channel / per tensor) x static int8 activations (w8a8): QuantizeLinear on
  the input with the calibrated scale and zero point (uint8; signed codes shifted by 128) straight
  into com.microsoft::MatMulIntegerToFloat with the int8 weight initializer [K, N], its per-channel
  scales and the bias, which the GEMM's output stage adds. (The QDQ form, DQ x DQ -> MatMul, fuses
  into the same kernel but leaves the bias Add as one more pass over the output: measured ~3%
  slower on MiniLM at batch 32 x 128.) The smoothing scale is a Div in front of the quantizer, as in PyTorch.
- int8 weights x dynamic symmetric per-token int8 activations: the zero point is one constant (0, or
  128 once signed codes are shifted into uint8), so ReduceMin/ReduceMax give the token scale, a
  blocked QuantizeLinear (one block per row) the uint8 codes, and com.microsoft::MatMulIntegerToFloat
  takes the scalar zero point 128: ORT's plain U8S8 GEMM, the kernel quantize_dynamic's graphs run.
  Then one Mul by the token scale and the bias Add.
- int8 weights x dynamic asymmetric per-token int8 activations (w8a8-dynamic): ORT's DynamicQuantizeLinear
  is per tensor, and a per-tensor range over a MiniLM batch costs far too much accuracy (ORT's own
  quantize_dynamic reaches a mean cosine of only 0.958 / 0.992 per channel to fp32). So per-token
  ranges come from ReduceMin/ReduceMax over the feature axis, the activation is quantized once by
  a blocked QuantizeLinear (one block per row), and com.microsoft::MatMulIntegerToFloat multiplies
  the integers. The per-token zero point is removed inside the same integer GEMM: R extra input
  columns holding the row's zero point meet R extra int8 weight rows that sum to -colsum(W)
  (exact integer arithmetic; R ~ 10-60 for K = 384..1536). Then one Mul by the per-token scale and
  the bias Add. This is PyTorch's per-token fake quantization, computed exactly in integers. (On
  MiniLM the extra columns cost no measurable time against the symmetric form above: both are
  within noise of each other, 1.04-1.2x ORT's quantize_dynamic, the difference being the per-token
  scale Mul and the bias Add, which a per-tensor GEMM does in its output stage.)
  Per-tensor asymmetric dynamic activations use DynamicQuantizeLinear + MatMulInteger, which ORT
  fuses into DynamicQuantizeMatMul; other per-tensor forms pass scale and zero point to
  MatMulIntegerToFloat directly.
- weight-only 2..8-bit integer weights on Linear layers (w4a16, w3a16, w2a16, w8a16):
  com.microsoft::MatMulNBits with the recipe's group size as block size and the stored zero
  points (3-bit codes are stored as 4-bit, 5..7-bit as 8-bit: the codes fit exactly; per-channel
  scales are one block scale repeated along the row). accuracy_level=0 keeps float activations
  (what the PyTorch model computes); 4 lets ORT quantize activations per block internally.
- A rotated layer (recipe `rotation`, the GPTQ presets) first maps its input to x R: Mul by the
  random signs, the rows viewed as [-1, block], MatMul by the block's Hadamard matrix and back to
  the input's shape (Shape + Reshape); layers reading the same tensor share it. It then runs the
  kernel above on its stored (rotated) integer weight.
- Embedding tables: com.microsoft::GatherBlockQuantized on the integer table (never dequantized
  at export time).
- Convolutions: DequantizeLinear on the integer kernel (per channel, or blocked on the
  [out, in * k] view for groups) + Conv, with QuantizeLinear/DequantizeLinear on a statically
  quantized input. ORT fuses QDQ convolutions into QLinearConv only when the output is quantized
  too, which secquant's models do not do, so ORT runs these convolutions in float.
- Activations ORT has no integer kernel for (not 8-bit, or next to weights without an int8 GEMM)
  are fake-quantized exactly in float (QuantizeLinear/DequantizeLinear or the same arithmetic
  as PyTorch) in front of the weight kernel; the layer records that as a note.
- Weights ORT cannot run (codebook formats nf4 / pow2 / kmeans) fall back to a dequantized float
  initializer. Such fallbacks are recorded in the model's metadata (:func:`export_info`) and
  reported with an :class:`ExportFallbackWarning`; ``strict=True`` raises SecquantError naming the
  layer instead. Group sizes MatMulNBits cannot take (not a power of two >= 16) and per-input-channel
  scales keep their integers through DequantizeLinear + MatMul (noted, not a fallback).

Before the file is moved into place it is run once by ONNX Runtime on the model's evaluation
data and compared with the PyTorch quantized model; a mismatch raises and nothing is written.
"""

from .causal import build_causal_onnx, export_causal_onnx
from .export import agreement, agrees, build_onnx, export_float_onnx, export_info, export_onnx, validate_onnx
from .info import DEFAULT_OPSET, ONNX_NAME, ExportFallbackWarning, ExportInfo, LayerExport
from .session import Session, check_external_data
from .weights import pack_bits

__all__ = ["export_onnx", "export_info", "export_float_onnx", "build_onnx", "validate_onnx", "agreement", "agrees",
           "ExportInfo", "LayerExport", "ExportFallbackWarning", "ONNX_NAME", "DEFAULT_OPSET", "pack_bits", "Session",
           "check_external_data", "export_causal_onnx", "build_causal_onnx"]
