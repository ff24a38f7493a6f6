"""The quantization schema: recipes say *what* to quantize and how finely; algorithms say how. Pydantic, strict.

QuantArgs -> Scheme (weights + activations) -> Recipe (scheme, targets, skips, overrides, the weight
algorithm's settings, calibration), in the spirit of compressed-tensors. Unknown fields are errors, so
a typo in a recipe file is reported instead of silently ignored.

Weight algorithms are pluggable: an `AlgorithmConfig` subclass (its settings, `name` picks it in a
recipe file) registers itself when defined, and its handler registers in `quant.algorithms` by that
config type. Adding one edits no switch here or in the pipeline.
"""

from __future__ import annotations

import fnmatch
import re
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, SerializeAsAny, field_validator, model_validator

from .primitives import Granularity, PerChannel, PerGroup, PerTensor, PerToken

LayerType = Literal["Linear", "Conv1d", "Conv2d", "Embedding", "Conv1D",
                    "Conv3d", "ConvTranspose1d", "ConvTranspose2d", "ConvTranspose3d", "LSTM", "GRU"]
ALL_LAYER_TYPES: list[str] = ["Linear", "Conv1d", "Conv2d", "Embedding", "Conv1D",
                              "Conv3d", "ConvTranspose1d", "ConvTranspose2d", "ConvTranspose3d", "LSTM", "GRU"]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class QuantArgs(Strict):
    """How one tensor kind (weights or activations) is quantized."""

    bits: int = Field(8, ge=2, le=8, description="integer width, 2..8")
    format: Literal["int", "nf4", "kmeans", "pow2"] = Field(
        "int", description="int: uniform affine grid; nf4 / pow2: fixed non-uniform tables scaled by absmax; "
                           "kmeans: tables fitted to the weights (weights only)")
    codebook_size: int | None = Field(None, ge=2, description="kmeans: number of centroids (default 2**bits)")
    symmetric: bool = True
    signed: bool | None = Field(None, description="default: signed when symmetric")
    granularity: Literal["tensor", "channel", "group", "token"] = "tensor"
    axis: int = Field(0, description="channel axis for granularity=channel")
    group_size: int | None = Field(None, ge=1)
    dynamic: bool = Field(False, description="activations: ranges computed at run time")
    observer: Literal["minmax", "moving_average", "percentile", "mse"] = "minmax"
    percentile: float = Field(99.99, gt=50.0, le=100.0)

    @model_validator(mode="after")
    def _check(self) -> "QuantArgs":
        if self.granularity == "group" and self.group_size is None:
            raise ValueError("granularity 'group' needs group_size")
        if self.granularity != "group" and self.group_size is not None:
            raise ValueError("group_size is only valid with granularity 'group'")
        if self.granularity == "token" and not self.dynamic:
            raise ValueError("granularity 'token' needs dynamic: true (per-token ranges exist only at run time)")
        if self.format == "nf4" and self.bits != 4:
            raise ValueError("format 'nf4' is a 4-bit code: set bits: 4")
        if self.format == "kmeans" and self.granularity not in ("tensor", "channel"):
            raise ValueError("format 'kmeans' fits one table per tensor or per channel: use granularity tensor or channel")
        if self.format == "kmeans" and self.granularity == "channel" and self.axis not in (0, -2):
            raise ValueError("format 'kmeans' per-channel tables run along the output channel: axis 0")
        if self.codebook_size is not None:
            if self.format != "kmeans":
                raise ValueError("codebook_size applies to format 'kmeans' only")
            if self.codebook_size > 2 ** self.bits:
                raise ValueError(f"codebook_size {self.codebook_size} needs more than {self.bits} bits to index "
                                 f"(at most {2 ** self.bits} entries); raise bits or shrink the codebook")
        if self.format != "int" and (self.dynamic or self.granularity == "token"):
            raise ValueError(f"format {self.format!r} is for weights; activations use format 'int'")
        return self

    @property
    def codebook_entries(self) -> int:
        """Number of table entries for codebook formats."""
        if self.format == "kmeans":
            return self.codebook_size or 2 ** self.bits
        if self.format == "nf4":
            return 16
        return 2 ** self.bits - 1  # pow2

    @property
    def is_signed(self) -> bool:
        return self.symmetric if self.signed is None else self.signed

    def granule(self, weight_kind: str = "linear") -> Granularity:
        """The primitive granularity object. Groups run along the reduction dimension."""
        if self.granularity == "tensor":
            return PerTensor()
        if self.granularity == "channel":
            return PerChannel(self.axis)
        if self.granularity == "token":
            return PerToken()
        return PerGroup(int(self.group_size), -1)


class Override(Strict):
    """Different settings (or a skip) for modules whose name matches `pattern`.

    Patterns are shell-style (`encoder.layer.*.attention.*`); prefix with `re:` for a regex.
    Fields left out keep the recipe's value; `activations: null` turns activation
    quantization off for the matched modules.
    """

    pattern: str
    weights: QuantArgs | None = None
    activations: QuantArgs | None = None
    skip: bool = False


