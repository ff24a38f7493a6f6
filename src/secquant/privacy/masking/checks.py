"""Check digits and plausibility tests of the structured PII types: they score a match, they never drop one.

Written here rather than taken from python-stdnum: the checks are the published one-line formulas (Luhn, ISO 7064
mod 97-10, the NIR key), and stdnum's LGPL licence is not worth adding for them. `phonenumbers` and `tldextract`
(well-kept, already dependencies through Presidio) do the two checks that need data tables.
"""

from __future__ import annotations

import datetime
import functools

import regex as re

DIGITS = "0123456789"
MONTH_RE = (r"(?:jan(?:uary)?|feb(?:ruary)?|mar(?:ch)?|apr(?:il)?|may|june?|july?|aug(?:ust)?|sep(?:t(?:ember)?)?"
            r"|oct(?:ober)?|nov(?:ember)?|dec(?:ember)?)")
_MONTHS = ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec")
# Regions tried for a phone number written without its country code (scoring only).
PHONE_REGIONS = ("US", "GB", "DE", "FR", "NL", "IN", "JP", "AU", "BR", "ES", "IT", "CH", "BE", "AT", "IE", "SE", "PL")


def luhn_check_digit(body: str) -> str:
    """The digit that makes `body` + digit pass the Luhn test."""
    total = 0
    for i, ch in enumerate(reversed(body)):
        d = int(ch) * (2 if i % 2 == 0 else 1)
        total += d - 9 if d > 9 else d
    return str(-total % 10)


def luhn_valid(number: str) -> bool:
    digits = "".join(ch for ch in number if ch.isdigit())
    return len(digits) > 1 and luhn_check_digit(digits[:-1]) == digits[-1]


def _iban_number(s: str) -> int:
    return int("".join(str(int(ch, 36)) for ch in s))


def iban_check_digits(country: str, bban: str) -> str:
    """ISO 13616 check digits (mod 97-10) for a country code and a BBAN."""
    return f"{98 - _iban_number((bban + country + '00').upper()) % 97:02d}"


def iban_valid(iban: str) -> bool:
    s = "".join(ch for ch in iban if ch.isalnum()).upper()
    return len(s) > 4 and s.isalnum() and s.isascii() and _iban_number(s[4:] + s[:4]) % 97 == 1


def nir_key(body13: str) -> str | None:
    """The two-digit key of a French NIR's first 13 characters (Corsica 2A/2B counted as 19/18)."""
    body = body13.upper().replace("2A", "19").replace("2B", "18")
    return f"{97 - int(body) % 97:02d}" if body.isdigit() else None


def nir_valid(text: str) -> bool:
    s = "".join(ch for ch in text if ch.isalnum()).upper()
    return len(s) == 15 and nir_key(s[:13]) == s[13:]


def ssn_plausible(text: str) -> bool:
    """Issued-looking SSN: area not 000, 666 or 9xx, group not 00, serial not 0000, not one digit repeated."""
    d = "".join(ch for ch in text if ch.isdigit())
    return (len(d) == 9 and d[:3] not in ("000", "666") and d[0] != "9" and d[3:5] != "00" and d[5:] != "0000"
            and len(set(d)) > 1)


def nino_plausible(text: str) -> bool:
    """Prefix pairs HMRC never issues (BG, GB, NK, KN, NT, TN, ZZ) lower the score; they do not stop the mask."""
    s = "".join(ch for ch in text if ch.isalnum()).upper()
    return s[:2] not in ("BG", "GB", "NK", "KN", "NT", "TN", "ZZ")


def date_plausible(text: str) -> bool:
    """A real calendar date between 1900 and today (D/M/Y or M/D/Y, ISO, or with a month name)."""
    t = text.lower()
    nums = [int(x) for x in re.findall(r"\d+", t)]
    month_word = re.search(MONTH_RE, t)
    candidates: list[tuple[int, int, int]] = []
    if month_word:
        m = _MONTHS.index(month_word.group(0)[:3]) + 1
        if len(nums) == 2:
            d, y = (nums[0], nums[1]) if nums[1] > 31 else (nums[1], nums[0])
            candidates.append((y, m, d))
    elif len(nums) == 3:
        a, b, c = nums
        if a > 31:
            candidates.append((a, b, c))
        else:
            y = c if c >= 100 else (1900 + c if c > 30 else 2000 + c)
            candidates += [(y, a, b), (y, b, a)]
    for y, m, d in candidates:
        try:
            datetime.date(y, m, d)
        except ValueError:
            continue
        if 1900 <= y <= datetime.date.today().year:
            return True
    return False


def ip_valid(text: str) -> bool:
    import ipaddress

    try:
        ipaddress.ip_interface(text)
    except ValueError:
        return False
    return True


@functools.lru_cache(maxsize=1)
def _suffix_extractor():
    import tldextract

    # tldextract's default downloads the public-suffix list; the snapshot bundled with it needs no network.
    return tldextract.TLDExtract(cache_dir=None, suffix_list_urls=(), fallback_to_snapshot=True)


def email_public_suffix(text: str) -> bool:
    """The domain ends in a public suffix (.com, .co.uk, ...). Reserved and private domains (.test, .internal) do
    not, and are masked all the same: this only scores."""
    return _suffix_extractor()(text.rsplit("@", 1)[-1]).suffix != ""


def phone_valid(text: str) -> bool:
    """`phonenumbers` calls the number valid (assigned range) with its country code or in a common region."""
    import phonenumbers as pn

    body = re.split(r"(?i)\s*(?:ext\.?|extension|x|#)\s*\d+$", text)[0]
    digits = "".join(ch for ch in body if ch.isdigit())
    if body.lstrip().startswith("+"):
        candidates = ["+" + digits]
    elif digits.startswith("00"):
        candidates = ["+" + digits[2:]]
    elif digits.startswith("011"):
        candidates = ["+" + digits[3:]]
    else:
        candidates = [body]
    for c in candidates:
        regions = (None,) if c.startswith("+") else PHONE_REGIONS
        for region in regions:
            try:
                if pn.is_valid_number(pn.parse(c, region)):
                    return True
            except pn.NumberParseException:
                continue
    return False
