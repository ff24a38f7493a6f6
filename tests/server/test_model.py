"""Opening the served model: sealed only, verified, nothing left in /dev/shm; ONNX Runtime backend;
sentence embeddings."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient

from secquant.errors import SecquantError
from secquant.models.digits import splits
from secquant.security.seal import SealError
from secquant.server import ServedModel, ServerConfig, create_app, open_served


def _shm_dirs() -> set[str]:
    return {p.name for p in Path("/dev/shm").glob("secquant-serve-*")}


def test_open_verifies_and_leaves_no_plaintext(sealed_digits, server_keys, digits_artifact):
    owner, other = server_keys
    before = _shm_dirs()
    with pytest.raises(SealError, match="signature verification failed"):
        open_served(sealed_digits, owner.identity, other.verify_key)
    with pytest.raises(SealError, match="cannot be decrypted"):
        open_served(sealed_digits, other.identity, owner.verify_key)
    with pytest.raises(SecquantError, match="carries no model.onnx"):
        open_served(sealed_digits, owner.identity, owner.verify_key, backend="onnxruntime")
    with pytest.raises(SecquantError, match="not a sealed model file"):
        open_served(digits_artifact("w8a16"), owner.identity, owner.verify_key)  # a plain directory
    m = open_served(sealed_digits, owner.identity, owner.verify_key)
    assert m.backend == "pytorch" and m.kind == "classifier" and m.check() is None
    assert _shm_dirs() == before


def test_onnx_runtime_backend_serves_the_exported_model(sealed_digits_onnx, server_keys, sqlite_url):
    owner, _ = server_keys
    before = _shm_dirs()
    m = open_served(sealed_digits_onnx, owner.identity, owner.verify_key)
    assert m.backend == "onnxruntime" and _shm_dirs() == before
    d = splits()
    x, y = d["test_x"], d["test_y"]
    ort_labels = m.logits(x).argmax(1)
    torch_labels = m.qm(x).argmax(1)
    assert float((ort_labels == torch_labels).float().mean()) >= 0.98
    assert float((ort_labels == y).float().mean()) > 0.9
    from secquant.server import Store

    store = Store(sqlite_url)
    admin = store.add_client("root", "admin")
    with TestClient(create_app(m, store, ServerConfig(integrity_interval=0))) as c:
        h = {"Authorization": f"Bearer {admin}"}
        assert c.get("/v1/info", headers=h).json()["model"]["backend"] == "onnxruntime"
        r = c.post("/v1/predict", json={"inputs": x[:32].tolist()}, headers=h).json()
        assert [p["label"] for p in r["predictions"]] == ort_labels[:32].tolist()
        # the PyTorch weights are the reference copy: a flip there takes the model out of service
        layer = next(iter(m.guard.layers.values()))
        with torch.no_grad():
            layer.qweight[0] ^= 1
        assert c.post("/v1/integrity/check", headers=h).json()["corrupted"] is True
        assert c.post("/v1/predict", json={"inputs": x[:1].tolist()}, headers=h).status_code == 503
    store.close()
    m2 = open_served(sealed_digits_onnx, owner.identity, owner.verify_key, backend="pytorch")
    assert m2.backend == "pytorch"
    with pytest.raises(SecquantError, match="--backend"):
        open_served(sealed_digits_onnx, owner.identity, owner.verify_key, backend="tensorrt")


def test_embeddings_of_a_sentence_encoder(minilm_artifact, sqlite_url):
    from secquant.server import Store

    _, qm = minilm_artifact
    m = ServedModel(qm)
    store = Store(sqlite_url)
    user = store.add_client("ann")
    texts = ["The cat sat on the mat.", "Quantization shrinks neural networks."]
    with TestClient(create_app(m, store, ServerConfig(round_digits=4, integrity_interval=0))) as c:
        h = {"Authorization": f"Bearer {user}"}
        r = c.post("/v1/embed", json={"texts": texts}, headers=h)
        assert r.status_code == 200
        emb = torch.tensor(r.json()["embeddings"])
        assert r.json()["dim"] == 384 and emb.shape == (2, 384)
        ref = qm.encode(texts)
        assert torch.allclose(emb, ref, atol=6e-5)
        assert all(round(v, 4) == v for v in r.json()["embeddings"][0])
        assert c.post("/v1/predict", json={"inputs": [[0.0]]}, headers=h).status_code == 404
        assert c.post("/v1/embed", json={"texts": []}, headers=h).status_code == 422
        assert c.post("/v1/embed", json={"texts": ["x" * 3000]}, headers=h).status_code == 422
    store.close()


def test_the_secret_canaries_watch_onnx_runtimes_own_copy(sealed_digits_onnx, server_keys, tmp_path):
    """Issue 15: ORT holds its own copy of the weights, which no checksum reads. A bit flipped in that copy
    (here bit 30 of one logit bias in the ORT session) is caught by the periodic check through the secret
    canaries run on ORT, while the checksums of the intact PyTorch copy stay clean."""
    import numpy as np
    import onnx
    import onnxruntime as ort

    from secquant.security import open_sealed

    owner, _ = server_keys
    m = open_served(sealed_digits_onnx, owner.identity, owner.verify_key)
    assert m.backend == "onnxruntime" and m.canaries.count >= 64 and m.info()["canaries"] == m.canaries.count
    assert m.check() is None
    x, y = splits()["test_x"], splits()["test_y"]
    clean = float((m.logits(x).argmax(1) == y).float().mean())
    proto = onnx.load_from_string((open_sealed(sealed_digits_onnx, owner.identity, owner.verify_key, tmp_path / "o")
                                   / "model.onnx").read_bytes())
    init = next(i for i in proto.graph.initializer if i.name == "classifier.3.bias")
    b = onnx.numpy_helper.to_array(init).copy()
    b.view(np.uint32)[4] ^= 1 << 30
    init.CopyFrom(onnx.numpy_helper.from_array(b, init.name))
    m.ort._sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    assert float((m.logits(x).argmax(1) == y).float().mean()) < clean - 0.05  # real damage, on ORT only
    assert m.guard.check() == []  # the checksums read the PyTorch copy, which is intact
    assert "secret canary" in m.check() and "onnxruntime" in m.corruption



def test_encoder_canaries_read_the_embedding_rows_of_common_tokens(minilm_artifact):
    """A sentence's embedding reads only its own tokens' rows: the encoder canaries carry rows of the most
    frequent tokens of realistic text, so a flip in such a row (as in ORT's copy, which no checksum reads)
    moves their outputs."""
    from secquant.audits.bitflip import flip_tensor_bit
    from secquant.security.canary import outputs_match

    _, qm = minilm_artifact
    m = ServedModel(qm)
    tok = qm.handle.adapter.tokenizer
    held = {t for b in m.canaries.batches for t in b["input_ids"][b["attention_mask"].bool()].tolist()}
    common = [tok.convert_tokens_to_ids(w) for w in ("the", "for", "of", "and", "is")]
    assert set(common) <= held and len(held) > 250
    emb = qm.module.get_submodule("transformer.embeddings.word_embeddings")
    cache = emb.dequantized_weight()
    element = common[1] * cache.shape[1] + 7  # the row of "for"
    flip_tensor_bit(cache, element, 30)
    try:
        assert not all(map(outputs_match, m._canary_out, m._canary_run()))
        assert {c.name for c in m.guard.check()} == {"transformer.embeddings.word_embeddings._w_cache"}
    finally:
        flip_tensor_bit(cache, element, 30)
    assert m.check() is None


def test_a_vocabulary_sweep_reaches_the_rows_of_rare_tokens_in_the_ort_copy(minilm_artifact):
    """With ORT serving an encoder, a flip in its copy of the embedding row of a token no canary holds is
    seen by the secret vocabulary sweep, one batch per check, within one sweep."""
    from secquant.audits.bitflip import flip_tensor_bit

    _, qm = minilm_artifact
    table = qm.module.get_submodule("transformer.embeddings.word_embeddings").dequantized_weight()

    class OwnCopy:  # stands in for ORT: its own copy of the table, read row by row like a Gather
        def __init__(self) -> None:
            self.table = table.clone()

        def run(self, batch):
            return (self.table[batch["input_ids"]] * batch["attention_mask"][..., None]).sum(1)

    m = ServedModel(qm, OwnCopy())
    sweep = m.info()["vocabulary_sweep_batches"]
    assert sweep == len(m._sweep) >= 100
    special = set(qm.handle.adapter.tokenizer.all_special_ids)
    swept = [t for b in m._sweep for t in b["input_ids"][b["attention_mask"].bool()].tolist() if t not in special]
    assert sorted(swept) == [t for t in range(30522) if t not in special]  # every row, once
    held = {t for b in m.canaries.batches for t in b["input_ids"][b["attention_mask"].bool()].tolist()}
    rare = qm.handle.adapter.tokenizer.convert_tokens_to_ids("zeppelin")
    assert rare not in held
    flip_tensor_bit(m.ort.table, rare * table.shape[1] + 3, 30)
    for _ in range(sweep):
        m.check()
    assert m.guard.check() == []  # the PyTorch copy is intact
    assert m.corruption is not None and "vocabulary sweep" in m.corruption
