"""Float models in: built-ins, Hugging Face directories, `package.module:factory`; and the adapters that
hold everything kind-specific (ADAPTERS: one per kind of model)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from ..errors import ArtifactError, ModelError
from .base import Adapter, GraphIO, ModelHandle
from .checkpoint import load_state_dict
from .classifier import TensorClassifierAdapter, load_factory
from .digits import DigitsCNN, load_builtin_digits, splits
from .causal_lm import CausalLMAdapter, load_causal_lm_dir
from .encoder import EncoderAdapter, load_builtin_minilm, load_encoder_dir
from .hf import is_causal_lm, read_config
from .factory import is_factory_spec

BUILTINS = {"builtin:digits": load_builtin_digits, "builtin:minilm": load_builtin_minilm}
ADAPTERS: dict[str, type[Adapter]] = {a.kind: a for a in (TensorClassifierAdapter, EncoderAdapter, CausalLMAdapter)}


def load_model(spec: str, weights: str | None = None, sample_shape: Any = None,
               sample_dtype: Any = None, tokenizer: str | None = None) -> ModelHandle:
    """Resolve a model spec to a float model handle. `sample_shape` / `sample_dtype` (factory models only):
    the input of one sample, when the model has no `sample_shape` / `sample_dtype` attribute (models.inputs).
    `tokenizer`: a directory whose tokenizer a Hugging Face model directory without one uses."""
    factory = is_factory_spec(spec) and not spec.startswith("builtin:") and not Path(spec).is_dir()
    if (sample_shape is not None or sample_dtype is not None) and not factory:
        raise ModelError(f"--sample-shape and --sample-dtype are for factory models (package.module:factory); "
                         f"{spec[:120]} knows its own inputs")
    if tokenizer is not None and not Path(spec).is_dir():
        raise ModelError("--tokenizer is for Hugging Face model directories")
    if spec in BUILTINS:
        if weights is not None:
            raise ModelError(f"--weights cannot be combined with {spec}")
        return BUILTINS[spec]()
    if spec.startswith("builtin:"):
        raise ModelError(f"unknown built-in {spec!r}; choose one of: {', '.join(BUILTINS)}")
    p = Path(spec)
    if p.is_dir():
        if weights is not None:
            raise ModelError("--weights is for factory models; a model directory carries its own weights")
        if is_causal_lm(read_config(p)):  # config.json read as JSON: the kind never comes from code
            return load_causal_lm_dir(p, tokenizer=tokenizer)
        return load_encoder_dir(p, tokenizer=tokenizer)
    if is_factory_spec(spec):
        return load_factory(spec, weights, sample_shape, sample_dtype)
    raise ModelError(
        f"cannot resolve model {spec!r}: use builtin:digits, builtin:minilm, a Hugging Face model "
        "directory, or package.module:factory with --weights FILE.safetensors"
    )


def adapter_class(kind: str) -> type[Adapter]:
    """The adapter of a kind of model a manifest names."""
    if kind not in ADAPTERS:
        raise ArtifactError(f"unknown model kind {str(kind)[:40]!r} in the manifest: this secquant knows "
                            f"{', '.join(ADAPTERS)}")
    return ADAPTERS[kind]


def adapter_for_artifact(d: Path, kind: str, rebuild: dict[str, Any]) -> Adapter:
    """The adapter of an artifact's model kind, without building the model (to feed an exported graph)."""
    return adapter_class(kind).for_artifact(Path(d), rebuild)


def rebuild_float(d: Path, kind: str, spec: str, rebuild: dict[str, Any], model: nn.Module | None = None,
                  factory: str | None = None) -> ModelHandle:
    """The float architecture (untrained) an artifact directory's manifest describes, with its adapter.
    Nothing the manifest names is imported or called without the caller's confirmation (see the adapters)."""
    cls = adapter_class(kind)
    if model is None and rebuild.get("loader") not in cls.loaders:
        raise ArtifactError(f"unknown model loader {str(rebuild.get('loader'))[:40]!r} for a {kind}")
    module, adapter = cls.rebuild(Path(d), rebuild, spec, model, factory)
    return ModelHandle(module, spec, rebuild, adapter, adapter.architecture_files(Path(d)))


def load_artifact(path: str | Path, model: nn.Module | None = None, factory: str | None = None):
    """An artifact directory's quantized model (artifact.store.read_artifact with this kind's rebuild): nothing
    the manifest names is imported or called unless the caller confirms it (`factory`) or passes the model."""
    from ..artifact.store import read_artifact

    return read_artifact(path, lambda d, m: rebuild_float(d, m.model.kind, m.model.spec, m.model.rebuild, model,
                                                          factory))


__all__ = ["load_artifact", "Adapter", "GraphIO", "ModelHandle", "ADAPTERS", "BUILTINS", "DigitsCNN", "TensorClassifierAdapter",
           "EncoderAdapter", "CausalLMAdapter", "adapter_class", "adapter_for_artifact", "load_model",
           "load_state_dict", "load_builtin_digits", "load_builtin_minilm", "load_encoder_dir", "load_causal_lm_dir",
           "rebuild_float", "splits"]
