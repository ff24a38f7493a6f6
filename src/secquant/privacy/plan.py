"""Which data reaches which stage of one quantization run, decided once, before any work.

    none       nothing reads data (weight-only, data-free recipes)
    raw        every data-reading stage reads the calibration file (or the model's built-in split)
    synthetic  every data-reading stage reads data-free inputs (`--calib synthetic`); no file is opened
    dp         the scale search and weight algorithm read data-free inputs; only static activation ranges read
               the private file, under (epsilon, delta), with one sample per forward pass

The plan also writes what the artifact records about it: the calibration entry (the file identified by
hash, by name only on request) and the privacy ledger entries.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from torch import nn

from ..errors import SecquantError
from ..artifact.manifest import CalibrationEntry
from .ledger import ledger_entry

Mode = Literal["none", "raw", "synthetic", "dp"]
SYNTHETIC_ONLY = "synthetic (data-free) inputs only"


@dataclass(frozen=True)
class CalibrationPlan:
    mode: Mode
    calib: str | Path | None = None
    epsilon: float | None = None
    delta: float | None = None

    @classmethod
    def decide(cls, recipe: Any, handle: Any, calib: str | Path | None, dp_epsilon: float | None,
               dp_delta: float | None) -> CalibrationPlan:
        """The plan for `recipe` on `handle`'s model with `calib` ("synthetic", a file, or None); refuses
        combinations that cannot keep their promise (a DP budget with nothing private to spend it on)."""
        cls.check_options(calib, dp_epsilon, dp_delta)
        if dp_epsilon is not None:
            from .dp_calibration import check_budget

            return cls("dp", calib, float(dp_epsilon), check_budget(dp_epsilon, dp_delta))
        from .synthetic import SYNTHETIC

        if calib == SYNTHETIC:
            return cls("synthetic")
        if calib is not None or handle.adapter.has_builtin_data:
            return cls("raw", calib)
        return cls("none")

    @staticmethod
    def check_options(calib: str | Path | None, dp_epsilon: float | None, dp_delta: float | None) -> None:
        """The checks the options allow alone (run before the model loads): a DP budget needs private data."""
        from .synthetic import SYNTHETIC

        if calib == SYNTHETIC and dp_epsilon is not None:
            raise SecquantError("--calib synthetic reads no private data, so there is nothing to spend a DP budget "
                                "on: drop --dp-epsilon, or pass the private calibration file")
        if dp_epsilon is not None and calib is None:
            raise SecquantError("DP calibration needs the private calibration data: pass --calib FILE")
        if dp_epsilon is None and dp_delta is not None:
            raise SecquantError("--dp-delta needs --dp-epsilon")
        if dp_epsilon is not None:
            from .dp_calibration import check_budget

            check_budget(dp_epsilon, dp_delta)

    def stage_batches(self, recipe: Any, handle: Any, data: str | Path | None) -> Callable[[], Iterable] | None:
        """The batches the scale search, the weight algorithm and (outside DP) the activation ranges read."""
        cal = recipe.calibration
        if self.mode in ("synthetic", "dp"):
            if not recipe.needs_calibration:
                return None
            public = self._public(handle, recipe)
            return lambda: public(cal.batch_size)
        if self.mode == "raw":
            return lambda: handle.adapter.calibration_batches(data, cal.num_samples, cal.batch_size)
        return None

    @staticmethod
    def _public(handle: Any, recipe: Any):
        from .synthetic import synthetic_source

        return synthetic_source(handle, recipe.calibration.num_samples, recipe.calibration.seed)

    def spend(self, qmodule: nn.Module, layers: dict[str, dict], recipe: Any, handle: Any, data: str | Path | None,
              progress: Callable) -> list[dict[str, Any]]:
        """Under DP, the private activation ranges (replacing the ones the public pass set) and their ledger
        entry; or the entry saying this recipe read no private data. [] outside DP."""
        if self.mode != "dp":
            return []
        from .synthetic import prior_provenance

        if not _reads_activation_ranges(layers):
            return [no_private_data_entry(recipe, handle)]
        from .dp_calibration import dp_calibrate

        cal = recipe.calibration
        # one sample per batch, private and public: a sample's statistic is everything the quantizer saw
        # while it ran alone, so neither padding nor a reshape of samples into rows can mix samples
        res = dp_calibrate(qmodule, handle.adapter.calibration_batches(data, cal.num_samples, 1),
                           self._public(handle, recipe)(1), handle.run, self.epsilon, self.delta,
                           progress("DP calibration", None))
        return [ledger_entry(**res.ledger, public_prior=prior_provenance(handle),
                             public_stages={st: SYNTHETIC_ONLY for st in public_stages(recipe)})]

    def record(self, layers: dict[str, dict], n_samples: int, handle: Any,
               record_source_name: bool) -> tuple[CalibrationEntry, str | None]:
        """The manifest's calibration entry, and the private file's commitment key (for the caller only)."""
        from .synthetic import describe

        if self.mode == "dp" and _reads_activation_ranges(layers):
            fields, key = file_source(self.calib, record_source_name, private=True, what="private calibration file")
            return CalibrationEntry(data="private", num_samples=None, **fields), key
        if n_samples and self.mode in ("synthetic", "dp"):
            return CalibrationEntry(data="synthetic", source=describe(handle), num_samples=n_samples), None
        if n_samples and self.calib is not None:
            fields, _ = file_source(self.calib, record_source_name, private=False)
            return CalibrationEntry(data="raw", num_samples=n_samples, **fields), None
        if n_samples:
            return CalibrationEntry(data="raw", source=f"{handle.spec} (built-in)", num_samples=n_samples), None
        return CalibrationEntry(data="none"), None


def _reads_activation_ranges(layers: dict[str, dict]) -> bool:
    return any(e["activation"] is not None and not e["activation"]["dynamic"] for e in layers.values())


def file_source(path, record_name: bool, private: bool, what: str = "calibration file") -> tuple[dict, str | None]:
    """CalibrationEntry fields naming a data file (hash; name only on request) and the commitment key, if any."""
    from .provenance import file_commitment, file_sha256

    fields: dict[str, Any] = {"source": str(path) if record_name else f"{what} (name not recorded)"}
    if private:
        fields["source_hmac_sha256"], key = file_commitment(path)
        return fields, key
    fields["source_sha256"] = file_sha256(path)
    return fields, None


def public_stages(recipe: Any) -> list[str]:
    """The data-reading steps other than static activation ranges: under DP they run on synthetic inputs."""
    stages = []
    if recipe.smoothing is not None:
        stages.append("activation-aware scale search (AWQ/SmoothQuant-style scales and clipping)")
    if recipe.algorithm.needs_data:
        stages.append(f"the {recipe.algorithm.name.upper()} weight algorithm's calibration statistics")
    return stages


def presets_reading_private_data() -> tuple[list[str], list[str]]:
    """(presets whose static activation ranges read --calib under --dp-epsilon, the others)."""
    from ..recipes import PRESETS

    def static(r: Any) -> bool:
        return any(a is not None and not a.dynamic for a in [r.activations] + [o.activations for o in r.overrides])

    return [n for n, r in PRESETS.items() if static(r)], [n for n, r in PRESETS.items() if not static(r)]


def no_private_data_entry(recipe: Any, handle: Any) -> dict[str, Any]:
    """The ledger entry of a --dp-epsilon run whose recipe read no private data."""
    from .synthetic import prior_provenance

    reads, free = presets_reading_private_data()
    stages = public_stages(recipe)
    return ledger_entry(
        stage="none: this artifact read no private data (epsilon = 0)",
        epsilon=0.0, delta=0.0,
        statement=(f"--dp-epsilon spends budget only on static activation ranges, the one step that reads the "
                      f"private calibration data; recipe {recipe.name!r} has no static activation quantizer, so the "
                      f"private data was not read. Presets with static activation ranges (they read it, under DP): "
                   f"{', '.join(reads)}. Presets that do not: {', '.join(free)}."),
        public_stages={st: SYNTHETIC_ONLY for st in stages} if stages else "none: the weights are quantized without data",
        public_prior=prior_provenance(handle) if stages else None,
    )
