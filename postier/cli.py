"""The `postier` command: serve, check-config, passwd, gen-cert, queue, sendmail.

Flag names are fixed by docs/configuration.md. Exit codes: 0 success; 2 bad usage or
configuration, with one line on stderr naming the file, key or flag; 1 any other failure.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from postier import __version__
from postier.config import Config, build, describe, load_toml
from postier.errors import ConfigError

# Subcommands implemented in their own modules: name -> (module, help). Each module offers
# add_arguments(parser) and run(args) -> int.
_MODULE_COMMANDS = {
    "passwd": ("postier.auth.passwd_cmd", "set, change or delete a password for SMTP AUTH"),
    "gen-cert": ("postier.gencert", "write a self-signed certificate and key"),
    "queue": ("postier.queue.cli", "list, show, flush or delete queued messages"),
    "sendmail": ("postier.sendmail", "submit a message from stdin, like /usr/sbin/sendmail"),
    "status": ("postier.ops.status", "sessions, messages, queue and TLS of the running server"),
    "dkim": ("postier.dkim.cli", "make DKIM keys and print their DNS records"),
    "doctor": ("postier.ops.doctor", "check the DNS records, PTR and certificate of this server"),
    "setup": ("postier.ops.setup", "write a working deployment for a domain, print DNS records"),
}


class _Parser(argparse.ArgumentParser):
    """argparse exits 2 on usage errors already; keep its message to one clear line."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        self.exit(2, f"{self.prog}: error: {message}\n")


def _add_server_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("-c", "--config", type=Path, help="TOML configuration file")
    p.add_argument("-H", "--hostname", help="name in the greeting, EHLO and Received headers")
    p.add_argument("-s", "--domain", action="append", help="a local domain (repeatable)")
    p.add_argument("-R", "--mail-root", dest="mail_root", help="where mailboxes live")
    p.add_argument(
        "-F", "--mailbox-format", dest="mailbox_format", help="maildir, mbox, spool or lmtp"
    )
    p.add_argument(
        "--mailbox-template",
        dest="mailbox_template",
        help="mailbox path template, e.g. /home/{user}/Maildir",
    )
    p.add_argument("--lmtp", help="LMTP target for -F lmtp: HOST:PORT or a UNIX socket path")
    p.add_argument("-u", "--users", help="local users file: lines 'address [mailbox]'")
    p.add_argument("-a", "--aliases", help="aliases file: lines 'alias: target, target'")
    # "-pass FILE" is the seeds' own spelling; argparse matches it exactly before "-P".
    p.add_argument("-P", "--pass", "-pass", dest="passwords", help="credentials for SMTP AUTH")
    p.add_argument("-Q", "--queue-dir", dest="queue_dir", help="the durable outbound queue")
    for role, text in (
        ("mx", "inbound listener ADDR:PORT (repeatable)"),
        ("local", "relay listener for local programs, loopback only (repeatable)"),
        ("submission", "STARTTLS + AUTH listener (repeatable)"),
        ("submissions", "implicit TLS + AUTH listener (repeatable)"),
    ):
        p.add_argument(f"--{role}", action="append", metavar="ADDR:PORT", help=text)
    p.add_argument("--tls-cert", dest="tls_cert", help="certificate chain (PEM)")
    p.add_argument("--tls-key", dest="tls_key", help="private key (PEM)")
    p.add_argument(
        "--tls-cert-dir", dest="tls_cert_dir", help="certbot-style directory of certs for SNI"
    )
    p.add_argument("--dns-server", dest="dns_server", help="resolver IP[:PORT] for MX look-ups")
    p.add_argument(
        "--public-ip", dest="public_ip", action="append", help="our public address (repeatable)"
    )
    p.add_argument("--remote-port", dest="remote_port", help="port of remote MX hosts")
    p.add_argument(
        "--no-dmarc-reject",
        dest="dmarc_reject",
        action="store_false",
        default=None,
        help="deliver DMARC p=reject failures (recorded) instead of answering 550 5.7.1",
    )
    p.add_argument("--smarthost", help="send all remote mail through HOST[:PORT]")
    p.add_argument(
        "--relay-domain", dest="relay_domain", action="append", help="backup MX for DOMAIN"
    )
    p.add_argument(
        "--relay-recipients", dest="relay_recipients", help="valid recipients of relay domains"
    )
    p.add_argument(
        "--outbound-family", dest="outbound_family", help="ipv4, ipv6 or both (outbound SMTP)"
    )
    p.add_argument(
        "--outbound-bind", dest="outbound_bind", action="append", help="source ADDR (per family)"
    )
    p.add_argument("--dkim-keys", dest="dkim_keys", help="DKIM keys: DIR/<domain>/<selector>.pem")
    p.add_argument("--workers", help="worker processes: N or auto (default auto, one per core)")
    p.add_argument(
        "--tls-ca-file",
        dest="tls_ca_file",
        help="CA bundle for verifying remote MX and MTA-STS policy hosts",
    )
    p.add_argument("--mta-sts-port", dest="mta_sts_port", help="port for MTA-STS policy fetches")
    p.add_argument(
        "--no-mta-sts",
        dest="mta_sts",
        action="store_const",
        const=False,
        help="do not apply MTA-STS policies to outbound mail",
    )
    p.add_argument(
        "--no-dane",
        dest="dane",
        action="store_const",
        const=False,
        help="do not apply DANE TLSA records to outbound mail",
    )
    p.add_argument("--user", help="drop privileges to this user after binding")
    p.add_argument("--log-level", dest="log_level", help="debug, info, warning or error")
    p.add_argument("--log-format", dest="log_format", help="text (default) or json")
    p.add_argument("--metrics", metavar="ADDR:PORT", help="Prometheus endpoint (/metrics)")
    p.add_argument("--max-message-size", dest="max_message_size", help="bytes (default 35 MB)")
    p.add_argument("--max-recipients", dest="max_recipients", help="per message (default 100)")
    p.add_argument("--max-connections", dest="max_connections", help="in total (default 1000)")
    p.add_argument("--max-connections-per-ip", dest="max_connections_per_ip", help="(default 50)")
    p.add_argument("--command-timeout", dest="command_timeout", help="seconds (default 300)")
    p.add_argument("--data-timeout", dest="data_timeout", help="seconds (default 300)")
    p.add_argument(
        "--inetd",
        metavar="ROLE",
        help="serve one SMTP session on stdin/stdout in ROLE (mx, local, submission), then exit",
    )
    p.add_argument(
        "--rspamd", help="rspamd's HTTP address for spam checks, e.g. http://127.0.0.1:11333"
    )


