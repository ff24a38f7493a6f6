"""CLI commands: private-eval, private-serve, private-query (secret-shared inference among 3 parties)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

from .common import err, factory_option, user_errors


def _query_inputs(index: Optional[list[int]], inputs: Optional[Path], sample_shape: list[int]):
    """The client's samples: built-in digits test images by index, or a tensor file."""
    from ..errors import SecquantError

    if (index is None) == (inputs is None):
        raise SecquantError("give --index I (built-in digits test images) or --input FILE (.safetensors/.npy)")
    if inputs is not None:
        from ..models.data import input_tensor, read_tensors

        return input_tensor(read_tensors(inputs), inputs, tuple(sample_shape)), None
    from ..models.digits import splits

    d = splits()
    n = len(d["test_x"])
    bad = [i for i in index if not 0 <= i < n]
    if bad:
        raise SecquantError(f"--index {bad[0]} is out of range: the digits test split has {n} images (0..{n - 1})")
    return d["test_x"][index], d["test_y"][index]


def _loaded(artifact: Path, factory: str | None):
    """The artifact directory, or (a factory-built one, with --factory) the model rebuilt by that factory."""
    if factory is None:
        return artifact
    from ..api import load

    return load(artifact, factory=factory, allow_unsealed=True)  # naming a directory is the opt-in


app = typer.Typer()


@app.command("private-eval")
@user_errors
def private_eval(
    artifact: Path = typer.Argument(..., help="artifact directory (a classifier with static integer activations)"),
    parties: int = typer.Option(3, "--parties", help="number of parties (3: Shamir, threshold 1)"),
    samples: int = typer.Option(10, "--samples", help="held-out inputs to run (1..256, one secure session)"),
    data: Optional[Path] = typer.Option(None, "--data", help="evaluation data (default: built-in held-out set)"),
    precision_bits: int = typer.Option(24, "--precision-bits", help="bits of each requantization multiplier"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
    factory: Optional[str] = factory_option(),
) -> None:
    """Run held-out inputs through the model secret-shared among 3 local parties (MPyC) and compare with
    the plaintext quantized model."""
    from ..runtime.private import private_evaluate

    res = private_evaluate(_loaded(artifact, factory), samples=samples, parties=parties, data=data,
                           precision_bits=precision_bits, log=lambda s: err.print(s, highlight=False, soft_wrap=True))
    if as_json:
        sys.stdout.write(json.dumps(res) + "\n")
        return
    for k in ("agreement", "accuracy", "plain_accuracy", "bit_exact", "seconds_per_sample", "bytes_per_sample",
              "p_bits", "engine", "protocol"):
        v = res[k]
        sys.stdout.write(f"{k}: {v:.4g}\n" if isinstance(v, float) else f"{k}: {v}\n")

@app.command("private-serve")
@user_errors
def private_serve(
    artifact: Path = typer.Argument(..., help="artifact directory"),
    bundle: Path = typer.Option(..., "--bundle", help="directory to write for the client (public program, "
                                                      "peers, the client's TLS key and certificate)"),
    base_port: int = typer.Option(11365, "--base-port", help="party i listens on base-port + i"),
    sessions: int = typer.Option(0, "--sessions", min=0, help="stop after this many queries (0: never)"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace --bundle if it exists"),
    precision_bits: int = typer.Option(24, "--precision-bits", help="bits of each requantization multiplier"),
    factory: Optional[str] = factory_option(),
) -> None:
    """Run the model owner (party 1) and helper (party 2) as processes on 127.0.0.1; clients use the bundle."""
    from ..runtime.private import PrivateBackend
    from ..runtime.private.serve import prepare_service, serve

    backend = PrivateBackend.load(_loaded(artifact, factory), precision_bits)
    server, peers = prepare_service(backend.program, bundle, base_port=base_port, overwrite=overwrite)
    err.print(f"wrote the client bundle {bundle} (give it to the client; it holds no weight)",
              highlight=False, soft_wrap=True)
    try:
        serve(server, peers, sessions, log=lambda s: err.print(s, highlight=False, soft_wrap=True))
    except KeyboardInterrupt:
        err.print("stopped")

@app.command("private-query")
@user_errors
def private_query(
    bundle: Path = typer.Option(..., "--bundle", help="the client bundle from `secquant private-serve`"),
    index: Optional[list[int]] = typer.Option(None, "--index", help="built-in digits test image(s) to classify"),
    inputs: Optional[Path] = typer.Option(None, "--input", help="inputs file (.safetensors 'inputs' or .npy)"),
    timeout: float = typer.Option(300.0, "--timeout", help="seconds to wait for the servers"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
) -> None:
    """Classify inputs without revealing them: this process is party 0 and learns only the labels."""
    from ..errors import SecquantError
    from ..runtime.private.serve import query

    try:
        shape = json.loads((bundle / "public.json").read_text())["input"]["sample_shape"]
    except (OSError, ValueError, KeyError):
        raise SecquantError(f"{bundle} is not a client bundle written by `secquant private-serve`") from None
    x, y = _query_inputs(index, inputs, shape)
    res = query(bundle, x, timeout)
    out = {"labels": res["labels"], "seconds": res["seconds"], "bytes_sent": res["bytes_sent"]}
    if y is not None:
        out["true_labels"] = [int(v) for v in y]
    if as_json:
        sys.stdout.write(json.dumps(out) + "\n")
    else:
        sys.stdout.write(" ".join(str(v) for v in res["labels"]) + "\n")
