"""`secquant.json`: the artifact's manifest. Strict: unknown fields, unknown versions, oversize
files and unsafe file names are refused, so an artifact explains itself and nothing else."""

from __future__ import annotations

import json
from pathlib import Path, PurePosixPath
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ..errors import ArtifactError
from ..recipes.io import format_validation_error
from ..quant.schema import QuantArgs, Recipe

FORMAT = "secquant.artifact"
FORMAT_VERSION = 1
MANIFEST_NAME = "secquant.json"
WEIGHTS_NAME = "model.safetensors"
SAFETENSORS_METADATA = {"format": FORMAT, "format_version": "1"}  # in model.safetensors' header
MAX_MANIFEST_BYTES = 16 * 1024 * 1024
MAX_JSON_DEPTH = 32  # a real manifest nests about 6 deep


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class WeightEntry(Strict):
    shape: list[Annotated[int, Field(ge=1, le=2**31)]] = Field(min_length=1, max_length=5)
    args: QuantArgs | None


class LayerEntry(Strict):
    type: Literal["Linear", "Conv1d", "Conv2d", "Embedding",
                  "Conv3d", "ConvTranspose1d", "ConvTranspose2d", "ConvTranspose3d", "LSTM", "GRU"]
    source_type: Literal["Linear", "Conv1d", "Conv2d", "Embedding", "Conv1D",
                         "Conv3d", "ConvTranspose1d", "ConvTranspose2d", "ConvTranspose3d", "LSTM", "GRU"]
    weight: WeightEntry
    activation: QuantArgs | None
    bias: bool
    config: dict[str, Any]
    algorithm: str | None = Field(None, max_length=32, description="the weight algorithm that actually ran on this "
                                  "layer (rtn, gptq, lsq, ...); null: weights kept in float, or an older artifact")


class FloatLayerEntry(Strict):
    """A module that stayed in float after quantization, and why (quant.algorithms.coverage)."""

    name: str = Field(max_length=1024)
    type: str = Field(max_length=128)
    parameters: int = Field(ge=0, description="float elements it holds (parameters and floating buffers)")
    reason: str = Field(max_length=1200)


class ModuleEntry(Strict):
    """A float module replaced, before quantizing, by an equivalent one whose layers can be quantized (see
    quant.modules.attention): PyTorch attention split into projections, transformer encoder layers and stacks
    on their unfused path. Loading replays it on the rebuilt float model."""

    type: Literal["MultiheadAttention", "TransformerEncoderLayer", "TransformerEncoder"]
    config: dict[str, Any]


class ModelEntry(Strict):
    spec: str
    kind: str = Field(pattern=r"^[a-z][a-z0-9-]{0,31}$", description="the model kind (models.ADAPTERS) that "
                      "rebuilds it; an unknown kind is refused when loading")
    rebuild: dict[str, Any]


class SourceEntry(Strict):
    weights_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    num_parameters: int
    float_size_bytes: int


class CalibrationEntry(Strict):
    """What data quantization read. A file's name is recorded only when the caller asks (it often says what
    the data is about); a file read without a privacy claim is identified by its sha256, a private file by
    an HMAC under a key that only the caller got (a public hash of private data is a membership test)."""

    data: Literal["none", "raw", "synthetic", "private"]
    source: str | None = None
    source_sha256: str | None = Field(None, pattern=r"^[0-9a-f]{64}$")
    source_hmac_sha256: str | None = Field(None, pattern=r"^[0-9a-f]{64}$")
    num_samples: int | None = Field(0, description="samples read; null for private data (its count is private: "
                                                   "the privacy ledger holds a differentially private estimate)")


class PrivacyLedger(Strict):
    """Privacy budget spent on the data this artifact saw (empty when no private data was read). Each entry is
    written by the privacy layer through its typed `privacy.ledger.LedgerEntry`."""

    entries: list[dict[str, Any]] = Field(default_factory=list)


# What an artifact may hold: weights, JSON, tokenizer/vocabulary files and ONNX, i.e. data formats only.
# A file Python could import or a loader could execute (.py, .pyc, .so, .pth, ...) has no business in an
# artifact, whatever its manifest says: refusing it keeps a shipped `payload.py` off every sys.path.
DATA_SUFFIXES = (".json", ".safetensors", ".txt", ".model", ".onnx", ".onnx.data")


def safe_relpath(name: str) -> str:
    """A file name inside the artifact: relative, POSIX, no '..', no absolute or drive paths."""
    p = PurePosixPath(name)
    if not name or p.is_absolute() or "\\" in name or ":" in name or any(part in ("..", "") for part in p.parts) \
            or name != str(p):
        raise ValueError(f"unsafe file name {name!r} (must be a plain relative path inside the artifact)")
    return name


