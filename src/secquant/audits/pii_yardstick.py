"""A held-out PII corpus and its scorer, written apart from the masker so it cannot share the masker's blind spots.

The masker's own corpus (`pii_corpus.py`) plants only values its validators accept. This one imports nothing from
secquant, nor Presidio, `phonenumbers` or any other validator: it plants what real records hold, chosen from public
numbering rules and habits of writing, including values a validator would call unassigned or unusual:

- e-mail at reserved and private domains (.test, .example, .invalid, .localhost, .internal, .corp, .lan,
  .home.arpa), IDN (Unicode and punycode), deep subdomains, plus-addressing, quoted local parts;
- phone numbers in unassigned and fictional ranges (+1 555-01xx, Ofcom drama ranges, random digits after a country
  code), E.164 with and without '+' (00 / 011 prefixes, bare digits), national formats of 12 countries with spaces,
  dashes, dots, slashes, brackets and extensions;
- IBANs of 16 countries with their mod-97 check digits, including all-digit Dutch and British bank codes
  (check-digit-valid, format-unusual), grouped in fours or not, upper or lower case;
- Luhn-valid card numbers of 9 brands (13 to 19 digits, 4-4-4-4, 4-6-5, 4-6-4, dashes, spaces, none);
- IPv4 (with ports) and IPv6 (full, compressed, upper case, IPv4-mapped), US SSNs, UK NINOs, French NIRs
  (with Corsican departments), dates of birth after the usual English labels.

`score_masking` scores the spans a masker replaced: per type, how many planted values one span of the right type
covers (recall), how many were left wholly in clear, and how many leak in part (a letter or digit of the value left
outside every replaced span: a '+1 ' prefix, an extension, a country code).
"""

from __future__ import annotations

import random
import string
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

STRUCTURED_TYPES = ("EMAIL_ADDRESS", "PHONE_NUMBER", "CREDIT_CARD", "IBAN_CODE", "IP_ADDRESS", "US_SSN", "UK_NINO",
                    "FR_NIR", "DATE_OF_BIRTH")


@dataclass(frozen=True)
class Plant:
    """One planted value: record, field, [start, end) offsets in that field, type, the value and its variant."""

    record: int
    field: str
    start: int
    end: int
    entity_type: str
    value: str
    variant: str


# ---------------------------------------------------------------------------------------------- check digits
# Written here on purpose (not imported from the masker): the yardstick must not share code with what it measures.


def _luhn_complete(body: str) -> str:
    total = 0
    for i, ch in enumerate(reversed(body)):
        d = int(ch) * (2 if i % 2 == 0 else 1)
        total += d - 9 if d > 9 else d
    return body + str(-total % 10)


def _iban(country: str, bban: str) -> str:
    digits = "".join(str(int(c, 36)) for c in (bban + country + "00").upper())
    return f"{country}{98 - int(digits) % 97:02d}{bban}"


def _nir_key(body13: str) -> str:
    return f"{97 - int(body13.replace('2A', '19').replace('2B', '18')) % 97:02d}"


# ---------------------------------------------------------------------------------------------- generators


