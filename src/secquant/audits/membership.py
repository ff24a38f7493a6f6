"""Membership-inference audit: does a model (float or quantized) reveal which examples it was trained on?

Two attacks on each model, both scored over members (the training split) against non-members:

- loss threshold (Yeom et al. 2018): score = -cross-entropy of the true label;
- LiRA, offline variant (Carlini et al. 2022, "Membership Inference Attacks From First Principles"):
  N shadow models train on random halves of the whole population with the target's training procedure
  and are quantized with the target's recipe; for each example a Gaussian is fitted to the logit-scaled
  confidence phi = log(p/(1-p)) of the shadows that did NOT train on it, and the target's phi is scored by
  the one-sided test Pr[Z < phi] under that Gaussian.

Reported per model and attack: ROC AUC, and TPR at 1% and 0.1% FPR read off the exact ROC curve
(sklearn.metrics.roc_curve) as the largest TPR whose FPR does not exceed the target (no interpolation
upwards: a rate the non-member count cannot resolve is reported at the rate it can, and said so).

`audit_privacy` adds the artifacts that claim differential privacy: shadows cannot be compared with them
like with like, so each is audited by repeating its mechanism instead (privacy/dp_audit.py: a replay check
and a one-run canary audit giving an empirical lower bound on epsilon next to the claimed one).
"""

from __future__ import annotations

import copy
import html
import io
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.metrics import roc_auc_score, roc_curve

from ..artifact import Manifest, read_manifest, state_dict_sha256
from ..errors import ModelError, OutputExistsError, SecquantError
from ..models import ModelHandle, load_artifact, load_model
from .canary_audit import CONFIDENCE
from .dp_audit import EntryPoints, audit_artifact, is_private, mechanism
from .shadow import TargetRecipe, TrainConfig, check_ray_address, keep_matrix, logit_confidence, logits_of, run_shadows

Progress = Callable[[str, int | None], Callable[[int], None]]
ATTACKS = ("loss", "lira_offline")
FPR_TARGETS = {"tpr_at_1pct_fpr": 0.01, "tpr_at_0.1pct_fpr": 0.001}
JSON_NAME = "privacy_audit.json"
PLOT_NAME = "privacy_audit_roc.svg"
# Carlini et al. recommend one global variance below ~64 shadows: per-example variances from a few
# OUT models are too noisy.
GLOBAL_VARIANCE_BELOW = 64


def _no_progress(label: str, total: int | None) -> Callable[[int], None]:
    return lambda n: None


# ---------------------------------------------------------------------------------------------- metrics

def tpr_at_fpr(fpr: np.ndarray, tpr: np.ndarray, target: float) -> float:
    """The largest TPR reachable with FPR <= target on the exact (step) ROC curve."""
    ok = fpr <= target + 1e-12
    return float(tpr[ok].max()) if ok.any() else 0.0


def roc_metrics(is_member: np.ndarray, scores: np.ndarray) -> dict[str, Any]:
    """AUC and TPR at 1% / 0.1% FPR (higher score = 'member')."""
    fpr, tpr, _ = roc_curve(is_member, scores, drop_intermediate=False)
    res: dict[str, Any] = {"auc": float(roc_auc_score(is_member, scores))}
    res.update({k: tpr_at_fpr(fpr, tpr, t) for k, t in FPR_TARGETS.items()})
    return res


def roc_points(is_member: np.ndarray, scores: np.ndarray) -> dict[str, list[float]]:
    """The ROC curve's corners (sklearn drops collinear points; the curve is the same): for the plot."""
    fpr, tpr, _ = roc_curve(is_member, scores)
    return {"fpr": [round(float(v), 6) for v in fpr], "tpr": [round(float(v), 6) for v in tpr]}


