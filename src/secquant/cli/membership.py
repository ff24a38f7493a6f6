"""CLI commands: membership (registered by secquant.cli): `secquant audit privacy`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def register(app: typer.Typer, audit: typer.Typer) -> None:
    """Add this module's commands to the main app (and the `audit` group)."""
    from rich.table import Table

    from . import RichProgress, err, out, user_errors

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
        seed: int = typer.Option(0, "--seed", help="seed of the shadow splits and training (same seed, same numbers)"),
        ray: Optional[str] = typer.Option(None, "--ray", help="train shadows on Ray: 'local' (private local "
                                                              "instance) or a cluster address"),
        variance: str = typer.Option("auto", "--variance", help="LiRA OUT variance: auto (global below 64 "
                                                                "shadows), global or per-example"),
        out_dir: Path = typer.Option(Path("privacy-audit"), "--out", "-o", help="directory for privacy_audit.json "
                                                                                "and privacy_audit_roc.svg"),
        overwrite: bool = typer.Option(False, "--overwrite", help="replace an earlier audit in --out"),
    ) -> None:
        """Membership-inference audit (loss threshold and offline LiRA) of a float model and its quantized
        artifacts: AUC and TPR at 1% / 0.1% FPR per model, a log-scale ROC plot."""
        from ..privacy.membership import JSON_NAME, PLOT_NAME, audit_membership, summary_rows

        with RichProgress() as prog:
            res = audit_membership(float_model, list(quantized or []), shadows=shadows, epochs=epochs, seed=seed,
                                   ray=ray, variance=variance, out=out_dir, overwrite=overwrite, progress=prog)
        t = Table(title=f"membership inference on {res['float_model']}: {res['n_members']} members, "
                        f"{res['n_nonmembers']} non-members, {res['shadows']} shadows, seed {res['seed']}")
        for c in ["model", "attack", "acc members", "acc non-members", "AUC", "TPR@1%FPR", "TPR@0.1%FPR"]:
            t.add_column(c)
        for r in summary_rows(res):
            t.add_row(r["model"], r["attack"], f"{r['accuracy_members']:.4f}", f"{r['accuracy_nonmembers']:.4f}",
                      f"{r['auc']:.4f}", f"{r['tpr_at_1pct_fpr']:.4f}", f"{r['tpr_at_0.1pct_fpr']:.4f}")
        out.print(t)
        out.print(f"note: {res['note']}", highlight=False, soft_wrap=True)
        err.print(f"wrote {out_dir / JSON_NAME} and {out_dir / PLOT_NAME}", highlight=False, soft_wrap=True)