class _Gen:
    def __init__(self, seed: int) -> None:
        self.r = random.Random(seed)

    def n(self, k: int, first: str = "0123456789") -> str:
        return self.r.choice(first) + "".join(self.r.choice(string.digits) for _ in range(k - 1))

    def a(self, k: int) -> str:
        return "".join(self.r.choice(string.ascii_uppercase) for _ in range(k))

    def c(self, k: int) -> str:
        return "".join(self.r.choice(string.ascii_uppercase + string.digits) for _ in range(k))

    # -- e-mail
    def email(self) -> tuple[str, str]:
        r = self.r
        first = r.choice(["jane", "omar", "li", "sofia", "kenji", "amelie", "j", "ana-maria", "o'brien", "x"])
        last = r.choice(["doe", "okafor", "nakamura", "dubois", "smith", "lindqvist", "garcia", "nguyen"])
        local = r.choice([f"{first}.{last}", f"{first}{r.randint(1, 9999)}", f"{first}_{last}", f"{first}-{last}",
                          f"{first}+{r.choice(['news', 'billing', 'x', 'tag-2'])}",
                          f"{first}.{last}+{r.randint(1, 99)}",
                          f"{first[0]}{last}", f"{r.randint(10, 99999)}", f"{first}.{last}.{r.randint(70, 99)}"])
        domain, variant = r.choice([
            (f"mail.{r.choice(['test', 'example', 'invalid', 'localhost'])}", "reserved"),
            (f"{r.choice(['corp', 'hr', 'it', 'dev'])}.example", "reserved"),
            (f"{r.choice(['svc', 'mx', 'db'])}.internal", "private"),
            (f"intranet.{r.choice(['corp', 'lan', 'home.arpa', 'local'])}", "private"),
            (f"{r.choice(['a', 'eu', 'mail'])}.{r.choice(['b', 'west', 'x1'])}.{r.choice(['dept', 'c'])}.example.com",
             "subdomains"),
            (f"{r.choice(['bücher', 'münchen', 'élève', 'zürich'])}.{r.choice(['example', 'test', 'de'])}", "idn"),
            (f"{r.choice(['bücher', 'münchen', 'zürich']).encode('idna').decode()}.{r.choice(['example', 'de'])}",
             "punycode"),
            (f"{r.choice(['acme', 'globex', 'initech'])}.{r.choice(['co.uk', 'com.au', 'photography', 'io'])}",
             "public"),
        ])
        if r.random() < 0.05:
            return f'"{first} {last}"@{domain}', "quoted"
        if r.random() < 0.1:
            local = local.capitalize()
        return f"{local}@{domain}", variant

    # -- phone
    def phone(self) -> tuple[str, str]:
        r = self.r
        kind = r.choice(["intl", "intl", "intl", "national", "national", "national", "no_plus", "unassigned"])
        if kind == "unassigned":
            value = r.choice([
                f"+1 555-01{self.n(2)}",  # fictional NANP range
                f"+1 {self.n(3)}-555-01{self.n(2)}",
                f"+1 (1{self.n(2)}) {self.n(3)}-{self.n(4)}",  # area codes never start with 1
                f"+44 7700 900{self.n(3)}",  # Ofcom drama range
                f"+44 20 7946 0{self.n(3)}",
                f"+{r.choice(['49', '33', '39', '31'])} {self.n(r.randint(2, 4))} {self.n(r.randint(4, 7))}",
                f"+{r.choice(['1', '7', '44'])}{self.n(r.randint(8, 10))}",
            ])
        elif kind == "intl":
            value = r.choice([
                f"+1 {self.n(3, '23456789')} {self.n(3, '23456789')} {self.n(4)}",
                f"+1 ({self.n(3, '23456789')}) {self.n(3, '23456789')}-{self.n(4)}",
                f"+1-{self.n(3, '23456789')}-{self.n(3, '23456789')}-{self.n(4)}",
                f"+1{self.n(3, '23456789')}{self.n(3, '23456789')}{self.n(4)}",
                f"+44 {self.n(2, '2')} {self.n(4)} {self.n(4)}", f"+44 7{self.n(3)} {self.n(6)}",
                f"+44 (0){self.n(2, '2')} {self.n(4)} {self.n(4)}",
                f"+49 {self.n(2, '3')} {self.n(8)}", f"+49 15{self.n(1)} {self.n(8)}", f"+49-{self.n(3)}-{self.n(7)}",
                f"+33 {r.choice('1234567')} {self.n(2)} {self.n(2)} {self.n(2)} {self.n(2)}",
                f"+33 (0){r.choice('67')} {self.n(2)} {self.n(2)} {self.n(2)} {self.n(2)}",
                f"+91 {self.n(5, '6789')} {self.n(5)}", f"+81 {self.n(1, '3')}-{self.n(4)}-{self.n(4)}",
                f"+86 1{self.n(2)} {self.n(4)} {self.n(4)}", f"+61 {r.choice('2378')} {self.n(4)} {self.n(4)}",
                f"+55 {self.n(2, '1')} 9{self.n(4)}-{self.n(4)}", f"+31 6 {self.n(8)}", f"+31 (0)20 {self.n(7)}",
                f"+34 {self.n(3, '67')} {self.n(2)} {self.n(2)} {self.n(2)}",
                f"+353 {self.n(1)} {self.n(3)} {self.n(4)}",
                f"+971 50 {self.n(3)} {self.n(4)}", f"+7 {self.n(3, '49')} {self.n(3)}-{self.n(2)}-{self.n(2)}",
                f"+27 {self.n(2)} {self.n(3)} {self.n(4)}", f"+41.{self.n(2)}.{self.n(3)}.{self.n(2)}.{self.n(2)}",
                f"+39 {self.n(3, '3')} {self.n(3)} {self.n(4)}",
            ])
        elif kind == "national":
            value = r.choice([
                f"({self.n(3, '23456789')}) {self.n(3, '23456789')}-{self.n(4)}",
                f"{self.n(3, '23456789')}-{self.n(3, '23456789')}-{self.n(4)}",
                f"{self.n(3, '23456789')}.{self.n(3, '23456789')}.{self.n(4)}",
                f"{self.n(3, '23456789')} {self.n(3, '23456789')} {self.n(4)}",
                f"1-800-{self.n(3)}-{self.n(4)}", f"1 ({self.n(3, '23456789')}) {self.n(3)}-{self.n(4)}",
                f"0{self.n(2, '2')} {self.n(4)} {self.n(4)}", f"07{self.n(3)} {self.n(6)}",
                f"(0{self.n(2, '2')}) {self.n(4)} {self.n(4)}",
                f"0{self.n(2, '3')} {self.n(8)}", f"015{self.n(1)} {self.n(8)}",
                f"(0{self.n(2, '3')}) {self.n(4)}-{self.n(4)}",
                f"0{self.n(2, '3')}/{self.n(8)}",
                f"0{r.choice('1234567')} {self.n(2)} {self.n(2)} {self.n(2)} {self.n(2)}",
                f"0{r.choice('67')}.{self.n(2)}.{self.n(2)}.{self.n(2)}.{self.n(2)}",
                f"06-{self.n(8)}", f"020 {self.n(3)} {self.n(4)}",
                f"0{self.n(5, '9')} {self.n(5)}",
                f"0{self.n(1, '3')}-{self.n(4)}-{self.n(4)}", f"090-{self.n(4)}-{self.n(4)}",
                f"(0{r.choice('2378')}) {self.n(4)} {self.n(4)}", f"04{self.n(2)} {self.n(3)} {self.n(3)}",
                f"({self.n(2, '1')}) 9{self.n(4)}-{self.n(4)}",
                f"{self.n(3, '67')} {self.n(2)} {self.n(2)} {self.n(2)}",
                f"{self.n(3, '3')} {self.n(3)} {self.n(4)}", f"06 {self.n(4)} {self.n(4)}",
            ])
        else:  # E.164 without '+': international call prefixes or bare digits
            value = r.choice([
                f"00 44 {self.n(2, '2')} {self.n(4)} {self.n(4)}", f"0049 {self.n(2, '3')} {self.n(8)}",
                f"011 44 {self.n(2, '2')} {self.n(4)} {self.n(4)}", f"0033{self.n(9, '1234567')}",
                f"1{self.n(3, '23456789')}{self.n(3, '23456789')}{self.n(4)}", f"44{self.n(2, '2')}{self.n(8)}",
                f"49{self.n(2, '3')}{self.n(8)}",
            ])
        if r.random() < 0.12:
            value += r.choice([f" ext. {self.n(3)}", f" x{self.n(2)}", f" ext {self.n(4)}", f" extension {self.n(2)}",
                               f" #{self.n(3)}"])
            kind += "+ext"
        return value, kind

    # -- card
    def card(self) -> tuple[str, str]:
        r = self.r
        brand, prefix, length = r.choice([
            ("visa", "4", 16), ("visa13", "4", 13), ("visa19", "4", 19), ("mc", str(r.randint(51, 55)), 16),
            ("mc2", str(r.randint(2221, 2720)), 16), ("amex", r.choice(["34", "37"]), 15),
            ("discover", r.choice(["6011", "65", "644"]), 16), ("diners", "36", 14),
            ("jcb", str(r.randint(3528, 3589)), 16), ("unionpay", "62", r.choice([16, 17, 18, 19])),
            ("maestro", r.choice(["6759", "6304", "5018"]), r.choice([16, 18, 19])),
        ])
        n = _luhn_complete(prefix + self.n(length - len(prefix) - 1))
        if length == 15:
            groups = [n[:4], n[4:10], n[10:]]
        elif length == 14:
            groups = [n[:4], n[4:10], n[10:]]
        else:
            groups = [n[i:i + 4] for i in range(0, length, 4)]
        sep = r.choice([" ", " ", "-", ""])
        return sep.join(groups), f"{brand}{'/' + repr(sep) if sep else '/plain'}"

    # -- IBAN
    def iban(self) -> tuple[str, str]:
        r = self.r
        country, bban, variant = r.choice([
            ("DE", self.n(18), "DE"), ("GB", self.a(4) + self.n(14), "GB"), ("GB", self.n(18), "GB-digit-bank"),
            ("FR", self.n(10) + self.c(11) + self.n(2), "FR"), ("NL", self.a(4) + self.n(10), "NL"),
            ("NL", self.n(14), "NL-all-digit"), ("NL", self.n(14), "NL-all-digit"), ("ES", self.n(20), "ES"),
            ("IT", self.a(1) + self.n(10) + self.c(12), "IT"), ("BE", self.n(12), "BE"),
            ("CH", self.n(5) + self.c(12), "CH"), ("AT", self.n(16), "AT"), ("PL", self.n(24), "PL"),
            ("SE", self.n(20), "SE"), ("NO", self.n(11), "NO"), ("PT", self.n(21), "PT"),
            ("IE", self.a(4) + self.n(14), "IE"), ("LU", self.n(3) + self.c(13), "LU"),
            ("MT", self.a(4) + self.n(5) + self.c(18), "MT"),
        ])
        s = _iban(country, bban)
        if r.random() < 0.6:
            s = " ".join(s[i:i + 4] for i in range(0, len(s), 4))
            variant += "/grouped"
        if r.random() < 0.06:
            s = s.lower()
            variant += "/lower"
        return s, variant

    # -- IP
    def ip(self) -> tuple[str, str]:
        r = self.r
        kind = r.choice(["v4", "v4", "v4-private", "v6-full", "v6-compressed", "v6-upper", "v6-mapped"])
        if kind == "v4":
            return ".".join(str(r.randint(1, 254)) for _ in range(4)), kind
        if kind == "v4-private":
            return r.choice([f"10.{r.randint(0, 255)}.{r.randint(0, 255)}.{r.randint(1, 254)}",
                             f"192.168.{r.randint(0, 255)}.{r.randint(1, 254)}",
                             f"172.{r.randint(16, 31)}.{r.randint(0, 255)}.{r.randint(1, 254)}"]), kind
        groups = [f"{r.randint(0, 0xFFFF):x}" for _ in range(8)]
        if kind == "v6-full":
            return ":".join(groups), kind
        if kind == "v6-compressed":
            k = r.randint(1, 5)
            return ":".join(groups[:k]) + "::" + ":".join(groups[k + 2:]), kind
        if kind == "v6-upper":
            return ("fe80::" if r.random() < 0.5 else "2001:DB8::") + ":".join(groups[5:]).upper(), kind
        return f"::ffff:{r.randint(1, 223)}.{r.randint(0, 255)}.{r.randint(0, 255)}.{r.randint(1, 254)}", kind

    def ssn(self) -> tuple[str, str]:
        r = self.r
        area = r.choice([a for a in range(1, 900) if a != 666])
        s = f"{area:03d}{r.randint(1, 99):02d}{r.randint(1, 9999):04d}"
        sep = r.choice(["-", "-", " ", ".", ""])
        return (f"{s[:3]}{sep}{s[3:5]}{sep}{s[5:]}" if sep else s), repr(sep) if sep else "plain"

    def nino(self) -> tuple[str, str]:
        r = self.r
        while True:
            p = r.choice("ABCEGHJKLMNOPRSTWXYZ") + r.choice("ABCEGHJKLMNPRSTWXYZ")
            if p not in ("BG", "GB", "NK", "KN", "NT", "TN", "ZZ"):
                break
        d, suffix = self.n(6), r.choice("ABCD")
        v, variant = (f"{p} {d[:2]} {d[2:4]} {d[4:]} {suffix}", "spaced") if r.random() < 0.5 else (f"{p}{d}{suffix}",
                                                                                                     "plain")
        if r.random() < 0.08:
            return v.lower(), variant + "/lower"
        return v, variant

    def nir(self) -> tuple[str, str]:
        r = self.r
        dept = r.choice([f"{r.randint(1, 95):02d}", "2A", "2B", "75", "13"])
        if dept == "20":
            dept = "21"
        body = (r.choice("12") + f"{r.randint(0, 99):02d}" + f"{r.randint(1, 12):02d}" + dept
                + f"{r.randint(1, 990):03d}" + f"{r.randint(1, 999):03d}")
        s = body + _nir_key(body)
        if r.random() < 0.6:
            return f"{s[0]} {s[1:3]} {s[3:5]} {s[5:7]} {s[7:10]} {s[10:13]} {s[13:]}", "spaced"
        return s, "plain"

    def dob(self) -> tuple[str, str]:
        r = self.r
        y, m, d = r.randint(1935, 2008), r.randint(1, 12), r.randint(1, 28)
        months = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
                  "November", "December"]
        v = r.choice([f"{y}-{m:02d}-{d:02d}", f"{m:02d}/{d:02d}/{y}", f"{d:02d}/{m:02d}/{y}", f"{d:02d}.{m:02d}.{y}",
                      f"{d}-{m}-{y}", f"{m}/{d}/{y % 100:02d}", f"{months[m - 1]} {d}, {y}", f"{d} {months[m - 1]} {y}",
                      f"{months[m - 1][:3]} {d} {y}", f"{d}th of {months[m - 1]} {y}"])
        return v, "date"


