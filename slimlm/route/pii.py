"""Private spans in a prompt: find them, mask them for a remote tier, restore them in its answer.

Detection is by regular expression plus a checksum where the format has one, so that ordinary
numbers are not flagged: card numbers must pass the Luhn check, IBANs the ISO 13616 mod-97 check,
IPv4 addresses must have octets ≤ 255 and IPv6 addresses must parse. Person names would need a
named-entity model; none is available offline here, so names are *not* detected (documented in
docs/serving.md) — callers that need them must keep such requests local.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Callable

KINDS = ("email", "card", "iban", "ipv6", "ipv4", "phone")  # checked in this order; earlier kinds win overlaps

_PATTERNS: dict[str, re.Pattern[str]] = {
    "email": re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}"),
    "card": re.compile(r"(?<![\d-])\d(?:[ -]?\d){12,18}(?![\d-])"),
    "iban": re.compile(r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]){11,30}\b"),
    "ipv6": re.compile(r"(?<![\w:])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}(?![\w:])"),
    "ipv4": re.compile(r"(?<![\d.])(?:\d{1,3}\.){3}\d{1,3}(?![\d.])"),
    "phone": re.compile(r"(?<![\w+])(?:\+\d{1,3}[ .-]?)?(?:\(\d{1,4}\)[ .-]?)?\d{2,4}(?:[ .-]?\d{2,4}){1,4}(?!\w)"),
}


def luhn_ok(digits: str) -> bool:
    """The Luhn checksum of card numbers (ISO/IEC 7812)."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def iban_ok(text: str) -> bool:
    """ISO 13616: move the first four characters to the end, letters → 10..35, the number mod 97 is 1."""
    s = text.replace(" ", "")
    if not 15 <= len(s) <= 34:
        return False
    moved = s[4:] + s[:4]
    return int("".join(str(int(c, 36)) for c in moved)) % 97 == 1


def _ipv6_ok(text: str) -> bool:
    try:
        ipaddress.IPv6Address(text)
    except ValueError:
        return False
    return text.count(":") >= 2 and any(c.isalpha() or c == ":" for c in text)


def _phone_ok(text: str) -> bool:
    digits = re.sub(r"\D", "", text)
    has_sep = bool(re.search(r"[ .()+-]", text.strip()))
    return 7 <= len(digits) <= 15 and (has_sep or len(digits) >= 10)


_CHECKS: dict[str, Callable[[str], bool]] = {
    "email": lambda s: True,
    "card": lambda s: luhn_ok(re.sub(r"\D", "", s)),
    "iban": iban_ok,
    "ipv6": _ipv6_ok,
    "ipv4": lambda s: all(int(p) <= 255 for p in s.split(".")),
    "phone": _phone_ok,
}


@dataclass(frozen=True)
class Span:
    """One private span: ``text[start:end]`` is a value of ``kind``."""

    kind: str
    start: int
    end: int


def find_pii(text: str, kinds: tuple[str, ...] | list[str] = KINDS) -> list[Span]:
    """Non-overlapping private spans of ``text`` in order of position (earlier kinds in ``KINDS`` win)."""
    taken: list[Span] = []
    for kind in KINDS:
        if kind not in kinds:
            continue
        for m in _PATTERNS[kind].finditer(text):
            if any(m.start() < s.end and s.start < m.end() for s in taken):
                continue
            if _CHECKS[kind](m.group()):
                taken.append(Span(kind, m.start(), m.end()))
    return sorted(taken, key=lambda s: s.start)


def mask(text: str, spans: list[Span]) -> tuple[str, dict[str, str]]:
    """Replace each span with a placeholder like ``[EMAIL_1]``; returns the masked text and the
    placeholder → value table (kept in memory only, never logged). Equal values share a placeholder."""
    table: dict[str, str] = {}
    by_value: dict[str, str] = {}
    counts: dict[str, int] = {}
    out, at = [], 0
    for s in spans:
        value = text[s.start : s.end]
        if value not in by_value:
            counts[s.kind] = counts.get(s.kind, 0) + 1
            by_value[value] = f"[{s.kind.upper()}_{counts[s.kind]}]"
            table[by_value[value]] = value
        out += [text[at : s.start], by_value[value]]
        at = s.end
    out.append(text[at:])
    return "".join(out), table


def restore(text: str, table: dict[str, str]) -> str:
    """Put the private values back into an answer that quotes the placeholders."""
    for placeholder, value in table.items():
        text = text.replace(placeholder, value)
    return text


def kind_counts(spans: list[Span]) -> dict[str, int]:
    """What may be logged about private spans: how many of each kind, never their values."""
    counts: dict[str, int] = {}
    for s in spans:
        counts[s.kind] = counts.get(s.kind, 0) + 1
    return counts
