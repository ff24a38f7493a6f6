"""Issue 13 item 7: one passphrase protects the age identity (scrypt) and the signing key; the
signing key must not be the cheaper way to guess it. `keygen --passphrase` writes a standard
PBES2/scrypt PKCS#8 key at the identity's own scrypt work factor; old PBKDF2 keys still sign,
with a warning, and re-protect in place.

The files are read here with independent code (asn1crypto for the structure, cryptography's
loader for the decryption, the age header as written by rage), not with secquant's readers.
"""

from __future__ import annotations

import re

import pytest
from asn1crypto import keys as asn1_keys
from asn1crypto import pem
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from typer.testing import CliRunner

from secquant.cli import app
from secquant.errors import SecquantError
from secquant.security import keygen, open_sealed, reprotect_sign_key, seal
from secquant.security.pkcs8_scrypt import encrypt_private_key

PW = "correct horse battery staple"
SCRYPT_OID, PBKDF2_OID = "1.3.6.1.4.1.11591.4.11", "1.2.840.113549.1.5.12"


@pytest.fixture(scope="module")
def carol(tmp_path_factory):
    return keygen(tmp_path_factory.mktemp("kdf-keys") / "carol", passphrase=PW)


def age_scrypt_cost(identity_file: bytes) -> int:
    """log2(N) from the age header's scrypt stanza, as the age spec lays it out."""
    m = re.search(rb"^-> scrypt \S+ (\d+)$", identity_file.split(b"\n---")[0], re.MULTILINE)
    assert m, identity_file[:200]
    return int(m.group(1))


def pkcs8_kdf(pem_bytes: bytes) -> tuple[str, dict]:
    _, _, der = pem.unarmor(pem_bytes)
    alg = asn1_keys.EncryptedPrivateKeyInfo.load(der)["encryption_algorithm"]
    assert alg["algorithm"].native == "pbes2"
    kdf = alg["parameters"]["key_derivation_func"]
    params = kdf["parameters"].native  # scrypt-params as a plain sequence: salt, N, r, p
    return kdf["algorithm"].dotted, params


def test_signing_key_costs_as_much_to_guess_as_the_identity(carol):
    ident_cost = age_scrypt_cost(carol.identity.read_bytes())
    oid, params = pkcs8_kdf(carol.sign_key.read_bytes())
    assert oid == SCRYPT_OID, f"signing key protected by {oid}, not scrypt"
    salt, n, r, p = (params[k] for k in ("0", "1", "2", "3"))
    assert len(salt) >= 16
    assert n == 2 ** ident_cost and (r, p) == (8, 1)  # age's scrypt: r=8, p=1, N=2^work factor
    assert ident_cost >= 15  # age's calibration targets ~1 s a guess
    # decryption really runs through those parameters: cryptography (what model-signing calls) reads it
    key = serialization.load_pem_private_key(carol.sign_key.read_bytes(), PW.encode())
    assert key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo) \
        == carol.verify_key.read_bytes()


def test_model_signing_signs_with_the_scrypt_key(carol, digits_artifact, tmp_path):
    sealed = seal(digits_artifact("w8a16"), [str(carol.recipient.read_text().strip())], carol.sign_key,
                  tmp_path / "c.age", sign_key_passphrase=PW)
    # only the identity's passphrase is needed to open: a plain key pair for the receiver
    bob = keygen(tmp_path / "bob")
    with pytest.raises(SecquantError, match="passphrase"):
        seal(digits_artifact("w8a16"), [str(bob.recipient)], carol.sign_key, tmp_path / "d.age")
    assert sealed.is_file() and not (tmp_path / "d.age").exists()


