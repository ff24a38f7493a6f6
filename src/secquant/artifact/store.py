"""Saving and loading quantized artifacts: safetensors + secquant.json + architecture files.

No pickle is written or read. Loading checks the manifest, the file hashes, the layer list
and every tensor's name and shape before the weights are used.
"""

from __future__ import annotations

import datetime as _dt
import shutil
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Callable
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .._version import __version__
from ..errors import ArtifactError
from ..quant.modules import build_empty, restore_unfused, tensors_for_save, unfused_modules
from .checks import check_files
from .fsutil import atomic_dir
from .hashing import file_sha256
from .manifest import (
    MANIFEST_NAME, SAFETENSORS_METADATA, WEIGHTS_NAME, CalibrationEntry, Manifest, ModelEntry, PrivacyLedger, SourceEntry,
    read_manifest,
)


def build_manifest(handle: Any, recipe, layers: dict[str, dict], source: SourceEntry,
                   calibration: CalibrationEntry, files: dict[str, str], tuning: dict | None = None,
                   training: dict | None = None, privacy: list[dict] | None = None,
                   watermark: dict | None = None, float_layers: list[dict] | None = None,
                   module: nn.Module | None = None) -> Manifest:
    """The manifest of a quantized `module` (its unfused attention modules are listed from it)."""
    return Manifest(
        secquant_version=__version__,
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        model=ModelEntry(spec=handle.spec, kind=handle.kind, rebuild=handle.rebuild),
        recipe=recipe, layers=layers, float_layers=float_layers,
        modules=unfused_modules(module) if module is not None else {}, source=source, calibration=calibration,
        files=files, tuning=tuning, training=training, privacy=PrivacyLedger(entries=list(privacy or [])),
        watermark=watermark,
    )


