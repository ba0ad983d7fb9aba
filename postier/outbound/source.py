"""Which of our addresses outbound SMTP uses: `--outbound-family` and `--outbound-bind`.

The field's commonest complaint: Gmail refuses mail over IPv6 from an address without a PTR
record, and the sender's IPv6 has none. Restricting outbound SMTP to IPv4 (or binding each
family to an address that has a PTR) fixes it without touching the host's network setup.
The same choice tells `postier doctor` which families' PTR records matter.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from postier.errors import DeliveryError

FAMILIES = ("ipv4", "ipv6", "both")


def _version(address: str) -> int:
    return ipaddress.ip_address(address.split("%", 1)[0]).version


def parse_binds(values: Iterable[str], family: str, where: str) -> tuple[str, ...]:
    """Validated `--outbound-bind` values: IP addresses, at most one per family, each of a
    family in use. ValueError with the reason (the caller names the flag)."""
    if family not in FAMILIES:
        raise ValueError(f"{where}: {family!r} is not one of {', '.join(FAMILIES)}")
    seen: dict[int, str] = {}
    for raw in values:
        text = raw.strip().strip("[]")
        try:
            version = _version(text)
        except ValueError:
            raise ValueError(f"{where}: {raw!r} is not an IP address") from None
        if version in seen:
            raise ValueError(f"{where}: two IPv{version} addresses ({seen[version]}, {text})")
        if family != "both" and family != f"ipv{version}":
            raise ValueError(f"{where}: {text} is IPv{version} but outbound_family is {family}")
        seen[version] = text
    return tuple(seen.values())


@dataclass(frozen=True, slots=True)
class OutboundSource:
    """The families outbound SMTP may use and the source address of each (none: the
    kernel chooses)."""

    family: str = "both"
    bind: tuple[str, ...] = ()

    def versions(self) -> tuple[int, ...]:
        return {"ipv4": (4,), "ipv6": (6,)}.get(self.family, (4, 6))

    def usable(self, host: str, addresses: Sequence[str]) -> list[str]:
        """The addresses of `host` we may connect to, in their order. None left is a
        temporary failure: the host may gain an address of our family, or the operator may
        widen the choice; bouncing would lose mail over a local setting."""
        allowed = self.versions()
        kept = [a for a in addresses if _version(a) in allowed]
        if not kept:
            raise DeliveryError(
                f"{host} has no {' or '.join(f'IPv{v}' for v in allowed)} address "
                f"(outbound_family = {self.family})",
                permanent=False,
                code=451,
                enhanced="4.4.4",
            )
        return kept

    def local_addr(self, address: str) -> tuple[str, int] | None:
        """The (address, 0) to bind before connecting to `address`, or None."""
        version = _version(address)
        for source in self.bind:
            if _version(source) == version:
                return source, 0
        return None


def sending_addresses(family: str, binds: Iterable[str], ours: Iterable[str]) -> list[str]:
    """The addresses receivers will see our mail come from, for `doctor`'s PTR check: the
    bound ones, and our other addresses of a family in use that no bind replaces."""
    source = OutboundSource(family, parse_binds(binds, family, "outbound_bind"))
    bound = {_version(b) for b in source.bind}
    kept = [a for a in ours if _version(a) in source.versions() and _version(a) not in bound]
    return list(dict.fromkeys([*source.bind, *kept]))
