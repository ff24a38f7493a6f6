"""Text that is safe to store in the audit log and to print on a terminal.

Request paths, client names and error details reach an admin's terminal through `secquant server
audit-log`. A path like `/%1b[2J...` would otherwise clear the screen, rewrite earlier rows or set
the window title. `clean` removes every terminal escape sequence (ECMA-48: CSI, OSC/DCS/APC/PM/SOS
strings, two-character ESC sequences; 7- and 8-bit forms) and every control character (C0, DEL, C1),
plus the invisible characters that reorder or hide text (bidi overrides, zero-width characters, line
and paragraph separators). Each removed sequence or character becomes U+FFFD, so an admin sees that
something was there; tab, CR and LF become a space.

Our own few lines (one regular expression for ECMA-48, the standard library's unicodedata for the
rest): small enough to read whole, which a filter in front of an admin's terminal should be.
"""

from __future__ import annotations

import re
import unicodedata

MARK = "\ufffd"
_ESCAPES = re.compile(
    r"(?:\x1b\[|\x9b)[0-?]*[ -/]*[@-~]?"  # CSI (7-bit ESC [ and 8-bit 0x9b), possibly unterminated
    r"|(?:\x1b[\]PX^_]|[\x90\x98\x9d\x9e\x9f])[^\x07\x1b\x9c]*(?:\x07|\x1b\\|\x9c)?"  # OSC, DCS, SOS, PM, APC
    r"|\x1b[ -/]*[0-~]?"  # other ESC sequences (and a lone ESC)
)
_WHITESPACE = {"\t", "\n", "\r", "\v", "\f"}
_INVISIBLE = {"\u061c", "\u200b", "\u200c", "\u200d", "\u200e", "\u200f", "\u2060", "\ufeff"} | {
    chr(c) for c in range(0x202A, 0x202F)} | {chr(c) for c in range(0x2066, 0x206A)}


def _char(c: str) -> str:
    if c in _WHITESPACE:
        return " "
    if c in _INVISIBLE or unicodedata.category(c) in ("Cc", "Cs", "Zl", "Zp"):
        return MARK
    return c


def clean(text: str | None) -> str | None:
    """`text` with terminal escape sequences and control / invisible characters replaced (None stays None)."""
    if text is None:
        return None
    text = _ESCAPES.sub(MARK, str(text))
    if text.isprintable():  # the common case: nothing more to look at
        return text
    return "".join(_char(c) for c in text)
