"""A seeded corpus of text records with known, planted PII: the yardstick for `secquant mask`.

Written here because `faker` is not installed: small generators that make *valid* values (Luhn card numbers,
IBANs with their mod-97 check digits, phone numbers that `phonenumbers` accepts, SSNs outside the never-issued
ranges, UK NINOs with allowed prefixes, French NIRs with their key, real calendar dates of birth) in several
printed formats, inside sentences with distractors (order numbers, amounts, versions, other dates) that are not PII.
Every planted value is recorded with its record, field, offsets and type.

It plants only values the validators accept (phone numbers `phonenumbers` calls valid, domains with a public
suffix), so it cannot show a detector that drops what a validator rejects: `pii_yardstick.py` is the held-out
corpus for that. The masker no longer imports from here (its checks are in `privacy/masking/checks.py`).
"""

from __future__ import annotations

import datetime
import random
from dataclasses import asdict, dataclass

FIRST = ["James", "Mary", "Robert", "Patricia", "John", "Jennifer", "Michael", "Linda", "David", "Elizabeth",
         "William", "Barbara", "Richard", "Susan", "Joseph", "Jessica", "Thomas", "Sarah", "Charles", "Karen",
         "Amelie", "Lukas", "Sofia", "Mateo", "Priya", "Arjun", "Chloe", "Hugo", "Ingrid", "Kenji", "Fatima", "Omar"]
LAST = ["Smith", "Johnson", "Williams", "Brown", "Jones", "Garcia", "Miller", "Davis", "Rodriguez", "Martinez",
        "Wilson", "Anderson", "Taylor", "Thomas", "Moore", "Jackson", "Martin", "Lee", "Thompson", "White",
        "Dubois", "Schneider", "Rossi", "Kowalski", "Patel", "Nakamura", "Okafor", "Lindqvist", "Moreau", "Fischer"]
DOMAINS = ["example.com", "mail.example.org", "corp.example.net", "uni-example.de", "example.co.uk", "example.io"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]


@dataclass(frozen=True)
class Planted:
    """One planted value: record index, field name, [start, end) offsets in that field, type, value, and whether
    its sentence carries a context word for it."""

    record: int
    field: str
    start: int
    end: int
    entity_type: str
    value: str
    context: bool = True


def luhn_check_digit(body: str) -> str:
    total = 0
    for i, ch in enumerate(reversed(body)):
        d = int(ch)
        if i % 2 == 0:  # these positions get doubled once the check digit is appended
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return str((10 - total % 10) % 10)


def luhn_valid(number: str) -> bool:
    digits = "".join(ch for ch in number if ch.isdigit())
    return len(digits) > 1 and luhn_check_digit(digits[:-1]) == digits[-1]


def iban_check_digits(country: str, bban: str) -> str:
    rearranged = bban + country + "00"
    num = int("".join(str(int(ch, 36)) for ch in rearranged))
    return f"{98 - num % 97:02d}"


def iban_valid(iban: str) -> bool:
    s = iban.replace(" ", "").upper()
    num = int("".join(str(int(ch, 36)) for ch in s[4:] + s[:4]))
    return num % 97 == 1


