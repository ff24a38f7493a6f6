"""An LSTM (and GRU) classifier of digits, read as 8 rows of 8 pixels, through quantize -> eval -> export -> seal ->
open -> serve: weight-only int8 / int4 (exported to ONNX LSTM operators on DequantizeLinear weights) and dynamic
int8 activations (PyTorch runtime only), agreeing with the float model."""

from __future__ import annotations

import warnings

import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import save_file

import secquant
from secquant.errors import SecquantError

SPEC = "layers_models:lstm_digits"


@pytest.fixture(scope="module")
def lstm_files(tmp_path_factory):
    """Float weights of the LSTM trained briefly on the digits member split, calibration and test files."""
    from layers_models import lstm_digits, train

    from secquant.models.digits import splits

    d = splits()
    x, y = d["train_x"].reshape(-1, 8, 8), d["train_y"]
    torch.manual_seed(0)
    model = train(lstm_digits(), x, y, epochs=12, lr=1e-2)
    root = tmp_path_factory.mktemp("lstm")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(root / "float.safetensors"))
    save_file({"inputs": x[:128].contiguous()}, str(root / "calib.safetensors"))
    save_file({"inputs": d["test_x"].reshape(-1, 8, 8).contiguous(), "labels": d["test_y"]},
              str(root / "test.safetensors"))
    return root, model


@pytest.mark.parametrize("preset", ["w8a16", "w4a16", "w8a8-dynamic"])
def test_lstm_quantize_eval_export(lstm_files, tmp_path, preset):
    root, model = lstm_files
    out = tmp_path / preset
    qm = secquant.quantize(SPEC, preset, out=out, weights=str(root / "float.safetensors"),
                           calib=str(root / "calib.safetensors"), strict=True)
    rnn = qm.manifest.layers["rnn"]
    assert rnn.type == "LSTM" and rnn.algorithm == "rtn" and rnn.weight.args.bits == (4 if "w4" in preset else 8)
    assert (rnn.activation is not None) == preset.endswith("dynamic")
    assert qm.manifest.float_layers == []
    res = secquant.evaluate(qm, against=SPEC, weights=str(root / "float.safetensors"),
                            data=str(root / "test.safetensors"))
    from secquant.models.digits import splits

    xt = splits()["test_x"].reshape(-1, 8, 8)
    with torch.no_grad():
        agree = float((qm(xt).argmax(1) == model(xt).argmax(1)).float().mean())
    print(f"\n{preset}: float {res['float_value']:.4f} quantized {res['value']:.4f} agreement {agree:.4f} "
          f"mean cosine {res['mean_cosine_to_float']:.4f} size ratio {res['size_ratio']:.3f}")
    assert res["metric"] == "accuracy" and res["float_value"] > 0.85
    assert res["value"] >= res["float_value"] - (0.03 if "w4" in preset else 0.01)
    assert agree >= (0.93 if "w4" in preset else 0.98)
    assert res["size_ratio"] < (0.25 if "w4" in preset else 0.35)
    from secquant.runtime import export_onnx

    if preset.endswith("dynamic"):  # activations quantized at every step: no ONNX form
        with pytest.raises(SecquantError, match="'rnn': a quantized LSTM with quantized activations"):
            export_onnx(out, factory=SPEC)
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_onnx(out, factory=SPEC)
    onnx_res = secquant.evaluate(secquant.load(out, factory=SPEC, allow_unsealed=True), against=SPEC,
                                 weights=str(root / "float.safetensors"), data=str(root / "test.safetensors"),
                                 runtime="onnx")
    assert onnx_res["value"] == pytest.approx(res["value"], abs=0.002)


def test_lstm_sealed_opened_and_served(lstm_files, tmp_path, server_keys, store_factory, sqlite_url):
    from secquant.security import seal
    from secquant.server import ServerConfig, create_app, open_served

    root, model = lstm_files
    owner, _ = server_keys
    art = tmp_path / "q"
    qm = secquant.quantize(SPEC, "w8a16", out=art, weights=str(root / "float.safetensors"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from secquant.runtime import export_onnx

        export_onnx(art, factory=SPEC)  # served by ONNX Runtime
    sealed = seal(art, [owner.recipient.read_text().strip()], owner.sign_key, tmp_path / "lstm.age")
    opened = secquant.load(sealed, identity=owner.identity, verify_key=owner.verify_key, factory=SPEC)

    from secquant.models.digits import splits

    xt = splits()["test_x"][:16].reshape(-1, 8, 8)
    with torch.no_grad():
        assert torch.equal(opened(xt), qm(xt))
        assert opened.check_integrity() == []
        float_pred = model(xt).argmax(1)
    store = store_factory(sqlite_url)
    user = store.add_client("ann", "user")
    served = open_served(sealed, owner.identity, owner.verify_key, factory=SPEC)
    assert served.backend == "onnxruntime"
    with TestClient(create_app(served, store, ServerConfig(integrity_interval=0))) as c:
        r = c.post("/v1/predict", json={"inputs": xt.tolist()}, headers={"Authorization": f"Bearer {user}"})
    assert r.status_code == 200, r.text
    labels = torch.tensor([p["label"] for p in r.json()["predictions"]])
    assert torch.equal(labels, qm(xt).argmax(1))
    assert float((labels == float_pred).float().mean()) >= 0.9