def fpr_note(n_nonmembers: int) -> str:
    """What the non-member count lets the low-FPR numbers mean."""
    step = 1.0 / n_nonmembers
    parts = []
    for key, t in FPR_TARGETS.items():
        k = int(np.floor(t * n_nonmembers + 1e-9))
        if k == 0:
            parts.append(f"{key}: {t:.1%} of {n_nonmembers} non-members is less than one false positive "
                         f"(one is {step:.3%}), so it is the TPR at zero false positives")
        else:
            parts.append(f"{key}: at most {k} false positive(s) of {n_nonmembers}")
    return "; ".join(parts)


# ---------------------------------------------------------------------------------------------- attacks

def loss_scores(logits: torch.Tensor, labels: torch.Tensor) -> np.ndarray:
    """-cross-entropy of the true label: the loss-threshold attack's score."""
    return (-torch.nn.functional.cross_entropy(logits.double(), labels, reduction="none")).numpy()


def lira_offline_scores(target_phi: np.ndarray, shadow_phi: np.ndarray, keep: np.ndarray,
                        variance: str = "auto") -> tuple[np.ndarray, str]:
    """Offline LiRA. `shadow_phi` (n_shadows, n), `keep` (n_shadows, n) True where a shadow trained on
    the example. Returns (scores, variance used).

    The score is z = (phi - mu_out) / sigma_out: the one-sided likelihood Pr[Z < phi] = Phi(z) is a
    monotone function of z, so z ranks examples identically, without Phi saturating at 1.0 in the tail.
    Variances: "per-example" (std of each example's OUT phis), "global" (one pooled within-example std),
    or "auto" (global below 64 shadows, as the paper advises).
    """
    out = ~keep
    n_out = out.sum(0)
    if (n_out < 1).any():
        raise SecquantError("some examples have no OUT shadow model: use at least 2 shadows")
    mask = np.where(out, shadow_phi, np.nan)
    mu = np.nanmean(mask, axis=0)
    if variance == "auto":
        variance = "global" if len(keep) < GLOBAL_VARIANCE_BELOW else "per-example"
    if variance not in ("global", "per-example"):
        raise SecquantError(f"variance {variance!r}: choose auto, global or per-example")
    if n_out.min() < 2:
        if variance == "per-example":
            raise SecquantError("per-example variances need 2 OUT shadows per example: use 4 or more shadows "
                                "or the global variance")
        # One OUT model per example (2 shadows): no within-example spread exists; use the spread of all
        # OUT phis, as the reference implementation's fixed variance does.
        sigma = np.full_like(mu, np.nanstd(mask))
        used = "global (all OUT scores: one OUT shadow per example)"
    elif variance == "global":
        resid = (mask - mu) ** 2
        sigma = np.full_like(mu, np.sqrt(np.nansum(resid) / (n_out - 1).sum()))
        used = "global (pooled within-example)"
    else:
        sigma = np.sqrt(np.nansum((mask - mu) ** 2, axis=0) / (n_out - 1))
        used = "per-example"
    return (target_phi - mu) / (sigma + 1e-12), used


# ---------------------------------------------------------------------------------------------- inputs

def _float_handle(model: str | ModelHandle) -> ModelHandle:
    handle = model if isinstance(model, ModelHandle) else load_model(str(model))
    if not handle.adapter.labelled:
        raise ModelError(f"{handle.spec} is an {handle.kind}: the membership audit needs a classifier "
                         "(labels and a classification loss)")
    split = getattr(handle.adapter, "builtin", None)
    if not split or not all(k in split for k in ("train_x", "train_y", "test_x", "test_y")):
        raise ModelError(f"{handle.spec} has no built-in member/non-member split (its training set and held-out "
                         "set): the audit supports models that carry one, such as builtin:digits")
    return handle


def _check_source(m: Manifest, label: str, source_sha: str, float_spec: str) -> None:
    from ..models import adapter_class

    if not adapter_class(m.model.kind).labelled:
        raise ModelError(f"{label} is an {m.model.kind}: the membership audit needs a classifier")
    if m.source.weights_sha256 != source_sha:
        raise ModelError(f"{label} was quantized from a different model than {float_spec} (source weights hash "
                         f"{m.source.weights_sha256[:12]}... differs from {source_sha[:12]}...): pass the float "
                         "model it was made from with --float")


