"""An artifact's model.onnx cannot pull weights from files outside the artifact's hashes (issue 13, item 4)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, external_data_helper

from secquant.errors import ArtifactError
from secquant.runtime import Session, export_onnx


@pytest.fixture(scope="module")
def exported(digits_artifact, tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("onnx") / "d8"
    shutil.copytree(digits_artifact("w8a16"), d)
    export_onnx(d)
    return d


def _point_outside(art: Path, location: str, secret: Path, *, in_subgraph: bool = False) -> None:
    """Rewrite one initializer of model.onnx to read its bytes from `location`, as an attacker would, and fix
    the manifest's hash of model.onnx (an unsealed directory carries no signature)."""
    model = onnx.load(str(art / "model.onnx"))
    target = max(model.graph.initializer, key=lambda t: len(t.raw_data))
    raw = target.raw_data
    secret.write_bytes(raw)  # same size: the model would run, on bytes nobody hashed
    if in_subgraph:  # move the tensor into a Constant inside an If branch instead
        const = onnx.helper.make_tensor("c", target.data_type, list(target.dims), vals=raw, raw=True)
        branch = onnx.helper.make_graph([onnx.helper.make_node("Constant", [], ["c_out"], value=const)], "b", [],
                                        [onnx.helper.make_tensor_value_info("c_out", target.data_type, None)])
        cond = onnx.helper.make_tensor("cond", TensorProto.BOOL, [], [True])
        model.graph.initializer.append(cond)
        model.graph.node.append(onnx.helper.make_node("If", ["cond"], ["unused"], then_branch=branch,
                                                      else_branch=branch))
        target = model.graph.node[-1].attribute[0].g.node[0].attribute[0].t
    external_data_helper.set_external_data(target, location=location, offset=0, length=len(raw))
    target.data_location = TensorProto.EXTERNAL
    target.ClearField("raw_data")
    data = model.SerializeToString()
    (art / "model.onnx").write_bytes(data)
    m = json.loads((art / "secquant.json").read_text())
    m["files"]["model.onnx"] = hashlib.sha256(data).hexdigest()
    (art / "secquant.json").write_text(json.dumps(m))


@pytest.mark.parametrize("in_subgraph", [False, True])
def test_external_data_from_the_working_directory_is_refused(exported, tmp_path, monkeypatch, in_subgraph):
    art = tmp_path / "art"
    shutil.copytree(exported, art)
    monkeypatch.chdir(tmp_path)
    _point_outside(art, "SECRET.txt", tmp_path / "SECRET.txt", in_subgraph=in_subgraph)
    with pytest.raises(ArtifactError, match="SECRET.txt"):
        Session(art, threads=1, export=False)


def test_external_data_escaping_the_artifact_is_refused(exported, tmp_path):
    art = tmp_path / "art"
    shutil.copytree(exported, art)
    _point_outside(art, "../SECRET.bin", tmp_path / "SECRET.bin")
    with pytest.raises(ArtifactError, match="not this artifact's own"):
        Session(art, threads=1, export=False)


def test_own_external_data_still_runs(digits_artifact, tmp_path):
    """The artifact's own hashed model.onnx.data is accepted (exported with a tiny threshold)."""
    art = tmp_path / "art"
    shutil.copytree(digits_artifact("w8a16"), art)
    export_onnx(art, external_data_threshold=1)
    assert (art / "model.onnx.data").is_file()
    s = Session(art, threads=1, export=False)
    x = np.zeros((2, 1, 8, 8), dtype=np.float32)
    assert tuple(s.run(__import__("torch").from_numpy(x)).shape) == (2, 10)