class _Gen:
    def __init__(self, seed: int) -> None:
        self.r = random.Random(seed)

    def digits(self, n: int) -> str:
        return "".join(self.r.choice("0123456789") for _ in range(n))

    def name(self) -> str:
        return f"{self.r.choice(FIRST)} {self.r.choice(LAST)}"

    def email(self) -> str:
        f, last = self.r.choice(FIRST).lower(), self.r.choice(LAST).lower()
        local = self.r.choice([f"{f}.{last}", f"{f[0]}{last}", f"{f}_{last}{self.r.randint(1, 99)}",
                               f"{last}.{f}{self.r.randint(1950, 2005)}", f"{f}{self.r.randint(100, 9999)}"])
        if self.r.random() < 0.15:
            local = local.capitalize()
        return f"{local}@{self.r.choice(DOMAINS)}"

    def phone(self) -> str:
        import phonenumbers as pn

        region = self.r.choice(["US", "US", "GB", "DE", "FR", "IN"])
        kind = self.r.choice([pn.PhoneNumberType.MOBILE, pn.PhoneNumberType.FIXED_LINE])
        ex = pn.example_number_for_type(region, kind)
        base = str(ex.national_number)
        for _ in range(200):
            cand = base[:-4] + self.digits(4)
            num = pn.parse(f"+{ex.country_code}{cand}")
            if pn.is_valid_number(num) and cand[-4:] != base[-4:]:
                break
        else:  # pragma: no cover - phonenumbers metadata always has valid neighbours of its examples
            num = ex
        fmt = self.r.choice([pn.PhoneNumberFormat.INTERNATIONAL, pn.PhoneNumberFormat.NATIONAL,
                             pn.PhoneNumberFormat.E164])
        return pn.format_number(num, fmt)

    def credit_card(self) -> str:
        kind = self.r.choice(["visa", "mc", "amex", "discover"])
        if kind == "amex":
            body = self.r.choice(["34", "37"]) + self.digits(12)
            n = body + luhn_check_digit(body)
            return self.r.choice([f"{n[:4]} {n[4:10]} {n[10:]}", f"{n[:4]}-{n[4:10]}-{n[10:]}", n])
        prefix = {"visa": "4", "mc": str(self.r.randint(51, 55)), "discover": "6011"}[kind]
        body = prefix + self.digits(15 - len(prefix))
        n = body + luhn_check_digit(body)
        sep = self.r.choice([" ", "-", ""])
        return sep.join(n[i:i + 4] for i in range(0, 16, 4))

    def iban(self) -> str:
        country = self.r.choice(["DE", "GB", "FR", "NL", "ES"])
        letters = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
        bban = {"DE": lambda: self.digits(18),
                "GB": lambda: "".join(self.r.choice(letters) for _ in range(4)) + self.digits(14),
                "FR": lambda: self.digits(23),
                "NL": lambda: "".join(self.r.choice(letters) for _ in range(4)) + self.digits(10),
                "ES": lambda: self.digits(20)}[country]()
        s = country + iban_check_digits(country, bban) + bban
        if self.r.random() < 0.6:
            return " ".join(s[i:i + 4] for i in range(0, len(s), 4))
        return s

    def ip(self) -> str:
        if self.r.random() < 0.7:
            return ".".join(str(self.r.randint(1, 254)) for _ in range(4))
        groups = [f"{self.r.randint(0, 0xFFFF):x}" for _ in range(8)]
        if self.r.random() < 0.5:
            return "2001:db8:" + ":".join(groups[2:])
        return "2001:db8:" + ":".join(groups[2:4]) + "::" + ":".join(groups[6:])

    def ssn(self) -> str:
        while True:
            area = self.r.randint(1, 899)
            if area != 666:
                break
        group, serial = self.r.randint(1, 99), self.r.randint(1, 9999)
        s = f"{area:03d}{group:02d}{serial:04d}"
        sep = self.r.choice(["-", "-", " "])
        return f"{s[:3]}{sep}{s[3:5]}{sep}{s[5:]}"

    def nino(self) -> str:
        first = "ABCEGHJKLMNOPRSTWXYZ"
        second = "ABCEGHJKLMNPRSTWXYZ"
        while True:
            p = self.r.choice(first) + self.r.choice(second)
            if p not in ("BG", "GB", "NK", "KN", "NT", "TN", "ZZ"):
                break
        d = self.digits(6)
        suffix = self.r.choice("ABCD")
        if self.r.random() < 0.5:
            return f"{p} {d[:2]} {d[2:4]} {d[4:]} {suffix}"
        return f"{p}{d}{suffix}"

    def fr_nir(self) -> str:
        sex = self.r.choice("12")
        yy = f"{self.r.randint(0, 99):02d}"
        mm = f"{self.r.randint(1, 12):02d}"
        dept = self.r.choice([f"{self.r.randint(1, 95):02d}", "2A", "2B"])
        if dept == "20":
            dept = "21"
        commune, order = f"{self.r.randint(1, 990):03d}", f"{self.r.randint(1, 999):03d}"
        body = sex + yy + mm + dept + commune + order
        key = 97 - int(body.replace("2A", "19").replace("2B", "18")) % 97
        s = f"{body}{key:02d}"
        if self.r.random() < 0.6:
            return f"{s[0]} {s[1:3]} {s[3:5]} {s[5:7]} {s[7:10]} {s[10:13]} {s[13:]}"
        return s

    def dob(self) -> str:
        d = datetime.date(1940, 1, 1) + datetime.timedelta(days=self.r.randint(0, 365 * 65))
        return self.r.choice([
            d.isoformat(), f"{d.month:02d}/{d.day:02d}/{d.year}", f"{d.day:02d}.{d.month:02d}.{d.year}",
            f"{MONTHS[d.month - 1]} {d.day}, {d.year}", f"{d.day} {MONTHS[d.month - 1]} {d.year}",
        ])


