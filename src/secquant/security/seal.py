"""Sealing: sign the artifact directory (OpenSSF model-signing, key method), then encrypt a tar
stream of it to named age recipients. Opening decrypts, and verifies the signature and the
artifact's own hashes before anything leaves a private temporary directory. The signed artifact
carries a release record (security.release) that a receiver can hold to a minimum.

Standard formats only: the sealed file decrypts with the `age` tool, the signature
(`model.sig` inside, a Sigstore bundle) verifies with `model_signing verify key`. Both
directions stream through a pipe, so memory does not grow with the model size.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import tarfile
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyrage

from ..artifact.checks import check_files, verify_artifact_dir
from ..artifact.fsutil import atomic_dir, atomic_file, refuse_existing
from ..artifact.manifest import MANIFEST_NAME, WEIGHTS_NAME, read_manifest, register_files
from ..errors import ArtifactError, SecquantError
from .checksums import INTEGRITY_NAME, write_record_for_weights
from .keys import check_sign_key, load_identities, load_recipients
from .release import RELEASE_NAME, MAX_RELEASE, Release, check_release, new_release, read_release, write_release
from .sealed_tar import ART_DIR, SIG_NAME, HostileTar, extract_sealed_tar, max_plaintext_bytes


class SealError(SecquantError):
    """A sealed file cannot be opened: wrong identity, modified bytes, bad or missing signature."""


def _signer(sign_key: Path, passphrase: str | None):
    """A model-signing configuration holding the loaded key: a wrong key or passphrase fails here, early."""
    from model_signing import signing

    check_sign_key(sign_key)
    try:
        return signing.Config().use_elliptic_key_signer(
            private_key=sign_key, password=passphrase.encode() if passphrase else None)
    except Exception as e:
        raise SecquantError(f"signing with {sign_key} failed: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
                            " (is it a P-256 PEM private key, and is the passphrase right?)") from None


def _verify(artifact: Path, sig_path: Path, verify_key: Path) -> None:
    from model_signing import verifying

    if not Path(verify_key).is_file():
        raise SealError(f"verify key {verify_key} does not exist")
    try:
        verifying.Config().use_elliptic_key_verifier(public_key=verify_key).verify(artifact, sig_path)
    except Exception as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise SealError(f"signature verification failed ({msg}): the model was not signed by the holder of "
                        f"{verify_key}, or it was changed after signing") from None


def _staging_area(near: Path) -> tempfile.TemporaryDirectory:
    """A private temporary directory next to `near` (so files can be hard-linked), else in $TMPDIR."""
    try:
        return tempfile.TemporaryDirectory(prefix=f".{near.name}.seal-", dir=near.parent)
    except OSError:
        return tempfile.TemporaryDirectory(prefix="secquant-seal-")


_BUF = 1 << 20  # pipe and stream buffers: with the 64 KiB defaults the two threads spend their time handing over


def _wide_pipe() -> tuple[int, int]:
    r, w = os.pipe()
    with contextlib.suppress(OSError, AttributeError):  # Linux only; the default size still works
        fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, _BUF)
    return r, w


def _stage_with_integrity(src: Path, stage: Path, release: Release) -> None:
    """`stage` = the artifact in `src`, checked against its manifest, plus a fresh integrity record
    (new random key) and the release record, both listed in its manifest. Files are hard-linked
    where possible (no copy of the weights), else copied. Hashing the source (the check) and
    computing the record both read every weight byte and release the GIL: they run side by side."""
    manifest = read_manifest(src)
    stage.mkdir()
    for p in sorted(src.rglob("*")):
        rel = p.relative_to(src)
        if not p.is_file() or rel.as_posix() in (MANIFEST_NAME, INTEGRITY_NAME, RELEASE_NAME):
            continue
        dst = stage / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(p, dst)
        except OSError:
            shutil.copyfile(p, dst)
    with ThreadPoolExecutor(1) as ex:
        checked = ex.submit(check_files, src, manifest)  # never seal a broken or tampered artifact
        write_record_for_weights(stage / WEIGHTS_NAME, stage / INTEGRITY_NAME)  # memory flat in the model size
        checked.result()
    # the staged files are links to the ones just checked: a change to them before the tar is read no
    # longer matches the signature, and open refuses it
    write_release(stage, release)
    register_files(stage, [INTEGRITY_NAME, RELEASE_NAME], manifest)


def seal(artifact_dir: str | Path, recipients: list[str], sign_key: str | Path, out: str | Path,
         sign_key_passphrase: str | None = None, overwrite: bool = False, release: int | None = None) -> Path:
    """Sign and encrypt an artifact directory into one age file readable by `recipients` only.

    The sealed artifact also carries `integrity.safetensors`: keyed checksums of the packed
    weights under a fresh random key (see security.checksums), and `release.json`: `release`
    (default: the UTC time in seconds), both covered by the signature.
    The artifact's hashes are checked while the record is computed (two threads over the same
    bytes); then model-signing hashes and signs while the tar stream is already being encrypted,
    and the signature goes last in the tar. Nothing here imports torch.
    """
    src, out = Path(artifact_dir), Path(out)
    if not src.is_dir():
        raise ArtifactError(f"{src} is not an artifact directory")
    recips = load_recipients(list(recipients))
    rel = new_release(release)
    refuse_existing(out, overwrite)
    signer = _signer(Path(sign_key), sign_key_passphrase)
    with _staging_area(src) as stage_root, tempfile.TemporaryDirectory(prefix="secquant-seal-") as td:
        d = Path(stage_root) / "artifact"
        _stage_with_integrity(src, d, rel)
        files = sorted(p.relative_to(d).as_posix() for p in d.rglob("*") if p.is_file())
        sig = Path(td) / SIG_NAME
        r_fd, w_fd = _wide_pipe()
        failure: list[BaseException] = []

        def produce(signing) -> None:
            try:
                with os.fdopen(w_fd, "wb", buffering=_BUF) as w, \
                        tarfile.open(fileobj=w, mode="w|", format=tarfile.PAX_FORMAT, bufsize=_BUF) as tar:
                    tar.copybufsize = _BUF
                    for f in files:
                        tar.add(d / f, arcname=f"{ART_DIR}/{f}")
                    signing.result()
                    tar.add(sig, arcname=SIG_NAME)
            except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
                failure.append(e)

        with ThreadPoolExecutor(2) as ex, atomic_file(out) as tmp:
            signing = ex.submit(signer.sign, d, sig)
            producer = ex.submit(produce, signing)
            with os.fdopen(r_fd, "rb", buffering=_BUF) as r, open(tmp, "wb", buffering=_BUF) as dst:
                pyrage.encrypt_io(r, dst, recips)
            producer.result()
            if failure:
                if signing.done() and signing.exception():
                    raise SecquantError(f"signing with {sign_key} failed: {signing.exception()}")
                raise SecquantError(f"sealing failed while reading the artifact: {failure[0]}")
    return out


class _Decrypting:
    """A background thread that decrypts `src` into a pipe; read the plaintext from `.reader`.

    Streaming keeps memory flat whatever the model size; `finish()` re-raises (as SealError)
    any decryption failure: wrong identity, or modified bytes (age authenticates every chunk).
    """

    def __init__(self, src: Path, ids, identity) -> None:
        self.src, self.identity = src, identity
        r_fd, w_fd = _wide_pipe()
        self.reader = os.fdopen(r_fd, "rb", buffering=_BUF)
        self.failure: list[BaseException] = []

        def produce() -> None:
            try:
                with open(src, "rb", buffering=_BUF) as f, os.fdopen(w_fd, "wb", buffering=_BUF) as w:
                    pyrage.decrypt_io(f, w, ids)
            except BaseException as e:  # noqa: BLE001 - reported by finish()
                self.failure.append(e)

        self.thread = threading.Thread(target=produce, daemon=True)
        self.thread.start()

    def finish(self) -> None:
        try:  # drain what the consumer did not read (tar padding), so the writer never hits a closed pipe
            while self.reader.read(1 << 16):
                pass
        except (OSError, ValueError):
            pass
        self.reader.close()
        self.thread.join()
        if self.failure:
            raise SealError(f"{self.src} cannot be decrypted with {self.identity}: it is not sealed to this "
                            "identity, or its bytes were modified")


def open_sealed(sealed: str | Path, identity: str | Path, verify_key: str | Path, out: str | Path,
                identity_passphrase: str | None = None, overwrite: bool = False,
                min_release: int | None = None) -> Path:
    """Decrypt, verify the signature and the artifact hashes, then move the artifact to `out`.

    `min_release`: refuse a model whose signed release record (security.release) is older, or
    that carries none. Until the signature verified, the decrypted tar is treated as hostile
    (security.sealed_tar): at most as many bytes as the ciphertext can hold are written, and
    only regular files with safe names."""
    src = Path(sealed)
    if min_release is not None and (isinstance(min_release, bool) or not isinstance(min_release, int)
                                    or not 0 <= min_release <= MAX_RELEASE):
        raise SecquantError(f"min_release {min_release!r}: give a whole number from 0 to {MAX_RELEASE}")
    if not src.is_file():
        raise SealError(f"sealed file {src} does not exist")
    ids = load_identities(identity, identity_passphrase)
    budget = max_plaintext_bytes(src)
    # Stage next to `out` (not in the system temp dir, often on disk): a caller that opens into a
    # memory-backed directory (secquant.load, the server) keeps the plaintext off disk throughout.
    with atomic_dir(Path(out), overwrite) as final, \
            tempfile.TemporaryDirectory(prefix=".secquant-open-", dir=Path(out).parent) as td:
        work = Path(td)
        dec = _Decrypting(src, ids, identity)
        refusal = malformed = None
        digests: dict[str, str] = {}
        try:
            digests = extract_sealed_tar(dec.reader, work, budget)
        except HostileTar as e:
            refusal = str(e)
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise SecquantError(f"no space left to open {src} next to {out}") from None
            malformed = str(e) or type(e).__name__  # a short stream: the decryptor's error (finish) says why
        except Exception as e:  # noqa: BLE001 - tarfile raises TarError, ValueError, ... on a malformed archive
            malformed = str(e) or type(e).__name__
        dec.finish()  # a decryption failure (wrong identity, modified bytes) is the first thing to report
        if refusal:
            raise SealError(f"{src} holds unexpected entries: {refusal}; refusing it before checking any signature")
        if malformed:
            raise SealError(f"{src} does not hold a valid sealed model (malformed archive: {malformed[:200]})")
        if not (work / SIG_NAME).is_file():
            raise SealError(f"{src} carries no signature ({SIG_NAME}): refusing an unsigned model")
        art = work / ART_DIR
        if not art.is_dir():
            raise SealError(f"{src} holds no artifact")
        _verify(art, work / SIG_NAME, Path(verify_key))
        prefix = f"{ART_DIR}/"
        try:  # the hashes taken while extracting: no second read
            verify_artifact_dir(art, {k[len(prefix):]: v for k, v in digests.items() if k.startswith(prefix)})
        except ArtifactError as e:
            raise SealError(f"the signed artifact is inconsistent: {e}") from None
        check_release(read_release(art), min_release, str(src))
        for p in art.iterdir():
            shutil.move(str(p), final / p.name)
    return Path(out)


def reseal(sealed: str | Path, identity: str | Path, recipients: list[str], out: str | Path,
           identity_passphrase: str | None = None, overwrite: bool = False) -> Path:
    """Re-encrypt a sealed file to a new recipient list (add, remove, rotate keys).

    The decrypted stream is piped straight into the encryptor: the plaintext never touches
    disk, and the signed bundle inside is carried over byte for byte (its signature still
    verifies against the original signer).
    """
    src, out = Path(sealed), Path(out)
    if not src.is_file():
        raise SealError(f"sealed file {src} does not exist")
    ids = load_identities(identity, identity_passphrase)
    recips = load_recipients(list(recipients))
    refuse_existing(out, overwrite)
    dec = _Decrypting(src, ids, identity)
    try:
        with atomic_file(out) as tmp:
            with open(tmp, "wb") as dst:
                pyrage.encrypt_io(dec.reader, dst, recips)
            dec.finish()
    finally:
        dec.reader.close()
    return out
