"""The FastAPI application: the audit middleware, the gate (authentication, limits, integrity, error
handlers; gate.py) and the routers (routes/) wired together for one model and one database.

Every request, whatever its outcome, leaves one audit row before its answer goes out (middleware.py);
every route but /healthz needs a valid key, checked after the failed-auth limit (gate.py).
"""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from .gate import Gate, ServerConfig
from .middleware import AuditMiddleware
from .model import ServedModel
from .routes import ROUTERS
from .store import Store

__all__ = ["ServerConfig", "create_app"]


def create_app(model: ServedModel, store: Store, config: ServerConfig | None = None) -> FastAPI:
    """The server application for one loaded model and one database."""
    gate = Gate(model, store, config or ServerConfig())
    # The routers' routes are listed in the app itself, not through app.include_router: FastAPI's
    # (0.165 here) keeps a lazy entry per router, so app.routes would no longer enumerate the operations
    # (the route tests and anything that audits app.routes would see none).
    routes = [route for router in ROUTERS for route in router.routes]
    app = FastAPI(title="secquant server", lifespan=gate.lifespan, docs_url=None, redoc_url=None, openapi_url=None,
                  routes=routes)
    app.add_middleware(AuditMiddleware, store=store, max_body_bytes=gate.config.max_body_bytes)
    app.state.gate = gate  # the routes' dependencies find it here (gate.gate_of)
    app.add_exception_handler(RequestValidationError, gate.on_invalid_request)
    app.add_exception_handler(StarletteHTTPException, gate.on_http_error)
    return app
