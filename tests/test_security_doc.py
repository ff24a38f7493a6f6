"""SECURITY.md names, for each threat, the test that shows its defence: every test it names must exist."""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def named_tests() -> list[tuple[str, str | None]]:
    """(file, test name or None) for every test SECURITY.md cites; `::name` after a file continues that file."""
    text = (REPO / "SECURITY.md").read_text(encoding="utf-8")
    out, current = [], None
    for m in re.finditer(r"`(tests/[\w/]+\.py)?(::[\w\[\]-]+)?`|, `::([\w\[\]-]+)`", text):
        path, name, cont = m.group(1), m.group(2), m.group(3)
        if path:
            current = path
            out.append((path, name[2:] if name else None))
        elif (name or cont) and current:
            out.append((current, (name[2:] if name else cont)))
    return out


def test_every_test_security_md_names_exists():
    cited = named_tests()
    assert len(cited) > 50  # the parser found the table
    missing = []
    for path, name in cited:
        p = REPO / path
        if not p.is_file():
            missing.append(path)
            continue
        if name:
            base = name.split("[")[0]
            defs = {n.name for n in ast.walk(ast.parse(p.read_text(encoding="utf-8")))
                    if isinstance(n, ast.FunctionDef)}
            if base not in defs:
                missing.append(f"{path}::{name}")
    assert missing == []
