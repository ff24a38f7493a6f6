"""Saving and loading quantized artifacts: safetensors + secquant.json + architecture files.

No pickle is written or read. Loading checks the manifest, the file hashes, the layer list
and every tensor's name and shape before the weights are used.
"""

from __future__ import annotations

import datetime as _dt
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .._version import __version__
from ..errors import ArtifactError
from ..models.base import ModelHandle
from ..quant.modules import build_empty
from .checks import check_files
from .fsutil import atomic_dir
from .hashing import file_sha256
from .manifest import (
    MANIFEST_NAME, WEIGHTS_NAME, CalibrationEntry, Manifest, ModelEntry, PrivacyLedger, SourceEntry,
    read_manifest,
)


def tensors_for_save(module: nn.Module) -> dict[str, torch.Tensor]:
    """Contiguous copies; tensors that share storage are cloned (safetensors refuses aliasing)."""
    out, seen = {}, set()
    for k, v in module.state_dict().items():
        v = v.detach()
        key = (v.untyped_storage().data_ptr(), v.storage_offset()) if v.numel() else None
        if key is not None and key in seen:
            v = v.clone()
        elif key is not None:
            seen.add(key)
        out[k] = v.contiguous()
    return out


def build_manifest(handle: ModelHandle, recipe, layers: dict[str, dict], source: SourceEntry,
                   calibration: CalibrationEntry, files: dict[str, str], tuning: dict | None = None,
                   training: dict | None = None, privacy: list[dict] | None = None,
                   watermark: dict | None = None) -> Manifest:
    return Manifest(
        secquant_version=__version__,
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        model=ModelEntry(spec=handle.spec, kind=handle.kind, rebuild=handle.rebuild),
        recipe=recipe, layers=layers, source=source, calibration=calibration, files=files, tuning=tuning,
        training=training, privacy=PrivacyLedger(entries=list(privacy or [])), watermark=watermark,
    )


def save_artifact(out: Path, module: nn.Module, handle: ModelHandle, recipe, layers: dict[str, dict],
                  source: SourceEntry, calibration: CalibrationEntry, overwrite: bool = False,
                  extra_files: dict[str, bytes] | None = None, tuning: dict | None = None,
                  training: dict | None = None, privacy: list[dict] | None = None,
                  watermark: dict | None = None) -> Manifest:
    """Write the artifact directory atomically and return its manifest."""
    with atomic_dir(Path(out), overwrite) as tmp:
        save_file(tensors_for_save(module), str(tmp / WEIGHTS_NAME),
                  metadata={"format": "secquant.artifact", "format_version": "1"})
        for rel, src in handle.arch_files.items():
            dst = tmp / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dst)
        for rel, data in (extra_files or {}).items():
            (tmp / rel).write_bytes(data)
        files = {p.relative_to(tmp).as_posix(): file_sha256(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
        manifest = build_manifest(handle, recipe, layers, source, calibration, files, tuning, training, privacy,
                                  watermark)
        (tmp / MANIFEST_NAME).write_text(manifest.to_json(), encoding="utf-8")
    return manifest


@dataclass
class LoadedArtifact:
    module: nn.Module
    manifest: Manifest
    path: Path
    handle: ModelHandle


def _float_arch(d: Path, manifest: Manifest, model: nn.Module | None, factory: str | None) -> ModelHandle:
    from ..models.digits import SAMPLE_SHAPE, DigitsCNN, TensorClassifierAdapter, splits
    from ..models.encoder import EncoderAdapter, arch_files_of, build_encoder_arch

    rb = manifest.model.rebuild
    loader = rb.get("loader")
    spec = manifest.model.spec
    if model is not None:
        adapter = TensorClassifierAdapter(tuple(rb["sample_shape"]) if rb.get("sample_shape") else None)
        return ModelHandle(model, manifest.model.kind, spec, rb, adapter)
    if loader == "builtin" and rb.get("name") == "digits":
        return ModelHandle(DigitsCNN().eval(), "classifier", spec, rb, TensorClassifierAdapter(SAMPLE_SHAPE, splits()))
    if loader == "hf-encoder":
        enc = build_encoder_arch(d, rb.get("pooling", "mean"), bool(rb.get("normalize", False)))
        return ModelHandle(enc, "encoder", spec, rb, EncoderAdapter(d, int(rb.get("max_length", 128))), arch_files_of(d))
    if loader == "factory":
        if factory != rb.get("factory"):
            raise ArtifactError(
                f"this artifact is rebuilt by calling {rb.get('factory')!r}; secquant runs no code named by a file "
                f"unless you confirm it: pass factory={rb.get('factory')!r} (CLI: --factory)"
            )
        from ..models.factory import call_factory
        m = call_factory(factory)
        adapter = TensorClassifierAdapter(tuple(rb["sample_shape"]) if rb.get("sample_shape") else None)
        return ModelHandle(m.eval(), "classifier", spec, rb, adapter)
    if loader == "module":
        raise ArtifactError("this artifact was made from a Python nn.Module: pass model=<an instance of the same "
                            "architecture> to secquant.load")
    raise ArtifactError(f"unknown model loader {loader!r} in the manifest")


def _set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, new)


def load_artifact(path: str | Path, model: nn.Module | None = None, factory: str | None = None) -> LoadedArtifact:
    d = Path(path)
    if not d.is_dir():
        raise ArtifactError(f"{d} is not an artifact directory")
    manifest = read_manifest(d)
    check_files(d, manifest)
    handle = _float_arch(d, manifest, model, factory)
    root = handle.module
    for name, entry in manifest.layers.items():
        try:
            root.get_submodule(name)
        except AttributeError:
            raise ArtifactError(f"manifest layer {name!r} does not exist in the rebuilt architecture") from None
        try:
            q = build_empty(entry.model_dump())
        except (ValueError, KeyError, TypeError) as e:
            raise ArtifactError(f"manifest layer {name!r} cannot be rebuilt: {e}") from None
        _set_submodule(root, name, q)
    expected = root.state_dict()
    with safe_open(str(d / WEIGHTS_NAME), "pt") as f:
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
    root.load_state_dict(sd, strict=True)
    root.eval()
    return LoadedArtifact(root, manifest, d, handle)


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
            "a_bits": a.bits if a else None,
            "a_mode": ("dynamic/" + a.granularity if a.dynamic else f"static/{a.observer}") if a else "float",
        })
    return rows
