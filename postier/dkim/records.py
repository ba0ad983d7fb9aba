"""The DNS records that publish DKIM keys, written so that people can paste them anywhere.

A TXT record is a list of character-strings of at most 255 octets each (RFC 1035 §3.3); an
RSA-2048 value is about 410 octets, so a zone file needs it split, while most web panels
want the whole value on one line and split it themselves. Getting either wrong is the most
common "my DKIM record is truncated" complaint, so both spellings come from here.
"""

from __future__ import annotations

from postier.dkim.keys import DkimKey

MAX_STRING = 255  # octets in one TXT character-string


def split_value(value: str, size: int = MAX_STRING) -> list[str]:
    """The value cut into pieces of at most `size` octets; joined again they are the value.

    DKIM values are ASCII, so octets and characters are the same; anything else is refused
    rather than split inside a UTF-8 sequence.
    """
    data = value.encode("ascii")
    return [data[i : i + size].decode("ascii") for i in range(0, len(data), size)] or [""]


def _quoted(piece: str) -> str:
    return '"' + piece.replace("\\", "\\\\").replace('"', '\\"') + '"'


def zone_file_line(key: DkimKey) -> str:
    """`SEL._domainkey.DOMAIN. IN TXT ( "v=DKIM1; k=rsa; p=…" "…" )`, strings <= 255 octets."""
    strings = " ".join(_quoted(piece) for piece in split_value(key.dns_value()))
    return f"{key.dns_name()}. IN TXT ( {strings} )"


def plain_value(key: DkimKey) -> str:
    """The whole value on one line, for DNS web panels that take it unsplit."""
    return key.dns_value()