# Sentence templates: {v} is the planted value. Context words are what real records carry, but several templates
# have none, so detection does not lean on them.
TEMPLATES = {
    "EMAIL_ADDRESS": ["Please write to {v} before Friday.", "Contact: {v}", "cc {v} on the reply",
                      "The invoice went to {v} yesterday."],
    "PHONE_NUMBER": ["Call me back on {v} after lunch.", "Phone: {v}", "reachable at {v} (mobile)",
                     "Her number is {v}."],
    "CREDIT_CARD": ["Card used: {v}.", "Payment with card {v} failed twice.", "charged {v} for the order",
                    "Please refund {v}."],
    "IBAN_CODE": ["Transfer to IBAN {v} by the 5th.", "Account {v} was credited.", "IBAN: {v}",
                  "Wire the deposit to {v} please."],
    "IP_ADDRESS": ["Login from {v} was blocked.", "client ip {v} timed out", "The request came from {v}.",
                   "Whitelist {v} on the firewall."],
    "US_SSN": ["SSN {v} on file.", "Her social security number is {v}.", "ssn: {v}", "Verify SSN {v} today."],
    "UK_NINO": ["NI number {v} confirmed.", "National Insurance number: {v}", "His NINO is {v}.",
                "Payroll lists NI no. {v}."],
    "FR_NIR": ["Numéro de sécurité sociale : {v}", "NIR {v} enregistré.", "INSEE number {v} on the form.",
               "Carte vitale: {v}"],
    "DATE_OF_BIRTH": ["Patient born on {v} in Leeds.", "DOB: {v}", "Date of birth: {v}.",
                      "She was born {v}.", "birthday is {v}"],
    "PERSON": ["Dr. {v} signed the report.", "Name: {v}", "Dear {v}, thanks for your order.",
               "Mrs. {v} called about the refund.", "{v} asked for a new password.",
               "We met {v} at the conference."],
}
# The last two PERSON templates carry no context: an offline, NER-free detector is expected to miss them.
PERSON_NO_CONTEXT = {"{v} asked for a new password.", "We met {v} at the conference."}

FILLER = ["Order 48213 shipped on 2024-03-02.", "The meeting moved to 14:30.", "Total due: 1,250.00 EUR.",
          "Version 2.13.1 fixed the bug.", "Ticket #77812 is resolved.", "Thanks, the team.",
          "We received 3 boxes and 12 bags.", "Room 204, building B.", "Delivery window: 9 to 12.",
          "The warranty ends in 2027.", "Reference A-1182-77.", "See page 42, section 3.1."]



def _distractor(g: _Gen) -> str:
    """Non-PII text that looks like PII: checksums that fail, IDs in formats no recognizer should take."""
    kind = g.r.randrange(6)
    if kind == 0:  # 16 digits failing Luhn
        body = "4" + g.digits(14)
        bad = str((int(luhn_check_digit(body)) + g.r.randint(1, 9)) % 10)
        n = body + bad
        return f"Voucher {' '.join(n[i:i + 4] for i in range(0, 16, 4))} expired."
    if kind == 1:  # IBAN shape, wrong check digits
        bban = g.digits(18)
        good = int(iban_check_digits("DE", bban))
        bad = (good + g.r.randint(1, 96) - 2) % 97 + 2
        if bad == good:
            bad = good + 1 if good < 98 else good - 1
        return f"Ref DE{bad:02d}{bban} is not ours."
    if kind == 2:  # NIR shape, wrong key
        body = g.r.choice("12") + g.digits(2) + f"{g.r.randint(1, 12):02d}" + f"{g.r.randint(10, 95):02d}" + g.digits(6)
        key = 97 - int(body) % 97
        return f"Dossier {body}{(key % 97) + 1:02d} archived."
    if kind == 3:
        return f"Timestamp {g.r.randint(2019, 2025)}-{g.r.randint(1, 12):02d}-{g.r.randint(1, 28):02d} " \
               f"{g.r.randint(0, 23):02d}:{g.r.randint(0, 59):02d}:{g.r.randint(0, 59):02d}."
    if kind == 4:
        return f"ISBN 978-{g.r.randint(0, 9)}-{g.digits(2)}-{g.digits(6)}-{g.r.randint(0, 9)}."
    return f"Parcel {g.r.choice(['1Z', 'JD', 'RR'])}{g.digits(3)}{g.r.choice(['AA', 'BC'])}{g.digits(10)} in transit."


