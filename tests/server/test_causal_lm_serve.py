"""A causal LM sealed, opened, loaded and served: `secquant generate` on the sealed file, POST /v1/generate with
the same keys, budgets (one query per prompt) and audit log as /v1/predict."""

from __future__ import annotations

import json

import pytest
from causal_lm_fixtures import tiny_causal_lm
from fastapi.testclient import TestClient

import secquant
from secquant.server import ServerConfig, create_app, open_served

PROMPT = "The city council"


PRESETS = {"llama": "w4a16-gptq", "gpt2": "w8a8-dynamic", "qwen2": "w8a16"}


@pytest.fixture(scope="module", params=list(PRESETS))
def sealed_lm(request, server_keys, tmp_path_factory):
    """(artifact dir, sealed file) of a tiny causal LM of each style (Llama, GPT-2, Qwen2), quantized."""
    from secquant.security import seal

    owner, _ = server_keys
    style = request.param
    d = tmp_path_factory.mktemp(f"lm-sealed-{style}")
    art = d / style
    secquant.quantize(str(tiny_causal_lm(style)), PRESETS[style], out=art)
    return art, seal(art, [owner.recipient.read_text().strip()], owner.sign_key, d / f"{style}.age")


def bearer(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def test_seal_open_load_generate(sealed_lm, server_keys, tmp_path, cli):
    from secquant.security import open_sealed

    art, sealed = sealed_lm
    owner, _ = server_keys
    want = secquant.generate(secquant.load(art, allow_unsealed=True), PROMPT, max_new_tokens=6)
    qm = secquant.load(sealed, identity=owner.identity, verify_key=owner.verify_key)
    assert qm.integrity is not None and qm.check_integrity() == []
    assert secquant.generate(qm, PROMPT, max_new_tokens=6) == want
    opened = open_sealed(sealed, owner.identity, owner.verify_key, tmp_path / "opened")
    assert secquant.generate(secquant.load(opened, allow_unsealed=True), PROMPT, max_new_tokens=6) == want
    r = cli("generate", sealed, "--prompt", PROMPT, "--max-new-tokens", "6", "--identity", owner.identity,
            "--verify-key", owner.verify_key)
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout) == want


def test_v1_generate_with_keys_budget_and_audit(sealed_lm, server_keys, store_factory, sqlite_url):
    art, sealed = sealed_lm
    owner, _ = server_keys
    model = open_served(sealed, owner.identity, owner.verify_key)
    assert model.task == "generate" and model.canaries is not None  # integrity canaries run through the LM too
    store = store_factory(sqlite_url)
    admin, user = store.add_client("root", "admin"), store.add_client("ann", "user")
    store.set_budget("ann", max_queries=2)
    want = secquant.generate(secquant.load(art, allow_unsealed=True), PROMPT, max_new_tokens=5)
    with TestClient(create_app(model, store, ServerConfig(integrity_interval=0, max_new_tokens=16))) as c:
        body = {"prompt": PROMPT, "max_new_tokens": 5}
        assert c.post("/v1/generate", json=body).status_code == 401
        r = c.post("/v1/generate", json=body, headers=bearer(user))
        assert r.status_code == 200, r.text
        assert r.json() == {k: want[k] for k in ("text", "prompt_tokens", "generated_tokens", "decoding")}
        assert c.post("/v1/generate", json={**body, "max_new_tokens": 17}, headers=bearer(user)).status_code == 422
        assert c.post("/v1/generate", json={**body, "bogus": 1}, headers=bearer(user)).status_code == 422
        assert c.post("/v1/predict", json={"inputs": [[0.0]]}, headers=bearer(user)).status_code == 404
        sampled = c.post("/v1/generate", json={**body, "temperature": 1.0, "seed": 7}, headers=bearer(user))
        assert sampled.status_code == 200 and sampled.json()["decoding"] == "sampling"
        r = c.post("/v1/generate", json=body, headers=bearer(user))  # a third prompt: the budget is 2
        assert r.status_code == 429 and "budget" in r.json()["detail"]
        entries = c.get("/v1/audit", params={"limit": 50}, headers=bearer(admin)).json()["entries"]
    gen = [(e["status"], e["client"], e["rows"]) for e in entries[::-1] if e["route"] == "/v1/generate"]
    assert gen == [(401, None, None), (200, "ann", 1), (422, "ann", None), (422, "ann", None), (200, "ann", 1),
                   (429, "ann", 1)]
    assert PROMPT not in json.dumps(entries)  # the audit log holds a hash of the request, never the prompt
