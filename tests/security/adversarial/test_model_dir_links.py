"""A third-party model directory cannot make secquant copy other files of this machine into an artifact
(issue 13, item 3): side files that link out of the directory, or are not regular files, are refused by name."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

import secquant
from secquant.errors import ArtifactError, UnsafeInputError


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=True)
    return dst


def test_link_to_a_secret_outside_is_refused_and_nothing_is_written(tiny_bert, tmp_path, secquant_proc,
                                                                    assert_user_error):
    secret = tmp_path / "SECRET.txt"
    secret.write_text("AWS_SECRET_ACCESS_KEY=do-not-ship-me\n")
    repo = _copy(tiny_bert, tmp_path / "repo")
    os.symlink(secret, repo / "merges.txt")
    with pytest.raises(UnsafeInputError, match="merges.txt"):
        secquant.quantize(str(repo), "w8a16", out=tmp_path / "api-out")
    assert not (tmp_path / "api-out").exists()
    out = tmp_path / "cli-out"
    r = secquant_proc("quantize", repo, "--preset", "w8a16", "--out", out)
    assert_user_error(r, out, contains=("merges.txt", "outside"))


@pytest.mark.parametrize("name", ["vocab.txt", "config.json", "model.safetensors", "1_Pooling/config.json"])
def test_any_side_file_linking_out_is_refused(tiny_bert, tmp_path, name):
    """Linked files and linked folders alike (a link to a directory outside holding a file of the right name)."""
    outside = tmp_path / "outside"
    outside.mkdir()
    repo = _copy(tiny_bert, tmp_path / "repo")
    if "/" in name:
        folder, base = name.split("/")
        (outside / base).write_text("{}")
        os.symlink(outside, repo / folder)
    else:
        shutil.move(repo / name, outside / name)
        os.symlink(outside / name, repo / name)
    with pytest.raises(UnsafeInputError, match=name.split("/")[-1]):
        secquant.models.load_model(str(repo))


def test_fifo_in_place_of_a_side_file_is_refused(tiny_bert, tmp_path):
    repo = _copy(tiny_bert, tmp_path / "repo")
    os.mkfifo(repo / "merges.txt")
    with pytest.raises(UnsafeInputError, match="not a regular file"):
        secquant.models.load_model(str(repo))


def test_links_inside_the_directory_and_hf_cache_blobs_are_fine(tiny_bert, tmp_path):
    # a link to another file of the same repository
    repo = _copy(tiny_bert, tmp_path / "repo")
    (repo / "vocab.txt").rename(repo / "vocab.real")
    os.symlink("vocab.real", repo / "vocab.txt")
    assert secquant.models.load_model(str(repo)).arch_files["vocab.txt"] == repo / "vocab.txt"
    # the Hugging Face cache layout: snapshots/REV/<file> -> ../../blobs/<hash>
    root = tmp_path / "hub" / "models--org--tiny"
    snap, blobs = root / "snapshots" / "abc123", root / "blobs"
    snap.mkdir(parents=True)
    blobs.mkdir()
    for i, p in enumerate(sorted(tiny_bert.iterdir())):
        shutil.copyfile(p, blobs / f"blob{i}")
        os.symlink(Path("../../blobs") / f"blob{i}", snap / p.name)
    h = secquant.models.load_model(str(snap))
    qm = secquant.quantize(h, "w8a16", out=tmp_path / "art")
    copied = tmp_path / "art" / "vocab.txt"
    assert not copied.is_symlink() and copied.read_bytes() == (tiny_bert / "vocab.txt").read_bytes()
    assert qm.manifest.files["vocab.txt"]


def test_a_link_inside_an_artifact_directory_is_refused(tiny_bert, tmp_path):
    """An unsealed artifact whose tokenizer file became a link (to content of the same hash) is refused too."""
    art = tmp_path / "art"
    secquant.quantize(str(tiny_bert), "w8a16", out=art)
    real = tmp_path / "elsewhere.txt"
    shutil.move(art / "vocab.txt", real)
    os.symlink(real, art / "vocab.txt")
    with pytest.raises(ArtifactError, match="link"):
        secquant.load(art, allow_unsealed=True)
