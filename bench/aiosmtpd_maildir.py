"""The aiosmtpd baseline's server: aiosmtpd with the usual fsync'ing Maildir handler.

Run by baselines.AiosmtpdTarget in a child process with bench/.tools/pylib (where aiosmtpd is
installed, never a postier dependency) on PYTHONPATH. It imports nothing from bench/, so the
child pays for aiosmtpd alone:

    python3 bench/aiosmtpd_maildir.py --port 2525 --root MAILROOT --domain example.org \
        --users alice,bob [--uvloop]

Each recipient's copy is written to tmp/, fsync'd and renamed into new/ before the 250, the
way an aiosmtpd Maildir server is usually written (blocking the event loop while it does).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import time

from aiosmtpd.smtp import SMTP

HOSTNAME = "bench.aiosmtpd.test"


class MaildirHandler:
    """Each recipient's copy: write to tmp/, fsync, rename into new/."""

    def __init__(self, root: str, domain: str, users: set[str]) -> None:
        self.root = root
        self.domain = domain
        self.users = users
        self.pid = os.getpid()
        self.counter = 0
        self.host = socket.gethostname()

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        local, _, domain = address.rpartition("@")
        if domain.lower() != self.domain or local.lower() not in self.users:
            return "550 5.1.1 No such user here"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        data = f"Return-Path: <{envelope.mail_from}>\n".encode() + (
            envelope.original_content.replace(b"\r\n", b"\n")
        )
        for rcpt in envelope.rcpt_tos:
            mailbox = os.path.join(self.root, rcpt.rpartition("@")[0].lower())
            if not os.path.isdir(mailbox):
                for sub in ("tmp", "new", "cur"):
                    os.makedirs(os.path.join(mailbox, sub), mode=0o700, exist_ok=True)
            self.counter += 1
            now = time.time()
            name = f"{int(now)}.M{int(now % 1 * 1e6)}P{self.pid}Q{self.counter}.{self.host}"
            tmp = os.path.join(mailbox, "tmp", name)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.write(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(tmp, os.path.join(mailbox, "new", name))
        return "250 2.0.0 OK"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="aiosmtpd_maildir.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--root", required=True)
    p.add_argument("--domain", required=True)
    p.add_argument("--users", required=True, help="comma-separated local parts")
    p.add_argument("--uvloop", action="store_true")
    a = p.parse_args(argv)
    handler = MaildirHandler(a.root, a.domain.lower(), set(a.users.lower().split(",")))
    if a.uvloop:
        import uvloop

        loop = uvloop.new_event_loop()
    else:
        loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    # hostname given, or aiosmtpd calls socket.getfqdn() per connection
    server = loop.run_until_complete(
        loop.create_server(
            lambda: SMTP(handler, hostname=HOSTNAME), "127.0.0.1", a.port, backlog=1024
        )
    )
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, loop.stop)
    try:
        loop.run_forever()
    finally:
        server.close()
        loop.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
