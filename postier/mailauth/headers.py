"""The header section of a spooled message, read once and bounded, and its From domains.

Why bounded: DKIM and DMARC only need the header section, and a peer controls its size. We
read at most `MAX_HEADER_BYTES`; past that the header section is "too large" (DKIM answers
permerror, DMARC uses the From fields found in the part read).
"""

from __future__ import annotations

import email.utils
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from postier.dns import to_ascii_domain

MAX_HEADER_BYTES = 256 * 1024
MAX_LINE = 64 * 1024
MAX_ADDRESS_FIELD = 16 * 1024  # a From field longer than this is not parsed for addresses
_FIELD_NAME = re.compile(rb"[\x21-\x39\x3b-\x7e]+")  # RFC 5322 ftext


@dataclass(frozen=True, slots=True)
class HeaderSection:
    """Header lines with CRLF ends (no blank line), where the body starts, whether cut short."""

    raw: bytes
    body_offset: int
    too_large: bool


def read_header_section(path: Path, offset: int) -> HeaderSection:
    """Read the header section of the message that starts at `offset` in `path` (blocking)."""
    lines: list[bytes] = []
    size = 0
    too_large = False
    with open(path, "rb") as f:
        f.seek(offset)
        pos = offset
        while True:
            line = f.readline(MAX_LINE)
            pos += len(line)
            if not line or line in (b"\n", b"\r\n"):
                break
            size += len(line)
            if size > MAX_HEADER_BYTES or not line.endswith(b"\n"):  # or a line over MAX_LINE
                too_large = True
                break
            lines.append(line.rstrip(b"\r\n") + b"\r\n")
    return HeaderSection(b"".join(lines), pos, too_large)


def header_fields(raw: bytes) -> list[tuple[bytes, bytes]]:
    """(lower-case name, unfolded value) for each field; lines that are no field are skipped."""
    out: list[tuple[bytes, bytes]] = []
    for line in raw.split(b"\r\n"):
        if not line:
            continue
        if line[:1] in (b" ", b"\t"):
            if out:
                out[-1] = (out[-1][0], out[-1][1] + line)
            continue
        name, sep, value = line.partition(b":")
        if sep and _FIELD_NAME.fullmatch(name):
            out.append((name.lower(), value.strip()))
    return out


def _addresses(values: Iterable[bytes]) -> Iterator[str]:
    """The addresses in address-list fields; a value the parser cannot take yields none."""
    for value in values:
        if len(value) > MAX_ADDRESS_FIELD:
            continue
        try:
            pairs = email.utils.getaddresses([value.decode("utf-8", "replace")])
        except (RecursionError, ValueError, IndexError):  # the stdlib parser on hostile input
            continue
        for _name, addr in pairs:
            yield addr


def from_domains(raw: bytes) -> list[str]:
    """The domains of every address in every From field, A-label form, in order, no repeats.

    DMARC (RFC 7489 §6.6.1) evaluates the author domain; a message with several is judged on
    each, so an added second From cannot hide a failing one.
    """
    domains: list[str] = []
    for addr in _addresses(v for n, v in header_fields(raw) if n == b"from"):
        _, at, domain = addr.rpartition("@")
        if not at or not domain:
            continue
        try:
            domain = to_ascii_domain(domain)
        except ValueError:
            continue
        if domain not in domains:
            domains.append(domain)
    return domains
