"""`postier queue list | show ID | flush [ID] | delete ID`: the operator's view of the queue.

Works whether or not the daemon runs: `list` and `show` only read envelopes; `flush` drops a
request file that the running daemon's scheduler polls (and that a starting daemon consumes);
`delete` uses `QueueStore.remove`, which is safe against a concurrent delivery.

Everything printed that came from outside (addresses, remote replies, message headers) has
its control characters escaped: a hostile header must not drive the operator's terminal.

Exit codes: 0 success; 1 no such entry or another failure; 2 bad usage or no queue directory.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TextIO

from postier.config import DEFAULT_QUEUE_DIR
from postier.delivery.base import Status
from postier.queue.entry import PENDING, state_name
from postier.queue.ids import is_queue_id
from postier.queue.store import BadEntry, EntryNotFound, QueueEntry, QueueStore


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add `-Q` and the sub-commands to the `queue` parser (the lead's cli.py calls this)."""
    _location_options(parser, default=None)
    sub = parser.add_subparsers(dest="queue_command", metavar="COMMAND", required=True)
    listing = sub.add_parser("list", help="list queued messages and the state of each recipient")
    show = sub.add_parser("show", help="print one entry's envelope and headers")
    show.add_argument("queue_id", metavar="ID")
    flush = sub.add_parser("flush", help="make the running daemon retry now")
    flush.add_argument("queue_id", metavar="ID", nargs="?")
    delete = sub.add_parser("delete", help="remove entries (safe while the daemon runs)")
    delete.add_argument("queue_id", metavar="ID", nargs="+")
    # `postier queue list -Q DIR` and `postier queue -Q DIR list` both work.
    for p in (listing, show, flush, delete):
        _location_options(p, default=argparse.SUPPRESS)


def _location_options(parser: argparse.ArgumentParser, default: object) -> None:
    parser.add_argument(
        "-Q",
        "--queue-dir",
        default=default,
        metavar="DIR",
        help=f"the queue directory (default {DEFAULT_QUEUE_DIR})",
    )
    parser.add_argument(
        "-c",
        "--config",
        default=default,
        metavar="FILE",
        help="take queue_dir from this TOML configuration file",
    )


def _queue_dir_from_config(path: str) -> str | None:
    from pathlib import Path

    from postier.config import load_toml

    value = load_toml(Path(path)).get("queue_dir")
    return str(value) if value is not None else None


def safe(text: str) -> str:
    """Escape control characters (ESC, CR, ...) so outside text prints as inert text."""
    return "".join(ch if (ch.isprintable() or ch == "\t") else f"\\x{ord(ch):02x}" for ch in text)


