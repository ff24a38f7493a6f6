"""Extra report sections of the demo: speed on ONNX Runtime, and privacy (ledger, masking, audit)."""

from __future__ import annotations

import html
from typing import Any


def _table(rows: list[dict[str, Any]], cols: list[str]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = "".join("<tr>" + "".join(
        f"<td>{r.get(c):.4f}</td>" if isinstance(r.get(c), float) else f"<td>{html.escape(str(r.get(c, '')))}</td>"
        for c in cols) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def speed_section(rows: list[dict[str, Any]]) -> dict[str, str]:
    """Per artifact: ONNX Runtime latency against fp32 PyTorch, size of model.onnx, fidelity on ORT."""
    note = ("<p class='note'>Each artifact exported to ONNX (<code>secquant export</code>) and evaluated with "
            "ONNX Runtime on the CPU (<code>secquant eval --runtime onnx</code>): median latency per batch of 32 "
            "against eager fp32 PyTorch in the same run. bench/speed.py measures this in more depth, against "
            "ONNX Runtime's own quantizer and torch.ao.</p>")
    return {"title": "Speed (ONNX Runtime)", "html": note + _table(rows, [
        "model", "recipe", "runtime", "value", "float_value", "latency_ms", "float_latency_ms", "speedup",
        "onnx_size_bytes"])}


def privacy_ledger_section(results: list[dict[str, Any]], masking: dict[str, Any] | None,
                           audit_html: str | None) -> dict[str, str]:
    """Which data each artifact saw, the budgets spent, the masking summary and the membership audit."""
    rows = [{"model": r["model"], "recipe": r["recipe"], "data seen": r.get("calibration_data", ""),
             "samples": r.get("calibration_samples", 0),
             "epsilon": r["privacy"][0]["epsilon"] if r.get("privacy") else "",
             "delta": r["privacy"][0]["delta"] if r.get("privacy") else "",
             "mechanism": r["privacy"][0]["mechanism"] if r.get("privacy") else ""} for r in results]
    parts = ["<h3>Privacy ledger</h3><p class='note'>The data each artifact's quantization read: none (weights "
             "only), synthetic (data-free), private (differentially private, with the budget spent) or raw.</p>",
             _table(rows, ["model", "recipe", "data seen", "samples", "epsilon", "delta", "mechanism"])]
    if masking:
        ent = [{"type": k, "found": v, "operator": masking.get("operators", {}).get(k, masking.get("operators", {})
                                                                                    .get("default", ""))}
               for k, v in sorted(masking.get("entities", {}).items())]
        parts += ["<h3>Masking of calibration text</h3>",
                  f"<p class='note'>{masking.get('strings_scanned', 0)} strings scanned, "
                  f"{masking.get('strings_with_pii', 0)} with PII, {masking.get('total_found', 0)} values masked "
                  f"(secquant mask; detector: {html.escape(str(masking.get('detector', '')))}).</p>",
                  _table(ent, ["type", "found", "operator"])]
    if audit_html:
        parts += ["<h3>Membership-inference audit</h3>", audit_html]
    return {"title": "Privacy", "html": "".join(parts)}


def security_section(info: dict[str, Any]) -> dict[str, str]:
    """Sealing, signature, integrity and watermark of one demo artifact."""
    rows = [{"check": k, "result": v} for k, v in info.items()]
    note = ("<p class='note'>One artifact sealed (OpenSSF model-signing signature + age encryption to the listed "
            "recipients), opened again in memory, its integrity checksums checked (and a flipped bit caught and "
            "repaired), and a keyed watermark embedded and verified.</p>")
    return {"title": "Security", "html": note + _table(rows, ["check", "result"])}


PARTY_VIEWS = [
    {"party": "0: client", "holds": "its input (quantized locally to integer codes)",
     "sees": "one Shamir share of every secret value; masked openings of comparisons and truncations "
             "(statistically hiding, 2^-30); the public program; the predicted label (only it receives output)"},
    {"party": "1: model owner", "holds": "integer weights, requantization multipliers and offsets",
     "sees": "one share of every secret value (the client's input included); masked openings; the public "
             "program; the batch size. Not the input, not the label"},
    {"party": "2: helper", "holds": "nothing of its own",
     "sees": "one share of every secret value; masked openings; the public program. Nothing in the clear"},
]


def private_inference_section(res: dict[str, Any]) -> dict[str, str]:
    """Secret-shared inference of one artifact among 3 parties: fidelity, cost, and what each party sees."""
    note = (f"<p class='note'>{html.escape(res['recipe'])} digits CNN secret-shared among 3 local processes "
            f"({html.escape(res['engine'])}; {html.escape(res['protocol'])}) on {res['samples']} held-out images "
            "(<code>secquant private-eval</code>). The model maps exactly onto integers in Z_p; p is chosen from "
            "proved bounds on every intermediate value, so nothing wraps. Public to every party: the architecture, "
            "the input quantizer, shifts, clamp bounds and comparison bit lengths (these reveal a few bits about "
            "the weights' magnitudes).</p>")
    rows = [{"metric": k, "value": res[k]} for k in ("agreement", "accuracy", "plain_accuracy", "bit_exact",
                                                     "seconds_per_sample", "bytes_per_sample", "p_bits")]
    return {"title": "Private inference",
            "html": note + _table(rows, ["metric", "value"]) + "<h3>What each party sees</h3>"
            + _table(PARTY_VIEWS, ["party", "holds", "sees"])}