_CONFIG_FLAGS = [
    "hostname",
    "domain",
    "mail_root",
    "mailbox_format",
    "mailbox_template",
    "lmtp",
    "users",
    "aliases",
    "passwords",
    "queue_dir",
    "mx",
    "local",
    "submission",
    "submissions",
    "tls_cert",
    "tls_key",
    "tls_cert_dir",
    "dns_server",
    "public_ip",
    "remote_port",
    "dmarc_reject",
    "smarthost",
    "relay_domain",
    "relay_recipients",
    "outbound_family",
    "outbound_bind",
    "dkim_keys",
    "tls_ca_file",
    "mta_sts_port",
    "mta_sts",
    "dane",
    "workers",
    "user",
    "log_level",
    "log_format",
    "metrics",
    "max_message_size",
    "max_recipients",
    "max_connections",
    "max_connections_per_ip",
    "command_timeout",
    "data_timeout",
    "rspamd",
    "inetd",
]


def load_config(args: argparse.Namespace) -> Config:
    file_values: dict[str, Any] = load_toml(args.config) if args.config else {}
    flags = {name: getattr(args, name, None) for name in _CONFIG_FLAGS}
    return build(file_values, flags)


def make_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="postier", description="A small, secure, fast SMTP server.", allow_abbrev=False
    )
    parser.add_argument("--version", action="version", version=f"postier {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    sub.add_parser = functools.partial(sub.add_parser, allow_abbrev=False)  # type: ignore[method-assign]
    serve = sub.add_parser("serve", help="run the SMTP server in the foreground")
    _add_server_options(serve)
    check = sub.add_parser("check-config", help="validate and print the effective settings")
    _add_server_options(check)
    for name, (module_name, help_text) in _MODULE_COMMANDS.items():
        p = sub.add_parser(name, help=help_text)
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            p.set_defaults(_unavailable=module_name)
            continue
        module.add_arguments(p)
        p.set_defaults(_module=module)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)
    if getattr(args, "_unavailable", None):
        print(f"postier {args.command}: not available in this build", file=sys.stderr)
        return 1
    module = getattr(args, "_module", None)
    if module is not None:
        return int(module.run(args))
    try:
        config = load_config(args)
    except ConfigError as exc:
        print(f"postier: {exc}", file=sys.stderr)
        return 2
    if args.command == "check-config":
        print(describe(config))
        return 0
    from postier.net.daemon import serve

    try:
        if config.inetd:
            from postier.net.inetd import serve_inetd

            return serve_inetd(config)
        return serve(config)
    except ConfigError as exc:
        print(f"postier: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 0
