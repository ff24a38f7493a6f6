"""CLI commands: server (registered by secquant.cli)."""

from __future__ import annotations

import typer


def register(app: typer.Typer, audit: typer.Typer) -> None:
    """Add this module's commands to the main app (and the `audit` group)."""
