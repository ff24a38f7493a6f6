"""Reading recipes from YAML/JSON files with errors that name the field and the problem."""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from pydantic import ValidationError

from ..errors import RecipeError
from ..quant.schema import Recipe


def format_validation_error(err: ValidationError, source: str) -> str:
    parts = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        parts.append(f"{loc}: {e['msg']}")
    return f"{source}: invalid recipe: " + "; ".join(parts)


def recipe_from_dict(data: object, source: str = "recipe") -> Recipe:
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: a recipe must be a mapping of fields, got {type(data).__name__}")
    try:
        return Recipe.model_validate(data)
    except ValidationError as e:
        raise RecipeError(format_validation_error(e, source)) from None


def load_recipe(path: str | Path) -> Recipe:
    p = Path(path)
    if not p.is_file():
        raise RecipeError(f"recipe file {p} does not exist")
    text = p.read_text(encoding="utf-8")
    try:
        data = json.loads(text) if p.suffix.lower() == ".json" else yaml.safe_load(text)
    except json.JSONDecodeError as e:
        raise RecipeError(f"{p}: not valid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise RecipeError(f"{p}: not valid YAML{where}: {problem}") from None
    return recipe_from_dict(data, str(p))
