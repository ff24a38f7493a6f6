"""Input checkpoints: pickle formats are read weights-only; anything needing more is refused unrun."""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import secquant
from secquant.errors import ModelError, SecquantError, UnsafeInputError
from secquant.models import load_model, load_state_dict


class Evil:
    """Unpickling this creates the file `path` (the classic pickle code-execution gadget)."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_gadget_is_live(tmp_path):
    """Sanity check of the test itself: plain pickle really does create the file."""
    marker = tmp_path / "created-by-pickle"
    pickle.loads(pickle.dumps(Evil(marker)))  # noqa: S301 - deliberately, on our own object
    assert marker.exists()


def _evil_checkpoint(tmp_path: Path, name: str, kind: str) -> tuple[Path, Path]:
    marker = tmp_path / f"PWNED-{name}"
    path = tmp_path / name
    payload = {"fc1.weight": torch.zeros(16, 6), "evil": Evil(marker)}
    if kind == "zip":
        torch.save(payload, path)
    elif kind == "legacy":
        torch.save(payload, path, _use_new_zipfile_serialization=False)
    else:  # a raw pickle with a .pt name
        with open(path, "wb") as f:
            pickle.dump(payload, f)
    assert not marker.exists()
    return path, marker


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("name", ["evil.pt", "evil.bin", "evil.pth", "evil.ckpt"])
@pytest.mark.parametrize("kind", ["zip", "legacy", "raw"])
def test_evil_checkpoint_refused_and_not_run(tmp_path, name, kind):
    path, marker = _evil_checkpoint(tmp_path, name, kind)
    with pytest.raises(UnsafeInputError) as ei:
        load_state_dict(path)
    assert str(path) in str(ei.value)
    assert not marker.exists(), "the checkpoint's code ran"


def test_evil_weights_via_api_factory(tmp_path):
    path, marker = _evil_checkpoint(tmp_path, "evil.pt", "zip")
    with pytest.raises(UnsafeInputError):
        secquant.quantize("tiny_factory:tiny", "w8a16", weights=str(path), out=tmp_path / "out")
    assert not marker.exists()
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("runner,fmt", [("in-process", "zip"), ("subprocess", "legacy")])
def test_evil_weights_via_the_cli(tmp_path, cli, secquant_proc, assert_user_error, runner, fmt):
    path, marker = _evil_checkpoint(tmp_path, "evil.pt", fmt)
    out = tmp_path / "out"
    run = cli if runner == "in-process" else secquant_proc
    r = run("quantize", "tiny_factory:tiny", "--weights", path, "--preset", "w8a16", "--out", out)
    assert_user_error(r, out, contains=("evil.pt",))
    assert not marker.exists()


def test_evil_pytorch_model_bin_in_hf_dir(tmp_path):
    """A Hugging Face dir whose only weights are a malicious pytorch_model.bin is refused unrun."""
    from secquant.models.encoder import minilm_dir

    src = minilm_dir()
    d = tmp_path / "hf"
    d.mkdir()
    for p in src.rglob("*"):
        if p.is_file() and p.name != "model.safetensors" and p.suffix not in (".md",):
            dst = d / p.relative_to(src)
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(p, dst)
    marker = tmp_path / "PWNED-hf"
    torch.save({"embeddings.word_embeddings.weight": torch.zeros(2, 2), "x": Evil(marker)}, d / "pytorch_model.bin")
    with pytest.raises(UnsafeInputError):
        load_model(str(d))
    assert not marker.exists()


def test_weights_only_state_dict_loads(tmp_path):
    sd = {"a.weight": torch.randn(3, 4), "a.bias": torch.randn(3), "n": torch.tensor(5)}
    for name in ["w.pt", "w.bin", "w.pth"]:
        torch.save(sd, tmp_path / name)
        got = load_state_dict(tmp_path / name)
        assert got.keys() == sd.keys()
        for k in sd:
            assert torch.equal(got[k], sd[k])


def test_nested_state_dict_key_unwrapped(tmp_path):
    sd = {"a.weight": torch.randn(3, 4)}
    torch.save({"state_dict": sd, "epoch": 3}, tmp_path / "ckpt.pt")
    assert torch.equal(load_state_dict(tmp_path / "ckpt.pt")["a.weight"], sd["a.weight"])


def test_non_state_dict_pickle_refused(tmp_path):
    torch.save([torch.zeros(2)], tmp_path / "list.pt")
    with pytest.raises(ModelError, match="state dict"):
        load_state_dict(tmp_path / "list.pt")


def test_safetensors_loads(tmp_path):
    sd = {"a.weight": torch.randn(3, 4), "b": torch.arange(5)}
    save_file(sd, str(tmp_path / "w.safetensors"))
    got = load_state_dict(tmp_path / "w.safetensors")
    for k in sd:
        assert torch.equal(got[k], sd[k])


def test_corrupt_safetensors(tmp_path):
    (tmp_path / "bad.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(ModelError, match="safetensors"):
        load_state_dict(tmp_path / "bad.safetensors")


def test_safetensors_named_file_holding_a_pickle_is_not_unpickled(tmp_path):
    path, marker = _evil_checkpoint(tmp_path, "evil.safetensors", "zip")
    with pytest.raises(SecquantError):
        load_state_dict(path)
    assert not marker.exists()


@pytest.mark.parametrize("name", ["w.npz", "w.h5", "w.onnx", "w", "w.json"])
def test_unsupported_suffix(tmp_path, name):
    (tmp_path / name).write_bytes(b"data")
    with pytest.raises(ModelError) as ei:
        load_state_dict(tmp_path / name)
    assert "unsupported" in str(ei.value)


def test_missing_weights_file(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        load_state_dict(tmp_path / "nope.safetensors")
