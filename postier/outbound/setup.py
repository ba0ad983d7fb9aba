"""Build the outbound TLS policy from the configuration (one place for the daemon to call)."""

from __future__ import annotations

from postier.config import Config
from postier.dns import Resolver, SecureLookups
from postier.outbound.dane import Dane
from postier.outbound.mta_sts import MtaSts
from postier.outbound.tls_policy import Level, TlsPolicy
from postier.outbound.tlsrpt import DB_NAME, TlsReports
from postier.tls import client_context

MTA_STS_CACHE = "mta-sts"  # under the queue directory


def make_tls_policy(config: Config, resolver: Resolver) -> TlsPolicy:
    """The operator's table, plus MTA-STS and DANE unless turned off."""
    table = {domain: Level(level) for domain, level in config.tls_policy}
    lookups = SecureLookups(resolver)
    reports = TlsReports(config.queue_dir / DB_NAME)
    mta_sts = None
    if config.mta_sts:
        context = client_context(verify=True, ca_file=config.tls_ca_file)
        mta_sts = MtaSts(
            lookups,
            config.queue_dir / MTA_STS_CACHE,
            context=context,
            port=config.mta_sts_port,
            reports=reports,
        )
    dane = Dane(lookups) if config.dane else None
    return TlsPolicy(table, mta_sts=mta_sts, dane=dane, reports=reports)
