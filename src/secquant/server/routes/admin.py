"""The admin routes (403 for user clients): the OpenAPI document, model info, integrity checks,
client administration and the audit log.

Route functions carry no return annotation: FastAPI would turn it into a response model and change
the OpenAPI document. Their names make the operation ids, so they are part of the interface.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

from ..db import ClientExists, ClientNotFound, ServerDBError
from ..gate import AdminOnly, gate_of
from ..schemas import BudgetChange, NewClient

router = APIRouter()
T = TypeVar("T")


def _db_errors(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """fn(...), its database errors as HTTP ones: 404 (no such client), 409 (exists) or 422."""
    try:
        return fn(*args, **kwargs)
    except ServerDBError as e:
        code = 404 if isinstance(e, ClientNotFound) else 409 if isinstance(e, ClientExists) else 422
        raise HTTPException(code, str(e)) from None


@router.get("/openapi.json", include_in_schema=False)
async def openapi_document(request: Request, p: AdminOnly):
    """The OpenAPI document, for admins only: it maps every route an attacker could try."""
    return JSONResponse(request.app.openapi())


@router.get("/v1/info")
async def info(request: Request, p: AdminOnly):
    gate = gate_of(request)
    return {"model": gate.model.info(), "config": asdict(gate.config)}


@router.post("/v1/integrity/check")
async def check_now(request: Request, p: AdminOnly):
    problem = await run_in_threadpool(gate_of(request).integrity_check)
    return {"corrupted": problem is not None, "detail": problem}


@router.get("/v1/clients")
async def clients(request: Request, p: AdminOnly):
    return {"clients": await run_in_threadpool(gate_of(request).store.list_clients)}


@router.post("/v1/clients", status_code=201)
async def add_client(body: NewClient, request: Request, p: AdminOnly):
    store = gate_of(request).store
    key = await run_in_threadpool(_db_errors, store.add_client, body.name, body.role, max_queries=body.max_queries,
                                  window_s=body.window_s, rate_per_s=body.rate_per_s, burst=body.burst)
    return {"client": await run_in_threadpool(store.client, body.name), "api_key": key}


@router.post("/v1/clients/{name}/rotate")
async def rotate(name: str, request: Request, p: AdminOnly):
    store = gate_of(request).store
    key = await run_in_threadpool(_db_errors, store.rotate_key, name)
    return {"client": await run_in_threadpool(store.client, name), "api_key": key}


@router.post("/v1/clients/{name}/revoke")
async def revoke(name: str, request: Request, p: AdminOnly):
    store = gate_of(request).store
    await run_in_threadpool(_db_errors, store.revoke, name)
    return {"client": await run_in_threadpool(store.client, name)}


@router.put("/v1/clients/{name}/budget")
async def budget(name: str, body: BudgetChange, request: Request, p: AdminOnly):
    c = await run_in_threadpool(_db_errors, gate_of(request).store.set_budget, name, max_queries=body.max_queries,
                                window_s=body.window_s, rate_per_s=body.rate_per_s, burst=body.burst,
                                unlimited=body.unlimited)
    return {"client": c}


@router.get("/v1/audit")
async def audit(request: Request, p: AdminOnly, limit: Annotated[int, Query(ge=1, le=10000)] = 100,
                client: str | None = None, status: Annotated[int | None, Query(ge=100, le=599)] = None):
    store = gate_of(request).store
    return {"entries": await run_in_threadpool(store.audit_log, limit=limit, client=client, status=status)}