def format_age(seconds: float) -> str:
    s = max(0, int(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def _date(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _recipient_line(
    r_state: Status, address: str, attempts: int, next_attempt: float, reply: str, now: float
) -> str:
    parts = [state_name(r_state)]
    if attempts:
        parts.append(f"{attempts} attempt{'s' if attempts != 1 else ''}")
    if r_state is PENDING and attempts:
        parts.append(
            "next now" if next_attempt <= now else f"next in {format_age(next_attempt - now)}"
        )
    line = f"    {safe(address)}: {', '.join(parts)}"
    return f"{line}: {safe(reply)}" if reply else line


def cmd_list(store: QueueStore, out: TextIO, now: float, err: TextIO | None = None) -> int:
    """Print the queue; an unreadable entry is named on `err` and makes the exit status 1."""
    bad: list[BadEntry] = []
    entries = store.list(on_bad=bad.append)
    for exc in bad:
        print(f"postier queue list: {safe(str(exc))}", file=err or sys.stderr)
    status = 1 if bad else 0
    if not entries:
        print("Mail queue is empty", file=out)
        return status
    print(f"{'ID':<16}  {'AGE':>6}  {'SIZE':>9}  SENDER", file=out)
    total = 0
    for e in entries:
        size = e.size - e.content_offset
        total += size
        print(
            f"{e.queue_id:<16}  {format_age(now - e.arrival):>6}  {size:>9}  <{safe(e.sender)}>",
            file=out,
        )
        for r in e.recipients:
            print(
                _recipient_line(r.state, r.address, r.attempts, r.next_attempt, r.last_reply, now),
                file=out,
            )
    n = len(entries)
    print(f"-- {n} message{'s' if n != 1 else ''}, {total} bytes", file=out)
    return status


def cmd_show(store: QueueStore, entry: QueueEntry, out: TextIO, now: float) -> int:
    flags = [
        f
        for f, on in (
            ("smtputf8", entry.smtputf8),
            ("8bit", entry.body_8bit),
            ("requiretls", entry.requiretls),
        )
        if on
    ]
    print(f"id: {entry.queue_id}", file=out)
    print(f"sender: <{safe(entry.sender)}>", file=out)
    print(f"arrival: {_date(entry.arrival)} ({format_age(now - entry.arrival)} ago)", file=out)
    print(f"size: {entry.size - entry.content_offset}", file=out)
    print(f"flags: {' '.join(flags) or '-'}", file=out)
    print(f"delay warning sent: {'yes' if entry.delay_warned else 'no'}", file=out)
    for r in entry.recipients:
        print(f"recipient: {safe(r.address)}", file=out)
        print(f"  state: {state_name(r.state)}", file=out)
        print(f"  attempts: {r.attempts}", file=out)
        if r.last_attempt:
            print(f"  last attempt: {_date(r.last_attempt)}", file=out)
        if r.state is PENDING:
            when = "now" if r.next_attempt <= now else _date(r.next_attempt)
            print(f"  next attempt: {when}", file=out)
        if r.remote_mta:
            print(f"  remote MTA: {safe(r.remote_mta)}", file=out)
        if r.tls_policy:
            print(f"  TLS policy: {safe(r.tls_policy)}", file=out)
        if r.tls_failure:
            print(f"  last TLS failure: {safe(r.tls_failure)}", file=out)
        if r.last_reply:
            print(f"  last reply: {safe(r.last_reply)}", file=out)
    print("", file=out)
    headers = store.read_headers(entry).decode("utf-8", "replace")
    for line in headers.splitlines():
        print(safe(line), file=out)
    return 0


def run(
    args: argparse.Namespace,
    *,
    out: TextIO | None = None,
    err: TextIO | None = None,
    clock: Callable[[], float] = time.time,
) -> int:
    """Run the sub-command in `args` (from `add_arguments`); returns the exit code.

    `args.queue_dir` may have been filled in by the caller from the config file (`-c`).
    """
    out = out or sys.stdout
    err = err or sys.stderr
    directory = getattr(args, "queue_dir", None)
    if directory is None and getattr(args, "config", None):
        from postier.errors import ConfigError

        try:
            directory = _queue_dir_from_config(args.config)
        except ConfigError as exc:
            print(f"postier queue: {exc}", file=err)
            return 2
    directory = directory or DEFAULT_QUEUE_DIR
    command = args.queue_command
    ids = (
        args.queue_id
        if isinstance(getattr(args, "queue_id", None), list)
        else ([args.queue_id] if getattr(args, "queue_id", None) else [])
    )
    for qid in ids:
        if not is_queue_id(qid):
            print(f"postier queue {command}: {safe(qid)!r} is not a queue id", file=err)
            return 2
    try:
        store = QueueStore(directory, create=False)
    except OSError as exc:
        print(f"postier queue: -Q {directory}: {exc.strerror or exc}", file=err)
        return 2
    now = clock()
    try:
        if command == "list":
            return cmd_list(store, out, now, err)
        if command == "show":
            return cmd_show(store, store.load(ids[0]), out, now)
        if command == "flush":
            if ids:
                store.load(ids[0])  # no such entry: say so rather than wait for nothing
            store.request_flush(ids[0] if ids else None)
            print(f"flush requested for {ids[0] if ids else 'all entries'}", file=out)
            return 0
        if command == "delete":
            status = 0
            for qid in ids:
                if store.remove(qid):
                    print(f"{qid}: deleted", file=out)
                else:
                    print(f"postier queue delete: {qid}: no such entry", file=err)
                    status = 1
            return status
    except EntryNotFound as exc:
        print(f"postier queue {command}: {exc}: no such entry", file=err)
        return 1
    except (OSError, ValueError) as exc:
        print(f"postier queue {command}: {exc}", file=err)
        return 1
    print(f"postier queue: unknown command {command!r}", file=err)
    return 2
