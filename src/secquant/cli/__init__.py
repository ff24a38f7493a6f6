"""The shell face of secquant (typer). User errors print one line and exit 2, no traceback."""

from __future__ import annotations

import functools
import json
import os
import re
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from ..errors import SecquantError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Quantize PyTorch models securely and privately.")
# Tables stay legible when piped (rich assumes 80 columns off a terminal).
err = Console(stderr=True, width=None if sys.stderr.isatty() else 160)
out = Console(width=None if sys.stdout.isatty() else 160)


MAX_ERROR_CHARS = 400
_CONTROL = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|[\x00-\x1f\x7f-\x9f]")  # ANSI sequences, C0, DEL, C1


def one_line(text: str, limit: int = MAX_ERROR_CHARS) -> str:
    """A message fit for a terminal: no control characters or escape sequences (a file name or manifest
    field can carry them), one line, at most `limit` characters."""
    text = " ".join(_CONTROL.sub(" ", text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def user_errors(fn):
    """Turn SecquantError into `error: ...` on stderr and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except SecquantError as e:
            err.print(f"[bold red]error:[/] {escape(one_line(str(e)))}", highlight=False, markup=True, soft_wrap=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            err.print("interrupted; nothing was written")
            raise typer.Exit(130) from None

    return wrapper


class RichProgress:
    """Adapter from secquant's progress callbacks to one rich progress display on stderr."""

    def __init__(self) -> None:
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), console=err, transient=True)
        self.started = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.started:  # started lazily: an early error prints no empty progress line
            self.progress.stop()
        return False

    def __call__(self, label: str, total: int | None):
        if not self.started:
            self.progress.start()
            self.started = True
        task = self.progress.add_task(label, total=total)
        return lambda n: self.progress.advance(task, n)


