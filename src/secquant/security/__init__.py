"""Model protection: keys, sealing (OpenSSF model-signing + age encryption), opening."""

from .keys import KeyFiles, keygen, load_identities, load_recipients, reprotect_sign_key
from .release import Release, RollbackError, read_release
from .seal import open_sealed, reseal, seal

__all__ = ["KeyFiles", "keygen", "load_identities", "load_recipients", "reprotect_sign_key", "seal", "open_sealed",
           "reseal", "Release", "RollbackError", "read_release"]
