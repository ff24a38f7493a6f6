"""The FastAPI application: authenticated prediction and embedding, client administration, the
audit log, budgets and rate limits, and the periodic integrity check.

Every request, whatever its outcome (401, 403, 404, 413, 422, 429, 503 included), leaves one audit
row: client (when a valid key was sent, 404s included), peer address, time, method, route, status,
rows and the SHA-256 of the request body, never the body. The row is written before the response
goes out; if it cannot be written the client gets 503 instead of an unaudited answer (fail closed).

An address that sent `auth_failures_per_minute` bad keys is refused (429, Retry-After) before its
next key is looked at; checking a key is one HMAC (auth.py), so bad keys cost the server little.
Error details are capped at a few hundred characters, so no reply echoes a large input.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from typing import Any, Literal

import anyio
import torch
from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.encoders import jsonable_encoder
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from fastapi.security import HTTPBearer
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from .budgets import FailureLimiter, RateLimiter, retry_after_header
from .db import ClientExists, ClientNotFound, ServerDBError
from .model import ServedModel
from .store import Principal, Store

log = logging.getLogger("secquant.server")
AUDIT_KEY = "secquant_audit"
MAX_DETAIL = 300  # characters of an error message; longer ones are cut
MAX_ERRORS = 3  # validation errors listed in a 422


@dataclass
class ServerConfig:
    """Serving options. `top_k` / `round_digits` harden outputs against extraction (None: off)."""

    top_k: int | None = None
    round_digits: int | None = None
    max_batch: int = 64
    max_body_bytes: int = 1 << 20
    max_text_chars: int = 2000
    integrity_interval: float = 30.0  # seconds between checks; <= 0 turns the periodic check off
    auth_failures_per_minute: int | None = 20  # per peer address, then 429 before any key check; None: off
    auth_refusal_delay_s: float = 1.0  # a refused address waits this long for its 429 (at most Retry-After)


# ---- request / response bodies ------------------------------------------------------------------

# Unknown fields are refused (422), not ignored: a misspelt option must not silently do nothing.
# Integer limits are bounded by their columns (a larger number is a 422, not a database overflow).
_INT32, _INT64 = 2**31 - 1, 2**63 - 1


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PredictRequest(_Body):
    inputs: list[Any] = Field(..., description="a batch: one nested list of numbers per example")


class EmbedRequest(_Body):
    texts: list[str] = Field(..., description="sentences to embed")


class NewClient(_Body):
    name: str
    role: Literal["user", "admin"] = "user"
    max_queries: int | None = Field(None, ge=0, le=_INT64)
    window_s: int = Field(86400, ge=1, le=_INT32)
    rate_per_s: float | None = Field(None, gt=0, allow_inf_nan=False)
    burst: int | None = Field(None, ge=1, le=_INT32)


class BudgetChange(_Body):
    max_queries: int | None = Field(None, ge=0, le=_INT64)
    window_s: int | None = Field(None, ge=1, le=_INT32)
    rate_per_s: float | None = Field(None, gt=0, allow_inf_nan=False)
    burst: int | None = Field(None, ge=1, le=_INT32)
    unlimited: bool = False


# ---- audit middleware -----------------------------------------------------------------------------

class AuditMiddleware:
    """Pure ASGI: reads the body once (size-limited), hashes it, replays it to the app, and writes
    the audit row when the response starts."""

    def __init__(self, app, store: Store, max_body_bytes: int) -> None:
        self.app, self.store, self.max_body = app, store, max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        info: dict[str, Any] = {}
        scope.setdefault("state", {})[AUDIT_KEY] = info
        method, route = scope.get("method", "?"), scope.get("path", "?")
        remote = (scope.get("client") or (None,))[0]
        h, size, chunks, too_big = hashlib.sha256(), 0, [], False
        digest: str | None = None

        async def write(status: int) -> bool:
            row = dict(method=method, route=route, status=status, client_id=info.get("client_id"),
                       client_name=info.get("client"), input_sha256=digest, rows=info.get("rows"),
                       latency_ms=round((time.perf_counter() - t0) * 1000, 3), detail=info.get("detail"),
                       remote_addr=remote)
            try:
                await anyio.to_thread.run_sync(lambda: self.store.audit(**row))
                return True
            except Exception as e:  # noqa: BLE001 - any failure to audit refuses the answer
                log.error("cannot write the audit log (%s): refusing to answer unaudited", e)
                return False

        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":  # gone before its body arrived: nothing to answer
                info["detail"] = "client disconnected"
                await write(499)
                return
            body = msg.get("body", b"")
            size += len(body)
            if size > self.max_body:
                too_big = True
                break
            h.update(body)
            chunks.append(body)
            if not msg.get("more_body", False):
                break
        digest = h.hexdigest() if size else None

        async def plain(status: int, detail: str, headers: list | None = None) -> None:
            body = JSONResponse({"detail": detail}).body
            await send({"type": "http.response.start", "status": status,
                        "headers": [(b"content-type", b"application/json"),
                                    (b"content-length", str(len(body)).encode())] + (headers or [])})
            await send({"type": "http.response.body", "body": body})

        if too_big:
            info["detail"] = f"request body over {self.max_body} bytes"
            digest = None  # the body was not read whole
            if await write(413):
                return await plain(413, f"request body too large (limit {self.max_body} bytes)")
            return await plain(503, "the audit log is unavailable")

        body = b"".join(chunks)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        suppressed = started = False

        async def audited_send(message):
            nonlocal suppressed, started
            if message["type"] == "http.response.start":
                started = True
                if not await write(int(message["status"])):
                    suppressed = True
                    return await plain(503, "the audit log is unavailable")
            elif suppressed:
                return
            await send(message)

        try:
            await self.app(scope, replay, audited_send)
        except Exception:
            if not started:  # the error response is sent by Starlette's outermost middleware
                info.setdefault("detail", "internal error")
                await write(500)
            raise


# ---- the app --------------------------------------------------------------------------------------

def _cap(text: str, n: int = MAX_DETAIL) -> str:
    return text if len(text) <= n else text[: n - 1] + "\u2026"


def _capped_errors(errors: list[dict]) -> list[dict]:
    """Validation errors without the offending input, each field cut short: a reply never grows with
    the request (a 10 kB unknown field name is not echoed back)."""
    out = []
    for e in errors[:MAX_ERRORS]:
        loc = [_cap(x, 40) if isinstance(x, str) else x for x in e.get("loc", ())][:6]
        out.append({"type": _cap(str(e.get("type", "")), 40), "loc": loc, "msg": _cap(str(e.get("msg", "")), 150)})
    while len(out) > 1 and len(json.dumps(jsonable_encoder(out))) > 2 * MAX_DETAIL:
        out.pop()
    return out


def _peer(request: Request) -> str | None:
    return request.client.host if request.client else None


def _bearer_key(request: Request) -> str | None:
    scheme, _, key = request.headers.get("authorization", "").partition(" ")
    return key.strip() if scheme.lower() == "bearer" and key.strip() else None


def _as_batch(inputs: list[Any], shape: tuple[int, ...] | None) -> torch.Tensor:
    try:
        x = torch.tensor(inputs, dtype=torch.float32)
    except (TypeError, ValueError, RuntimeError):
        raise HTTPException(422, "inputs must be a list of examples, each a (nested) list of numbers of "
                                 "one shape") from None
    if x.dim() < 2 or x.shape[0] == 0:
        raise HTTPException(422, "inputs must be a non-empty batch: a list of examples")
    if shape is not None:
        n = math.prod(shape)
        if tuple(x.shape[1:]) != tuple(shape):
            if x[0].numel() != n:
                raise HTTPException(422, f"each example must have shape {list(shape)} ({n} numbers); got "
                                         f"{list(x.shape[1:])}")
            x = x.reshape(x.shape[0], *shape)
    if not bool(torch.isfinite(x).all()):
        raise HTTPException(422, "inputs must be finite numbers")
    return x


def create_app(model: ServedModel, store: Store, config: ServerConfig | None = None) -> FastAPI:
    """The server application for one loaded model and one database."""
    cfg = config or ServerConfig()
    limiter = RateLimiter()
    failures = FailureLimiter(cfg.auth_failures_per_minute) if cfg.auth_failures_per_minute else None
    # Declared on the protected routes so the OpenAPI document shows the scheme; the key is read below.
    bearer_scheme = HTTPBearer(auto_error=False, description="an API key from `secquant server add-client`")
    state = {"event_logged": False}

    def integrity_check() -> str | None:
        try:
            problem = model.check()
        except Exception as e:  # noqa: BLE001 - a check that cannot run counts as a failure (fail closed)
            problem = model.corruption = model.corruption or f"the integrity check itself failed: {e}"
            log.error("integrity check failed to run: %s", e)
        if problem is not None and not state["event_logged"]:
            state["event_logged"] = True
            try:
                store.audit(method="EVENT", route="integrity", status=503, detail=problem)
            except Exception as e:  # noqa: BLE001 - the model is already out of service
                log.error("cannot record the integrity event in the audit log: %s", e)
        return problem

    async def periodic() -> None:
        while True:
            await asyncio.sleep(cfg.integrity_interval)
            await run_in_threadpool(integrity_check)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        await run_in_threadpool(integrity_check)
        task = asyncio.create_task(periodic()) if cfg.integrity_interval > 0 else None
        try:
            yield
        finally:
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    app = FastAPI(title="secquant server", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(AuditMiddleware, store=store, max_body_bytes=cfg.max_body_bytes)
    app.state.model, app.state.store, app.state.config = model, store, cfg
    app.state.integrity_check = integrity_check

    def audit_info(request: Request) -> dict[str, Any]:
        return request.scope.setdefault("state", {}).setdefault(AUDIT_KEY, {})

    async def refuse_if_limited(request: Request) -> None:
        """429 for an address that spent its failed authentications, before its key is looked at."""
        wait = failures.retry_after(_peer(request)) if failures is not None else 0.0
        if wait > 0:
            audit_info(request)["detail"] = "too many failed authentications from this address"
            if cfg.auth_refusal_delay_s > 0:  # a flood of refused requests is slowed down, not served at once
                await asyncio.sleep(min(cfg.auth_refusal_delay_s, wait))
            raise HTTPException(429, "too many failed authentications from your address: wait and check your "
                                     "API key", headers={"Retry-After": retry_after_header(wait)})

    async def authenticate(request: Request) -> Principal:
        info = audit_info(request)
        await refuse_if_limited(request)
        key = _bearer_key(request)
        p = None if key is None else await run_in_threadpool(store.authenticate, key)
        if p is None:
            if failures is not None:
                failures.failed(_peer(request))
            if key is None:
                info["detail"] = "no bearer key"
                raise HTTPException(401, "authentication required: send 'Authorization: Bearer <API key>'",
                                    headers={"WWW-Authenticate": "Bearer"})
            info["detail"] = "invalid, rotated or revoked key"
            raise HTTPException(401, "invalid API key", headers={"WWW-Authenticate": "Bearer"})
        info["client_id"], info["client"] = p.id, p.name
        return p

    async def principal(request: Request, _scheme: Any = Depends(bearer_scheme)) -> Principal:
        return await authenticate(request)

    async def identify(request: Request) -> None:
        """No route ran on a 404 / 405, so no key was checked: record who sent it, if it is valid."""
        info = audit_info(request)
        key = _bearer_key(request)
        if "client_id" in info or key is None:
            return
        if failures is not None and failures.retry_after(_peer(request)) > 0:
            return
        p = await run_in_threadpool(store.authenticate, key)
        if p is not None:
            info["client_id"], info["client"] = p.id, p.name
        elif failures is not None:
            failures.failed(_peer(request))

    async def admin(request: Request, p: Principal = Depends(principal)) -> Principal:
        if p.role != "admin":
            audit_info(request)["detail"] = "admin role required"
            raise HTTPException(403, "this route is for admin clients")
        return p

    async def auth_first(request: Request):
        """FastAPI parses a JSON body before it runs the dependencies, so a malformed body (422 / 400)
        would be answered before the key is checked. On a protected route whose key has not been
        checked yet, check it (and the role) first: 401 / 403, the same answer a well-formed body gets."""
        route = request.scope.get("route")
        if not isinstance(route, APIRoute) or "client_id" in audit_info(request):
            return None
        calls = {d.call for d in route.dependant.dependencies}
        if not calls & {principal, admin}:
            return None
        try:
            p = await authenticate(request)
            if admin in calls:
                await admin(request, p)
        except HTTPException as e:
            return await http_exception_handler(request, e)
        return None

    @app.exception_handler(RequestValidationError)
    async def on_invalid_request(request: Request, exc: RequestValidationError):
        # FastAPI's own handler echoes each offending input back, which fails to serialize (a 500) when
        # it is NaN or Infinity (JSON the parser accepts); the client sent it, so it is left out.
        denied = await auth_first(request)
        if denied is not None:
            return denied
        return JSONResponse({"detail": jsonable_encoder(_capped_errors(list(exc.errors())))}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, exc: StarletteHTTPException):
        if isinstance(exc.detail, str) and len(exc.detail) > MAX_DETAIL:
            exc = StarletteHTTPException(exc.status_code, _cap(exc.detail), exc.headers)
        if exc.status_code == 400:  # "There was an error parsing the body" (not UTF-8, nested too deep...)
            return await auth_first(request) or await http_exception_handler(request, exc)
        if exc.status_code in (404, 405):  # no route ran (or a handler refused an authenticated client)
            await identify(request)
        return await http_exception_handler(request, exc)

    def serving(request: Request) -> None:
        if model.corruption is not None:
            audit_info(request)["detail"] = "model out of service (integrity)"
            raise HTTPException(503, "the model failed its integrity check and is out of service")

    async def charge(request: Request, p: Principal, rows: int) -> None:
        """Batch size, rate limit (token bucket) and budget window, in rows; 413 / 429 + Retry-After."""
        info = audit_info(request)
        info["rows"] = rows
        if rows > cfg.max_batch:
            info["detail"] = "batch too large"
            raise HTTPException(413, f"at most {cfg.max_batch} examples per request")
        if p.rate_per_s is not None and p.burst is not None and rows > p.burst:
            info["detail"] = "batch larger than burst"
            raise HTTPException(413, f"your rate limit allows at most {p.burst} examples per request")
        wait = limiter.take(p.id, p.rate_per_s, p.burst, rows)
        if wait > 0:
            info["detail"] = "rate limit"
            raise HTTPException(429, "rate limit exceeded: slow down",
                                headers={"Retry-After": retry_after_header(wait)})
        wait = await run_in_threadpool(store.consume, p.id, rows)
        if math.isinf(wait):
            info["detail"] = "batch larger than budget"
            raise HTTPException(413, f"your query budget is {p.max_queries} examples per window: send fewer")
        if wait > 0:
            info["detail"] = "query budget exhausted"
            raise HTTPException(429, "query budget exhausted for this window",
                                headers={"Retry-After": retry_after_header(wait)})

    def harden(values: list[float]) -> list[float]:
        return [round(v, cfg.round_digits) for v in values] if cfg.round_digits is not None else values

    @app.head("/healthz", operation_id="healthz_head")  # load balancers probe with HEAD
    @app.get("/healthz")
    async def healthz():
        if model.corruption is not None:
            return JSONResponse({"status": "unavailable"}, status_code=503)
        return {"status": "ok"}

    @app.post("/v1/predict")
    async def predict(body: PredictRequest, request: Request, p: Principal = Depends(principal)):
        serving(request)
        if model.task != "predict":
            raise HTTPException(404, f"this server runs a {model.kind}: use /v1/{model.task}")
        x = _as_batch(body.inputs, model.sample_shape)
        await charge(request, p, int(x.shape[0]))
        logits = await run_in_threadpool(model.logits, x)
        probs = torch.softmax(logits.float(), dim=-1)
        k = min(cfg.top_k or probs.shape[1], probs.shape[1])
        top = torch.topk(probs, k, dim=-1)
        preds = []
        for vals, idx in zip(top.values.tolist(), top.indices.tolist()):
            scores = harden(vals)
            preds.append({"label": idx[0], "top": [{"label": i, "score": s} for i, s in zip(idx, scores)]})
        return {"predictions": preds}

    @app.post("/v1/embed")
    async def embed(body: EmbedRequest, request: Request, p: Principal = Depends(principal)):
        serving(request)
        if model.task != "embed":
            raise HTTPException(404, f"this server runs a {model.kind}: use /v1/{model.task}")
        if not body.texts:
            raise HTTPException(422, "texts must be a non-empty list of strings")
        if any(len(t) > cfg.max_text_chars for t in body.texts):
            raise HTTPException(422, f"each text may have at most {cfg.max_text_chars} characters")
        await charge(request, p, len(body.texts))
        emb = await run_in_threadpool(model.embed, body.texts)
        return {"embeddings": [harden(r) for r in emb.float().tolist()], "dim": int(emb.shape[-1])}

    @app.get("/openapi.json", include_in_schema=False)
    async def openapi_document(p: Principal = Depends(admin)):
        """The OpenAPI document, for admins only: it maps every route an attacker could try."""
        return JSONResponse(app.openapi())

    @app.get("/v1/info")
    async def info(p: Principal = Depends(admin)):
        return {"model": model.info(), "config": asdict(cfg)}

    @app.post("/v1/integrity/check")
    async def check_now(p: Principal = Depends(admin)):
        problem = await run_in_threadpool(integrity_check)
        return {"corrupted": problem is not None, "detail": problem}

    def db_errors(fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ServerDBError as e:
            code = 404 if isinstance(e, ClientNotFound) else 409 if isinstance(e, ClientExists) else 422
            raise HTTPException(code, str(e)) from None

    @app.get("/v1/clients")
    async def clients(p: Principal = Depends(admin)):
        return {"clients": await run_in_threadpool(store.list_clients)}

    @app.post("/v1/clients", status_code=201)
    async def add_client(body: NewClient, p: Principal = Depends(admin)):
        key = await run_in_threadpool(db_errors, store.add_client, body.name, body.role, max_queries=body.max_queries,
                                      window_s=body.window_s, rate_per_s=body.rate_per_s, burst=body.burst)
        return {"client": await run_in_threadpool(store.client, body.name), "api_key": key}

    @app.post("/v1/clients/{name}/rotate")
    async def rotate(name: str, p: Principal = Depends(admin)):
        key = await run_in_threadpool(db_errors, store.rotate_key, name)
        return {"client": await run_in_threadpool(store.client, name), "api_key": key}

    @app.post("/v1/clients/{name}/revoke")
    async def revoke(name: str, p: Principal = Depends(admin)):
        await run_in_threadpool(db_errors, store.revoke, name)
        return {"client": await run_in_threadpool(store.client, name)}

    @app.put("/v1/clients/{name}/budget")
    async def budget(name: str, body: BudgetChange, p: Principal = Depends(admin)):
        c = await run_in_threadpool(db_errors, store.set_budget, name, max_queries=body.max_queries,
                                    window_s=body.window_s, rate_per_s=body.rate_per_s, burst=body.burst,
                                    unlimited=body.unlimited)
        return {"client": c}

    @app.get("/v1/audit")
    async def audit(limit: int = Query(100, ge=1, le=10000), client: str | None = None,
                    status: int | None = Query(None, ge=100, le=599),
                    p: Principal = Depends(admin)):
        return {"entries": await run_in_threadpool(store.audit_log, limit=limit, client=client, status=status)}

    return app
