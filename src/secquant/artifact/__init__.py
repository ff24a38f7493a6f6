"""The quantized artifact: a directory with model.safetensors, secquant.json and architecture files."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import lazy_exports

if TYPE_CHECKING:
    from .checks import verify_artifact_dir
    from .fsutil import atomic_dir
    from .hashing import file_sha256, state_dict_sha256
    from .manifest import (FORMAT_VERSION, MANIFEST_NAME, WEIGHTS_NAME, CalibrationEntry, Manifest, SourceEntry,
                           read_manifest)
    from .store import LoadedArtifact, describe, read_artifact, save_artifact

_EXPORTS = {"atomic_dir": "fsutil", "file_sha256": "hashing", "state_dict_sha256": "hashing",
            "verify_artifact_dir": "checks",
            **dict.fromkeys(["FORMAT_VERSION", "MANIFEST_NAME", "WEIGHTS_NAME", "CalibrationEntry", "Manifest",
                             "SourceEntry", "read_manifest"], "manifest"),
            **dict.fromkeys(["LoadedArtifact", "describe", "read_artifact", "save_artifact"], "store")}
__getattr__, __dir__ = lazy_exports(__name__, globals(), _EXPORTS)
__all__ = list(_EXPORTS)
