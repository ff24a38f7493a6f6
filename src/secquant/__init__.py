"""secquant: quantize PyTorch models securely and privately."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ._lazy import lazy_exports
from ._version import __version__
from .errors import SecquantError

if TYPE_CHECKING:
    from .api import QuantizedModel, evaluate, generate, load, qat, quantize
    from .recipes import PRESETS, QuantArgs, Recipe
    from .tuning import TuneResult, tune

_EXPORTS = {"quantize": "api", "qat": "api", "load": "api", "evaluate": "api", "generate": "api",
            "QuantizedModel": "api",
            "Recipe": "recipes", "QuantArgs": "recipes", "PRESETS": "recipes", "tune": "tuning", "TuneResult": "tuning"}
__getattr__, __dir__ = lazy_exports(__name__, globals(), _EXPORTS)
__all__ = ["__version__", "SecquantError", *_EXPORTS]
