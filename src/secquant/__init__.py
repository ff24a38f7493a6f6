"""secquant: quantize PyTorch models securely and privately."""

from ._version import __version__
from .api import QuantizedModel, evaluate, load, qat, quantize
from .errors import SecquantError
from .recipes import PRESETS, QuantArgs, Recipe
from .tuning import TuneResult, tune

__all__ = ["__version__", "quantize", "qat", "load", "evaluate", "QuantizedModel", "Recipe", "QuantArgs", "PRESETS",
           "SecquantError", "tune", "TuneResult"]
