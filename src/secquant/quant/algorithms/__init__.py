"""Algorithms that transform a model using primitives, observers and quantized modules."""

from .rtn import apply_recipe, calibrate, check_finite, plan

__all__ = ["apply_recipe", "calibrate", "check_finite", "plan"]
