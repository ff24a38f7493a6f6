"""Mutual TLS between the parties, with MPyC's own `--ssl` mode.

MPyC authenticates peers with TLS when started with `--ssl`: each party loads
`.config/party_<i>.crt`, `.config/party_<i>.key` and the CA `.config/mpyc_ca.crt` from its working
directory; a listening party requires a certificate signed by that CA (CERT_REQUIRED) and a connecting
party checks the listener's name `MPyC party <i>`. MPyC unpickles the array shares it receives, so
an unauthenticated connection to a party's port would be a remote-code path: every secquant run uses
TLS with a fresh CA whose private key is discarded once the three certificates are issued.
"""

from __future__ import annotations

import datetime
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def issue_party_certificates(dirs: list[Path], days: int = 30) -> None:
    """Write `.config/` TLS material for party i into dirs[i] (created 0700); the CA key is never stored."""
    now = datetime.datetime.now(datetime.timezone.utc)
    start, end = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=days)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(_name("secquant private inference CA"))
          .issuer_name(_name("secquant private inference CA")).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(start).not_valid_after(end)
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .sign(ca_key, hashes.SHA256()))
    ca_pem = ca.public_bytes(serialization.Encoding.PEM)
    for i, d in enumerate(dirs):
        conf = Path(d) / ".config"
        conf.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(d, 0o700)
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (x509.CertificateBuilder().subject_name(_name(f"MPyC party {i}")).issuer_name(ca.subject)
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(start).not_valid_after(end)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .sign(ca_key, hashes.SHA256()))
        _write_private(conf / f"party_{i}.key", key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
        (conf / f"party_{i}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        (conf / "mpyc_ca.crt").write_bytes(ca_pem)
    del ca_key
