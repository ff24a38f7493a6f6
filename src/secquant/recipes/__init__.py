"""Recipes (what to do) and presets (named recipes); the schema itself lives in secquant.quant.schema."""

from ..quant.schema import (
    ALL_LAYER_TYPES, GPTQ, RTN, AlgorithmConfig, Calibration, Override, QuantArgs, Recipe, Rotation, Smoothing,
    SmallTables, name_matches,
)
from .io import load_recipe, recipe_from_dict
from .presets import PRESETS, get_preset

__all__ = ["Recipe", "QuantArgs", "Override", "Calibration", "Smoothing", "Rotation", "GPTQ", "RTN", "AlgorithmConfig",
           "PRESETS", "get_preset", "load_recipe", "recipe_from_dict", "name_matches", "ALL_LAYER_TYPES",
           "SmallTables"]
