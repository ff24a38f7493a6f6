"""A self-contained HTML report (inline SVG plots, no external assets)."""

from __future__ import annotations

import html
import io
from typing import Any


def _fidelity_plot(results: list[dict[str, Any]]) -> str:
    """Fidelity against size ratio, one panel per model, as inline SVG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({r["model"] for r in results})
    fig, axes = plt.subplots(1, len(models), figsize=(5.2 * len(models), 4), squeeze=False)
    for ax, model in zip(axes[0], models):
        rows = [r for r in results if r["model"] == model]
        metric = rows[0]["metric"]
        ax.axhline(rows[0]["float_value"], color="grey", ls="--", lw=1, label="fp32")
        for i, r in enumerate(sorted(rows, key=lambda r: (r["size_ratio"], r["value"]))):
            ax.scatter(r["size_ratio"], r["value"], s=40)
            # alternate label sides so presets of equal size stay readable
            ax.annotate(r["recipe"], (r["size_ratio"], r["value"]), textcoords="offset points",
                        xytext=(6, 6 if i % 2 == 0 else -12), fontsize=8)
        ax.set_xlabel("size / fp32 size")
        ax.set_ylabel(metric + (" (mean cosine to fp32)" if metric == "cosine" else " (held-out)"))
        ax.set_title(model)
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    buf = io.StringIO()
    fig.savefig(buf, format="svg")
    plt.close(fig)
    svg = buf.getvalue()
    return svg[svg.find("<svg"):]


def _table(results: list[dict[str, Any]]) -> str:
    cols = ["model", "recipe", "metric", "value", "float_value", "size_bytes", "float_size_bytes", "size_ratio",
            "latency_ms", "float_latency_ms", "quantize_s"]
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = []
    for r in results:
        cells = []
        for c in cols:
            v = r.get(c)
            cells.append(f"<td>{v:.4f}</td>" if isinstance(v, float) else f"<td>{html.escape(str(v))}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def render_html(report: dict[str, Any]) -> str:
    results = report["results"]
    sections = "".join(
        f"<section><h2>{html.escape(s['title'])}</h2>{s['html']}</section>" for s in report.get("sections", [])
    )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>secquant report</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; font-size: 0.9em; }}
th, td {{ border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: right; }}
th {{ background: #f3f3f3; }} td:first-child, td:nth-child(2), td:nth-child(3) {{ text-align: left; }}
.note {{ color: #555; font-size: 0.9em; max-width: 60em; }}
</style></head><body>
<h1>secquant report</h1>
<p class="note">secquant {html.escape(report.get('secquant_version', ''))}, created {html.escape(report.get('created', ''))},
torch {html.escape(report.get('torch', ''))}, {report.get('threads', '')} threads. Accuracy is on held-out data
(builtin:digits non-members); cosine is the mean cosine of each sentence embedding to the fp32 one. Latency is the
median per batch of 32 in eager PyTorch, where integer math is simulated in float: speed comes from the ONNX Runtime path.</p>
<h2>Fidelity against size</h2>
{_fidelity_plot(results)}
<h2>Results</h2>
{_table(results)}
{sections}
</body></html>
"""
