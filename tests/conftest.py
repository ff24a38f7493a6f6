"""Shared fixtures for the secquant test-suite.

* The built-in digits CNN is trained once per session into a session temp dir
  (``SECQUANT_CACHE``), never into the user's cache.
* Torch runs single-threaded: on a small, shared 2-core machine the default
  intra-op thread pool makes a tiny CNN forward ~100x slower (thread contention),
  which would blow the test time budget. Results do not depend on it.
* ``tests/models`` is put on ``sys.path`` so ``tiny_factory:tiny`` resolves as a
  ``package.module:factory`` spec, in process and in ``secquant`` subprocesses.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]) if os.environ["OMP_NUM_THREADS"].isdigit() else 1)

REPO = Path(__file__).resolve().parents[1]
TESTS = REPO / "tests"
MODELS_TESTS = TESTS / "models"
SECQUANT_BIN = REPO / ".venv" / "bin" / "secquant"
PRESET_NAMES = ["w8a8", "w8a8-dynamic", "w8a16", "w4a16", "w4a8-dynamic"]

if str(MODELS_TESTS) not in sys.path:
    sys.path.insert(0, str(MODELS_TESTS))

# One cache per test session, set before any test (or fixture) can train the digits CNN.
_SESSION_CACHE = Path(tempfile.mkdtemp(prefix="secquant-test-cache-"))
os.environ["SECQUANT_CACHE"] = str(_SESSION_CACHE)


def pytest_unconfigure(config):  # noqa: D103 - pytest hook
    shutil.rmtree(_SESSION_CACHE, ignore_errors=True)


@pytest.fixture(scope="session")
def secquant_cache() -> Path:
    """The session's SECQUANT_CACHE directory."""
    assert os.environ["SECQUANT_CACHE"] == str(_SESSION_CACHE)
    return _SESSION_CACHE


@pytest.fixture(scope="session")
def digits(secquant_cache):
    """A loaded `builtin:digits` handle (trained once per session). Do not mutate its module."""
    from secquant.models import load_model

    return load_model("builtin:digits")


@pytest.fixture(scope="session")
def minilm():
    """A loaded `builtin:minilm` handle. Slow: use sparingly."""
    from secquant.models import load_model

    return load_model("builtin:minilm")


@pytest.fixture(scope="session")
def digits_artifact(digits, tmp_path_factory) -> Callable[[str], Path]:
    """preset -> a saved builtin:digits artifact directory (made once per session; copy before mutating)."""
    import secquant

    root = tmp_path_factory.mktemp("digits-artifacts")
    made: dict[str, Path] = {}

    def get(preset: str) -> Path:
        if preset not in made:
            secquant.quantize(digits, preset, out=root / preset)
            made[preset] = root / preset
        return made[preset]

    return get


@pytest.fixture(scope="session")
def minilm_artifact(minilm, tmp_path_factory):
    """(artifact dir, in-memory QuantizedModel) for builtin:minilm quantized with w8a16."""
    import secquant

    out = tmp_path_factory.mktemp("minilm-artifact") / "minilm-w8a16"
    qm = secquant.quantize(minilm, "w8a16", out=out)
    return out, qm


@pytest.fixture(scope="session")
def sentences_file(tmp_path_factory) -> Path:
    """16 short sentences, one per line (a small --data / --calib file for the encoder)."""
    lines = [
        "The cat sat on the mat.", "A quick brown fox jumps over the lazy dog.",
        "Quantization shrinks neural networks.", "It is raining in Paris today.",
        "She plays the violin every evening.", "The stock market fell sharply on Monday.",
        "Water boils at one hundred degrees Celsius.", "He forgot his umbrella at the office.",
        "Machine learning models need data.", "The train to Berlin leaves at nine.",
        "Fresh bread smells wonderful.", "Our team won the football match.",
        "The library opens early on weekends.", "Mount Everest is the highest mountain.",
        "Please close the window, it is cold.", "Bees make honey from flower nectar.",
    ]
    p = tmp_path_factory.mktemp("text") / "sentences.txt"
    p.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return p


@pytest.fixture
def cli():
    """Invoke the typer app in process; returns a click Result with .exit_code, .stdout, .stderr."""
    from typer.testing import CliRunner

    from secquant.cli import app

    runner = CliRunner()

    def invoke(*args: str | os.PathLike):
        return runner.invoke(app, [str(a) for a in args])

    return invoke


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(MODELS_TESTS)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.setdefault("COLUMNS", "200")
    return env


@pytest.fixture
def secquant_proc():
    """Run the installed `secquant` console script; returns CompletedProcess (text)."""

    def run(*args: str | os.PathLike, cwd: Path | None = None, env: dict[str, str] | None = None,
            timeout: float = 120):
        e = subprocess_env()
        if env:
            e.update(env)
        return subprocess.run([str(SECQUANT_BIN), *[str(a) for a in args]], capture_output=True, text=True,
                              cwd=cwd or REPO, env=e, timeout=timeout)

    return run


def leftovers(out: Path) -> list[str]:
    """Names next to `out` that look like secquant temp dirs for it (`.NAME.tmp-*`, `.NAME.old-*`)."""
    parent = Path(out).parent
    if not parent.exists():
        return []
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{Path(out).name}."))


@pytest.fixture
def assert_user_error():
    """Check a CLI failure: exit 2, exactly one non-blank stderr line starting with 'error:', no traceback,
    nothing (half-)written at `out` unless it existed before."""

    def check(result, out: Path | None = None, *, existed: bool = False, contains: tuple[str, ...] = (),
              progress_log: bool = False):
        code = getattr(result, "exit_code", None)
        if code is None:
            code = result.returncode
        stderr = result.stderr
        assert code == 2, f"exit code {code}, stderr:\n{stderr}\nexception: {getattr(result, 'exception', None)!r}"
        if hasattr(result, "exception") and result.exception is not None:
            assert isinstance(result.exception, SystemExit), repr(result.exception)
        assert "Traceback" not in stderr and "Traceback" not in result.stdout, stderr
        lines = [ln for ln in stderr.splitlines() if ln.strip()]
        if progress_log:  # commands that log progress lines (demo) before failing: the error is the last line
            assert sum(ln.startswith("error:") for ln in lines) == 1, stderr
            lines = lines[-1:]
        assert len(lines) == 1, f"expected one error line on stderr, got {len(lines)}:\n{stderr}"
        assert lines[0].startswith("error:"), stderr
        for c in contains:
            assert c.lower() in lines[0].lower(), f"{c!r} not in {lines[0]!r}"
        if out is not None:
            if not existed:
                assert not Path(out).exists(), f"{out} was (half-)written"
            assert leftovers(out) == [], f"temp dirs left next to {out}: {leftovers(out)}"
        return lines[0]

    return check
