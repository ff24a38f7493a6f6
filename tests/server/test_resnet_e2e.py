"""A torchvision-style ResNet (conv-BN-ReLU, residual blocks, a downsampling shortcut) trained briefly on digits,
through quantize (BatchNorm folded) -> eval -> ONNX export -> seal -> open -> serve."""

from __future__ import annotations

import warnings

import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import save_file

import secquant
from secquant.models.digits import splits

SPEC = "layers_models:resnet"


@pytest.fixture(scope="module")
def resnet_files(tmp_path_factory):
    from layers_models import resnet, train

    d = splits()
    torch.manual_seed(0)
    model = train(resnet(), d["train_x"], d["train_y"], epochs=4)
    root = tmp_path_factory.mktemp("resnet")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(root / "float.safetensors"))
    save_file({"inputs": d["train_x"][:128].contiguous()}, str(root / "calib.safetensors"))
    save_file({"inputs": d["test_x"].contiguous(), "labels": d["test_y"]}, str(root / "test.safetensors"))
    return root, model


def test_resnet_quantize_eval_export_seal_open_serve(resnet_files, tmp_path, server_keys, store_factory, sqlite_url):
    from secquant.runtime import export_onnx
    from secquant.security import seal
    from secquant.server import ServerConfig, create_app, open_served

    root, model = resnet_files
    art = tmp_path / "q"
    weights, data = str(root / "float.safetensors"), str(root / "test.safetensors")
    qm = secquant.quantize(SPEC, "w8a8", out=art, weights=weights, calib=str(root / "calib.safetensors"), strict=True)
    assert {n: e.config.get("folded_batchnorm") for n, e in qm.manifest.layers.items() if "conv" in n} == {
        "conv1": "bn1", "layer1.conv1": "layer1.bn1", "layer1.conv2": "layer1.bn2", "layer2.conv1": "layer2.bn1",
        "layer2.conv2": "layer2.bn2"}
    res = secquant.evaluate(qm, against=SPEC, weights=weights, data=data)
    assert res["float_value"] > 0.9 and res["value"] >= res["float_value"] - 0.01, res
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_onnx(art, factory=SPEC)
    onnx_res = secquant.evaluate(secquant.load(art, factory=SPEC, allow_unsealed=True), against=SPEC,
                                 weights=weights, data=data, runtime="onnx")
    assert abs(onnx_res["value"] - res["value"]) <= 0.01, (onnx_res["value"], res["value"])
    owner, _ = server_keys
    sealed = seal(art, [owner.recipient.read_text().strip()], owner.sign_key, tmp_path / "resnet.age")
    opened = secquant.load(sealed, identity=owner.identity, verify_key=owner.verify_key, factory=SPEC)
    x = splits()["test_x"][:16]
    with torch.no_grad():
        assert torch.equal(opened(x), qm(x)) and opened.check_integrity() == []
    store = store_factory(sqlite_url)
    user = store.add_client("ann", "user")
    served = open_served(sealed, owner.identity, owner.verify_key, factory=SPEC, backend="pytorch")
    with TestClient(create_app(served, store, ServerConfig(integrity_interval=0))) as c:
        r = c.post("/v1/predict", json={"inputs": x.tolist()}, headers={"Authorization": f"Bearer {user}"})
    assert r.status_code == 200, r.text
    assert [p["label"] for p in r.json()["predictions"]] == qm(x).argmax(1).tolist()
