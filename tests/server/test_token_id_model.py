"""A factory model that takes integer token ids, served: requests are checked as ids and fed as int64."""

from __future__ import annotations

import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import save_file

import secquant
from secquant.server import ServedModel, ServerConfig, create_app


@pytest.fixture
def token_server(tmp_path, store_factory, sqlite_url):
    from input_factory import tokens

    torch.manual_seed(0)
    save_file(tokens().state_dict(), str(tmp_path / "w.safetensors"))
    secquant.quantize("input_factory:tokens", "w8a16", weights=str(tmp_path / "w.safetensors"), out=tmp_path / "q")
    qm = secquant.load(tmp_path / "q", factory="input_factory:tokens", allow_unsealed=True)
    store = store_factory(sqlite_url)
    key = store.add_client("ann", "user")
    served = ServedModel(qm)
    assert served.canaries is not None  # canaries are made as ids too (a float canary would crash the model)
    with TestClient(create_app(served, store, ServerConfig(integrity_interval=0))) as c:
        yield c, {"Authorization": f"Bearer {key}"}, qm


def test_token_ids_are_served(token_server):
    c, auth, qm = token_server
    ids = torch.randint(0, 50, (3, 8), generator=torch.Generator().manual_seed(1))
    r = c.post("/v1/predict", json={"inputs": ids.tolist()}, headers=auth)
    assert r.status_code == 200, r.text
    assert [p["label"] for p in r.json()["predictions"]] == qm(ids).argmax(-1).tolist()


@pytest.mark.parametrize("bad", [[[1.5] * 8], [[-1] * 8], [[50] * 8]])
def test_inputs_that_are_not_ids_of_the_table_are_refused(token_server, bad):
    c, auth, _ = token_server
    r = c.post("/v1/predict", json={"inputs": bad}, headers=auth)
    assert r.status_code == 422 and "0..49" in r.json()["detail"]