def _quantized(item: Any, handle: ModelHandle, source_sha: str) -> tuple[Any, str | None]:
    """(loaded model with .module and .manifest, its path) for a directory or an already loaded model.

    A directory's manifest is checked against the float model before its weights are read; loading
    then verifies every file's sha256 against the manifest (as `secquant.load(..., allow_unsealed=True)`).
    """
    if isinstance(item, (str, os.PathLike)):
        p = Path(item)
        if p.is_file():
            raise SecquantError(f"{p} is a sealed file: open it first (`secquant open ... --out DIR`) and audit "
                                "the directory")
        if not p.is_dir():
            raise SecquantError(f"{p} is not an artifact directory: pass a directory written by `secquant quantize`")
        m = read_manifest(p)
        _check_source(m, str(p), source_sha, handle.spec)
        # an artifact made from a Python module is rebuilt on a copy of the float architecture
        arch = copy.deepcopy(handle.module) if m.model.rebuild.get("loader") == "module" else None
        return load_artifact(p, model=arch), str(p)
    _check_source(item.manifest, str(getattr(item, "path", None) or item.manifest.recipe.name), source_sha,
                  handle.spec)
    return item, (str(item.path) if getattr(item, "path", None) else None)


def _names(recipes: list[str], paths: list[str | None]) -> list[str]:
    names = []
    for r, p in zip(recipes, paths):
        n = r if recipes.count(r) == 1 else f"{r} ({Path(p).name if p else len(names)})"
        while n in names or n == "fp32":
            n += "'"
        names.append(n)
    return names


# ---------------------------------------------------------------------------------------------- audit

