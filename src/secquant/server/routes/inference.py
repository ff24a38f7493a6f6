"""The open health check and the client routes: /healthz (GET and HEAD), /v1/predict, /v1/embed, /v1/generate.

Route functions carry no return annotation: FastAPI would turn it into a response model and change
the OpenAPI document. Their names make the operation ids, so they are part of the interface.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from fastapi import APIRouter, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

from ...errors import SecquantError
from ..gate import Authenticated, Gate, gate_of
from ..schemas import EmbedRequest, GenerateRequest, PredictRequest

router = APIRouter()


def _as_batch(inputs: list[Any], shape: tuple[int, ...] | None, dtype: str = "float32",
              id_high: int | None = None) -> torch.Tensor:
    """The request's examples as one finite batch of the model's sample shape and dtype (422 otherwise):
    floats, or integer ids (0 <= id < id_high, the smallest embedding table) for token-id models."""
    try:
        x = torch.tensor(inputs, dtype=torch.float32 if dtype == "float32" else torch.float64)
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
    if dtype != "float32":
        top = (id_high or 2**31) - 1
        if not bool(((x == x.round()) & (x >= 0) & (x <= top)).all()):
            raise HTTPException(422, f"this model takes integer ids: inputs must be whole numbers in 0..{top}")
        x = x.to(getattr(torch, dtype))
    return x


def _serving_task(gate: Gate, request: Request, task: str) -> None:
    """503 when the model is out of service, 404 when it does not do `task` (predict or embed)."""
    gate.serving(request)
    if gate.model.task != task:
        raise HTTPException(404, f"this server runs a {gate.model.kind}: use /v1/{gate.model.task}")


@router.head("/healthz", operation_id="healthz_head")  # load balancers probe with HEAD
@router.get("/healthz")
async def healthz(request: Request):
    if gate_of(request).model.corruption is not None:
        return JSONResponse({"status": "unavailable"}, status_code=503)
    return {"status": "ok"}


@router.post("/v1/predict")
async def predict(body: PredictRequest, request: Request, p: Authenticated):
    gate = gate_of(request)
    _serving_task(gate, request, "predict")
    x = _as_batch(body.inputs, gate.model.sample_shape, gate.model.sample_dtype, gate.model.id_high)
    await gate.charge(request, p, int(x.shape[0]))
    logits = await run_in_threadpool(gate.model.logits, x)
    probs = torch.softmax(logits.float(), dim=-1)
    k = min(gate.config.top_k or probs.shape[1], probs.shape[1])
    top = torch.topk(probs, k, dim=-1)
    preds = []
    for vals, idx in zip(top.values.tolist(), top.indices.tolist()):
        scores = gate.harden(vals)
        preds.append({"label": idx[0], "top": [{"label": i, "score": s} for i, s in zip(idx, scores)]})
    return {"predictions": preds}


def _check_lengths(texts: list[str], limit: int, what: str) -> None:
    if any(len(t) > limit for t in texts):
        raise HTTPException(422, f"{what} may have at most {limit} characters")


@router.post("/v1/embed")
async def embed(body: EmbedRequest, request: Request, p: Authenticated):
    gate = gate_of(request)
    cfg = gate.config
    _serving_task(gate, request, "embed")
    if not body.texts:
        raise HTTPException(422, "texts must be a non-empty list of strings")
    _check_lengths(body.texts, cfg.max_text_chars, "each text")
    await gate.charge(request, p, len(body.texts))
    emb = await run_in_threadpool(gate.model.embed, body.texts)
    return {"embeddings": [gate.harden(r) for r in emb.float().tolist()], "dim": int(emb.shape[-1])}


@router.post("/v1/generate")
async def generate(body: GenerateRequest, request: Request, p: Authenticated):
    """One prompt per request, charged as one query (the budget counts prompts, as /v1/embed counts texts)."""
    gate = gate_of(request)
    cfg = gate.config
    _serving_task(gate, request, "generate")
    if not body.prompt:
        raise HTTPException(422, "prompt must be a non-empty text")
    _check_lengths([body.prompt], cfg.max_text_chars, "the prompt")
    if body.max_new_tokens > cfg.max_new_tokens:
        raise HTTPException(422, f"max_new_tokens may be at most {cfg.max_new_tokens}")
    await gate.charge(request, p, 1)
    try:
        res = await run_in_threadpool(gate.model.generate, body.prompt, max_new_tokens=body.max_new_tokens,
                                      temperature=body.temperature, top_k=body.top_k, seed=body.seed)
    except SecquantError as e:
        raise HTTPException(422, str(e)[:300]) from None
    return {k: res[k] for k in ("text", "prompt_tokens", "generated_tokens", "decoding")}
