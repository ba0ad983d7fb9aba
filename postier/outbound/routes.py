"""Transport routes: a fixed next hop per domain, in place of the MX look-up.

The TOML table `routes` maps a domain, or every subdomain of one written `.example.org`, to
one of (Postfix's transport(5) spellings, so an operator's habits carry over):

- `smtp:[host]:port`  that host, no MX look-up (brackets as in Postfix);
- `smtp:host[:port]`  the MX hosts of `host` (a relay reached by its own MX records);
- `lmtp:target`       an LMTP server (`HOST:PORT`, `[v6]:PORT` or a UNIX socket path);
- `error:X.Y.Z text`  refuse: a 5.x.x status bounces, a 4.x.x one defers.

The exact domain wins over a subdomain pattern, and a longer pattern over a shorter one, so
`.lists.example.org` beats `.example.org`. `.example.org` does not match `example.org`
itself: write both when both are meant (Postfix's `parent_domain_matches_subdomains` off).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from postier.delivery.client import parse_hostport

_STATUS = re.compile(r"^([45])\.(\d{1,3})\.(\d{1,3})$")


@dataclass(frozen=True, slots=True)
class Route:
    """One next hop. `kind` is `smtp`, `lmtp` or `error`; the other fields belong to it."""

    kind: str
    host: str = ""  # smtp: the host (or the domain whose MX hosts to use)
    port: int = 0  # smtp; 0: the usual port (25, or --remote-port)
    mx: bool = True  # smtp: look up MX records of `host` (False for `[host]`)
    target: str = ""  # lmtp
    enhanced: str = ""  # error: X.Y.Z
    text: str = ""  # error: the text of the reply

    @classmethod
    def parse(cls, spec: str) -> Route:
        """From the table's value; ValueError with a sentence an operator can act on."""
        kind, sep, rest = spec.strip().partition(":")
        kind = kind.lower()
        rest = rest.strip()
        if not sep or not rest:
            raise ValueError(f"{spec!r}: expected smtp:HOST, lmtp:TARGET or error:X.Y.Z TEXT")
        if kind == "smtp":
            bracketed = rest.startswith("[")
            host, port = parse_hostport(rest, 0)
            # `[host]` names a host; a bare name asks for its MX records, an address cannot.
            return cls("smtp", host=host.lower(), port=port, mx=not bracketed)
        if kind == "lmtp":
            if not rest.startswith(("/", "unix:")):
                parse_hostport(rest, 24)  # ValueError on a bad HOST:PORT
            return cls("lmtp", target=rest)
        if kind == "error":
            status, _, text = rest.partition(" ")
            match = _STATUS.match(status)
            if match is None:
                raise ValueError(f"{spec!r}: expected error:X.Y.Z TEXT with X 4 or 5")
            return cls(
                "error", enhanced=status, text=text.strip() or "Mail for this domain is refused"
            )
        raise ValueError(f"{spec!r}: unknown transport {kind!r} (smtp, lmtp or error)")

    @property
    def permanent(self) -> bool:
        return self.enhanced.startswith("5")

    @property
    def code(self) -> int:
        """The reply code of an `error:` route (550 or 450, as Postfix's error(8) uses)."""
        return 550 if self.permanent else 450

    def __str__(self) -> str:
        if self.kind == "smtp":
            host = self.host if self.mx else f"[{self.host}]"
            return f"smtp:{host}:{self.port}" if self.port else f"smtp:{host}"
        if self.kind == "lmtp":
            return f"lmtp:{self.target}"
        return f"error:{self.enhanced} {self.text}"


def _domain_key(key: str) -> str:
    return key.strip().lower().rstrip(".")


def parse_routes_table(table: object, where: str) -> dict[str, Route]:
    """Check the TOML table; ValueError naming the first bad entry."""
    if not isinstance(table, Mapping):
        raise ValueError(f'{where}: expected a table of domain = "transport:next-hop"')
    out: dict[str, Route] = {}
    for key, value in table.items():
        domain = _domain_key(str(key))
        if not domain or domain == "." or " " in domain:
            raise ValueError(f"{where}: {key!r} is not a domain or .subdomain pattern")
        if not isinstance(value, str):
            raise ValueError(f'{where}: {key!r}: expected a string such as "smtp:[host]:25"')
        try:
            out[domain] = Route.parse(value)
        except ValueError as exc:
            raise ValueError(f"{where}: {key!r}: {exc}") from None
    return out


class RouteTable:
    """Domain → Route, exact match first, then the most specific `.parent` pattern."""

    def __init__(self, routes: Mapping[str, Route] | Iterable[tuple[str, Route]] = ()) -> None:
        items = routes.items() if isinstance(routes, Mapping) else routes
        self._routes = {_domain_key(k): v for k, v in items}

    @classmethod
    def from_config(cls, pairs: Iterable[tuple[str, str]]) -> RouteTable:
        """From `Config.routes` (already validated at load time)."""
        return cls((k, Route.parse(v)) for k, v in pairs)

    def __bool__(self) -> bool:
        return bool(self._routes)

    def lookup(self, domain: str) -> Route | None:
        domain = _domain_key(domain)
        found = self._routes.get(domain)
        if found is not None:
            return found
        labels = domain.split(".")
        for i in range(1, len(labels)):
            found = self._routes.get("." + ".".join(labels[i:]))
            if found is not None:
                return found
        return None