def audit_membership(
    float_model: str | ModelHandle = "builtin:digits",
    quantized: Sequence[Any] = (),
    *,
    shadows: int = 16,
    epochs: int = 40,
    seed: int = 0,
    ray: str | None = None,
    variance: str = "auto",
    out: str | Path | None = None,
    overwrite: bool = False,
    progress: Progress = _no_progress,
    num_cpus: int | None = None,
) -> dict[str, Any]:
    """Run the loss-threshold and offline-LiRA attacks on the float model and each quantized artifact.

    `quantized`: artifact directories (or loaded models) made from `float_model`. `shadows`/`epochs`:
    the shadow models and their training epochs (40 = how builtin:digits is trained). `ray`: None trains
    shadows here, "local" on a private Ray instance, else a Ray address. `out`: a directory to write
    privacy_audit.json and privacy_audit_roc.svg into. Returns the JSON's dict (same seed, same numbers).
    """
    if shadows < 2:
        raise SecquantError(f"--shadows {shadows}: LiRA needs at least 2 shadow models (16 or more is better)")
    if epochs < 1:
        raise SecquantError(f"--epochs {epochs}: shadow models need at least one epoch of training")
    if variance not in ("auto", "global", "per-example"):
        raise SecquantError(f"--variance {variance!r}: choose auto, global or per-example")
    if ray is not None:
        check_ray_address(ray)
    if out is not None:
        _check_out(Path(out), overwrite)
    handle = _float_handle(float_model)
    source_sha = state_dict_sha256(handle.module.state_dict())
    loaded = [_quantized(q, handle, source_sha) for q in quantized]
    names = ["fp32"] + _names([qm.manifest.recipe.name + ("+qat" if qm.manifest.training else "+synthetic"
                                                          if qm.manifest.calibration.data == "synthetic" else "")
                               for qm, _ in loaded],
                              [p for _, p in loaded])
    targets = [TargetRecipe("fp32")] + [
        TargetRecipe.from_manifest(n, qm.manifest.recipe, qm.manifest.training, qm.manifest.calibration,
                                   getattr(handle.adapter, "sample_shape", None))
        for n, (qm, _) in zip(names[1:], loaded)
    ]
    modules = [handle.module] + [qm.module for qm, _ in loaded]

    split = handle.adapter.builtin
    x = torch.cat([split["train_x"], split["test_x"]])
    y = torch.cat([split["train_y"], split["test_y"]]).long()
    n_m, n_n = len(split["train_y"]), len(split["test_y"])
    is_member = np.r_[np.ones(n_m, dtype=bool), np.zeros(n_n, dtype=bool)]

    keep = keep_matrix(shadows, len(y), seed)
    shadow_phi = run_shadows(handle.module, x, y, keep, seed, targets, TrainConfig(epochs=epochs), ray, progress,
                             num_cpus)

    models: dict[str, Any] = {}
    curves: dict[str, Any] = {}
    variance_used = None
    for k, (name, t, module) in enumerate(zip(names, targets, modules)):
        logits = logits_of(module.eval(), x)
        pred = logits.argmax(1)
        lira, variance_used = lira_offline_scores(logit_confidence(logits, y), shadow_phi[:, k], keep, variance)
        loss = loss_scores(logits, y)
        path = None if k == 0 else loaded[k - 1][1]
        models[name] = {
            "artifact": path,
            "recipe": None if t.recipe is None else t.recipe.name,
            "qat": t.qat is not None,
            "accuracy_members": float((pred[:n_m] == y[:n_m]).double().mean()),
            "accuracy_nonmembers": float((pred[n_m:] == y[n_m:]).double().mean()),
            "n_members": n_m, "n_nonmembers": n_n, "seed": seed, "shadows": shadows,
            "loss": roc_metrics(is_member, loss),
            "lira_offline": roc_metrics(is_member, lira),
        }
        curves[name] = {"loss": roc_points(is_member, loss), "lira_offline": roc_points(is_member, lira)}
    result = {
        "audit": "membership inference",
        "float_model": handle.spec,
        "members": f"{handle.spec} training split", "nonmembers": f"{handle.spec} held-out split",
        "n_members": n_m, "n_nonmembers": n_n, "seed": seed, "shadows": shadows, "shadow_epochs": epochs,
        "shadow_training": "fresh init, Adam lr 3e-3, batch 64, cross-entropy (the builtin:digits procedure) on a "
                           "random half of members + non-members; each quantized like its target on its own half "
                           "(data-free targets: on ZeroQ inputs from the shadow's own BatchNorm statistics)",
        "variance": variance_used,
        "fpr_resolution": 1.0 / n_n,
        "note": fpr_note(n_n),
        "models": models,
        "roc": curves,
    }
    if out is not None:
        write_report(result, Path(out), overwrite)
    return result


