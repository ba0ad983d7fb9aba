"""`postier sendmail`: submit a message from stdin, as /usr/sbin/sendmail does.

So cron, scripts and mail(1) can send mail. The message goes into the maildrop directory
(`postier.queue.maildrop.drop`), never over the network: it works while the daemon is down,
and the daemon picks it up when it runs. Exit codes are sysexits(3), which is what callers
of sendmail test.

Input rules, as in Sendmail and Postfix:
- without `-i`/`-oi`, a line holding a single dot ends the message; with it, only EOF does
  (no dot-unstuffing either way: this is not SMTP);
- `-t` adds the addresses in To, Cc and Bcc to the command-line recipients and removes Bcc;
- a missing From, Date or Message-ID is added; a leading mbox `From ` line is dropped;
- CRLF becomes LF (the spool format); unqualified addresses get `@hostname`.
"""

from __future__ import annotations

import argparse
import errno
import itertools
import os
import pwd
import re
import socket
import sys
from collections.abc import Iterator, Sequence
from email.utils import formataddr, formatdate, getaddresses, make_msgid, parseaddr
from typing import IO, BinaryIO, TextIO

from postier.config import DEFAULT_QUEUE_DIR
from postier.queue.maildrop import drop, ensure_maildrop_dir, maildrop_dir, valid_address

EX_OK = 0
EX_USAGE = 64
EX_DATAERR = 65
EX_NOUSER = 67
EX_SOFTWARE = 70
EX_CANTCREAT = 73
EX_IOERR = 74
EX_TEMPFAIL = 75

DEFAULT_MAX_SIZE = 35 * 1024 * 1024
HEADER_LIMIT = 1024 * 1024  # past this much header text, the rest is treated as body
LINE_CHUNK = 64 * 1024
_HEADER_RE = re.compile(rb"^([!-9;-~]+)[ \t]*:")
_RECIPIENT_HEADERS = (b"to", b"cc", b"bcc")


