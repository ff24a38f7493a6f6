"""What every request passes through: authentication behind the failed-auth limiter, the user and
admin dependencies, budget charging, output hardening, the integrity gate (with its periodic check)
and the error handlers. The routers (routes/) use it; create_app (app.py) builds one per app.

An address that sent `auth_failures_per_minute` bad keys is refused (429, Retry-After) before its
next key is looked at; checking a key is one HMAC (auth.py), so bad keys cost the server little.
Error details are capped at a few hundred characters, so no reply echoes a large input.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.encoders import jsonable_encoder
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from fastapi.security import HTTPBearer
from starlette.exceptions import HTTPException as StarletteHTTPException

from .budgets import FailureLimiter, RateLimiter, retry_after_header
from .middleware import audit_info
from .model import ServedModel
from .store import Principal, Store

log = logging.getLogger("secquant.server")
MAX_DETAIL = 300  # characters of an error message; longer ones are cut
MAX_ERRORS = 3  # validation errors listed in a 422

# Declared on the protected routes so the OpenAPI document shows the scheme; the key is read by the gate.
bearer_scheme = HTTPBearer(auto_error=False, description="an API key from `secquant server add-client`")


@dataclass
class ServerConfig:
    """Serving options. `top_k` / `round_digits` harden outputs against extraction (None: off)."""

    top_k: int | None = None
    round_digits: int | None = None
    max_batch: int = 64
    max_body_bytes: int = 1 << 20
    max_text_chars: int = 2000
    max_new_tokens: int = 256  # most tokens one /v1/generate request may ask for
    integrity_interval: float = 30.0  # seconds between checks; <= 0 turns the periodic check off
    auth_failures_per_minute: int | None = 20  # per peer address, then 429 before any key check; None: off
    auth_refusal_delay_s: float = 1.0  # a refused address waits this long for its 429 (at most Retry-After)


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


class Gate:
    """The request machinery of one app: one model, one database, one config, and the in-memory
    rate and failed-authentication limiters."""

    def __init__(self, model: ServedModel, store: Store, config: ServerConfig) -> None:
        self.model, self.store, self.config = model, store, config
        self.limiter = RateLimiter()
        self.failures = FailureLimiter(config.auth_failures_per_minute) if config.auth_failures_per_minute else None
        self._event_logged = False

    # ---- integrity ----------------------------------------------------------------------------

    def integrity_check(self) -> str | None:
        """Check the model now; the first failure takes it out of service and leaves one audit event."""
        try:
            problem = self.model.check()
        except Exception as e:  # noqa: BLE001 - a check that cannot run counts as a failure (fail closed)
            problem = self.model.corruption = self.model.corruption or f"the integrity check itself failed: {e}"
            log.error("integrity check failed to run: %s", e)
        if problem is not None and not self._event_logged:
            self._event_logged = True
            try:
                self.store.audit(method="EVENT", route="integrity", status=503, detail=problem)
            except Exception as e:  # noqa: BLE001 - the model is already out of service
                log.error("cannot record the integrity event in the audit log: %s", e)
        return problem

    async def _periodic(self) -> None:
        while True:
            await asyncio.sleep(self.config.integrity_interval)
            await run_in_threadpool(self.integrity_check)

    @contextlib.asynccontextmanager
    async def lifespan(self, app: FastAPI) -> AsyncIterator[None]:
        """Check at start, then every `integrity_interval` seconds while the app runs."""
        await run_in_threadpool(self.integrity_check)
        task = asyncio.create_task(self._periodic()) if self.config.integrity_interval > 0 else None
        try:
            yield
        finally:
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    def serving(self, request: Request) -> None:
        """503 once the model failed an integrity check."""
        if self.model.corruption is not None:
            audit_info(request)["detail"] = "model out of service (integrity)"
            raise HTTPException(503, "the model failed its integrity check and is out of service")

    # ---- authentication -----------------------------------------------------------------------

    async def refuse_if_limited(self, request: Request) -> None:
        """429 for an address that spent its failed authentications, before its key is looked at."""
        wait = self.failures.retry_after(_peer(request)) if self.failures is not None else 0.0
        if wait > 0:
            audit_info(request)["detail"] = "too many failed authentications from this address"
            if self.config.auth_refusal_delay_s > 0:  # a flood of refused requests is slowed down, not served at once
                await asyncio.sleep(min(self.config.auth_refusal_delay_s, wait))
            raise HTTPException(429, "too many failed authentications from your address: wait and check your "
                                     "API key", headers={"Retry-After": retry_after_header(wait)})

    async def authenticate(self, request: Request) -> Principal:
        """The client of the request's bearer key (401 without a valid one, 429 when limited)."""
        info = audit_info(request)
        await self.refuse_if_limited(request)
        key = _bearer_key(request)
        p = None if key is None else await run_in_threadpool(self.store.authenticate, key)
        if p is None:
            if self.failures is not None:
                self.failures.failed(_peer(request))
            if key is None:
                info["detail"] = "no bearer key"
                raise HTTPException(401, "authentication required: send 'Authorization: Bearer <API key>'",
                                    headers={"WWW-Authenticate": "Bearer"})
            info["detail"] = "invalid, rotated or revoked key"
            raise HTTPException(401, "invalid API key", headers={"WWW-Authenticate": "Bearer"})
        info["client_id"], info["client"] = p.id, p.name
        return p

    async def identify(self, request: Request) -> None:
        """No route ran on a 404 / 405, so no key was checked: record who sent it, if it is valid."""
        info = audit_info(request)
        key = _bearer_key(request)
        if "client_id" in info or key is None:
            return
        if self.failures is not None and self.failures.retry_after(_peer(request)) > 0:
            return
        p = await run_in_threadpool(self.store.authenticate, key)
        if p is not None:
            info["client_id"], info["client"] = p.id, p.name
        elif self.failures is not None:
            self.failures.failed(_peer(request))

    # ---- budgets and outputs ------------------------------------------------------------------

    async def charge(self, request: Request, p: Principal, rows: int) -> None:
        """Batch size, rate limit (token bucket) and budget window, in rows; 413 / 429 + Retry-After."""
        info = audit_info(request)
        info["rows"] = rows
        if rows > self.config.max_batch:
            info["detail"] = "batch too large"
            raise HTTPException(413, f"at most {self.config.max_batch} examples per request")
        if p.rate_per_s is not None and p.burst is not None and rows > p.burst:
            info["detail"] = "batch larger than burst"
            raise HTTPException(413, f"your rate limit allows at most {p.burst} examples per request")
        wait = self.limiter.take(p.id, p.rate_per_s, p.burst, rows)
        if wait > 0:
            info["detail"] = "rate limit"
            raise HTTPException(429, "rate limit exceeded: slow down",
                                headers={"Retry-After": retry_after_header(wait)})
        wait = await run_in_threadpool(self.store.consume, p.id, rows)
        if math.isinf(wait):
            info["detail"] = "batch larger than budget"
            raise HTTPException(413, f"your query budget is {p.max_queries} examples per window: send fewer")
        if wait > 0:
            info["detail"] = "query budget exhausted"
            raise HTTPException(429, "query budget exhausted for this window",
                                headers={"Retry-After": retry_after_header(wait)})

    def harden(self, values: list[float]) -> list[float]:
        """Scores rounded to `round_digits` (against model extraction), when set."""
        digits = self.config.round_digits
        return [round(v, digits) for v in values] if digits is not None else values

    # ---- error handlers -----------------------------------------------------------------------

    async def auth_first(self, request: Request) -> Response | None:
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
            p = await self.authenticate(request)
            if admin in calls:
                await admin(request, p)
        except HTTPException as e:
            return await http_exception_handler(request, e)
        return None

    async def on_invalid_request(self, request: Request, exc: RequestValidationError) -> Response:
        """422 listing a few capped errors, after the key check (see `auth_first`)."""
        # FastAPI's own handler echoes each offending input back, which fails to serialize (a 500) when
        # it is NaN or Infinity (JSON the parser accepts); the client sent it, so it is left out.
        denied = await self.auth_first(request)
        if denied is not None:
            return denied
        return JSONResponse({"detail": jsonable_encoder(_capped_errors(list(exc.errors())))}, status_code=422)

    async def on_http_error(self, request: Request, exc: StarletteHTTPException) -> Response:
        """Any HTTP error, its detail capped; 400s are checked for a key first, 404 / 405 identify it."""
        if isinstance(exc.detail, str) and len(exc.detail) > MAX_DETAIL:
            exc = StarletteHTTPException(exc.status_code, _cap(exc.detail), exc.headers)
        if exc.status_code == 400:  # "There was an error parsing the body" (not UTF-8, nested too deep...)
            return await self.auth_first(request) or await http_exception_handler(request, exc)
        if exc.status_code in (404, 405):  # no route ran (or a handler refused an authenticated client)
            await self.identify(request)
        return await http_exception_handler(request, exc)


# ---- the dependencies the routers declare ------------------------------------------------------

def gate_of(request: Request) -> Gate:
    """The gate of the app serving this request (create_app puts it on `app.state`)."""
    return request.app.state.gate


async def principal(request: Request, _scheme: Annotated[Any, Depends(bearer_scheme)]) -> Principal:
    """Any authenticated client."""
    return await gate_of(request).authenticate(request)


async def admin(request: Request, p: Annotated[Principal, Depends(principal)]) -> Principal:
    """An authenticated admin client (403 for users)."""
    if p.role != "admin":
        audit_info(request)["detail"] = "admin role required"
        raise HTTPException(403, "this route is for admin clients")
    return p


# What a route declares: `p: Authenticated` (any client) or `p: AdminOnly` (403 for users).
Authenticated = Annotated[Principal, Depends(principal)]
AdminOnly = Annotated[Principal, Depends(admin)]