def _fast_scrypt_key(path, passphrase: str, log_n: int = 12):
    """A signing key in the same format at a low work factor (format tests need no real cost)."""
    sk = ec.generate_private_key(ec.SECP256R1())
    path.write_bytes(encrypt_private_key(sk, passphrase, log_n))
    path.chmod(0o600)
    path.with_name(path.name.replace(".sign.key", ".sign.pub")).write_bytes(sk.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return sk


def test_wrong_passphrase_for_a_scrypt_key_is_refused(digits_artifact, tmp_path):
    bob = keygen(tmp_path / "bob")
    _fast_scrypt_key(tmp_path / "fast.sign.key", PW)
    with pytest.raises(SecquantError, match="is the passphrase right"):
        seal(digits_artifact("w8a16"), [str(bob.recipient)], tmp_path / "fast.sign.key", tmp_path / "x.age",
             sign_key_passphrase="wrong")
    assert not (tmp_path / "x.age").exists()


def _old_pbkdf2_key(path, passphrase: str):
    """What keygen --passphrase wrote before: cryptography's BestAvailableEncryption (PBKDF2)."""
    sk = ec.generate_private_key(ec.SECP256R1())
    path.write_bytes(sk.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.BestAvailableEncryption(passphrase.encode())))
    path.chmod(0o600)
    pub = sk.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    path.with_name(path.name.replace(".sign.key", ".sign.pub")).write_bytes(pub)
    return pub


def test_old_pbkdf2_keys_still_sign_warn_and_reprotect_in_place(digits_artifact, tmp_path, capsys):
    bob = keygen(tmp_path / "bob")
    old = tmp_path / "old.sign.key"
    pub = _old_pbkdf2_key(old, PW)
    assert pkcs8_kdf(old.read_bytes())[0] == PBKDF2_OID
    capsys.readouterr()
    sealed = seal(digits_artifact("w8a16"), [str(bob.recipient)], old, tmp_path / "a.age", sign_key_passphrase=PW)
    warned = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(warned) == 1 and warned[0].startswith("warning:") and "PBKDF2" in warned[0] \
        and "--reprotect" in warned[0], warned
    open_sealed(sealed, bob.identity, tmp_path / "old.sign.pub", tmp_path / "o1")  # the old key's signature holds

    prot = reprotect_sign_key(old, PW, log_n=12)
    assert (prot.kdf, prot.log_n) == ("scrypt", 12) and oct(old.stat().st_mode & 0o777) == "0o600"
    oid, params = pkcs8_kdf(old.read_bytes())
    assert oid == SCRYPT_OID and params["1"] == 2**12
    again = serialization.load_pem_private_key(old.read_bytes(), PW.encode())
    assert again.public_key().public_bytes(serialization.Encoding.PEM,
                                           serialization.PublicFormat.SubjectPublicKeyInfo) == pub  # same key
    capsys.readouterr()
    sealed = seal(digits_artifact("w8a16"), [str(bob.recipient)], old, tmp_path / "b.age", sign_key_passphrase=PW)
    assert capsys.readouterr().err == ""  # no warning any more
    open_sealed(sealed, bob.identity, tmp_path / "old.sign.pub", tmp_path / "o2")
    with pytest.raises(SecquantError, match="passphrase is wrong"):
        reprotect_sign_key(old, "not it", log_n=12)


def test_cli_reprotect_takes_the_cost_of_the_identity_next_to_it(tmp_path, monkeypatch):
    old = tmp_path / "dave.sign.key"
    _old_pbkdf2_key(old, PW)
    # the sibling identity's age header says scrypt work factor 13 (only its header is read for the cost)
    (tmp_path / "dave.key").write_bytes(b"age-encryption.org/v1\n-> scrypt c2FsdHNhbHRzYWx0c2FsdA 13\n"
                                        b"AAAA\n--- AAAA\n\x00")
    monkeypatch.setenv("SECQUANT_PASSPHRASE", PW)
    r = CliRunner().invoke(app, ["keygen", "--reprotect", str(old)])
    assert r.exit_code == 0 and "N=2^13" in r.stderr, r.stderr
    assert pkcs8_kdf(old.read_bytes())[1]["1"] == 2**13
    r = CliRunner().invoke(app, ["keygen"])
    assert r.exit_code == 2 and "--reprotect" in r.stderr
