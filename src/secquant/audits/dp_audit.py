"""Audit a DP artifact by running its mechanism again: the replay check and the one-run canary audit.

The artifact's manifest says which mechanism made it (DP-SGD QAT: `training.dp`; DP calibration: a ledger
entry for activation ranges) and with which settings. The audit repeats that mechanism through the entry
points the caller passes (`secquant.quantize` and `secquant.qat`, so what is audited is what ships; this
layer does not import the faces), on the private data (`data`, or the model's built-in training split):

- replay (privacy/replay.py): twice with the recorded settings; identical releases fail;
- canaries (privacy/canary_audit.py): once more with canaries, giving an empirical lower bound on epsilon
  next to the claimed one. A bound above the claim is evidence (at the stated confidence) that the claim is
  false; a bound below it is not a proof of the claim (see `max_attainable`: the most this audit could show).

Non-private QAT and calibration artifacts can be audited the same way (no claim: the bound shows the leak).
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from ..artifact import Manifest
from ..artifact.hashing import file_sha256
from ..errors import SecquantError
from ..models import ModelHandle
from ..privacy.budget import DEFAULT_DELTA
from .canary_audit import CALIBRATION_RUNS, CONFIDENCE, TRAINING_CANARIES, calibration_audit, training_audit
from .replay import replay_check

Progress = Callable[[str, int | None], Callable[[int], None]]
DP_SGD, DP_CALIBRATION, QAT, CALIBRATION = "dp-sgd", "dp-calibration", "qat", "calibration"
MECHANISMS = {
    DP_SGD: "DP-SGD quantization-aware retraining (secquant qat --dp-epsilon)",
    DP_CALIBRATION: "DP activation ranges (secquant quantize --dp-epsilon)",
    QAT: "quantization-aware retraining without DP (secquant qat)",
    CALIBRATION: "activation-range calibration without DP (secquant quantize --calib)",
}


@dataclass(frozen=True)
class EntryPoints:
    """The shipped mechanisms the audit repeats: pass `secquant.quantize` and `secquant.qat`."""

    quantize: Callable[..., Any]
    qat: Callable[..., Any]


def _no_progress(label: str, total: int | None) -> Callable[[int], None]:
    return lambda n: None


def mechanism(m: Manifest) -> str | None:
    """Which audited mechanism made the artifact: DP_SGD, DP_CALIBRATION, QAT, CALIBRATION, or None when it
    read no private data (none / synthetic calibration). An unknown ledger entry is refused (fail closed)."""
    if m.training and m.training.get("dp"):
        return DP_SGD
    spent = [e for e in m.privacy.entries if float(e.get("epsilon", 0) or 0) > 0]
    if any(str(e.get("stage", "")).startswith("activation ranges") for e in spent):
        return DP_CALIBRATION
    if spent:
        raise SecquantError(f"privacy ledger entry {spent[0].get('stage')!r} is not one this audit can repeat "
                            "(DP-SGD QAT or DP calibration): update secquant or audit it by hand")
    if m.training:
        return QAT
    if m.calibration.data == "raw":
        return CALIBRATION
    return None


def is_private(m: Manifest) -> bool:
    """True for artifacts that claim a DP guarantee (their audit is the DP audit, not LiRA)."""
    return mechanism(m) in (DP_SGD, DP_CALIBRATION)


def claimed(m: Manifest) -> tuple[float | None, float | None]:
    """The (epsilon, delta) the ledger claims (None, None without a claim)."""
    spent = [e for e in m.privacy.entries if float(e.get("epsilon", 0) or 0) > 0]
    if not spent:
        return None, None
    if len(spent) > 1:
        raise SecquantError("the ledger holds several DP releases: this audit repeats one mechanism at a time")
    return float(spent[0]["epsilon"]), float(spent[0]["delta"])


def _neighbours(m: Manifest) -> str:
    """The neighbour relation the ledger claims, in words ('' without a claim)."""
    return " ".join(str(e.get("neighbouring", "")) for e in m.privacy.entries if float(e.get("epsilon", 0) or 0) > 0)


@contextlib.contextmanager
def public_prior_once() -> Iterator[None]:
    """Compute DP calibration's public prior once per audit instead of once per run.

    Each DP calibration run synthesizes its data-free prior again (ZeroQ, about 2 s on digits, 90% of a run);
    it is a deterministic function of the float model and the recipe (no private data, fixed seed), so the
    hundreds of runs of a canary audit can share it. secquant.api imports `synthetic_source` when it runs,
    so wrapping the module attribute for the audit's duration is enough; outputs are unchanged (tested).
    """
    from ..privacy import synthetic

    original = synthetic.synthetic_source
    cache: dict[Any, Any] = {}

    def once(handle, n, seed=0, *args, **kwargs):
        key = (id(handle), n, seed, args, tuple(sorted(kwargs.items())))
        if key not in cache:
            cache[key] = original(handle, n, seed, *args, **kwargs)
        return cache[key]

    synthetic.synthetic_source = once
    try:
        yield
    finally:
        synthetic.synthetic_source = original


# ---------------------------------------------------------------------------------------------- data


def _private_data(handle: ModelHandle, m: Manifest, kind: str, data: str | Path | None
                  ) -> tuple[torch.Tensor, torch.Tensor | None, str, bool]:
    """(inputs, labels, description, is it the artifact's own data?) the mechanism is repeated on."""
    builtin = getattr(handle.adapter, "builtin", None)
    training = kind in (DP_SGD, QAT)
    if data is not None:
        p = Path(data)
        recorded = m.calibration.source_sha256  # files read without a DP claim; private ones carry a keyed HMAC
        if recorded and p.is_file() and file_sha256(p) != recorded:
            raise SecquantError(f"--data {p}: its sha256 is not the one the artifact records for its data: pass "
                                "the file the artifact was made from")
        if training:
            x, y = handle.adapter.train_set(p)
        else:
            x, y = torch.cat(list(handle.adapter.calibration_batches(p, 1 << 62, 4096))), None
        return x, y, str(p), True
    if not builtin:
        raise SecquantError(f"{handle.spec} has no built-in data: pass the private data the artifact was made from "
                            "with --data FILE")
    own = (m.calibration.source or "").startswith(handle.spec) and "(built-in)" in (m.calibration.source or "")
    x, y = builtin["train_x"], builtin["train_y"]
    desc = f"{handle.spec} training split (built-in)"
    if not own:
        desc += " as a stand-in: the artifact's own private file was not given (--data), so replays are compared " \
                "with each other, not with the artifact"
    return x, (y if training else None), desc, own


def _save(d: Path, name: str, x: torch.Tensor, y: torch.Tensor | None = None) -> str:
    p = d / f"{name}.safetensors"
    t = {"inputs": x.detach().float().contiguous()}
    if y is not None:
        t["labels"] = y.detach().long().contiguous()
    save_file(t, str(p))
    return str(p)


# ---------------------------------------------------------------------------------------------- audit


def audit_artifact(handle: ModelHandle, qm: Any, path: str | None, entry: EntryPoints, *,
                   data: str | Path | None = None, canaries: int | None = None, seed: int = 0,
                   confidence: float = CONFIDENCE, replays: int = 2, progress: Progress = _no_progress
                   ) -> dict[str, Any]:
    """Replay check and canary audit of one loaded artifact `qm` (with .module and .manifest) made from
    `handle`. `canaries`: canaries of the training run (default 1000), or calibration runs (default 200)."""
    m: Manifest = qm.manifest
    kind = mechanism(m)
    if kind is None:
        raise SecquantError(f"{path or m.recipe.name} read no private data (calibration: {m.calibration.data}): "
                            "there is no mechanism to replay; the membership audit (LiRA) covers it")
    eps, delta = claimed(m)
    x, y, desc, own = _private_data(handle, m, kind, data)
    recipe = m.recipe
    spent: list[float] = []  # what each canary run's own ledger says it spent

    def run(train_or_calib: str | None):
        if kind in (DP_SGD, QAT):
            t = m.training or {}
            kw: dict[str, Any] = {k: t[k] for k in ("epochs", "lr", "batch_size") if k in t}
            if "seed" in t:  # recorded by the run: replay it as recorded
                kw["seed"] = t["seed"]
            if kind == DP_SGD:
                dp = t["dp"]
                kw.update(dp_epsilon=dp["target_epsilon"], dp_delta=dp["delta"], max_grad_norm=dp["max_grad_norm"])
            out = entry.qat(handle, recipe, train=train_or_calib, **kw)
        else:
            kw = {"dp_epsilon": eps, "dp_delta": delta} if kind == DP_CALIBRATION else {}
            out = entry.quantize(handle, recipe, calib=train_or_calib, **kw)
        spent.extend(float(e["epsilon"]) for e in out.manifest.privacy.entries if e.get("epsilon"))
        return out.module

    with tempfile.TemporaryDirectory(prefix="secquant-audit-") as tmp, public_prior_once():
        d = Path(tmp)
        if kind in (DP_SGD, QAT):
            own_file = str(data) if data is not None else None  # None: the built-in split, as the run read it
            if not own and data is None:
                own_file = _save(d, "standin", x, y)
        else:
            own_file = str(data) if data is not None else _save(d, "standin", x)
        tick = progress(f"replaying {path or recipe.name}", replays)

        def replay():
            out = run(own_file)
            tick(1)
            return out

        try:
            rep = replay_check(replay, qm.module if own else None, replays)
        except SecquantError as e:
            rep = {"result": "inconclusive", "meaning": f"the recorded settings could not be replayed: {e}"}
        spent.clear()
        if kind in (DP_SGD, QAT):
            with torch.no_grad():
                n_classes = int(handle.module.eval()(x[:1]).shape[-1])
            tick = progress("canary training run", 1)

            def train(xc: torch.Tensor, yc: torch.Tensor):
                out = run(_save(d, "canaries", xc, yc))
                tick(1)
                return out

            can = training_audit(train, x, y, num_classes=n_classes, delta=delta or DEFAULT_DELTA,
                                 canaries=canaries or TRAINING_CANARIES, seed=seed, confidence=confidence)
        else:
            runs = canaries or CALIBRATION_RUNS
            can = calibration_audit(lambda xc: run(_save(d, "canaries", xc)), x,
                                    num_samples=recipe.calibration.num_samples, delta=delta or DEFAULT_DELTA,
                                    runs=runs, replace_one="replace" in _neighbours(m), seed=seed,
                                    confidence=confidence, progress=progress("canary calibration runs", runs))
    bound = can["epsilon_lower_bound"]
    if spent:
        can["run_epsilon"] = max(spent)  # the canary runs' own ledgers (with their canaries in)
    reasons = []
    if eps is not None and rep["result"] != "pass":
        reasons.append(f"replay {rep['result']}: {rep['meaning']}")
    if eps is not None and bound > eps:
        reasons.append(f"the canary audit shows epsilon >= {bound:.3g} with {confidence:.0%} confidence, above the "
                       f"claimed {eps:.3g}")
    return {
        "artifact": path,
        "mechanism": MECHANISMS[kind],
        "claimed_epsilon": eps,
        "claimed_delta": delta,
        "neighbouring": _neighbours(m) or None,
        "data": desc,
        "replay": rep["result"],
        "replay_detail": rep,
        "canary_epsilon_lower_bound": bound,
        "canary": can,
        "verdict": "no DP claim" if eps is None else ("fail" if reasons else "pass"),
        "reasons": reasons,
    }