class SendmailError(Exception):
    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The sendmail options (the lead's cli.py calls this for `postier sendmail`)."""
    parser.add_argument(
        "-t",
        dest="extract",
        action="store_true",
        help="also send to the To, Cc and Bcc addresses; remove Bcc",
    )
    parser.add_argument(
        "-i",
        dest="ignore_dots",
        action="store_true",
        help="a line with a single dot does not end the message",
    )
    parser.add_argument(
        "-o",
        dest="options",
        action="append",
        default=[],
        metavar="OPT",
        help="sendmail options; -oi is -i, the others are ignored",
    )
    parser.add_argument(
        "-f",
        "-r",
        dest="sender",
        metavar="SENDER",
        help="envelope sender (default: your login name); '<>' for none",
    )
    parser.add_argument(
        "-F", dest="full_name", metavar="NAME", help="full name for an added From: header"
    )
    parser.add_argument(
        "-b",
        dest="mode",
        default="m",
        metavar="MODE",
        help="only -bm (the default: read a message) is supported",
    )
    parser.add_argument("-B", dest="body_type", help=argparse.SUPPRESS)
    parser.add_argument("-N", dest="dsn_notify", help=argparse.SUPPRESS)
    parser.add_argument("-v", dest="verbose", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument(
        "-Q",
        "--queue-dir",
        default=None,
        metavar="DIR",
        help=f"the queue directory (default {DEFAULT_QUEUE_DIR})",
    )
    parser.add_argument(
        "--hostname",
        default=None,
        help="domain for unqualified addresses (default: this host's FQDN)",
    )
    parser.add_argument("recipients", nargs="*", metavar="RECIPIENT")


def _lines(stream: BinaryIO, ignore_dots: bool) -> Iterator[bytes]:
    """Input lines with LF endings, stopping at a lone dot unless `ignore_dots`. A very
    long line comes as several pieces; only a piece at the start of a line counts as one."""
    at_start = True
    while True:
        piece = stream.readline(LINE_CHUNK)
        if not piece:
            return
        if piece.endswith(b"\r\n"):
            piece = piece[:-2] + b"\n"
        if not ignore_dots and at_start and piece in (b".\n", b"."):
            return
        at_start = piece.endswith(b"\n")
        yield piece


def _split_headers(lines: Iterator[bytes]) -> tuple[list[list[bytes]], list[bytes]]:
    """Header fields (each a list of its physical lines) and the body lines read so far."""
    fields: list[list[bytes]] = []
    size = 0
    first = True
    for line in lines:
        if first and line.startswith(b"From "):
            first = False
            continue  # an mbox separator, not a header
        first = False
        if line in (b"\n", b""):
            return fields, []
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1].append(line)
        elif _HEADER_RE.match(line) and size < HEADER_LIMIT:
            fields.append([line])
        else:  # no header section, or a malformed line: the body starts here
            return fields, [line]
        size += len(line)
    return fields, []


def _name(field: list[bytes]) -> bytes:
    return field[0].split(b":", 1)[0].strip().lower()


def _value(field: list[bytes]) -> str:
    raw = b"".join(field).split(b":", 1)[1]
    return raw.decode("utf-8", "replace").replace("\n", " ")


def _qualify(address: str, hostname: str) -> str:
    return address if "@" in address else f"{address}@{hostname}"


def _parse_addresses(texts: list[str], hostname: str, what: str) -> list[str]:
    out = []
    for _name_part, address in getaddresses(texts):
        if not address:
            continue
        address = _qualify(address, hostname)
        if not valid_address(address):
            raise SendmailError(f"bad {what} address {address!r}", EX_NOUSER)
        out.append(address)
    return out


def _login_name() -> str:
    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        return os.environ.get("LOGNAME") or os.environ.get("USER") or "nobody"


def submit(args: argparse.Namespace, stdin: BinaryIO) -> str:
    """Read, check and drop the message; returns its queue id or raises SendmailError."""
    if args.mode != "m":
        raise SendmailError(f"-b{args.mode} is not supported (only -bm)", EX_USAGE)
    ignore_dots = args.ignore_dots or "i" in args.options
    hostname = args.hostname or socket.getfqdn()
    max_size = int(getattr(args, "max_size", 0) or DEFAULT_MAX_SIZE)
    login = _qualify(_login_name(), hostname)
    if args.sender is None:
        sender = login
    elif args.sender.strip() in ("", "<>"):
        sender = ""
    else:
        sender = _qualify(parseaddr(args.sender)[1] or args.sender.strip(), hostname)
        if not valid_address(sender):
            raise SendmailError(f"bad sender address {args.sender!r}", EX_DATAERR)
    recipients = _parse_addresses(list(args.recipients), hostname, "recipient")

    lines = _lines(stdin, ignore_dots)
    fields, body_start = _split_headers(lines)
    names = {_name(f) for f in fields}
    if args.extract:
        found = [_value(f) for f in fields if _name(f) in _RECIPIENT_HEADERS]
        recipients += _parse_addresses(found, hostname, "header recipient")
        fields = [f for f in fields if _name(f) != b"bcc"]
    recipients = list(dict.fromkeys(recipients))
    if not recipients:
        raise SendmailError("no recipients (give some, or use -t)", EX_USAGE)
    added = []
    if b"from" not in names:
        added.append(f"From: {formataddr((args.full_name or '', sender or login))}\n")
    if b"date" not in names:
        added.append(f"Date: {formatdate(localtime=True)}\n")
    if b"message-id" not in names:
        added.append(f"Message-ID: {make_msgid(domain=hostname)}\n")

    def write_body(f: IO[bytes]) -> None:
        size = 0
        for chunk in [b"".join(fl) for fl in fields] + [a.encode() for a in added] + [b"\n"]:
            f.write(chunk)
            size += len(chunk)
        for piece in itertools.chain(body_start, lines):
            size += len(piece)
            if size > max_size:
                raise SendmailError(f"message too large (limit {max_size} bytes)", EX_DATAERR)
            f.write(piece)

    directory = getattr(args, "queue_dir", None) or DEFAULT_QUEUE_DIR
    if not maildrop_dir(directory).is_dir():
        try:
            ensure_maildrop_dir(directory)
        except OSError as exc:
            raise SendmailError(
                f"{maildrop_dir(directory)}: {exc.strerror or exc} (has the daemon run once?)",
                EX_CANTCREAT,
            ) from None
    try:
        return drop(directory, sender, recipients, write_body)
    except OSError as exc:
        code = EX_TEMPFAIL if exc.errno in (errno.ENOSPC, errno.EDQUOT) else EX_CANTCREAT
        raise SendmailError(
            f"cannot write to {maildrop_dir(directory)}: {exc.strerror or exc}", code
        ) from None


def run(
    args: argparse.Namespace, *, stdin: BinaryIO | None = None, err: TextIO | None = None
) -> int:
    """`postier sendmail`: returns a sysexits code; one line on stderr when not 0."""
    err = err or sys.stderr
    try:
        submit(args, stdin or sys.stdin.buffer)
    except SendmailError as exc:
        print(f"postier sendmail: {exc}", file=err)
        return exc.code
    except OSError as exc:
        print(f"postier sendmail: {exc}", file=err)
        return EX_IOERR
    return EX_OK


def main(argv: Sequence[str] | None = None) -> int:
    """Stand-alone entry point (`python -m postier.sendmail`, or a /usr/sbin/sendmail
    wrapper): like `run`, and a usage error exits EX_USAGE as sendmail's callers expect."""
    parser = argparse.ArgumentParser(prog="sendmail")
    add_arguments(parser)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return EX_USAGE if exc.code else EX_OK
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
