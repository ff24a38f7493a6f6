"""The network face of secquant: an access-controlled inference server (FastAPI + uvicorn).

    from secquant.server import Store, ServerConfig, create_app, open_served
    store = Store("server.db")                      # SQLite (0600) + server.db.secret; or postgresql://...
    key = store.add_client("alice", role="user")    # shown once; only an HMAC of it is kept
    app = create_app(open_served("m.age", "me.key", "signer.sign.pub"), store, ServerConfig(top_k=3))

The CLI runs it: `secquant serve FILE --identity KEY --verify-key PUB [--db URL] [--secret-file F]`,
and manages clients with `secquant server add-client | list-clients | rotate-key | revoke |
set-budget | audit-log | migrate`.

Routes (all but /healthz need `Authorization: Bearer <key>`; 401 otherwise):

- `GET|HEAD /healthz` -> {"status": "ok"} (503 {"status": "unavailable"} once the model failed a check)
- `POST /v1/predict` {"inputs": [[...], ...]} -> {"predictions": [{"label": 3, "top": [{"label": 3,
  "score": 0.98}, ...]}]} (classifiers; `top` has k entries with --top-k, scores rounded with --round)
- `POST /v1/embed` {"texts": ["...", ...]} -> {"embeddings": [[...], ...], "dim": 384} (encoders)
- `POST /v1/generate` {"prompt": "...", "max_new_tokens": 32, "temperature": null, "top_k": null, "seed": null}
  -> {"text": "...", "prompt_tokens": 5, "generated_tokens": 32, "decoding": "greedy"} (causal LMs; one
  prompt per request, charged as one query against the client's budget)
- admin only (403 for users): `GET /v1/info` (model, backend, integrity state, config),
  `GET|POST /v1/clients`, `POST /v1/clients/{name}/rotate`, `POST /v1/clients/{name}/revoke`,
  `PUT /v1/clients/{name}/budget`, `GET /v1/audit?limit=&client=&status=`, `POST /v1/integrity/check`,
  `GET /openapi.json` (the OpenAPI document; there is no HTML /docs page)

Limits: 413 for a batch over --max-batch, over the client's burst or its whole budget, or a body
over 1 MiB; 429 with Retry-After when the client's rate limit (token bucket, rows per second) or
query budget (rows per window) is spent, or when its address sent too many bad keys (checked
before any key is); 503 once the model failed an integrity check. Bad input (malformed JSON,
unknown fields, wrong shapes, out-of-range numbers) is a 422 with a JSON `detail` that does not
echo the input and is capped in length; on a protected route the key and role are checked first
(401 / 403).
"""

from .app import create_app
from .db import DEFAULT_DB, ServerDBError, migrate, normalize_url
from .gate import ServerConfig
from .model import ServedModel, open_served
from .store import Principal, Store

__all__ = ["DEFAULT_DB", "Principal", "ServedModel", "ServerConfig", "ServerDBError", "Store", "create_app",
           "migrate", "normalize_url", "open_served"]