def audit_privacy(
    float_model: str | ModelHandle = "builtin:digits",
    quantized: Sequence[Any] = (),
    *,
    entry_points: EntryPoints | None = None,
    data: str | Path | None = None,
    canaries: int | None = None,
    canary_audit_all: bool = False,
    confidence: float = CONFIDENCE,
    out: str | Path | None = None,
    overwrite: bool = False,
    progress: Progress = _no_progress,
    **lira: Any,
) -> dict[str, Any]:
    """The membership audit (`audit_membership`, whose keyword arguments `lira` takes) of the float model and
    every ordinary artifact, plus a DP audit (`result["dp_audit"]`, by artifact name) of every artifact that
    claims differential privacy, and, with `canary_audit_all`, of every QAT or calibrated one too.

    `entry_points`: the mechanisms the DP audit repeats (`EntryPoints(secquant.quantize, secquant.qat)`).
    `data`: the private file the DP artifacts were made from (default: the model's built-in training split).
    `canaries`: canaries of a training run (1000), or calibration runs with one canary each (200).
    """
    if canaries is not None and canaries < 2:
        raise SecquantError(f"--canaries {canaries}: the canary audit needs at least 2 canaries (or runs)")
    if not 0.5 <= confidence < 1:
        raise SecquantError(f"--confidence {confidence}: give a confidence in [0.5, 1), e.g. 0.95")
    if out is not None:
        _check_out(Path(out), overwrite)
    handle = _float_handle(float_model)
    source_sha = state_dict_sha256(handle.module.state_dict())
    loaded = [_quantized(q, handle, source_sha) for q in quantized]
    private = [is_private(qm.manifest) for qm, _ in loaded]
    audited = [p or (canary_audit_all and mechanism(qm.manifest) is not None) for p, (qm, _) in zip(private, loaded)]
    if any(audited) and entry_points is None:
        raise SecquantError("the DP audit repeats the mechanism that made the artifact: pass "
                            "entry_points=EntryPoints(secquant.quantize, secquant.qat)")
    result = audit_membership(handle, [qm for (qm, _), p in zip(loaded, private) if not p], progress=progress,
                              **lira)
    suffix = {"dp-sgd": "+dp-sgd", "dp-calibration": "+dp", "qat": "+qat"}
    names = _names([qm.manifest.recipe.name + suffix.get(mechanism(qm.manifest) or "", "") for qm, _ in loaded],
                   [p for _, p in loaded])
    dp = {}
    for name, (qm, path), want in zip(names, loaded, audited):
        if want:
            dp[name] = audit_artifact(handle, qm, path, entry_points, data=data, canaries=canaries,
                                      seed=result["seed"], confidence=confidence, progress=progress)
    if dp:
        result["dp_audit"] = dp
    if out is not None:
        write_report(result, Path(out), overwrite)
    return result


def summary_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    """One flat row per model and attack (for tables)."""
    rows = []
    for name, m in result["models"].items():
        for a in ATTACKS:
            rows.append({"model": name, "attack": a, "accuracy_members": m["accuracy_members"],
                         "accuracy_nonmembers": m["accuracy_nonmembers"], "auc": m[a]["auc"],
                         **{k: m[a][k] for k in FPR_TARGETS}})
    return rows


# ---------------------------------------------------------------------------------------------- report

def roc_figure(result: dict[str, Any]):
    """Log-log ROC curves, one per model and attack, as a matplotlib Figure (the caller closes it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_n = result["n_nonmembers"]
    floor = 0.5 / n_n  # log axes cannot show 0: points at FPR (or TPR) 0 are drawn at half a sample
    fig, ax = plt.subplots(figsize=(6.4, 5.2))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, name in enumerate(result["models"]):
        for a, ls in zip(ATTACKS, ("--", "-")):
            curve = result["roc"][name][a]
            fpr = np.maximum(np.asarray(curve["fpr"]), floor)
            tpr = np.maximum(np.asarray(curve["tpr"]), floor)
            ax.step(fpr, tpr, where="post", ls=ls, color=colors[i % len(colors)], lw=1.3,
                    label=f"{name} {a} (AUC {result['models'][name][a]['auc']:.3f})")
    ax.plot([floor, 1], [floor, 1], color="grey", lw=0.8, ls=":", label="chance")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(floor, 1)
    ax.set_ylim(floor, 1)
    ax.axvline(0.01, color="grey", lw=0.6, alpha=0.5)
    ax.axvline(0.001, color="grey", lw=0.6, alpha=0.5)
    ax.set_xlabel(f"false positive rate ({n_n} non-members)")
    ax.set_ylabel(f"true positive rate ({result['n_members']} members)")
    ax.set_title(f"membership inference on {result['float_model']} ({result['shadows']} shadows, "
                 f"seed {result['seed']})", fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return fig


def roc_svg(result: dict[str, Any]) -> str:
    """The ROC figure as an SVG document; the same result gives the same bytes."""
    import matplotlib.pyplot as plt

    with plt.rc_context({"svg.hashsalt": "secquant", "svg.fonttype": "none"}):
        fig = roc_figure(result)
        buf = io.StringIO()
        fig.savefig(buf, format="svg", metadata={"Date": None})
        plt.close(fig)
    return buf.getvalue()


def privacy_section(result: dict[str, Any]) -> dict[str, str]:
    """{"title", "html"} for secquant.report.html's `sections`: the audit table and the ROC plot."""
    cols = ["model", "attack", "accuracy_members", "accuracy_nonmembers", "auc", *FPR_TARGETS]
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{r[c]:.4f}</td>" if isinstance(r[c], float) else
                                    f"<td>{html.escape(str(r[c]))}</td>" for c in cols) + "</tr>"
                   for r in summary_rows(result))
    svg = roc_svg(result)
    svg = svg[svg.find("<svg"):]
    text = (f"<p>Members: {html.escape(result['members'])} ({result['n_members']}); non-members: "
            f"{html.escape(result['nonmembers'])} ({result['n_nonmembers']}). LiRA offline with "
            f"{result['shadows']} shadow models ({result['shadow_epochs']} epochs, {html.escape(result['variance'])} "
            f"variance), seed {result['seed']}. {html.escape(result['note'])}.</p>")
    return {"title": "Privacy", "html": f"{text}<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
                                        f"{_dp_html(result.get('dp_audit', {}))}{svg}"}


