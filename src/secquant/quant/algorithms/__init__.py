"""Algorithms that transform a model using primitives, observers and quantized modules."""

from . import gptq as _gptq  # noqa: F401  (registers its handler)
from .base import HANDLERS, WeightPass, handles
from .pipeline import quantize_model
from .qat import convert_qat, init_activation_ranges, prepare_qat, train_qat
from .rtn import apply_recipe, calibrate, check_finite, plan
from .smooth import collect_input_stats, search_scale

__all__ = ["HANDLERS", "WeightPass", "handles", "apply_recipe", "calibrate", "check_finite", "plan", "collect_input_stats", "search_scale", "quantize_model",
           "prepare_qat", "init_activation_ranges", "train_qat", "convert_qat"]