# Sentence templates: {v} is the planted value. Several carry no context word.
TEMPLATES: dict[str, list[str]] = {
    "EMAIL_ADDRESS": ["Send the draft to {v} tonight.", "From: {v}", "reply-to <{v}>", "mailto:{v}",
                      "({v}) asked for a refund", "Her address, {v}, bounced.", "contact {v};"],
    "PHONE_NUMBER": ["Call {v} after 6pm.", "Tel: {v}", "mobile {v}", "ring me on {v}, thanks",
                     "The hotline ({v}) was busy.", "fax: {v}.", "Phone {v}"],
    "CREDIT_CARD": ["Charge it to {v}.", "card no. {v}", "PAN {v} was declined", "paid with {v} yesterday",
                    "Refund to card {v}, please."],
    "IBAN_CODE": ["Pay into {v} by Monday.", "IBAN: {v}", "account {v} (savings)", "Wire it to {v}.",
                  "Bank details {v}"],
    "IP_ADDRESS": ["Blocked {v} at the firewall.", "client={v}", "ssh from {v} failed", "Host {v} is down.",
                   "[{v}] timeout"],
    "US_SSN": ["SSN: {v}", "social security no. {v}", "SSN {v} on file.", "Her Social Security number is {v}."],
    "UK_NINO": ["NINO: {v}", "National Insurance number {v}.", "NI no {v}", "his NI number is {v}"],
    "FR_NIR": ["NIR : {v}", "numéro de sécurité sociale {v}", "INSEE {v}.", "Sécu {v}"],
    "DATE_OF_BIRTH": ["DOB: {v}", "born on {v}", "Date of birth: {v}.", "Born {v} in Lyon.", "D.O.B. {v}",
                      "birth date {v}", "Birthdate: {v}", "her birthday is {v}"],
}

