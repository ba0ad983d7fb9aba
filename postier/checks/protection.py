"""The inbound defences of one worker, built once from the configuration.

The checks of issue 16 (client rate limits, DNSBL, greylisting, rspamd) share what is costly
or must be shared: the SQLite state files under the queue directory (shared by every worker,
kept across restarts), one DNS resolver, one rspamd connection pool, the exempt networks and
the clock. `Protection` holds those; the check modules only decide.

The clock is `time.time`, except in tests: `POSTIER_TEST_CLOCK_FILE` names a file holding a
number of seconds added to it, so a test moves time forward for a running server (greylist
windows, rate-limit refills) without waiting. Production pays nothing for the hook: the
variable is read once, here.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import dns.asyncresolver

from postier.checks.dnsbl import DnsblChecker, DnsblSite
from postier.checks.greylist_store import GreylistStore
from postier.checks.ratelimit import RateLimiter
from postier.checks.rspamd_client import RspamdClient
from postier.config import Config
from postier.dns import Resolver, parse_dns_server
from postier.netaddr import in_networks, parse_networks

TEST_CLOCK_ENV = "POSTIER_TEST_CLOCK_FILE"
DNSBL_TIMEOUT = 5.0  # seconds; a slow list lets the client through (logged), never blocks mail
RSPAMD_TIMEOUT = 60.0  # a 35 MB message takes rspamd a few seconds


def make_clock() -> Callable[[], float]:
    """`time.time`, or time shifted by the offset in the test clock file."""
    path = os.environ.get(TEST_CLOCK_ENV)
    if not path:
        return time.time
    clock_file = Path(path)

    def shifted() -> float:
        try:
            return time.time() + float(clock_file.read_text().strip() or 0)
        except (OSError, ValueError):
            return time.time()

    return shifted


@dataclass
class Protection:
    """Shared state of the inbound defences; a part is None while its feature is off."""

    config: Config
    clock: Callable[[], float] = time.time
    rate: RateLimiter | None = None
    greylist: GreylistStore | None = None
    dnsbl: DnsblChecker | None = None
    rspamd: RspamdClient | None = None
    resolver: Resolver | None = None  # for SPF (greylist_allow_domains)
    _exempt: Callable[[str], bool] = field(init=False)

    def __post_init__(self) -> None:
        networks = parse_networks(self.config.exempt_networks, "exempt_networks")
        self._exempt = lru_cache(maxsize=4096)(lambda ip: in_networks(ip, networks))

    @classmethod
    def from_config(cls, config: Config, resolver: Resolver | None = None) -> Protection:
        """Build the parts the configuration turns on (state files open on first use).

        `resolver` is the worker's shared one (its TTL cache serves SPF here and in the
        mailauth check alike); one is made from the configuration when none is given."""
        clock = make_clock()
        state = Path(config.queue_dir)
        limits = (
            config.client_connections_per_minute,
            config.client_messages_per_minute,
            config.client_recipients_per_minute,
        )
        dns_server = parse_dns_server(config.dns_server) if config.dns_server else None
        return cls(
            config,
            clock=clock,
            rate=RateLimiter(state / "ratelimit.sqlite", clock=clock) if any(limits) else None,
            greylist=GreylistStore(
                state / "greylist.sqlite",
                delay=config.greylist_delay,
                expire=config.greylist_expire,
                clock=clock,
            )
            if config.greylist
            else None,
            dnsbl=DnsblChecker(
                [DnsblSite.parse(s) for s in config.dnsbl], _dnsbl_resolver(dns_server)
            )
            if config.dnsbl
            else None,
            rspamd=RspamdClient(config.rspamd, timeout=RSPAMD_TIMEOUT) if config.rspamd else None,
            resolver=resolver or (Resolver(*dns_server) if dns_server else Resolver()),
        )

    def exempt(self, ip: str, auth_user: str | None = None) -> bool:
        """Authenticated clients and `exempt_networks` skip limits, DNSBL and greylisting."""
        return auth_user is not None or self._exempt(ip)


def _dnsbl_resolver(server: tuple[str, int] | None) -> dns.asyncresolver.Resolver:
    """A resolver with a short time-out: a slow list must not hold the client at RCPT."""
    resolver = dns.asyncresolver.Resolver(configure=server is None)
    if server is not None:
        resolver.nameservers = [server[0]]
        resolver.port = server[1]
    resolver.timeout = resolver.lifetime = DNSBL_TIMEOUT
    return resolver