class Smoothing(Strict):
    """Activation-aware scale migration (AWQ / SmoothQuant style) for Linear layers.

    Each input channel j is scaled by s_j = mean|x_j|^alpha (normalized): x/s feeds the layer
    and W*s is quantized, which is exact in float and moves quantization error away from the
    channels that carry large activations. With `alpha: null` alpha is searched per layer on
    calibration samples (alpha = 0 is plain round-to-nearest, so the search never picks worse
    than RTN on those samples). Needs calibration data.
    """

    alpha: float | None = Field(None, ge=0.0, le=1.0)
    grid: int = Field(11, ge=2, le=101)
    max_rows: int = Field(2048, ge=16, description="calibration rows kept per layer for the search")
    clip: bool = Field(True, description="also choose each weight group's range by output error (AWQ's clip search)")


class AlgorithmConfig(Strict):
    """The settings of one weight algorithm. `name` selects it in a recipe (`algorithm: {name: gptq, ...}`, or
    just `algorithm: gptq` for its defaults); every subclass registers itself under that name."""

    name: str
    needs_data: ClassVar[bool] = False  # reads calibration batches
    chooses_ranges: ClassVar[bool] = False  # picks the weight ranges itself (the smoothing clip search stays out)
    registry: ClassVar[dict[str, type[AlgorithmConfig]]] = {}

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        AlgorithmConfig.registry[cls.model_fields["name"].default] = cls

    def check(self, recipe: Recipe) -> None:
        """Refuse recipes the algorithm cannot run (ValueError with the reason)."""

    @classmethod
    def parse(cls, value: Any) -> AlgorithmConfig:
        """A config from a registered name, a mapping with `name`, or a config."""
        if isinstance(value, AlgorithmConfig):
            return value
        if isinstance(value, str):
            value = {"name": value}
        if not isinstance(value, dict):
            raise ValueError("algorithm must be a name or a mapping with a 'name'")
        name = value.get("name", "rtn")
        if not isinstance(name, str) or name not in cls.registry:
            raise ValueError(f"unknown algorithm {name!r}: choose one of {', '.join(sorted(cls.registry))}")
        return cls.registry[name].model_validate(value)


class RTN(AlgorithmConfig):
    """Round-to-nearest on each weight's grid (with the range observer the weights ask for): data-free."""

    name: Literal["rtn"] = "rtn"


class GPTQ(AlgorithmConfig):
    """Hessian-based error compensation (Frantar et al.): each column's rounding error is pushed
    onto the columns not yet quantized, weighted by the inverse of H = 2 X^T X / n."""

    name: Literal["gptq"] = "gptq"
    needs_data: ClassVar[bool] = True
    chooses_ranges: ClassVar[bool] = True

    damp: float = Field(0.01, gt=0.0, le=1.0, description="fraction of mean(diag H) added to the diagonal")
    act_order: bool = Field(True, description="quantize columns in order of decreasing diag(H)")
    block_size: int = Field(128, ge=1, description="columns per lazy-update block")
    float_targets: bool = Field(True, description="aim at the float model's layer outputs, not the outputs the "
                                "already quantized model would give the float weights (GPTAQ); holds a float "
                                "copy of the model during quantization")
    float_targets_ridge: float = Field(1.0, gt=0.0, le=100.0, description="how strongly the float target stays "
                                       "near the float weight, as a fraction of mean(diag H)")

    def check(self, recipe: Recipe) -> None:
        if recipe.weights is None or recipe.weights.format != "int":
            raise ValueError("algorithm 'gptq' needs uniform integer weights (weights.format: int)")


class Rotation(Strict):
    """Randomized block-Hadamard rotation of each Linear layer's input space before its weight is
    quantized: the layer stores Q(W R) and computes (x R) Q^T, exact in float, with R = D B (random
    signs D, block-diagonal Hadamard B). Spreads weight outliers over their group (QuIP# / QuaRot
    incoherence processing). Layers whose input width the block does not divide stay unrotated."""

    block: int = Field(128, ge=2, le=4096, description="Hadamard block: a power of two; the weight "
                       "group size keeps each rotated group within one original group")
    seed: int = Field(0, ge=0, description="seed of the random signs")

    @model_validator(mode="after")
    def _check(self) -> "Rotation":
        if self.block & (self.block - 1):
            raise ValueError(f"rotation.block must be a power of two (the weight group size, e.g. 64 or 128), "
                             f"got {self.block}")
        return self


class SmallTables(Strict):
    """Embedding tables holding under `max_share` of the model's parameters (position and token-type tables, say)
    keep `weights` (8-bit per row by default) where the recipe's weights are narrower: they cost almost nothing
    in size, and every token reads them. An override naming the table still wins."""

    max_share: float = Field(0.01, gt=0.0, le=1.0, description="a table's parameters over the model's, below which "
                             "it counts as small")
    weights: QuantArgs = Field(default_factory=lambda: QuantArgs(bits=8, granularity="channel", axis=0))


