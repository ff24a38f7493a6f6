"""The server's routes as FastAPI routers by area: `inference` (health, predictions, embeddings) and
`admin` (the OpenAPI document, model info, integrity checks, clients, the audit log)."""

from . import admin, inference

ROUTERS = (inference.router, admin.router)

__all__ = ["ROUTERS", "admin", "inference"]
