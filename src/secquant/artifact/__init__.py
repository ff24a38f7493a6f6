"""The quantized artifact: a directory with model.safetensors, secquant.json and architecture files."""

from .fsutil import atomic_dir
from .hashing import file_sha256, state_dict_sha256
from .manifest import FORMAT_VERSION, MANIFEST_NAME, WEIGHTS_NAME, CalibrationEntry, Manifest, SourceEntry, read_manifest
from .store import LoadedArtifact, describe, load_artifact, save_artifact

__all__ = ["atomic_dir", "file_sha256", "state_dict_sha256", "FORMAT_VERSION", "MANIFEST_NAME",
           "WEIGHTS_NAME", "CalibrationEntry", "Manifest", "SourceEntry", "read_manifest", "LoadedArtifact",
           "describe", "load_artifact", "save_artifact"]