class Manifest(Strict):
    format: Literal["secquant.artifact"] = FORMAT
    format_version: int = FORMAT_VERSION
    secquant_version: str
    created: str
    model: ModelEntry
    recipe: Recipe
    layers: dict[str, LayerEntry]
    float_layers: list[FloatLayerEntry] | None = Field(None, description="modules left in float, with the reason "
                                                       "(null: not recorded by the secquant that wrote it)")
    modules: dict[str, ModuleEntry] = Field(default_factory=dict, description="float modules replaced by "
                                            "equivalent unfused ones before quantizing (attention projections)")
    source: SourceEntry
    calibration: CalibrationEntry
    privacy: PrivacyLedger = Field(default_factory=PrivacyLedger)
    tuning: dict[str, Any] | None = Field(None, description="what an accuracy-driven search decided and measured")
    training: dict[str, Any] | None = Field(None, description="quantization-aware retraining: epochs, losses, data")
    watermark: dict[str, Any] | None = Field(None, description="a public commitment to the owner's watermark key "
                                             "(scheme, key_id, commitment, tau); never the key")
    files: dict[str, str] = Field(description="artifact file name -> sha256 of its bytes")

    @field_validator("files")
    @classmethod
    def _safe_names(cls, v: dict[str, str]) -> dict[str, str]:
        for name, digest in v.items():
            safe_relpath(name)
            if not name.endswith(DATA_SUFFIXES):
                raise ValueError(f"file {name!r}: an artifact holds only data files ({', '.join(DATA_SUFFIXES)})")
            if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
                raise ValueError(f"file {name!r}: sha256 must be 64 lowercase hex digits")
        return v

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), indent=2, sort_keys=False) + "\n"


def json_depth(value: Any) -> int:
    """How deeply a parsed JSON value nests (iterative: a hostile depth cannot exhaust the stack here)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, (dict, list)):
            deepest = max(deepest, d)
            stack.extend((c, d + 1) for c in (v.values() if isinstance(v, dict) else v))
    return deepest


def read_manifest(artifact_dir: Path) -> Manifest:
    path = artifact_dir / MANIFEST_NAME
    if not path.is_file():
        raise ArtifactError(f"{artifact_dir} is not a secquant artifact (no {MANIFEST_NAME})")
    size = path.stat().st_size
    if size > MAX_MANIFEST_BYTES:
        raise ArtifactError(f"{path} is {size} bytes, over the {MAX_MANIFEST_BYTES} byte limit: refusing to parse it")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError, and integers over Python's digit limit
        raise ArtifactError(f"{path} is not valid JSON: {str(e)[:200]}") from None
    except RecursionError:
        raise ArtifactError(f"{path} nests JSON deeper than Python can parse: refusing it") from None
    if not isinstance(data, dict):
        raise ArtifactError(f"{path} must hold a JSON object")
    if (depth := json_depth(data)) > MAX_JSON_DEPTH:
        raise ArtifactError(f"{path} nests JSON {depth} levels deep (at most {MAX_JSON_DEPTH}): refusing it")
    if data.get("format") != FORMAT:
        raise ArtifactError(f"{path}: format is {data.get('format')!r}, expected {FORMAT!r}")
    if data.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(
            f"{path}: unknown format_version {data.get('format_version')!r} (this secquant reads version "
            f"{FORMAT_VERSION}); upgrade secquant or re-quantize the model"
        )
    try:
        return Manifest.model_validate(data)
    except ValidationError as e:
        raise ArtifactError(format_validation_error(e, str(path)).replace("invalid recipe", "invalid manifest")) from None


def register_files(artifact_dir: Path, names: list[str], manifest: Manifest | None = None) -> Manifest:
    """List `names` (files of `artifact_dir`) in its manifest with their sha256, dropping any whose file is
    gone, and rewrite the manifest atomically. `manifest` defaults to the one in the directory (sealing
    passes the source's manifest for the copy it stages)."""
    from .fsutil import atomic_file
    from .hashing import file_sha256

    m = manifest or read_manifest(artifact_dir)
    files = dict(m.files)
    for name in names:
        safe_relpath(name)
        path = artifact_dir / name
        if path.is_file():
            files[name] = file_sha256(path)
        else:
            files.pop(name, None)
    m = m.model_copy(update={"files": dict(sorted(files.items()))})
    with atomic_file(artifact_dir / MANIFEST_NAME) as tmp:
        tmp.write_text(m.to_json(), encoding="utf-8")
    return m