@app.command()
@user_errors
def quantize(
    model: str = typer.Argument(..., help="builtin:digits, builtin:minilm, a Hugging Face model dir, or package.module:factory"),
    out: Path = typer.Option(..., "--out", "-o", help="artifact directory to create"),
    preset: Optional[str] = typer.Option(None, "--preset", "-p", help="a named recipe (see `secquant presets`)"),
    recipe: Optional[Path] = typer.Option(None, "--recipe", "-r", help="a recipe file (YAML or JSON)"),
    calib: Optional[str] = typer.Option(None, "--calib", help="calibration data (text for encoders; .safetensors/.npy "
                                                              "tensors; FILE.age is decrypted in memory with "
                                                              "--identity), or 'synthetic' for data-free calibration"),
    weights: Optional[Path] = typer.Option(None, "--weights", help="weights for a factory model (.safetensors)"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace --out if it exists"),
    dp_epsilon: Optional[float] = typer.Option(None, "--dp-epsilon", help="calibrate activation ranges with "
                                                                          "(epsilon, delta)-differential privacy"),
    dp_delta: Optional[float] = typer.Option(None, "--dp-delta", help="DP delta (with --dp-epsilon; default 1e-5; "
                                                                       "must be below 1/n)"),
    identity: Optional[Path] = typer.Option(None, "--identity", help="age identity for an encrypted --calib FILE.age"),
    ask_passphrase: bool = typer.Option(False, "--passphrase", help="prompt for the identity's passphrase"),
    record_source_name: bool = typer.Option(False, "--record-source-name", help="record --calib's file name in the "
                                            "manifest (by default only its hash)"),
) -> None:
    """Quantize MODEL with a preset or recipe and write an artifact directory."""
    from ..api import quantize as _quantize

    if (preset is None) == (recipe is None):
        raise SecquantError("give exactly one of --preset P or --recipe FILE")
    with RichProgress() as prog:
        qm = _quantize(model, recipe if recipe is not None else preset, out=out, calib=calib,
                       weights=str(weights) if weights else None, overwrite=overwrite, progress=prog,
                       dp_epsilon=dp_epsilon, dp_delta=dp_delta, identity=identity,
                       passphrase=_passphrase(ask_passphrase), record_source_name=record_source_name)
    n = len(qm.manifest.layers)
    err.print(f"wrote {out} ({n} layers quantized with {qm.manifest.recipe.name}; calibration data: "
              f"{qm.manifest.calibration.data})")
    _print_privacy(qm)


def _print_privacy(qm) -> None:
    """The privacy ledger in a line per entry, and the private file's commitment key (shown once, stored nowhere)."""
    for e in qm.manifest.privacy.entries:
        if e["epsilon"] == 0:
            err.print(f"privacy: {e['stage']}. {e['statement']}", highlight=False, soft_wrap=True)
            continue
        err.print(f"privacy: spent epsilon={e['epsilon']:g}, delta={e['delta']:g} on about {e['num_samples_dp']} "
                  f"samples (a DP count; {e['stage']})", highlight=False, soft_wrap=True)
    if qm.source_commitment_key:
        err.print(f"commitment key of the private file (kept nowhere; with it you can prove which file this "
                  f"artifact was made from): {qm.source_commitment_key}", highlight=False, soft_wrap=True)


@app.command("eval")
@user_errors
def eval_(
    artifact: Path = typer.Argument(..., help="artifact directory"),
    against: Optional[str] = typer.Option(None, "--against", help="float model to compare with: needed unless the "
                                                                  "artifact was made from a built-in (nothing a "
                                                                  "manifest names is ever imported or opened)"),
    data: Optional[Path] = typer.Option(None, "--data", help="evaluation data (default: the model's built-in held-out data)"),
    weights: Optional[Path] = typer.Option(None, "--weights", help="float weights for a factory model (--factory or "
                                                                   "--against)"),
    factory: Optional[str] = typer.Option(None, "--factory", help="confirm the factory a factory-built artifact names "
                                                                  "(also the float reference, with --weights)"),
    batch_size: int = typer.Option(32, "--batch-size", min=1),
    runtime: str = typer.Option("torch", "--runtime", help="torch (eager PyTorch) or onnx (ONNX Runtime; exports "
                                                           "model.onnx into the artifact if missing)"),
    threads: int = typer.Option(2, "--threads", min=1, help="ONNX Runtime intra-op threads"),
) -> None:
    """Evaluate an artifact against its float model; print one JSON object."""
    from ..api import evaluate, load
    from ..runtime.backend import backend_class

    backend_class(runtime)  # a bad --runtime fails before anything loads
    qm = load(artifact, factory=factory, allow_unsealed=True)  # naming a directory is the opt-in
    with RichProgress() as prog:
        res = evaluate(qm, against=against or factory, data=data, weights=str(weights) if weights else None,
                       batch_size=batch_size, progress=prog, runtime=runtime, threads=threads)
    sys.stdout.write(json.dumps(res) + "\n")


@app.command()
@user_errors
def inspect(
    artifact: Path = typer.Argument(..., help="artifact directory"),
    as_json: bool = typer.Option(False, "--json", help="print the manifest summary as JSON"),
) -> None:
    """Show an artifact's per-layer quantization table."""
    from ..artifact import read_manifest
    from ..artifact.store import describe

    m = read_manifest(Path(artifact))
    rows = describe(m)
    if as_json:
        sys.stdout.write(json.dumps({"model": m.model.spec, "recipe": m.recipe.name, "layers": rows,
                                     "source": m.source.model_dump(), "calibration": m.calibration.model_dump(),
                                     "tuning": m.tuning}) + "\n")
        return
    t = Table(title=f"{artifact}: {m.model.spec}, recipe {m.recipe.name}, calibration: {m.calibration.data}")
    t.add_column("layer", overflow="fold", min_width=12)
    cols = ["type", "shape", "w_bits", "w_format", "w_granularity", "w_range", "w_transform", "a_bits", "a_mode"]
    for c in cols:
        t.add_column(c)
    for r in rows:
        t.add_row(*(str(r[c]) if r[c] is not None else "-" for c in ["layer", *cols]))
    out.print(t)
    if m.tuning:
        out.print(f"tuned: {m.tuning.get('statement', '')}", highlight=False, soft_wrap=True)


@app.command()
@user_errors
def qat(
    model: str = typer.Argument(..., help="a classifier: builtin:digits or package.module:factory (+ --weights)"),
    out: Path = typer.Option(..., "--out", "-o", help="artifact directory to create"),
    epochs: int = typer.Option(..., "--epochs", min=1, help="passes over the training set"),
    preset: Optional[str] = typer.Option(None, "--preset", "-p", help="a named recipe, e.g. w4a4 or w2a8"),
    recipe: Optional[Path] = typer.Option(None, "--recipe", "-r", help="a recipe file (YAML or JSON)"),
    lr: float = typer.Option(1e-3, "--lr", help="Adam learning rate (weights and step sizes)"),
    train: Optional[Path] = typer.Option(None, "--train", help="training data: .safetensors with 'inputs' and 'labels'"),
    calib: Optional[Path] = typer.Option(None, "--calib", help="data to initialize activation ranges (default: the "
                                         "training set; with --dp-epsilon: public data sharing no sample with the "
                                         "training set (checked), default ZeroQ synthetic inputs)"),
    checkpoints: Optional[Path] = typer.Option(None, "--checkpoints", help="write a safetensors checkpoint per epoch here"),
    weights: Optional[Path] = typer.Option(None, "--weights", help="weights for a factory model (.safetensors)"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace --out if it exists"),
    dp_epsilon: Optional[float] = typer.Option(None, "--dp-epsilon", help="retrain under DP-SGD (Opacus), spending at most this epsilon on the training set"),
    dp_delta: Optional[float] = typer.Option(None, "--dp-delta", help="DP delta (default 1e-5; must be below 1/n)"),
    max_grad_norm: float = typer.Option(1.0, "--max-grad-norm", help="DP-SGD per-sample gradient clipping norm"),
    seed: Optional[int] = typer.Option(None, "--seed", help="seed of a reproducible non-private run (default 0); "
                                       "refused with --dp-epsilon, whose runs must not be replayable"),
    record_source_name: bool = typer.Option(False, "--record-source-name", help="record --train's file name in the "
                                            "manifest (by default only its hash)"),
) -> None:
    """Quantization-aware retraining (learned step sizes) of a classifier; writes an artifact."""
    from ..api import evaluate
    from ..api import qat as _qat

    if (preset is None) == (recipe is None):
        raise SecquantError("give exactly one of --preset P or --recipe FILE")
    with RichProgress() as prog:
        qm = _qat(model, recipe if recipe is not None else preset, epochs=epochs, out=out, lr=lr, train=train,
                  calib=calib, checkpoint_dir=checkpoints, weights=str(weights) if weights else None,
                  overwrite=overwrite, progress=prog, dp_epsilon=dp_epsilon, dp_delta=dp_delta,
                  max_grad_norm=max_grad_norm, seed=seed, record_source_name=record_source_name)
        res = evaluate(qm, progress=prog) if model.startswith("builtin:") else None
    _print_privacy(qm)
    summary = {"artifact": str(out), "recipe": qm.manifest.recipe.name, "training": qm.manifest.training}
    if res:
        summary.update({k: res[k] for k in ("metric", "value", "float_value", "size_bytes", "size_ratio")})
    sys.stdout.write(json.dumps(summary) + "\n")


MIN_RELEASE_HELP = ("refuse a sealed model whose signed release number is below this (or that has none): "
                    "no rollback to an older release")


def describe_release(opened) -> str:
    """'release N (sealed T)' for an opened artifact directory or a loaded model (QuantizedModel)."""
    from ..security import read_release

    rel = read_release(opened) if isinstance(opened, (str, Path)) else getattr(opened, "release", None)
    return rel.describe() if rel is not None else "no release number"


def _passphrase(ask: bool, confirm: bool = False) -> str | None:
    """From $SECQUANT_PASSPHRASE, or prompted (hidden) when asked for."""
    env = os.environ.get("SECQUANT_PASSPHRASE")
    if env:
        return env
    if ask:
        return typer.prompt("passphrase", hide_input=True, confirmation_prompt=confirm)
    return None


@app.command()
@user_errors
def keygen(
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="key name prefix: writes NAME.key, NAME.pub, NAME.sign.key, NAME.sign.pub"),
    passphrase: bool = typer.Option(False, "--passphrase", help="protect the private keys with a passphrase (prompted, or $SECQUANT_PASSPHRASE)"),
    reprotect: Optional[Path] = typer.Option(None, "--reprotect", help="instead: re-encrypt this existing signing key "
                                             "(NAME.sign.key) in place with scrypt, at its identity's cost"),
) -> None:
    """Create an age X25519 identity (decryption) and a P-256 signing key pair (model-signing)."""
    from ..security import keygen as _keygen
    from ..security import reprotect_sign_key

    if (out is None) == (reprotect is None):
        raise SecquantError("give --out NAME to create keys, or --reprotect NAME.sign.key to re-protect one")
    if reprotect is not None:
        prot = reprotect_sign_key(reprotect, _passphrase(True, confirm=True))
        err.print(f"re-protected {reprotect} with scrypt (N=2^{prot.log_n}, r={prot.r}, p={prot.p}); its public key "
                  "is unchanged", highlight=False, soft_wrap=True)
        return
    files = _keygen(out, _passphrase(passphrase, confirm=True))
    recipient = files.recipient.read_text().strip()
    err.print(f"wrote {files.identity} and {files.sign_key} (mode 0600), {files.recipient}, {files.verify_key}",
              highlight=False, soft_wrap=True)
    sys.stdout.write(recipient + "\n")


@app.command()
@user_errors
def seal(
    artifact: Path = typer.Argument(..., help="artifact directory"),
    to: list[str] = typer.Option(..., "--to", help="age recipient (age1...) or a .pub file; repeat for several"),
    sign_key: Path = typer.Option(..., "--sign-key", help="P-256 PEM private key (NAME.sign.key)"),
    out: Path = typer.Option(..., "--out", "-o", help="sealed file to write"),
    passphrase: bool = typer.Option(False, "--passphrase", help="the signing key is passphrase-protected"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace --out if it exists"),
    release: Optional[int] = typer.Option(None, "--release", min=0, help="release number, signed with the model "
                                          "(default: the UTC time in seconds); receivers refuse older ones with "
                                          "--min-release"),
) -> None:
    """Sign the artifact (OpenSSF model-signing) and encrypt it to the recipients (age)."""
    from ..security import seal as _seal
    from ..security.release import new_release

    number = new_release(release).release  # the default (UTC seconds) fixed here, to be reported
    _seal(artifact, to, sign_key, out, _passphrase(passphrase), overwrite, release=number)
    err.print(f"sealed {artifact} -> {out} for {len(to)} recipient(s), release {number}", highlight=False,
              soft_wrap=True)


@app.command("open")
@user_errors
def open_(
    sealed: Path = typer.Argument(..., help="sealed file"),
    identity: Path = typer.Option(..., "--identity", help="age identity file (NAME.key)"),
    verify_key: Path = typer.Option(..., "--verify-key", help="signer's public key (NAME.sign.pub)"),
    out: Path = typer.Option(..., "--out", "-o", help="artifact directory to create"),
    passphrase: bool = typer.Option(False, "--passphrase", help="the identity is passphrase-protected"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace --out if it exists"),
    min_release: Optional[int] = typer.Option(None, "--min-release", min=0, help=MIN_RELEASE_HELP),
) -> None:
    """Decrypt a sealed model, verify its signature and hashes, and write the artifact directory."""
    from ..security import open_sealed

    open_sealed(sealed, identity, verify_key, out, _passphrase(passphrase), overwrite, min_release=min_release)
    err.print(f"opened and verified {sealed} -> {out} ({describe_release(out)})", highlight=False, soft_wrap=True)


@app.command()
@user_errors
def reseal(
    sealed: Path = typer.Argument(..., help="sealed file"),
    identity: Path = typer.Option(..., "--identity", help="an age identity the file is sealed to"),
    to: list[str] = typer.Option(..., "--to", help="the NEW complete recipient list (age1... or .pub files)"),
    out: Path = typer.Option(..., "--out", "-o", help="resealed file to write"),
    passphrase: bool = typer.Option(False, "--passphrase", help="the identity is passphrase-protected"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace --out if it exists"),
) -> None:
    """Change who can open a sealed model (add, remove, rotate) without writing the plaintext."""
    from ..security import reseal as _reseal

    _reseal(sealed, identity, to, out, _passphrase(passphrase), overwrite)
    err.print(f"resealed {sealed} -> {out} for {len(to)} recipient(s)", highlight=False, soft_wrap=True)


def parse_size(text: str) -> int:
    """'5MB', '800kB', '123456' -> bytes (decimal units)."""
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    t = text.strip().upper()
    num = t.rstrip("KMGIB")
    unit = t[len(num):]
    try:
        value = float(num)
    except ValueError:
        raise SecquantError(f"--size-budget {text!r}: give bytes, e.g. 5MB, 800kB or 123456") from None
    if unit not in units or value <= 0:
        raise SecquantError(f"--size-budget {text!r}: give bytes, e.g. 5MB, 800kB or 123456")
    return int(value * units[unit])


@app.command()
@user_errors
def tune(
    model: str = typer.Argument(..., help="builtin:digits, builtin:minilm, a Hugging Face model dir, ..."),
    out: Path = typer.Option(..., "--out", "-o", help="artifact directory for the best model found"),
    max_drop: float = typer.Option(..., "--max-drop", help="tolerated metric drop: accuracy points, or mean cosine"),
    metric: Optional[str] = typer.Option(None, "--metric", help="accuracy (classifiers) or cosine (encoders)"),
    size_budget: Optional[str] = typer.Option(None, "--size-budget", help="largest model.safetensors, e.g. 5MB"),
    time_budget: Optional[float] = typer.Option(None, "--time-budget", help="seconds for the search"),
    data: Optional[Path] = typer.Option(None, "--data", help="evaluation data (default: built-in held-out data)"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace --out if it exists"),
) -> None:
    """Search bits per layer for the smallest model within --max-drop; always saves the best found.

    Exit code 0 when the goal was met, 3 when it was not (the best model is saved anyway).
    """
    from ..tuning import tune as _tune

    budget = parse_size(size_budget) if size_budget else None
    with RichProgress() as prog:
        res = _tune(model, max_drop=max_drop, metric=metric, size_budget=budget, time_budget=time_budget,
                    data=data, out=out, overwrite=overwrite, progress=prog,
                    log=lambda s: err.print(s, highlight=False, soft_wrap=True))
    sys.stdout.write(json.dumps(res.summary) + "\n")
    if not res.goal_met:
        raise typer.Exit(3)


@app.command()
def presets() -> None:
    """List the built-in presets."""
    from ..recipes import PRESETS

    t = Table(title="presets")
    t.add_column("name")
    t.add_column("description")
    for name, r in PRESETS.items():
        t.add_row(name, r.description)
    out.print(t)


@app.command()
@user_errors
def demo(
    out_dir: Path = typer.Option(Path("secquant-demo"), "--out", help="where to write artifacts and the report"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace --out if it exists"),
    model: Optional[list[str]] = typer.Option(None, "--model", help="restrict to these built-ins"),
    preset: Optional[list[str]] = typer.Option(None, "--preset", help="restrict to these presets"),
    privacy: bool = typer.Option(True, "--privacy/--no-privacy", help="add the privacy part: DP calibration, "
                                                                       "PII masking, membership-inference audit"),
    private_inference: bool = typer.Option(True, "--private-inference/--no-private-inference",
                                           help="run digits-w8a8 secret-shared among 3 local parties (MPyC)"),
) -> None:
    """Quantize the built-in models with several presets, evaluate them (PyTorch and ONNX Runtime) and write a report."""
    from ..demo import run_demo

    with RichProgress() as prog:
        report = run_demo(out_dir, overwrite, model or None, preset or None, progress=prog,
                          log=lambda s: err.print(s, highlight=False, soft_wrap=True), privacy=privacy,
                          private_inference=private_inference)
    onnx_ms = {(s["model"], s["recipe"]): s["latency_ms"] for s in report["speed"]}
    t = Table(title=f"secquant demo ({out_dir}/report.html)")
    for c in ["model", "preset", "data", "metric", "value", "fp32", "size ratio", "ORT ms", "fp32 torch ms"]:
        t.add_column(c)
    for r in report["results"]:
        ort_ms = onnx_ms.get((r["model"], r["recipe"]))
        t.add_row(r["model"], r["recipe"], r["calibration_data"], r["metric"], f"{r['value']:.4f}",
                  f"{r['float_value']:.4f}", f"{r['size_ratio']:.3f}", f"{ort_ms:.1f}" if ort_ms else "",
                  f"{r['float_latency_ms']:.1f}")
    out.print(t)


# Command groups that live in their own modules (cli/<area>.py, each with `register(app, audit)`).
audit = typer.Typer(no_args_is_help=True, help="Audit models: privacy leakage, robustness, quantization divergence.")
app.add_typer(audit, name="audit")
_COMMAND_MODULES = ("export", "integrity", "mask", "membership", "private", "robustness", "server", "watermark")


def _register_all() -> None:
    import importlib

    for name in _COMMAND_MODULES:
        importlib.import_module(f"{__name__}.{name}").register(app, audit)


_register_all()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
