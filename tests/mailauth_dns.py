"""Zone helpers for the message-authentication tests (SPF, DKIM keys, DMARC) on tests/dnsserver.

The responder takes TXT values as zone-file text; `txt()` turns one record value into that text,
split into quoted strings of at most 255 octets as DNS requires.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from postier.dns import Resolver
from tests.dnsserver import DnsServer, Zone


def txt(value: str) -> str:
    """One TXT record value as zone text: `"chunk" "chunk" ...`, each at most 255 octets."""
    raw = value.encode()
    chunks = [raw[i : i + 255] for i in range(0, len(raw), 255)] or [b""]
    quoted = []
    for chunk in chunks:
        text = chunk.decode("latin-1").replace("\\", "\\\\").replace('"', '\\"')
        quoted.append(f'"{text}"')
    return " ".join(quoted)


def txt_zone(records: dict[str, str | list[str]]) -> Zone:
    """{name: value or [values]} -> a zone with those TXT records."""
    zone: Zone = {}
    for name, value in records.items():
        values = value if isinstance(value, list) else [value]
        zone[name] = {"TXT": [txt(v) for v in values]}
    return zone


@contextlib.contextmanager
def responder(zone: Zone, timeout: float = 1.0) -> Iterator[tuple[DnsServer, Resolver]]:
    """A loopback responder for `zone` and a resolver pointed at it (stopped on exit)."""
    with DnsServer(zone) as server:
        yield server, Resolver("127.0.0.1", server.port, timeout=timeout)
