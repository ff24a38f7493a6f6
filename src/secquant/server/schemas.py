"""The JSON bodies the server accepts (pydantic): unknown fields and out-of-range numbers are a 422.

Unknown fields are refused, not ignored: a misspelt option must not silently do nothing. Integer
limits are bounded by their database columns (a larger number is a 422, not a database overflow).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

_INT32, _INT64 = 2**31 - 1, 2**63 - 1


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PredictRequest(_Body):
    inputs: list[Any] = Field(..., description="a batch: one nested list of numbers per example")


class EmbedRequest(_Body):
    texts: list[str] = Field(..., description="sentences to embed")


class GenerateRequest(_Body):
    prompt: str = Field(..., description="the text to continue")
    max_new_tokens: int = Field(32, ge=1, le=_INT32, description="most tokens to generate")
    temperature: float | None = Field(None, ge=0.0, allow_inf_nan=False, description="sampling temperature "
                                      "(default: greedy decoding)")
    top_k: int | None = Field(None, ge=1, le=_INT32, description="sample from the k most likely tokens")
    seed: int | None = Field(None, ge=0, le=_INT64, description="seed of the sampling")


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
