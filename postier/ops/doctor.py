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
import sys
from pathlib import Path

from postier.errors import ConfigError

__all__ = ["add_arguments", "run"]


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


def _fail(message: str) -> int:
    print(f"postier doctor: {message}", file=sys.stderr)
    return 2


def run(args: argparse.Namespace) -> int:
    # Imported here, not at the top: every `postier` command (sendmail too) imports this module
    # to build its parser, and the checks pull in asyncio, dnspython, pyspf and cryptography.
    import asyncio

    from postier.cli import load_config
    from postier.dns import parse_dns_server, to_ascii_domain
    from postier.ops.doctor_diagnose import diagnose
    from postier.ops.doctor_dns import Lookup
    from postier.ops.records import our_addresses, zone_snippet

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
