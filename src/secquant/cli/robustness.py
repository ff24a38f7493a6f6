"""CLI commands: `secquant audit robustness | bitflip | divergence` (registered by secquant.cli).

Each prints one JSON object on stdout and, with --out DIR, writes it (plus plots) into a new
directory atomically. `audit divergence` exits 3 when the divergence is flagged (0 when not,
2 on user errors), so scripts can tell "suspicious model" from "bad invocation".
"""

from __future__ import annotations

import json
import secrets
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import typer

from ..errors import SecquantError
from ..privacy.encrypted_data import plaintext_path
from .common import RichProgress, err, existing, factory_option, user_errors, weights_option

if TYPE_CHECKING:  # the CLI imports torch only in the commands that need it (sealing runs without)
    import torch

EXIT_FLAGGED = 3


def _floats(text: str, what: str) -> list[float]:
    try:
        vals = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise SecquantError(f"{what} {text!r}: give comma-separated numbers, e.g. 0,0.02,0.05") from None
    if not vals:
        raise SecquantError(f"{what} is empty: give comma-separated numbers, e.g. 0,0.02,0.05")
    return vals


def _input_range(text: str) -> tuple[float, float]:
    vals = _floats(text, "--input-range")
    if len(vals) != 2 or not vals[0] < vals[1]:
        raise SecquantError(f"--input-range {text!r}: give LO,HI with LO < HI, e.g. 0,1")
    return vals[0], vals[1]


def _labelled(handle, data: Path | None) -> tuple[torch.Tensor, torch.Tensor]:
    """All evaluation inputs and labels of a classifier (built-in held-out split or --data FILE)."""
    if not handle.adapter.labelled:
        raise SecquantError(f"{handle.spec} is an {handle.kind}: robustness audits need a classifier with labels")
    xs, ys = [], []
    for x, y in handle.adapter.eval_batches(str(data) if data else None, 256):
        if y is None:
            raise SecquantError(f"{data}: the audit needs labels: add a 'labels' tensor next to 'inputs'")
        xs.append(x)
        ys.append(y.long())
    if not xs:
        raise SecquantError("the evaluation data is empty")
    import torch

    return torch.cat(xs).float(), torch.cat(ys)


