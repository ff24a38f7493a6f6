"""The shell face of secquant (typer). User errors print one line and exit 2, no traceback.

One Typer app per area (cli/<area>.py, each `app = typer.Typer()` with its commands; the `audit` group
gathers the audit modules' `audit` apps); shared helpers live in cli/common.py.
"""

from __future__ import annotations

import typer

from . import (evaluate, export, generate, integrity, mask, membership, private, quantize, robustness, sealing, server,
               watermark)

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Quantize PyTorch models securely and privately.")
for area in (quantize, evaluate, generate, sealing, export, integrity, mask, private, server, watermark):
    app.add_typer(area.app)
audit = typer.Typer(no_args_is_help=True, help="Audit models: privacy leakage, robustness, quantization divergence.")
for area in (membership, robustness):
    audit.add_typer(area.audit)
app.add_typer(audit, name="audit")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
