"""What an artifact may record about the data files it read, and the per-sample digests used to keep
private samples out of data declared public.

- A file read without a privacy claim gets its sha256 (anyone holding the file can check it).
- A private file under DP gets no public hash: with sha256(file) anyone holding all records but one can
  rebuild the file with and without a candidate and test membership with certainty, whatever epsilon
  says. It gets an HMAC-SHA256 under a fresh random key that is not stored; the key goes to the caller
  only, so the data owner can prove which file was used and nobody else can test candidates.
- File names are recorded only when the caller asks (they often say what the data is about).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from pathlib import Path

import torch

_CHUNK = 1 << 20


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def file_commitment(path: str | Path) -> tuple[str, str]:
    """(HMAC-SHA256 of the file's bytes under a fresh 256-bit key, that key), both hex."""
    key = secrets.token_bytes(32)
    mac = hmac.new(key, digestmod=hashlib.sha256)
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            mac.update(chunk)
    return mac.hexdigest(), key.hex()


def verify_commitment(path: str | Path, commitment: str, key_hex: str) -> bool:
    """Whether `path` is the file an artifact's `source_hmac_sha256` commits to, given the key."""
    mac = hmac.new(bytes.fromhex(key_hex), digestmod=hashlib.sha256)
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            mac.update(chunk)
    return hmac.compare_digest(mac.hexdigest(), commitment)


def sample_digests(x: torch.Tensor) -> list[bytes]:
    """sha256 of each sample (dim 0) as float32 values: equal samples match whatever dtype or layout the
    file stored them in. Exact copies only: a deliberately perturbed copy is not caught."""
    flat = x.detach().to(torch.float32).reshape(len(x), -1).contiguous()
    flat = flat + 0.0  # -0.0 -> 0.0, so a sign-of-zero rewrite does not hide a copy
    return [hashlib.sha256(row.numpy().tobytes()).digest() for row in flat]


def shared_samples(candidate: torch.Tensor, private: torch.Tensor) -> int:
    """How many samples of `candidate` also occur in `private` (by digest)."""
    seen = set(sample_digests(private))
    return sum(d in seen for d in sample_digests(candidate))
