"""Nothing named by an artifact's manifest is ever imported or called (issue 13, item 1).

The hostile artifacts are ordinary digits artifacts whose `secquant.json` an attacker rewrote
(an unsealed directory carries no signature, so that costs nothing). The probe module, when
imported, writes a marker file: if any face of secquant imports it, the marker appears.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import secquant
from secquant.errors import ArtifactError, ModelError

PROBE = "sq_hostile_probe"


def _probe_dir(root: Path) -> tuple[Path, Path]:
    """A directory holding an importable probe module, and the marker it writes when imported."""
    d = root / "probe"
    d.mkdir()
    marker = root / "IMPORTED"
    (d / f"{PROBE}.py").write_text(textwrap.dedent(f"""
        from pathlib import Path
        Path({str(marker)!r}).write_text("imported")
        def run():
            Path({str(marker)!r}).write_text("called")
    """))
    return d, marker


def _hostile(src: Path, dst: Path, spec: str, rebuild: dict | None = None, extra: dict[str, str] | None = None) -> Path:
    """A copy of the artifact `src` whose manifest names `spec` (and optionally other files, listed and hashed)."""
    shutil.copytree(src, dst)
    m = json.loads((dst / "secquant.json").read_text())
    m["model"]["spec"] = spec
    if rebuild is not None:
        m["model"]["rebuild"] = rebuild
    for name, text in (extra or {}).items():
        (dst / name).write_text(text)
        m["files"][name] = hashlib.sha256(text.encode()).hexdigest()
    (dst / "secquant.json").write_text(json.dumps(m))
    return dst


@pytest.fixture
def probe(tmp_path, monkeypatch):
    d, marker = _probe_dir(tmp_path)
    monkeypatch.syspath_prepend(str(d))
    sys.modules.pop(PROBE, None)
    yield d, marker
    sys.modules.pop(PROBE, None)


def test_builtin_loader_with_a_module_spec_is_not_imported(digits_artifact, tmp_path, probe):
    _, marker = probe
    art = _hostile(digits_artifact("w8a16"), tmp_path / "a", f"{PROBE}:run")
    qm = secquant.load(art, allow_unsealed=True)  # the architecture comes from the fixed built-in table
    with pytest.raises(ModelError, match="not a built-in"):
        secquant.evaluate(qm)
    assert not marker.exists() and PROBE not in sys.modules


def test_os_abort_spec_is_a_clean_refusal(digits_artifact, tmp_path, secquant_proc, assert_user_error):
    art = _hostile(digits_artifact("w8a16"), tmp_path / "a", "os:abort")
    r = secquant_proc("eval", art)
    assert r.returncode != -6 and r.returncode != 134, "os.abort ran"
    assert_user_error(r, contains=("not a built-in", "--against"))


def test_factory_named_by_the_manifest_needs_the_users_confirmation(digits_artifact, tmp_path, probe):
    _, marker = probe
    art = _hostile(digits_artifact("w8a16"), tmp_path / "a", f"{PROBE}:run",
                   rebuild={"loader": "factory", "factory": f"{PROBE}:run", "sample_shape": [1, 8, 8]})
    with pytest.raises(ArtifactError, match="--factory"):
        secquant.load(art, allow_unsealed=True)
    assert not marker.exists()


def test_payload_shipped_inside_the_artifact_is_refused(digits_artifact, tmp_path, secquant_proc, assert_user_error):
    """A `payload.py` listed and hashed in the manifest: refused before anything could import it, even with the
    artifact directory as the working directory (on sys.path for `python -m`)."""
    marker = tmp_path / "PAYLOAD-RAN"
    art = _hostile(digits_artifact("w8a16"), tmp_path / "a", "payload:run",
                   extra={"payload.py": f"open({str(marker)!r}, 'w').write('ran')\ndef run():\n    pass\n"})
    with pytest.raises(ArtifactError, match="payload.py"):
        secquant.load(art, allow_unsealed=True)
    r = subprocess.run([sys.executable, "-m", "secquant", "eval", "."], cwd=art, capture_output=True, text=True,
                       timeout=120)
    assert_user_error(r, contains=("payload.py",))
    assert not marker.exists()


def test_every_face_that_rebuilds_models_leaves_the_probe_alone(digits_artifact, tmp_path, cli):
    """eval, export, integrity, watermark verify and the audits on an artifact naming the probe: none imports it.
    (Run in one subprocess, so a face that did run it could not take the test process down.)"""
    d, marker = _probe_dir(tmp_path)
    art = _hostile(digits_artifact("w8a16"), tmp_path / "a", f"{PROBE}:run")
    script = textwrap.dedent(f"""
        import json, sys
        sys.path.insert(0, {str(d)!r})
        from typer.testing import CliRunner
        from secquant.cli import app
        runner = CliRunner()
        art = {str(art)!r}
        codes = {{}}
        for name, args in {{
            "eval": ["eval", art],
            "export": ["export", art],
            "watermark": ["watermark", "verify", art, "--key", {str(tmp_path / "no.wm")!r}],
            "bitflip": ["audit", "bitflip", art, "--max-flips", "1"],
            "divergence": ["audit", "divergence", "--float", "builtin:digits", "--quantized", art],
        }}.items():
            codes[name] = runner.invoke(app, args).exit_code
        print(json.dumps(codes))
        print("PROBE-IMPORTED" if {PROBE!r} in sys.modules else "probe-absent")
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "probe-absent" in r.stdout and not marker.exists(), r.stdout
    codes = json.loads(r.stdout.splitlines()[-2])
    assert codes["eval"] == 2  # refused: the source is not a built-in and no --against was given