def _inputs(handle, data: Path | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    xs, ys = [], []
    for x, y in handle.adapter.eval_batches(str(data) if data else None, 256):
        xs.append(x)
        ys.append(y)
    if not xs:
        raise SecquantError("the probe data is empty")
    import torch

    labels = None if any(y is None for y in ys) else torch.cat(ys).long()
    return torch.cat(xs).float(), labels


def _load_quantized(path: Path, factory: str | None, float_handle=None, float_spec: str = ""):
    """The artifact at `path`; with `float_handle`, refused unless it was quantized from exactly that float model."""
    from ..api import load
    from ..artifact import state_dict_sha256

    if path.is_file():
        raise SecquantError(f"{path} is a sealed file: open it first (`secquant open`) and audit the directory")
    qm = load(path, factory=factory, allow_unsealed=True)  # naming a directory is the opt-in
    if float_handle is not None and \
            state_dict_sha256(float_handle.module.state_dict()) != qm.manifest.source.weights_sha256:
        raise SecquantError(f"{float_spec} is not the float model {path} was quantized from (source weights hash "
                            "differs): pass the exact float model (and --weights)")
    return qm


def _load_float(spec: str, weights: Path | None):
    from ..models import load_model

    return load_model(spec, existing(weights, "--weights"))


def _emit(result: dict[str, Any], out_dir: Path | None, overwrite: bool, name: str, extra=None) -> None:
    """Write NAME.json (and extra(tmpdir) files) into out_dir atomically; print the JSON on stdout."""
    text = json.dumps(result, indent=1, default=float)
    if out_dir is not None:
        from ..artifact.fsutil import atomic_dir

        with atomic_dir(out_dir, overwrite) as tmp:
            (tmp / f"{name}.json").write_text(text + "\n", encoding="utf-8")
            if extra is not None:
                extra(tmp)
        err.print(f"wrote {out_dir}/{name}.json", highlight=False, soft_wrap=True)
    sys.stdout.write(json.dumps(result, default=float) + "\n")


def _robustness_html(res: dict[str, Any], svgs: list[str]) -> str:
    """A self-contained HTML report: the accuracy-vs-epsilon plots inline and the numbers as tables."""
    import html

    def table(r: dict[str, Any], title: str) -> str:
        head = "".join(f"<th>eps={e:g}</th>" for e in r["eps"])
        rows = []
        for name, m in r["models"].items():
            for kind in ("fgsm", "pgd", "fgsm_transfer", "pgd_transfer"):
                if kind in m:
                    cells = "".join(f"<td>{100 * v:.1f}%</td>" for v in m[kind])
                    rows.append(f"<tr><td>{html.escape(name)}</td><td>{kind.replace('_', ' ')}</td>{cells}</tr>")
        return (f"<h2>{html.escape(title)}</h2><table><tr><th>model</th><th>attack</th>{head}</tr>"
                + "".join(rows) + "</table>")

    attack = html.escape(json.dumps(res["attack"]))
    parts = [table(res, f"Robust accuracy ({res['n_samples']} samples)")]
    if "defensive" in res:
        parts.append(table(res["defensive"], "Defensive QAT: plain vs Lipschitz-regularized"))
    body = "".join(svgs) + "".join(parts)
    return ("<!doctype html><html><head><meta charset='utf-8'><title>secquant robustness audit</title><style>"
            "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;margin:1em 0}"
            "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}</style></head><body>"
            f"<h1>Robustness audit: {html.escape(str(res['model']))}</h1><p><code>{attack}</code></p>"
            f"{body}</body></html>\n")


def _check_out(out_dir: Path | None, overwrite: bool) -> None:
    from ..artifact.fsutil import refuse_existing

    if out_dir is not None:
        refuse_existing(out_dir, overwrite)

audit = typer.Typer()


@audit.command("robustness")
@user_errors
def robustness(
    float_model: str = typer.Option(..., "--float", help="the float classifier: builtin:digits or package.module:factory"),
    quantized: list[Path] = typer.Option(..., "--quantized", help="quantized artifact directory; repeat for several"),
    weights: Optional[Path] = weights_option("float weights of a factory --float model"),
    factory: Optional[str] = factory_option(),
    data: Optional[Path] = typer.Option(None, "--data", help="labelled data (.safetensors with 'inputs', 'labels'); default: built-in held-out split"),
    eps: str = typer.Option("0,0.02,0.05,0.1,0.2", "--eps", help="L-inf epsilon grid, comma-separated"),
    steps: int = typer.Option(10, "--steps", min=1, help="PGD steps"),
    samples: Optional[int] = typer.Option(None, "--samples", min=1, help="use only the first N evaluation samples"),
    input_range: str = typer.Option("0,1", "--input-range", help="valid input range LO,HI (adversarial inputs are clipped to it)"),
    defensive_qat: Optional[str] = typer.Option(None, "--defensive-qat", help="also retrain with this preset, plain vs Lipschitz-regularized QAT, and compare"),
    beta: float = typer.Option(1e-3, "--beta", help="Lipschitz (orthogonality) penalty weight for --defensive-qat"),
    epochs: int = typer.Option(5, "--epochs", min=1, help="QAT epochs for --defensive-qat"),
    train: Optional[Path] = typer.Option(None, "--train", help="training data for --defensive-qat (default: built-in training split)"),
    seed: int = typer.Option(0, "--seed"),
    out_dir: Optional[Path] = typer.Option(None, "--out", "-o", help="directory to write robustness.json, robustness.svg and report.html"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace --out if it exists"),
    identity: Optional[Path] = typer.Option(None, "--identity", help="age identity for an encrypted data file (FILE.age, decrypted in memory)"),
) -> None:
    """FGSM and PGD (L-inf) robust accuracy of the float and quantized models over an epsilon grid.

    Attacks on quantized models use straight-through (BPDA) gradients through the activation
    quantizers; transfer accuracy of examples crafted on the float model is reported too.
    """
    from ..audits.robustness import (
        defensive_comparison,
        plot_robustness,
        robust_accuracy,
    )
    from ..recipes import get_preset

    _check_out(out_dir, overwrite)
    grid = _floats(eps, "--eps")
    clip = _input_range(input_range)
    for f, flag in ((data, "--data"), (train, "--train"), (identity, "--identity"),
                    *((q, "--quantized") for q in quantized)):
        existing(f, flag)  # before the models load
    handle = _load_float(float_model, weights)
    models = {"fp32": handle.module.eval()}
    for d in quantized:
        qm = _load_quantized(d, factory, handle, float_model)
        name = qm.manifest.recipe.name
        if name in models:
            name = f"{name} ({d.name})"
        models[name] = qm.module
    with plaintext_path(data, identity) as plain:
        x, y = _labelled(handle, plain)
    if samples:
        x, y = x[:samples], y[:samples]
    with RichProgress() as prog:
        res = robust_accuracy(models, x, y, grid, steps, seed, "fp32", clip,
                              progress=prog("attacking", len(grid) * len(models)))
        res["n_samples"] = int(len(y))
        res["model"] = float_model
        res["artifacts"] = {n: str(d) for n, d in zip(list(models)[1:], quantized)}
        if defensive_qat:
            if not hasattr(handle.adapter, "train_set"):
                raise SecquantError(f"{float_model} has no training set for --defensive-qat")
            recipe = get_preset(defensive_qat)
            tr = handle.adapter.train_set(str(train) if train else None)
            res["defensive"] = defensive_comparison(handle.module, recipe, tr, (x, y), epochs=epochs, beta=beta,
                                                    eps_grid=grid, steps=steps, seed=seed, clip=clip)

    def plots(tmp: Path) -> None:
        svgs = [plot_robustness(res, tmp / "robustness.svg").read_text(encoding="utf-8")]
        if "defensive" in res:
            svgs.append(plot_robustness(res["defensive"], tmp / "defensive_qat.svg").read_text(encoding="utf-8"))
        svgs = [s[s.index("<svg"):] for s in svgs]  # inline: drop the XML prolog
        (tmp / "report.html").write_text(_robustness_html(res, svgs), encoding="utf-8")

    _emit(res, out_dir, overwrite, "robustness", plots)

@audit.command("bitflip")
@user_errors
def bitflip(
    artifact: Path = typer.Argument(..., help="quantized artifact directory (uniform integer weights)"),
    factory: Optional[str] = factory_option(),
    data: Optional[Path] = typer.Option(None, "--data", help="labelled evaluation data; default: built-in held-out split"),
    max_flips: int = typer.Option(50, "--max-flips", min=1, help="stop the attack after this many flips"),
    target_accuracy: float = typer.Option(0.2, "--target-accuracy", help="stop once accuracy falls below this"),
    integrity: bool = typer.Option(False, "--integrity", help="also run the keyed integrity check: detection rate and accuracy after repair"),
    random_trials: int = typer.Option(5, "--random-trials", min=1, help="random-flip baseline trials (averaged)"),
    attack_samples: int = typer.Option(128, "--attack-samples", min=1, help="attack batch size (from the training split when there is one)"),
    candidates: int = typer.Option(4, "--candidates", min=1, help="flips tried per layer per iteration (in-layer search)"),
    seed: int = typer.Option(0, "--seed"),
    out_dir: Optional[Path] = typer.Option(None, "--out", "-o", help="directory to write bitflip.json"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace --out if it exists"),
    identity: Optional[Path] = typer.Option(None, "--identity", help="age identity for an encrypted data file (FILE.age, decrypted in memory)"),
) -> None:
    """Progressive bit search attack on the packed weight codes vs random flips (and the integrity check)."""
    from ..audits.bitflip import bitflip_audit

    _check_out(out_dir, overwrite)
    if not 0 < target_accuracy < 1:
        raise SecquantError("--target-accuracy must lie strictly between 0 and 1")
    qm = _load_quantized(artifact, factory)
    with plaintext_path(data, identity) as plain:
        x, y = _labelled(qm.handle, plain)
    try:
        xa, ya = qm.handle.adapter.train_set(None) if data is None else (x, y)
    except SecquantError:
        xa, ya = x, y
    import torch

    g = torch.Generator().manual_seed(seed)
    pick = torch.randperm(len(ya), generator=g)[:attack_samples]
    with RichProgress() as prog:
        res = bitflip_audit(qm.module, (xa[pick].float(), ya[pick].long()), (x, y), max_flips=max_flips,
                            target_accuracy=target_accuracy, candidates=candidates, random_trials=random_trials,
                            seed=seed, integrity=integrity, progress=prog("flipping bits", max_flips))
    res["artifact"] = str(artifact)
    res["recipe"] = qm.manifest.recipe.name
    res["attack"]["attack_data"] = "training split (members)" if data is None and len(xa) != len(x) else "evaluation data"
    _emit(res, out_dir, overwrite, "bitflip")

@audit.command("divergence")
@user_errors
def divergence(
    float_model: str = typer.Option(..., "--float", help="the float model the artifact was quantized from"),
    quantized: Path = typer.Option(..., "--quantized", help="quantized artifact directory"),
    weights: Optional[Path] = weights_option("float weights of a factory --float model"),
    factory: Optional[str] = factory_option(),
    probe: Optional[Path] = typer.Option(None, "--probe", help="probe inputs (.safetensors/.npy); default: built-in held-out split"),
    alpha: float = typer.Option(1e-3, "--alpha", help="significance level of the one-sided binomial test"),
    copies: int = typer.Option(16, "--copies", min=1, help="randomly perturbed copies that calibrate the expected disagreement"),
    randomized_rounding: bool = typer.Option(False, "--randomized-rounding", help="also re-round the float weights with keyed stochastic rounding and report it"),
    key_file: Optional[Path] = typer.Option(None, "--key-file", help="secret key for --randomized-rounding (default: fresh random key)"),
    seed: int = typer.Option(0, "--seed"),
    out_dir: Optional[Path] = typer.Option(None, "--out", "-o", help="directory to write divergence.json"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace --out if it exists"),
    identity: Optional[Path] = typer.Option(None, "--identity", help="age identity for an encrypted data file (FILE.age, decrypted in memory)"),
) -> None:
    """Flag float-vs-quantized disagreement beyond the recipe's rounding noise (quantization backdoors).

    Exit code 0: not flagged; 3: flagged; 2: error.
    """
    from ..audits.divergence import (
        divergence_test,
        keyed_randomized_rounding,
        predictions,
    )

    _check_out(out_dir, overwrite)
    for f, flag in ((probe, "--probe"), (quantized, "--quantized"), (key_file, "--key-file"), (identity, "--identity")):
        existing(f, flag)  # before the models load
    handle = _load_float(float_model, weights)
    qm = _load_quantized(quantized, factory, handle, float_model)
    with plaintext_path(probe, identity) as plain:
        x, y = _inputs(handle, plain)
    with RichProgress() as prog:
        res = divergence_test(handle.module, qm.module, x, alpha=alpha, copies=copies, seed=seed,
                              progress=prog("null copies", copies))
    res.update(artifact=str(quantized), recipe=qm.manifest.recipe.name, model=float_model)
    if randomized_rounding:
        key = key_file.read_bytes() if key_file else secrets.token_bytes(32)
        if key_file and len(key) < 16:
            raise SecquantError(f"{key_file}: the key must have at least 16 bytes (e.g. head -c 32 /dev/urandom)")
        rr = keyed_randomized_rounding(qm.module, handle.module, key)
        pf, pq, pr = predictions(handle.module, x), predictions(qm.module, x), predictions(rr, x)
        res["randomized_rounding"] = {
            "key": str(key_file) if key_file else "fresh random 256-bit key (not stored)",
            "disagreement_rate": float((pr != pf).float().mean()),
            "rtn_disagreement_rate": float((pq != pf).float().mean()),
        }
        if y is not None:
            res["randomized_rounding"].update(
                accuracy=float((pr == y).float().mean()), rtn_accuracy=float((pq == y).float().mean()),
                float_accuracy=float((pf == y).float().mean()))
    _emit(res, out_dir, overwrite, "divergence")
    if res["flagged"]:
        err.print(f"flagged: float and quantized predictions diverge beyond rounding noise "
                  f"(p={res['p_value']:.3g}, classes {res['flagged_classes']})", highlight=False, soft_wrap=True)
        raise typer.Exit(EXIT_FLAGGED)