# Clean sentences with numbers that are not PII, mixed into the records (false positives are counted against them).
FILLER = ["Order 48213 shipped on 2024-03-02.", "The meeting moved to 14:30.", "Total due: 1,250.00 EUR.",
          "Version 2.13.1 fixed the bug.", "Ticket #77812 is resolved.", "We received 3 boxes and 12 bags.",
          "Room 204, building B.", "Delivery window: 9 to 12.", "The warranty ends in 2027.",
          "See page 42, section 3.1.", "Temperature 21.5 C at 08:00.", "Invoice INV-2024-0042 attached.",
          "Batch 7 of 12 done in 3.2 s.", "Scores: 3-1, 2-2 and 0-1.", "It costs $19.99 (was $24.99).",
          "Flight LH 400 leaves at 13:05.", "Build 20240302.1 passed.", "Use port 8080 or 8443."]


def make_holdout(n: int = 600, seed: int = 20261128, per_record: tuple[int, int] = (2, 3)
                 ) -> tuple[list[dict], list[Plant]]:
    """n records {'id', 'text', 'notes'} and the values planted in them (types drawn evenly)."""
    g = _Gen(seed)
    makers = {"EMAIL_ADDRESS": g.email, "PHONE_NUMBER": g.phone, "CREDIT_CARD": g.card, "IBAN_CODE": g.iban,
              "IP_ADDRESS": g.ip, "US_SSN": g.ssn, "UK_NINO": g.nino, "FR_NIR": g.nir, "DATE_OF_BIRTH": g.dob}
    records: list[dict] = []
    planted: list[Plant] = []
    for i in range(n):
        fields = {"text": "", "notes": ""}
        for t in g.r.sample(STRUCTURED_TYPES, g.r.randint(*per_record)):
            f = g.r.choice(["text", "text", "notes"])
            value, variant = makers[t]()
            tpl = g.r.choice(TEMPLATES[t])
            pre = fields[f] + (" " if fields[f] else "")
            if g.r.random() < 0.4:
                pre += g.r.choice(FILLER) + " "
            start = len(pre) + tpl.index("{v}")
            fields[f] = pre + tpl.replace("{v}", value)
            planted.append(Plant(i, f, start, start + len(value), t, value, variant))
        if g.r.random() < 0.3:
            fields["notes"] = (fields["notes"] + " " + g.r.choice(FILLER)).strip()
        records.append({"id": i, **fields})
    for p in planted:
        assert records[p.record][p.field][p.start:p.end] == p.value
    return records, planted