STRUCTURED = ("EMAIL_ADDRESS", "PHONE_NUMBER", "CREDIT_CARD", "IBAN_CODE", "IP_ADDRESS", "US_SSN", "UK_NINO",
              "FR_NIR", "DATE_OF_BIRTH")


def make_corpus(n: int = 1000, seed: int = 0, per_record: int = 3, with_names: bool = True
                ) -> tuple[list[dict], list[Planted]]:
    """n records {'id', 'text', 'notes', 'amount'} and the list of planted values (in 'text' and 'notes').

    Around the planted values: filler sentences and distractors (failing checksums, timestamps, ISBNs, parcel
    numbers) that a detector should leave alone, so precision means something."""
    g = _Gen(seed)
    makers = {"EMAIL_ADDRESS": g.email, "PHONE_NUMBER": g.phone, "CREDIT_CARD": g.credit_card, "IBAN_CODE": g.iban,
              "IP_ADDRESS": g.ip, "US_SSN": g.ssn, "UK_NINO": g.nino, "FR_NIR": g.fr_nir,
              "DATE_OF_BIRTH": g.dob, "PERSON": g.name}
    types = list(STRUCTURED) + (["PERSON"] if with_names else [])
    records: list[dict] = []
    planted: list[Planted] = []
    for i in range(n):
        fields = {"text": "", "notes": ""}
        chosen = g.r.sample(types, per_record)
        for t in chosen:
            f = g.r.choice(["text", "text", "notes"])
            parts = []
            if g.r.random() < 0.5:
                parts.append(g.r.choice(FILLER) if g.r.random() < 0.6 else _distractor(g))
            tpl = g.r.choice(TEMPLATES[t])
            v = makers[t]()
            pre = fields[f] + (" " if fields[f] else "") + (" ".join(parts) + " " if parts else "")
            start = len(pre) + tpl.index("{v}")
            fields[f] = pre + tpl.replace("{v}", v)
            planted.append(Planted(i, f, start, start + len(v), t, v, tpl not in PERSON_NO_CONTEXT))
        if g.r.random() < 0.5:
            fields["notes"] = (fields["notes"] + " " + g.r.choice(FILLER)).strip()
        records.append({"id": i, "text": fields["text"], "notes": fields["notes"],
                        "amount": round(g.r.uniform(1, 500), 2)})
    for p in planted:
        assert records[p.record][p.field][p.start:p.end] == p.value
    return records, planted


def planted_as_dicts(planted: list[Planted]) -> list[dict]:
    return [asdict(p) for p in planted]


def score_detection(planted: list[Planted], found: dict[tuple[int, str], list[tuple[int, int, str]]],
                    types: tuple[str, ...] | None = None) -> dict[str, dict]:
    """Per type: planted, tp, fn, fp, recall, precision.

    `found[(record, field)]` lists detected (start, end, type). A planted value counts as found when a detection of
    its type covers it; a detection is a false positive when it overlaps no planted value of its type.
    """
    by_loc: dict[tuple[int, str], list[Planted]] = {}
    for p in planted:
        by_loc.setdefault((p.record, p.field), []).append(p)
    types = types or tuple(sorted({p.entity_type for p in planted} | {t for v in found.values() for *_, t in v}))
    stats = {t: {"planted": 0, "tp": 0, "fn": 0, "fp": 0} for t in types}
    for p in planted:
        if p.entity_type not in stats:
            continue
        s = stats[p.entity_type]
        s["planted"] += 1
        hit = any(t == p.entity_type and a <= p.start and b >= p.end for a, b, t in found.get((p.record, p.field), []))
        s["tp" if hit else "fn"] += 1
    for loc, dets in found.items():
        for a, b, t in dets:
            if t not in stats:
                continue
            if not any(p.entity_type == t and a < p.end and b > p.start for p in by_loc.get(loc, [])):
                stats[t]["fp"] += 1
    for s in stats.values():
        s["recall"] = s["tp"] / s["planted"] if s["planted"] else None
        det = s["tp"] + s["fp"]
        s["precision"] = s["tp"] / det if det else None
    return stats
