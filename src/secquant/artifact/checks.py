"""Checks of an artifact directory without building the model (torch-free: sealing and opening use them)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from ..errors import ArtifactError
from .hashing import file_sha256
from .manifest import MANIFEST_NAME, WEIGHTS_NAME, Manifest, read_manifest


def check_files(d: Path, manifest: Manifest, digests: Mapping[str, str] | None = None) -> None:
    """Exactly the files the manifest lists are present, each with its recorded sha256.

    `digests` (relative path -> sha256) are hashes the caller already took while writing the
    files (opening a sealed model hashes as it extracts); any file missing from it is hashed here.
    """
    if WEIGHTS_NAME not in manifest.files:
        raise ArtifactError(f"{d}: the manifest does not list {WEIGHTS_NAME}")
    present = set()
    for p in d.rglob("*"):
        if p.is_symlink() or not (p.is_dir() or p.is_file()):  # an artifact holds its own regular files only
            raise ArtifactError(f"{p} is a link or a special file: an artifact holds regular files only "
                                "(re-save the artifact)")
        if p.is_file():
            present.add(p.relative_to(d).as_posix())
    present -= {MANIFEST_NAME}
    listed = set(manifest.files)
    if missing := sorted(listed - present):
        raise ArtifactError(f"{d}: files listed in the manifest are missing: {', '.join(missing)}")
    if extra := sorted(present - listed):
        raise ArtifactError(f"{d}: files not listed in the manifest: {', '.join(extra)} (remove them or re-save)")
    digests = digests or {}
    for name, digest in manifest.files.items():
        if (digests.get(name) or file_sha256(d / name)) != digest:
            raise ArtifactError(f"{d / name}: content does not match the manifest's sha256 (modified or corrupted)")


def verify_artifact_dir(d: Path, digests: Mapping[str, str] | None = None) -> Manifest:
    """Manifest and file checks of an artifact directory, without building the model."""
    if not Path(d).is_dir():
        raise ArtifactError(f"{d} is not an artifact directory")
    manifest = read_manifest(Path(d))
    check_files(Path(d), manifest, digests)
    return manifest
