"""CLI commands: membership (registered by secquant.cli): `secquant audit privacy`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from .common import RichProgress, err, out, user_errors

audit = typer.Typer()


@audit.command("privacy")
@user_errors
def privacy(
    float_model: str = typer.Option(..., "--float", help="the float classifier, e.g. builtin:digits (needs a "
                                                         "built-in member/non-member split)"),
    quantized: Optional[list[Path]] = typer.Option(None, "--quantized", help="artifact directory made from "
                                                   "--float; repeat for several"),
    shadows: int = typer.Option(16, "--shadows", help="LiRA shadow models (at least 2; 16+ advised)"),
    epochs: int = typer.Option(40, "--epochs", help="training epochs per shadow model (40 = how builtin:digits "
                                                    "is trained)"),
    seed: int = typer.Option(0, "--seed", help="seed of the shadow splits and training, and of the canaries "
                                               "(same seed, same numbers, except for DP noise)"),
    ray: Optional[str] = typer.Option(None, "--ray", help="train shadows on Ray: 'local' (private local "
                                                          "instance) or a cluster address"),
    variance: str = typer.Option("auto", "--variance", help="LiRA OUT variance: auto (global below 64 "
                                                            "shadows), global or per-example"),
    data: Optional[Path] = typer.Option(None, "--data", help="the private file the DP artifacts were made from "
                                                             "(training or calibration data; default: the "
                                                             "model's built-in training split)"),
    canaries: Optional[int] = typer.Option(None, "--canaries", help="canary audit size: canaries in the one "
                                           "training run (default 1000), or calibration runs with one canary "
                                           "each (default 200)"),
    canary_audit: bool = typer.Option(False, "--canary-audit", help="also replay and canary-audit the "
                                                                    "non-private QAT and calibrated artifacts"),
    confidence: float = typer.Option(0.95, "--confidence", help="confidence of the empirical epsilon bound"),
    out_dir: Path = typer.Option(Path("privacy-audit"), "--out", "-o", help="directory for privacy_audit.json "
                                                                            "and privacy_audit_roc.svg"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an earlier audit in --out"),
    as_json: bool = typer.Option(False, "--json", help="print the results as one JSON object (ROC points "
                                                       "stay in the file)"),
) -> None:
    """Membership-inference audit (loss threshold and offline LiRA) of a float model and its quantized
    artifacts: AUC and TPR at 1% / 0.1% FPR per model, a log-scale ROC plot. Artifacts that claim
    differential privacy are audited by repeating their mechanism: a replay check (identical releases
    fail) and a one-run canary audit (an empirical lower bound on epsilon next to the claimed one).
    Exits 3 when a DP artifact fails its audit."""
    from .. import api
    from ..audits.dp_audit import EntryPoints
    from ..audits.membership import JSON_NAME, PLOT_NAME, audit_privacy, summary_rows

    with RichProgress() as prog:
        res = audit_privacy(float_model, list(quantized or []), entry_points=EntryPoints(api.quantize, api.qat),
                            data=data, canaries=canaries, canary_audit_all=canary_audit, confidence=confidence,
                            out=out_dir, overwrite=overwrite, progress=prog, shadows=shadows, epochs=epochs,
                            seed=seed, ray=ray, variance=variance)
    dp = res.get("dp_audit", {})
    if as_json:
        typer.echo(json.dumps({k: v for k, v in res.items() if k != "roc"}, indent=1))
    else:
        t = Table(title=f"membership inference on {res['float_model']}: {res['n_members']} members, "
                        f"{res['n_nonmembers']} non-members, {res['shadows']} shadows, seed {res['seed']}")
        for c in ["model", "attack", "acc members", "acc non-members", "AUC", "TPR@1%FPR", "TPR@0.1%FPR"]:
            t.add_column(c)
        for r in summary_rows(res):
            t.add_row(r["model"], r["attack"], f"{r['accuracy_members']:.4f}", f"{r['accuracy_nonmembers']:.4f}",
                      f"{r['auc']:.4f}", f"{r['tpr_at_1pct_fpr']:.4f}", f"{r['tpr_at_0.1pct_fpr']:.4f}")
        out.print(t)
        out.print(f"note: {res['note']}", highlight=False, soft_wrap=True)
        if dp:
            out.print(_dp_table(dp, Table))
    err.print(f"wrote {out_dir / JSON_NAME} and {out_dir / PLOT_NAME}", highlight=False, soft_wrap=True)
    failed = [n for n, a in dp.items() if a["verdict"] == "fail"]
    for n in failed:
        err.print(f"{n}: DP audit failed: {'; '.join(dp[n]['reasons'])}", highlight=False, soft_wrap=True)
    if failed:
        raise typer.Exit(3)


def _dp_table(dp: dict, table_cls):
    """One row per audited artifact: the claim, the replay check and the canary bound."""
    t = table_cls(title="DP audit: replay check and one-run canary audit (Steinke et al. 2023)")
    for c in ["model", "claimed epsilon (delta)", "replay", "canary epsilon lower bound", "m", "k+ / k-",
              "correct / guesses", "most it could show", "verdict"]:
        t.add_column(c)
    for name, a in dp.items():
        c = a["canary"]
        claim = "none" if a["claimed_epsilon"] is None else f"{a['claimed_epsilon']:.3g} ({a['claimed_delta']:.0e})"
        t.add_row(name, claim, a["replay"], f"{a['canary_epsilon_lower_bound']:.3f} ({c['confidence']:.0%})",
                  str(c["m"]), f"{c['k_plus']} / {c['k_minus']}", f"{c['correct_guesses']} / {c['guesses']}",
                  f"{c['max_attainable']:.2f}", a["verdict"])
    return t
