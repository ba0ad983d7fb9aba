"""Backup MX: which recipients of the relay domains we accept (`--relay-domain`).

We accept mail for a relay domain on every listener, like Postfix's `relay_domains`: the
whole domain, or only the addresses listed in `--relay-recipients` (one a line, `#`
comments), so a backup does not accept mail the primary would refuse and then bounce it
to a forged sender (backscatter). Delivery of that mail is `NextHops.backup_hops`'s job.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from postier.errors import ConfigError
from postier.protocol.replies import Reply

UNKNOWN_RELAY_RECIPIENT = Reply(550, "5.1.1", "No such user here (not a relay recipient)")


def load_relay_recipients(path: Path) -> frozenset[str]:
    """The file's addresses, lower-case; ConfigError naming the line of a bad one."""
    out: set[str] = set()
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"relay_recipients: {path}: cannot read: {exc}") from None
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        local, at, domain = line.rpartition("@")
        if not at or not local or not domain or " " in line:
            raise ConfigError(f"relay_recipients: {path}:{n}: {line!r} is not an address")
        out.add(line.lower())
    return frozenset(out)


class RelayDomains:
    """The relay domains and, when given, their valid recipients."""

    def __init__(self, domains: Iterable[str], recipients: frozenset[str] | None = None) -> None:
        self.domains = frozenset(d.lower().rstrip(".") for d in domains)
        self.recipients = recipients

    @classmethod
    def from_config(cls, domains: Iterable[str], recipients_file: Path | None) -> RelayDomains:
        recipients = load_relay_recipients(recipients_file) if recipients_file else None
        return cls(domains, recipients)

    def __bool__(self) -> bool:
        return bool(self.domains)

    def covers(self, domain: str) -> bool:
        return domain.lower().rstrip(".") in self.domains

    def refusal(self, address: str) -> Reply | None:
        """None when we take mail for `address` (its domain is covered), else the reply."""
        if self.recipients is None or address.lower() in self.recipients:
            return None
        return UNKNOWN_RELAY_RECIPIENT
