"""ONNX export of the newer layer types: transposed convolutions (integer codes -> DequantizeLinear -> Transpose ->
ConvTranspose), Conv3d, depthwise convolutions; quantized LSTM/GRU refuse export, naming the layer."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

import secquant  # noqa: E402
from secquant.errors import SecquantError  # noqa: E402
from secquant.runtime import export_onnx  # noqa: E402


class UpNet(nn.Module):
    sample_shape = (2, 6, 6)

    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv2d(2, 8, 3, padding=1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.up = nn.ConvTranspose2d(8, 4, 3, stride=2, padding=1, output_padding=1, groups=2)
        self.c3 = nn.Conv3d(1, 2, (1, 3, 3), padding=(0, 1, 1))
        self.up1 = nn.ConvTranspose1d(2, 2, 4, stride=2, padding=1)
        self.fc = nn.Linear(2 * 4 * 12 * 24, 5)

    def forward(self, x):
        y = self.up(torch.relu(self.dw(torch.relu(self.c(x)))))  # [B, 4, 12, 12]
        y = self.c3(y.unsqueeze(1))  # [B, 2, 4, 12, 12]
        y = self.up1(y.reshape(y.shape[0], 2, -1))  # [B, 2, 1152]
        return self.fc(y.flatten(1))


@pytest.mark.parametrize("preset", ["w8a16", "w4a16-rtn", "w8a8-dynamic"])
def test_transposed_3d_and_depthwise_convs_export_with_integer_weights(tmp_path, preset):
    torch.manual_seed(0)
    m = UpNet().eval()
    out = tmp_path / preset
    qm = secquant.quantize(m, preset, out=out)
    assert {n: e.type for n, e in qm.manifest.layers.items()} == {
        "c": "Conv2d", "dw": "Conv2d", "up": "ConvTranspose2d", "c3": "Conv3d", "up1": "ConvTranspose1d",
        "fc": "Linear"}
    assert qm.manifest.float_layers == []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = export_onnx(out, model=UpNet().eval())
    graph = onnx.load(str(path)).graph
    assert [n.op_type for n in graph.node].count("ConvTranspose") == 2
    codes = [i for i in graph.initializer if i.name.startswith("up.qweight")]
    assert len(codes) == 1 and codes[0].data_type in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8,
                                                      onnx.TensorProto.UINT4)
    x = torch.rand(3, 2, 6, 6)
    s = ort.InferenceSession(str(path))
    y = s.run(None, {s.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        ref = qm(x).numpy()
    assert np.abs(y - ref).max() < 1e-4 * max(1.0, np.abs(ref).max())


@pytest.mark.parametrize("factory", ["lstm_digits", "gru_digits"])
@pytest.mark.parametrize("preset", ["w8a16", "w4a16-rtn", "w8a8-dynamic"])
def test_weight_only_recurrent_layers_export_and_activation_quantized_ones_refuse(tmp_path, factory, preset):
    import layers_models

    make = getattr(layers_models, factory)
    torch.manual_seed(0)
    out = tmp_path / "q"
    qm = secquant.quantize(make().eval(), preset, out=out)
    kind = "LSTM" if factory == "lstm_digits" else "GRU"
    if preset.endswith("dynamic"):
        with pytest.raises(SecquantError, match=f"layer 'rnn': a quantized {kind} with quantized activations"):
            export_onnx(out, model=make().eval())
        assert not (out / "model.onnx").exists()
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = export_onnx(out, model=make().eval())
    graph = onnx.load(str(path)).graph
    ops = [n.op_type for n in graph.node]
    assert ops.count(kind) == 2 and ops.count("DequantizeLinear") == 8  # 2 layers x 2 directions x (W, R)
    codes = [i for i in graph.initializer if i.name.startswith("rnn.") and "qweight" in i.name]
    assert len(codes) == 8 and all(i.data_type != onnx.TensorProto.FLOAT for i in codes)
    x = torch.rand(5, 8, 8)
    s = ort.InferenceSession(str(path))
    y = s.run(None, {s.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        assert np.abs(y - qm(x).numpy()).max() < 1e-5
