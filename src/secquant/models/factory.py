"""Any nn.Module: `package.module:factory` (called with no arguments) plus `--weights FILE`."""

from __future__ import annotations

import importlib
import re

from torch import nn

from ..errors import ModelError

FACTORY_RE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


def is_factory_spec(spec: str) -> bool:
    return bool(FACTORY_RE.match(spec))


def call_factory(spec: str) -> nn.Module:
    mod_name, _, fn_name = spec.partition(":")
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as e:
        raise ModelError(f"cannot import {mod_name!r} for factory {spec!r}: {e}") from None
    fn = getattr(mod, fn_name, None)
    if not callable(fn):
        raise ModelError(f"{spec!r}: {mod_name} has no callable {fn_name!r}")
    model = fn()
    if not isinstance(model, nn.Module):
        raise ModelError(f"{spec!r} returned {type(model).__name__}, not a torch.nn.Module")
    return model
