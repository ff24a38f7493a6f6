"""Recipes (what to do) and presets (named recipes)."""

from .io import load_recipe, recipe_from_dict
from .presets import PRESETS, get_preset
from .schema import ALL_LAYER_TYPES, GPTQ, Calibration, Override, QuantArgs, Recipe, Rotation, Smoothing, name_matches

__all__ = ["Recipe", "QuantArgs", "Override", "Calibration", "Smoothing", "Rotation", "GPTQ", "PRESETS", "get_preset",
           "load_recipe", "recipe_from_dict", "name_matches", "ALL_LAYER_TYPES"]
