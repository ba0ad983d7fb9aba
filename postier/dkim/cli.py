"""`postier dkim keygen` and `postier dkim record`: make a key, print what to publish.

The output is the two spellings DNS hosting takes: a zone-file line whose TXT value is split
into quoted strings of at most 255 octets (a longer string is what truncates DKIM records),
and the whole value on one line for web panels that split it themselves. stdout carries only
records, so `postier dkim record example.org --dkim-keys DIR >> zone` works; what we did and
what to do next goes to stderr.

The default selector is dated and names the key type, `rsa-YYYYMMDD` or `ed25519-YYYYMMDD`:
a rotation then needs no naming decision, and RSA and Ed25519 keys made the same day for dual
signing do not collide. Every key in `DIR/<domain>/` signs, so publish the record before the
daemon loads the key (start or SIGHUP), and retire a key by removing its file.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from postier.dkim.keys import KINDS, MIN_RSA_BITS, DkimKey, a_label, generate_key, keys_of
from postier.dkim.records import plain_value, zone_file_line
from postier.errors import ConfigError


def default_selector(kind: str, now: float | None = None) -> str:
    return f"{kind}-{time.strftime('%Y%m%d', time.gmtime(now))}"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="dkim_command", required=True)
    keygen = sub.add_parser("keygen", help="write a new key (0600) and print its DNS record")
    keygen.add_argument("domain", metavar="DOMAIN")
    keygen.add_argument("--dkim-keys", dest="dkim_keys", type=Path, required=True, metavar="DIR")
    keygen.add_argument("--selector", help="selector (default: rsa-YYYYMMDD / ed25519-YYYYMMDD)")
    keygen.add_argument("--type", dest="kind", choices=KINDS, default="rsa", help="default rsa")
    keygen.add_argument("--bits", type=int, help=f"RSA key size (at least {MIN_RSA_BITS})")
    record = sub.add_parser("record", help="print the DNS records of a domain's keys again")
    record.add_argument("domain", metavar="DOMAIN")
    record.add_argument("--dkim-keys", dest="dkim_keys", type=Path, required=True, metavar="DIR")


def _print_records(keys: list[DkimKey]) -> None:
    for key in keys:
        print(zone_file_line(key))
        print(plain_value(key))


def _keygen(args: argparse.Namespace) -> int:
    if args.kind == "ed25519" and args.bits is not None:
        print("postier dkim keygen: --bits applies to RSA keys only", file=sys.stderr)
        return 2
    selector = args.selector or default_selector(args.kind)
    try:
        key = generate_key(
            args.dkim_keys, args.domain, selector, args.kind, args.bits or MIN_RSA_BITS
        )
    except FileExistsError as exc:
        print(f"postier dkim keygen: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:
        print(f"postier dkim keygen: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"postier dkim keygen: {exc.filename}: {exc.strerror}", file=sys.stderr)
        return 1
    _print_records([key])
    print(
        f"postier dkim keygen: wrote {key.path} ({args.kind}); publish the TXT record above, "
        "then start or reload postier (SIGHUP) to sign with it",
        file=sys.stderr,
    )
    return 0


def _record(args: argparse.Namespace) -> int:
    try:
        domain = a_label(args.domain)
        keys = keys_of(args.dkim_keys, domain)
    except ValueError as exc:
        print(f"postier dkim record: {exc}", file=sys.stderr)
        return 2
    except ConfigError as exc:
        print(f"postier dkim record: {exc}", file=sys.stderr)
        return 2
    if not keys:
        print(
            f"postier dkim record: no keys for {domain} under {args.dkim_keys}; make one with "
            f"'postier dkim keygen {domain} --dkim-keys {args.dkim_keys}'",
            file=sys.stderr,
        )
        return 1
    _print_records(keys)
    return 0


def run(args: argparse.Namespace) -> int:
    if args.dkim_command == "keygen":
        return _keygen(args)
    return _record(args)
