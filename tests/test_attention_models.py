"""PyTorch-native transformers (nn.TransformerEncoderLayer / DecoderLayer, nn.MultiheadAttention) built as factory
models go through quantize -> eval -> export -> seal -> open -> serve, agreeing with the float model."""

from __future__ import annotations

import warnings

import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import save_file

import secquant
from secquant.models.data import write_tensors

import attn_factory as af

ENC, DEC = "attn_factory:encoder_classifier", "attn_factory:decoder_classifier"


def _data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(n, af.SEQ, af.FEATURES, generator=torch.Generator().manual_seed(seed))
    rule = torch.randn(af.FEATURES, af.CLASSES, generator=torch.Generator().manual_seed(1))
    return x, (x.mean(1) @ rule).argmax(-1)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Float weights of both factory models (briefly trained), calibration and labelled test files."""
    d = tmp_path_factory.mktemp("attn")
    x, y = _data(512, 2)
    out = {}
    for spec in (ENC, DEC):
        torch.manual_seed(0)
        m = getattr(af, spec.split(":")[1])()
        opt = torch.optim.Adam(m.parameters(), 3e-3)
        g = torch.Generator().manual_seed(0)
        for _ in range(80):
            i = torch.randint(0, len(x), (32,), generator=g)
            loss = torch.nn.functional.cross_entropy(m(x[i]), y[i])
            opt.zero_grad()
            loss.backward()
            opt.step()
        w = d / f"{spec.split(':')[1]}.safetensors"
        save_file({k: v.detach().contiguous() for k, v in m.state_dict().items()}, str(w))
        out[spec] = (m.eval(), str(w))
    xt, yt = _data(128, 3)
    save_file({"inputs": xt, "labels": yt}, str(d / "test.safetensors"))
    return {"dir": d, "models": out, "calib": str(write_tensors(x[:64], d / "calib.safetensors")),
            "test": str(d / "test.safetensors"), "xt": xt}


def _check_manifest(qm, prefix: str, attn: list[str], bits: int) -> None:
    """Every attention module is split and recorded, each projection quantized; no float MHA is left."""
    man = qm.manifest
    for a in attn:
        assert man.modules[f"{prefix}.{a}"].type == "MultiheadAttention"
        assert man.modules[f"{prefix}.{a}"].config["projections"] == ["q_proj", "k_proj", "v_proj", "out_proj"]
        for p in ("q_proj", "k_proj", "v_proj", "out_proj"):
            e = man.layers[f"{prefix}.{a}.{p}"]
            assert e.type == "Linear" and e.weight.args.bits == bits and e.weight.shape == [32, 32]
    assert not any(isinstance(m, torch.nn.MultiheadAttention) for m in qm.module.modules())
    assert not any(isinstance(m, torch.nn.Linear) for m in qm.module.modules())  # nothing left in float


@pytest.mark.parametrize("preset,bits", [("w8a8", 8), ("w8a8-dynamic", 8), ("w4a16", 4)])
def test_encoder_classifier_quantize_eval_export_seal_serve(files, preset, bits, tmp_path):
    from secquant.runtime import export_onnx
    from secquant.runtime.onnx import export_info
    from secquant.security import keygen, seal
    from secquant.server import ServerConfig, Store, create_app, open_served

    ref, weights = files["models"][ENC]
    art = tmp_path / "art"
    qm = secquant.quantize(ENC, preset, weights=weights, calib=files["calib"], out=art)
    _check_manifest(qm, "encoder.layers.0", ["self_attn"], bits)
    _check_manifest(qm, "encoder.layers.1", ["self_attn"], bits)
    assert qm.manifest.modules["encoder.layers.0"].type == "TransformerEncoderLayer"
    assert qm.manifest.modules["encoder"].type == "TransformerEncoder"

    loaded = secquant.load(art, allow_unsealed=True, factory=ENC)
    r = secquant.evaluate(loaded, against=ENC, weights=weights, data=files["test"])
    assert r["metric"] == "accuracy" and r["float_value"] > 0.6
    assert r["mean_cosine_to_float"] > 0.995 and abs(r["value"] - r["float_value"]) <= 0.03

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_onnx(art, factory=ENC)  # runs the graph in ONNX Runtime and checks it against PyTorch
    kernels = {x.name: x.kernel for x in export_info(art).layers}
    want = "int8" if bits == 8 else "nbits"
    assert all(kernels[f"encoder.layers.{i}.self_attn.{p}"] == want for i in (0, 1)
               for p in ("q_proj", "k_proj", "v_proj", "out_proj"))
    loaded = secquant.load(art, allow_unsealed=True, factory=ENC)
    ort = secquant.evaluate(loaded, against=ENC, weights=weights, data=files["test"], runtime="onnx")
    assert ort["runtime"].startswith("onnxruntime") and ort["mean_cosine_to_float"] > 0.995

    owner = keygen(tmp_path / "owner")
    sealed = seal(art, [owner.recipient.read_text().strip()], owner.sign_key, tmp_path / "enc.age")
    served = open_served(sealed, owner.identity, owner.verify_key, factory=ENC)
    store = Store(f"sqlite:///{tmp_path / 'server.db'}")
    user = store.add_client("ann", "user")
    xt = files["xt"][:16]
    with TestClient(create_app(served, store, ServerConfig(integrity_interval=0))) as c:
        res = c.post("/v1/predict", json={"inputs": xt.tolist()}, headers={"Authorization": f"Bearer {user}"})
    store.close()
    assert res.status_code == 200, res.text
    got = torch.tensor([p["label"] for p in res.json()["predictions"]])
    with torch.no_grad():
        want_labels = ref(xt).argmax(-1)
    assert (got == want_labels).float().mean() >= 0.9


def test_decoder_classifier_quantize_eval_export(files, tmp_path):
    from secquant.runtime import export_onnx

    _, weights = files["models"][DEC]
    for preset, bits in (("w8a8", 8), ("w4a16-gptq", 4)):
        art = tmp_path / preset
        qm = secquant.quantize(DEC, preset, weights=weights, calib=files["calib"], out=art)
        for i in (0, 1):
            _check_manifest(qm, f"decoder.layers.{i}", ["self_attn", "multihead_attn"], bits)
        if preset == "w4a16-gptq":  # GPTQ ran on the projections (the cross-attention's k/v read the memory)
            assert all("gptq" in e.config for n, e in qm.manifest.layers.items() if "_proj" in n)
        loaded = secquant.load(art, allow_unsealed=True, factory=DEC)
        r = secquant.evaluate(loaded, against=DEC, weights=weights, data=files["test"])
        assert r["mean_cosine_to_float"] > 0.99 and abs(r["value"] - r["float_value"]) <= 0.04
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            export_onnx(art, factory=DEC)


def test_tune_chooses_bits_per_attention_projection(files, tmp_path):
    from secquant.models import load_model

    ref, weights = files["models"][DEC]
    res = secquant.tune(load_model(DEC, weights), max_drop=2.0, data=files["test"], log=None, out=tmp_path / "t")
    manifest = secquant.load(tmp_path / "t", allow_unsealed=True, factory=DEC).manifest
    projections = {f"decoder.layers.{i}.{a}.{p}" for i in (0, 1) for a in ("self_attn", "multihead_attn")
                   for p in ("q_proj", "k_proj", "v_proj", "out_proj")}
    assert projections <= set(manifest.layers)
    assert projections <= set(manifest.tuning["bits_per_layer"])  # searched one by one, like any Linear layer
    assert res.summary["goal_met"]


def test_manifest_modules_must_fit_the_rebuilt_model(files, tmp_path):
    import json
    import shutil

    from secquant.errors import ArtifactError

    _, weights = files["models"][ENC]
    art = tmp_path / "a"
    secquant.quantize(ENC, "w8a16", weights=weights, out=art)
    for edit in ({"num_heads": 2}, None):
        bad = tmp_path / f"bad{edit is None}"
        shutil.copytree(art, bad)
        m = json.loads((bad / "secquant.json").read_text())
        if edit is None:  # the split recorded on a module that is no attention
            m["modules"]["head"] = m["modules"].pop("encoder.layers.0.self_attn")
        else:
            m["modules"]["encoder.layers.0.self_attn"]["config"].update(edit)
        (bad / "secquant.json").write_text(json.dumps(m))
        with pytest.raises(ArtifactError, match="modules do not fit"):
            secquant.load(bad, allow_unsealed=True, factory=ENC)
