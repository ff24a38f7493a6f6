"""Client names: one documented character set, NFKC-normalized, never confusable with another client's.

A name is 1-64 characters from `A-Z a-z 0-9 . _ - @`, starting and ending with a letter or digit,
after Unicode NFKC normalization (so full-width `ａｎｎ` is stored as `ann`; Cyrillic or Greek
look-alikes of Latin letters are outside the set and refused). Two names are confusable when their
*skeletons* are equal: the name case-folded, with the look-alikes of UTS #39's confusables table that
stay inside this set folded together (`0`/`o`, `1`/`l`/`I`/`i`, `rn`/`m`, `vv`/`w`, `cl`/`d`).
Because the set is ASCII after NFKC, this small table is complete for it; a full TR39 skeleton
(ICU's SpoofChecker) would be needed only for a wider set.
"""

from __future__ import annotations

import re
import unicodedata

from .db import ServerDBError

MAX_NAME = 64
NAME_RULE = ("a client name is 1-64 characters from A-Z a-z 0-9 . _ - @, starting and ending with a letter or "
             "digit")
_NAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._@-]{0,62}[A-Za-z0-9])?")
_SINGLE = str.maketrans({"0": "o", "1": "l", "i": "l"})
_MULTI = (("rn", "m"), ("vv", "w"), ("cl", "d"))


class ClientNameError(ServerDBError):
    """A client name outside the documented character set, or confusable with an existing one."""


def normalize_name(name: str) -> str:
    """The NFKC form of `name` if it is a valid client name, else ClientNameError saying the rule."""
    n = unicodedata.normalize("NFKC", name)
    if _NAME.fullmatch(n) is None:
        raise ClientNameError(f"{NAME_RULE}; got {name[:80]!r}")
    return n


def skeleton(name: str) -> str:
    """What a name looks like: equal skeletons mean a person could mistake one name for the other."""
    s = unicodedata.normalize("NFKC", name).casefold().translate(_SINGLE)
    for many, one in _MULTI:
        s = s.replace(many, one)
    return s
