"""Run every doctor check at once and collect each problem once, in a stable order.

Host checks (addresses, PTR per address, certificate and TLSA) run once per run; domain checks
once per domain. All run concurrently: a run is a few dozen DNS questions and one SMTP
conversation, and waiting for them one after the other would make a slow name server the
whole story. A DNS failure in any check becomes one `dns` problem (identical lines from two
checks asking the same name are printed once).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from pathlib import Path

from postier.config import Config
from postier.ops.doctor_checks import DOMAIN_CHECKS, DomainContext
from postier.ops.doctor_dns import DnsFailure, Lookup
from postier.ops.doctor_host import (
    HostContext,
    check_addresses,
    check_certificate,
    check_ptr,
    check_tlsa,
)
from postier.ops.doctor_problem import Problem, dns_problem
from postier.ops.records import certificate_path, dkim_keys_dir, our_addresses
from postier.outbound.source import sending_addresses

__all__ = ["diagnose"]


def _mx_port(config: Config) -> int:
    ports = [spec.port for spec in config.mx]
    return 25 if not ports or 25 in ports else ports[0]


async def _guarded(check: Awaitable[list[Problem]], lookup: Lookup) -> list[Problem]:
    try:
        return await check
    except DnsFailure as failure:
        return [dns_problem(failure, lookup.describe_server())]


async def _certificate_and_tlsa(host: HostContext, lookup: Lookup) -> list[Problem]:
    problems, leaf = await check_certificate(host, lookup)
    return problems + await _guarded(check_tlsa(host, lookup, leaf), lookup)


async def diagnose(
    config: Config,
    domains: list[str],
    lookup: Lookup,
    ca_file: Path | None = None,
    dkim_keys: Path | None = None,
) -> list[Problem]:
    """Every problem found, in a stable order (host first, then each domain), each once."""
    hostname = config.hostname.rstrip(".").lower()
    addresses = tuple(our_addresses(config))
    host = HostContext(hostname, addresses, _mx_port(config), ca_file, certificate_path(config))
    checks: list[Awaitable[list[Problem]]] = []
    early: list[Problem] = []
    if addresses:
        checks.append(check_addresses(host, lookup))
        # PTR matters where mail leaves from: the outbound families and bind addresses.
        sending = sending_addresses(config.outbound_family, config.outbound_bind, addresses)
        checks.extend(check_ptr(host, lookup, address) for address in sending)
    else:
        early.append(
            Problem(
                "config",
                "public_ip",
                "public_ip is not set and no mx listener binds a public address, so doctor "
                "cannot tell our addresses",
                'set public_ip = ["ADDRESS", ...] in the config or pass --public-ip ADDRESS',
            )
        )
    checks.append(_certificate_and_tlsa(host, lookup))
    domain_ctx = DomainContext(config, hostname, addresses, dkim_keys_dir(config, dkim_keys))
    for domain in domains:
        checks.extend(check(domain_ctx, lookup, domain) for check in DOMAIN_CHECKS)
    results = await asyncio.gather(*(_guarded(c, lookup) for c in checks))
    seen: dict[str, Problem] = {}
    for problem in [*early, *(p for result in results for p in result)]:
        seen.setdefault(problem.line(), problem)
    return list(seen.values())
