"""The audit middleware: every request, whatever its outcome (401, 403, 404, 413, 422, 429, 503
included), leaves one audit row.

The row holds the client (when a valid key was sent, 404s included), peer address, time, method,
route, status, rows and the SHA-256 of the request body, never the body. It is written before the
response goes out; if it cannot be written the client gets 503 instead of an unaudited answer (fail
closed). The gate and the routes add to the row through `audit_info(request)`.
"""

from __future__ import annotations

import hashlib
import logging
import time
from typing import Any

import anyio
from fastapi import Request
from fastapi.responses import JSONResponse

from .store import Store

log = logging.getLogger("secquant.server")
AUDIT_KEY = "secquant_audit"


def audit_info(request: Request) -> dict[str, Any]:
    """This request's audit row in the making (client, rows, detail), filled in as the request is handled."""
    return request.scope.setdefault("state", {}).setdefault(AUDIT_KEY, {})


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