def save_artifact(out: Path, module: nn.Module, handle: Any, recipe, layers: dict[str, dict],
                  source: SourceEntry, calibration: CalibrationEntry, overwrite: bool = False,
                  extra_files: dict[str, bytes] | None = None, tuning: dict | None = None,
                  training: dict | None = None, privacy: list[dict] | None = None,
                  watermark: dict | None = None, float_layers: list[dict] | None = None) -> Manifest:
    """Write the artifact directory atomically and return its manifest."""
    with atomic_dir(Path(out), overwrite) as tmp:
        save_file(tensors_for_save(module), str(tmp / WEIGHTS_NAME),
                  metadata=SAFETENSORS_METADATA)
        for rel, src in handle.arch_files.items():
            dst = tmp / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dst)
        for rel, data in (extra_files or {}).items():
            (tmp / rel).write_bytes(data)
        files = {p.relative_to(tmp).as_posix(): file_sha256(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
        manifest = build_manifest(handle, recipe, layers, source, calibration, files, tuning, training, privacy,
                                  watermark, float_layers, module)
        (tmp / MANIFEST_NAME).write_text(manifest.to_json(), encoding="utf-8")
    return manifest


@dataclass
class LoadedArtifact:
    module: nn.Module
    manifest: Manifest
    path: Path
    handle: Any


def _set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, new)


def read_artifact(path: str | Path, rebuild: Callable[[Path, Manifest], Any]) -> LoadedArtifact:
    """The quantized model of an artifact directory: manifest and file hashes checked first, then the float
    architecture from `rebuild(dir, manifest)` (a model handle: models.load_artifact passes the model kind's
    rebuild), its layers replaced by quantized ones after each was checked against the float layer, and the
    weights read with every tensor's name, dtype and shape checked."""
    d = Path(path)
    if not d.is_dir():
        raise ArtifactError(f"{d} is not an artifact directory")
    manifest = read_manifest(d)
    check_files(d, manifest)
    handle = rebuild(d, manifest)
    root = handle.module
    try:
        restore_unfused(root, {n: e.model_dump() for n, e in manifest.modules.items()})
    except ValueError as e:
        raise ArtifactError(f"the manifest's modules do not fit the rebuilt architecture: {str(e)[:200]}") from None
    for name, entry in manifest.layers.items():
        try:
            float_layer = root.get_submodule(name)
        except AttributeError:
            raise ArtifactError(f"manifest layer {name[:120]!r} does not exist in the rebuilt architecture") from None
        _check_fits(name, entry, float_layer)
        try:
            q = build_empty(entry.model_dump())
        except (ValueError, KeyError, TypeError) as e:
            raise ArtifactError(f"manifest layer {name!r} cannot be rebuilt: {str(e)[:200]}") from None
        _set_submodule(root, name, q)
    try:
        sd = _read_weights(d / WEIGHTS_NAME, root.state_dict())
    except ArtifactError:
        raise
    except Exception as e:  # safetensors' own errors for a malformed header or offsets
        raise ArtifactError(f"{d / WEIGHTS_NAME} is not a readable safetensors file: {str(e)[:200]}") from None
    root.load_state_dict(sd, strict=True)
    root.eval()
    return LoadedArtifact(root, manifest, d, handle)


def _check_fits(name: str, entry, layer: nn.Module) -> None:
    """The manifest's entry must describe the float layer it replaces: its kind, weight shape, bias, and the
    sizes that shape the quantized layer's buffers. Every allocation is then bounded by the architecture,
    not by what a manifest asks for."""
    from ..quant.modules import float_layer_type, stored_weight_shape

    kind = float_layer_type(layer)
    if kind is None or kind != entry.source_type or entry.type != ("Linear" if kind == "Conv1D" else kind):
        raise ArtifactError(f"manifest layer {name!r} says {entry.source_type} -> {entry.type}, but the architecture "
                            f"has a {type(layer).__name__} there")
    shape, sizes = stored_weight_shape(layer, kind)
    # a BatchNorm folded into the layer (quant.algorithms.fold) gives it a bias the float layer may lack
    b = getattr(layer, "bias", None)  # a tensor or None; a flag on LSTM / GRU
    has_bias = (b if isinstance(b, bool) else b is not None) or bool(entry.config.get("folded_batchnorm"))
    if entry.weight.shape != shape or entry.bias != has_bias or any(entry.config.get(k) != v for k, v in sizes.items()):
        raise ArtifactError(f"manifest layer {name!r} does not match the architecture (weight {shape}, bias "
                            f"{has_bias}): the manifest and the model differ")


def _read_weights(path: Path, expected: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Exactly the tensors `expected` names, each with its expected dtype and shape."""
    with safe_open(str(path), "pt") as f:
        keys = set(f.keys())
        if missing := sorted(set(expected) - keys):
            raise ArtifactError(f"{WEIGHTS_NAME} lacks tensors the manifest requires: {', '.join(missing[:5])}"
                                + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
        if unexpected := sorted(keys - set(expected)):
            raise ArtifactError(f"{WEIGHTS_NAME} holds tensors the manifest does not describe: {', '.join(unexpected[:5])}")
        sd = {}
        for k in expected:
            t = f.get_tensor(k)
            if tuple(t.shape) != tuple(expected[k].shape) or t.dtype != expected[k].dtype:
                raise ArtifactError(
                    f"tensor {k!r} is {t.dtype} {tuple(t.shape)} but the manifest implies "
                    f"{expected[k].dtype} {tuple(expected[k].shape)}"
                )
            sd[k] = t
    return sd


def _transform(config: dict[str, Any]) -> str | None:
    """What a layer applies to its input before the stored weight: smoothing, rotation (None: nothing)."""
    parts = (["smooth"] if config.get("smooth") else []) + (
        [f"hadamard{config['rotation']}"] if config.get("rotation") else [])
    return "+".join(parts) or None


def describe(manifest: Manifest) -> list[dict[str, Any]]:
    """One row per quantized layer for `secquant inspect`."""
    rows = []
    for name, e in manifest.layers.items():
        w = e.weight.args
        a = e.activation
        rows.append({
            "layer": name, "type": e.source_type, "shape": e.weight.shape,
            "w_bits": w.bits if w else None,
            "w_format": w.format if w else "float",
            "w_granularity": (f"group{w.group_size}" if w and w.granularity == "group" else (w.granularity if w else "float")),
            "w_symmetric": w.symmetric if w else None,
            "w_range": w.observer if w else None,
            "w_transform": _transform(e.config),
            "w_algorithm": e.algorithm,
            "a_bits": a.bits if a else None,
            "a_mode": ("dynamic/" + a.granularity if a.dynamic else f"static/{a.observer}") if a else "float",
        })
    return rows