def test_explicit_against_must_be_the_source(digits_artifact, tmp_path):
    """A float model the user names whose weights differ from the manifest's source is a refusal."""
    import torch
    from safetensors.torch import save_file

    from tiny_factory import tiny

    qm = secquant.load(digits_artifact("w8a16"), allow_unsealed=True)
    other = secquant.models.load_model("builtin:digits").module
    bumped = {k: v.clone() for k, v in other.state_dict().items()}
    first = next(iter(bumped))
    bumped[first] = bumped[first] + 1e-3
    other.load_state_dict(bumped)
    with pytest.raises(ModelError, match="not the float model"):
        secquant.evaluate(qm, against=other)
    save_file({k: v.contiguous() for k, v in tiny().state_dict().items()}, str(tmp_path / "w.safetensors"))
    with pytest.raises(ModelError, match="not the float model"):
        secquant.evaluate(qm, against="tiny_factory:tiny", weights=str(tmp_path / "w.safetensors"))
    assert torch.isfinite(torch.tensor(secquant.evaluate(qm, against="builtin:digits")["value"]))


def test_audits_refuse_a_float_model_that_is_not_the_source(tmp_path, cli, assert_user_error):
    """robustness and divergence audits compare an artifact with the float model the user names: it must be
    the one the artifact was made from."""
    import torch
    from safetensors.torch import save_file

    from tiny_factory import tiny

    for name, seed in (("a", 0), ("b", 1)):
        torch.manual_seed(seed)
        save_file({k: v.contiguous() for k, v in tiny().state_dict().items()}, str(tmp_path / f"{name}.safetensors"))
    art = tmp_path / "art"
    secquant.quantize("tiny_factory:tiny", "w8a16", weights=str(tmp_path / "a.safetensors"), out=art)
    common = ["--float", "tiny_factory:tiny", "--weights", tmp_path / "b.safetensors", "--quantized", art,
              "--factory", "tiny_factory:tiny"]
    save_file({"inputs": torch.rand(4, 6), "labels": torch.zeros(4, dtype=torch.long)}, str(tmp_path / "d.safetensors"))
    for cmd in (["audit", "robustness", *common, "--data", tmp_path / "d.safetensors"],
                ["audit", "divergence", *common]):
        assert_user_error(cli(*cmd), contains=("not the float model",))