def _dp_html(dp: dict[str, Any]) -> str:
    """The DP audit's table (claim, replay, canary bound) for the HTML section; empty without DP artifacts."""
    if not dp:
        return ""
    cols = ["model", "claimed epsilon", "delta", "replay", "canary epsilon lower bound", "m", "correct / guesses",
            "most it could show", "verdict"]
    rows = []
    for name, a in dp.items():
        c = a["canary"]
        cells = [name, "none" if a["claimed_epsilon"] is None else f"{a['claimed_epsilon']:.3g}",
                 "" if a["claimed_delta"] is None else f"{a['claimed_delta']:.0e}", a["replay"],
                 f"{a['canary_epsilon_lower_bound']:.3f}", str(c["m"]), f"{c['correct_guesses']} / {c['guesses']}",
                 f"{c['max_attainable']:.2f}", a["verdict"]]
        rows.append("<tr>" + "".join(f"<td>{html.escape(v)}</td>" for v in cells) + "</tr>")
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    return ("<p>Artifacts that claim differential privacy, audited by repeating their mechanism: replay check "
            "(identical releases fail) and a one-run canary audit (Steinke, Nasr and Jagielski 2023) giving an "
            "empirical lower bound on epsilon.</p>"
            f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>")


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"{out} exists and is not a directory: choose another --out")
    if not overwrite and any((out / n).exists() for n in (JSON_NAME, PLOT_NAME)):
        raise OutputExistsError(f"{out} already holds a privacy audit: choose another --out or pass --overwrite")


def _write_atomic(path: Path, text: str) -> None:
    from ..artifact.fsutil import atomic_file

    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_report(result: dict[str, Any], out: Path, overwrite: bool = False) -> tuple[Path, Path]:
    """privacy_audit.json and privacy_audit_roc.svg in `out` (each written to a temp name, then renamed)."""
    _check_out(out, overwrite)
    svg = roc_svg(result)  # render before writing anything
    out.mkdir(parents=True, exist_ok=True)
    j, p = out / JSON_NAME, out / PLOT_NAME
    _write_atomic(p, svg)
    # The per-model numbers indented for people; the ROC points (hundreds per curve) one line per model.
    body = json.dumps({k: v for k, v in result.items() if k != "roc"}, indent=1)
    roc = ",\n".join(f"  {json.dumps(m)}: {json.dumps(c, separators=(',', ':'))}"
                      for m, c in result.get("roc", {}).items())
    _write_atomic(j, body[:-2] + ',\n "roc": {\n' + roc + "\n }\n}\n" if roc else body + "\n")
    return j, p
