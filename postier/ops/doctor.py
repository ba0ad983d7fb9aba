"""`postier doctor`: is this server's DNS, reverse DNS and certificate right for sending mail?

    postier doctor [-c FILE] [DOMAIN ...] [--dns-server IP[:PORT]] [--records]

Doctor reads the same configuration as `postier serve` (so it checks the host name, addresses,
domains, DKIM keys and certificate the server really uses) and prints one line per problem,
each starting `PROBLEM <check> <subject>:`, with what is wrong and the exact fix, then a
one-line summary. Exit 0 when nothing is wrong, 1 when something is, 2 on bad usage.

It is meant to be quiet when things are right: it never warns about a record `--records`
recommends, and a DNS failure is reported as such, never as a missing record.

Which addresses are ours: `public_ip` (`--public-ip`), else the addresses the mx listeners
bind. Which port the certificate check uses: the mx listener's (25 in production). Which CAs
it trusts: the system's, or `--tls-ca-file` (tests use a private CA).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Awaitable
from pathlib import Path

from postier.config import Config
from postier.dns import parse_dns_server, to_ascii_domain
from postier.errors import ConfigError
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
from postier.ops.records import certificate_path, dkim_keys_dir, our_addresses, zone_snippet

__all__ = ["add_arguments", "diagnose", "run"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    from postier.cli import _add_server_options  # the very settings `serve` reads

    _add_server_options(p)
    p.add_argument("domains", nargs="*", metavar="DOMAIN", help="domains to check (default: all)")
    p.add_argument("--records", action="store_true", help="print the DNS records to publish")
    p.add_argument(
        "--dns-timeout",
        dest="dns_timeout",
        type=float,
        default=5.0,
        help="seconds to wait for each DNS answer (default 5)",
    )
    for flag, dest, text in (
        ("--tls-ca-file", "tls_ca_file", "CA bundle to verify our certificate"),
        ("--dkim-keys", "dkim_keys", "DKIM keys, DIR/<domain>/<selector>.pem"),
    ):
        try:  # `serve` may define it already (outbound TLS, DKIM signing): then share it
            p.add_argument(flag, dest=dest, help=text)
        except argparse.ArgumentError:
            pass


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
        checks.extend(check_ptr(host, lookup, address) for address in addresses)
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


def _fail(message: str) -> int:
    print(f"postier doctor: {message}", file=sys.stderr)
    return 2


def run(args: argparse.Namespace) -> int:
    from postier.cli import load_config

    try:
        config = load_config(args)
    except ConfigError as exc:
        return _fail(str(exc))
    try:
        domains = [to_ascii_domain(d) for d in (args.domains or config.domain)]
    except ValueError as exc:
        return _fail(f"DOMAIN: {exc}")
    if not domains:
        return _fail("no domain to check: name one, or set domain in the config (-c FILE)")
    keys_text = getattr(args, "dkim_keys", None)
    dkim_keys = Path(keys_text) if keys_text else None
    if args.records:
        try:
            snippets = [zone_snippet(config, d, dkim_keys=dkim_keys) for d in domains]
        except ConfigError as exc:
            return _fail(str(exc))
        print("\n".join(snippets), end="")
        return 0
    try:
        server = parse_dns_server(config.dns_server) if config.dns_server else None
    except ValueError as exc:
        return _fail(f"--dns-server: {exc}")
    if not args.dns_timeout > 0:
        return _fail("--dns-timeout: must be a positive number of seconds")
    ca_text = getattr(args, "tls_ca_file", None) or getattr(config, "tls_ca_file", None)
    ca_file = Path(ca_text) if ca_text else None
    if ca_file is not None and not ca_file.is_file():
        return _fail(f"--tls-ca-file: {ca_file}: no such file")
    lookup = Lookup(server, timeout=args.dns_timeout)
    try:
        problems = asyncio.run(diagnose(config, domains, lookup, ca_file, dkim_keys))
    except ConfigError as exc:  # e.g. a DKIM key file we cannot use
        return _fail(str(exc))
    for problem in problems:
        print(problem.line())
    addresses = ", ".join(our_addresses(config)) or "unknown"
    scope = f"{', '.join(domains)} (host {config.hostname}, addresses {addresses})"
    if problems:
        count = f"{len(problems)} problem{'s' if len(problems) != 1 else ''}"
        print(f"doctor: {count} found for {scope}")
        return 1
    print(f"doctor: no problems found for {scope}")
    return 0
