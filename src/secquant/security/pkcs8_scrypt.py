"""PKCS#8 private keys encrypted under a passphrase with scrypt (PBES2, RFC 8018, with the scrypt
KDF of RFC 7914, AES-256-CBC): the same memory-hard KDF, at the same cost, as an age identity.

`cryptography` reads this standard form but writes encrypted PKCS#8 only with PBKDF2
(`BestAvailableEncryption`: 2048 iterations, about 0.5 ms a guess), so pycryptodome writes it.
Reading goes through cryptography's `load_pem_private_key`, which is what model-signing calls
with the passphrase: to model-signing the files are ordinary encrypted PEM keys.
"""

from __future__ import annotations

from dataclasses import dataclass

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

SCRYPT_OID = "1.3.6.1.4.1.11591.4.11"
PBKDF2_OID = "1.2.840.113549.1.5.12"
SCRYPT_R, SCRYPT_P = 8, 1  # age's scrypt recipient uses r=8, p=1 (only N varies)


@dataclass(frozen=True)
class KeyProtection:
    """How a PEM private key file is protected: kdf is none, scrypt, pbkdf2 or another scheme's name."""

    kdf: str
    log_n: int | None = None  # scrypt: N = 2**log_n
    r: int | None = None
    p: int | None = None
    iterations: int | None = None  # pbkdf2


def encrypt_private_key(key: PrivateKeyTypes, passphrase: str, log_n: int) -> bytes:
    """`key` as an `ENCRYPTED PRIVATE KEY` PEM under scrypt(N=2**log_n, r=8, p=1) + AES-256-CBC."""
    from Crypto.PublicKey import ECC

    if not 10 <= log_n <= 30:
        raise ValueError(f"scrypt log2(N) {log_n} is outside 10..30")
    der = key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    pem = ECC.import_key(der).export_key(
        format="PEM", passphrase=passphrase, protection="scryptAndAES256-CBC",
        prot_params={"iteration_count": 1 << log_n, "block_size": SCRYPT_R, "parallelization": SCRYPT_P,
                     "salt_size": 16})  # as age (the default, 8 bytes, is the RFC minimum)
    return (pem if pem.endswith("\n") else pem + "\n").encode()


def key_protection(pem_bytes: bytes) -> KeyProtection:
    """Which KDF protects a PEM private key, read from its structure (no passphrase needed)."""
    from asn1crypto import keys, pem

    if b"-----BEGIN ENCRYPTED PRIVATE KEY-----" not in pem_bytes:
        if b"Proc-Type: 4,ENCRYPTED" in pem_bytes:
            return KeyProtection("openssl-legacy (MD5 key derivation)")
        return KeyProtection("none")
    try:
        _, _, der = pem.unarmor(pem_bytes[pem_bytes.index(b"-----BEGIN"):])
        alg = keys.EncryptedPrivateKeyInfo.load(der)["encryption_algorithm"]
        if alg["algorithm"].native != "pbes2":
            return KeyProtection(str(alg["algorithm"].native))
        kdf = alg["parameters"]["key_derivation_func"]
        oid = kdf["algorithm"].dotted
        if oid == SCRYPT_OID:  # asn1crypto knows no scrypt-params: a plain SEQUENCE (salt, N, r, p[, len])
            params = kdf["parameters"].native
            n, r, p = params["1"], params["2"], params["3"]
            return KeyProtection("scrypt", log_n=n.bit_length() - 1, r=r, p=p)
        if oid == PBKDF2_OID:
            return KeyProtection("pbkdf2", iterations=kdf["parameters"]["iteration_count"].native)
        return KeyProtection(oid)
    except Exception:  # noqa: BLE001 - unparsable: say so; the loader refuses it with its own message
        return KeyProtection("unknown")