def score_masking(planted: Sequence[Plant], replaced: Mapping[tuple[int, str], Iterable[tuple[int, int, str]]],
                  types: Sequence[str] = STRUCTURED_TYPES) -> dict[str, dict]:
    """Per type: planted, found (one replaced span of the type covers the value), in_clear (no letter or digit of
    the value replaced), partial (some but not all of its letters and digits replaced) and recall.

    `replaced[(record, field)]` lists the (start, end, type) spans the masker replaced, in original offsets.
    """
    stats = {t: {"planted": 0, "found": 0, "in_clear": 0, "partial": 0, "partial_examples": []} for t in types}
    for p in planted:
        if p.entity_type not in stats:
            continue
        s = stats[p.entity_type]
        s["planted"] += 1
        spans = list(replaced.get((p.record, p.field), ()))
        if any(t == p.entity_type and a <= p.start and b >= p.end for a, b, t in spans):
            s["found"] += 1
        alnum = [i for i in range(p.start, p.end) if p.value[i - p.start].isalnum()]
        covered = [i for i in alnum if any(a <= i < b for a, b, _ in spans)]
        if not covered:
            s["in_clear"] += 1
        elif len(covered) < len(alnum):
            s["partial"] += 1
            if len(s["partial_examples"]) < 5:
                s["partial_examples"].append(p.value)
    for s in stats.values():
        s["recall"] = s["found"] / s["planted"] if s["planted"] else None
    return stats


def false_positives(texts: Sequence[str], replaced: Sequence[Iterable[tuple[int, int, str]]]) -> dict:
    """On clean text (no PII planted), every replaced span is a false positive: counts per type and per text."""
    per_type: dict[str, int] = {}
    flagged = 0
    examples = []
    for text, spans in zip(texts, replaced):
        spans = list(spans)
        if spans:
            flagged += 1
        for a, b, t in spans:
            per_type[t] = per_type.get(t, 0) + 1
            if len(examples) < 10:
                examples.append((t, text[a:b]))
    return {"texts": len(texts), "texts_flagged": flagged, "spans": sum(per_type.values()), "per_type": per_type,
            "fp_rate_per_text": flagged / len(texts) if texts else None, "examples": examples}