class Calibration(Strict):
    num_samples: int = Field(256, ge=1)
    batch_size: int = Field(32, ge=1)
    seed: int = 0


def name_matches(pattern: str, name: str) -> bool:
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    return fnmatch.fnmatchcase(name, pattern)


class Recipe(Strict):
    """A complete quantization recipe."""

    name: str = "custom"
    description: str = ""
    algorithm: SerializeAsAny[AlgorithmConfig] = Field(default_factory=RTN, description="the weight algorithm and "
                                                       "its settings")
    weights: QuantArgs | None = None
    activations: QuantArgs | None = None
    targets: list[LayerType] = Field(default_factory=lambda: list(ALL_LAYER_TYPES))
    ignore: list[str] = Field(default_factory=list, description="module name patterns left in float")
    overrides: list[Override] = Field(default_factory=list)
    smoothing: Smoothing | None = None
    rotation: Rotation | None = None
    fold_batchnorm: bool = Field(True, description="fold each eval-mode BatchNorm into the conv (or Linear) before "
                                 "it, when that layer is quantized (quant.algorithms.fold)")
    small_tables: SmallTables | None = Field(None, description="keep small embedding tables at higher precision")
    calibration: Calibration = Field(default_factory=Calibration)

    @model_validator(mode="before")
    @classmethod
    def _legacy_algorithm(cls, data: Any) -> Any:
        """Recipes written before algorithms were pluggable: `algorithm: gptq` with a separate `gptq:` block
        (manifests of that time also carry the default `gptq:` block next to `algorithm: rtn`)."""
        if isinstance(data, dict) and "gptq" in data:
            data = dict(data)
            settings = data.pop("gptq")
            algo = data.get("algorithm", "rtn")
            if algo == "gptq":
                data["algorithm"] = {"name": "gptq", **(settings.model_dump() if isinstance(settings, BaseModel)
                                                        else dict(settings or {}))}
            elif algo != "rtn":
                raise ValueError("give the GPTQ settings inside `algorithm:` ({name: gptq, damp: ...}), not in a "
                                 "separate `gptq:` block")
        return data

    @field_validator("algorithm", mode="before")
    @classmethod
    def _algorithm(cls, v: Any) -> AlgorithmConfig:
        return AlgorithmConfig.parse(v)

    @model_validator(mode="after")
    def _check(self) -> "Recipe":
        if self.weights is None and self.activations is None:
            raise ValueError("a recipe must quantize weights, activations or both")
        self.algorithm.check(self)
        for where, args in [("weights", self.weights)] + [
            (f"overrides[{i}].weights", o.weights) for i, o in enumerate(self.overrides)
        ]:
            if args is not None and args.dynamic:
                raise ValueError(f"{where}: dynamic applies to activations only")
        for where, args in [("activations", self.activations)] + [
            (f"overrides[{i}].activations", o.activations) for i, o in enumerate(self.overrides)
        ]:
            if args is not None and args.granularity not in ("tensor", "token"):
                raise ValueError(f"{where}: granularity must be 'tensor' (static or dynamic) or 'token' (dynamic); "
                                 f"{args.granularity!r} is for weights")
            if args is not None and args.format != "int":
                raise ValueError(f"{where}: format {args.format!r} is for weights; activations use format 'int'")
        for pat in self.ignore + [o.pattern for o in self.overrides]:
            if pat.startswith("re:"):
                try:
                    re.compile(pat[3:])
                except re.error as e:
                    raise ValueError(f"bad regex {pat!r}: {e}") from None
        return self

    def resolve(self, name: str, table_share: float | None = None) -> tuple[QuantArgs | None, QuantArgs | None] | None:
        """(weights, activations) for a module name, or None when it stays in float. `table_share`: for an
        embedding table, its share of the model's parameters (see `small_tables`)."""
        if any(name_matches(p, name) for p in self.ignore):
            return None
        w, a = self.weights, self.activations
        if self.keeps_small_table(table_share):
            w = self.small_tables.weights
        for o in self.overrides:
            if name_matches(o.pattern, name):
                if o.skip:
                    return None
                if "weights" in o.model_fields_set:
                    w = o.weights
                if "activations" in o.model_fields_set:
                    a = o.activations
        return w, a

    def keeps_small_table(self, table_share: float | None) -> bool:
        """True when an embedding table with this share of the model's parameters gets `small_tables.weights`."""
        st = self.small_tables
        return (table_share is not None and st is not None and self.weights is not None
                and table_share < st.max_share and self.weights.bits < st.weights.bits)

    @property
    def needs_calibration(self) -> bool:
        """True when some activation range must be observed on data (static quantization)."""
        acts = [self.activations] + [o.activations for o in self.overrides]
        return (self.smoothing is not None or self.algorithm.needs_data
                or any(a is not None and not a.dynamic for a in acts))
