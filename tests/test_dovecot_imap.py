"""Dovecot reads over IMAP what MboxBackend wrote: count, \\Recent/unseen state, exact bytes.

Runs a private Dovecot (tests/dovecot.py) on a free loopback port with
`mail_location = mbox:~/mail:INBOX=<root>/%n`, so each user's INBOX is our `<root>/<mailbox>`.
"""

from __future__ import annotations

import imaplib
import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from postier.delivery.base import Recipient, Status, StoredMessage
from postier.delivery.mbox import MboxBackend
from tests import dovecot

pytestmark = pytest.mark.skipif(dovecot.available() is not None, reason=str(dovecot.available()))

PLAIN = b"From: bob@example.net\nSubject: plain\n\nHello Alice,\n\n  two spaces\ttab\nbye\n"
QUOTED = b"Subject: quoted\n\nFrom the start of a line\n>From already quoted\nFromage\n"
UTF8 = "Subject: utf8\nContent-Type: text/plain; charset=utf-8\n\nGrüße, 日本\n".encode()


class Box:
    """One Dovecot and a mail root, with a helper to deliver as postier's router would."""

    def __init__(self, workdir: Path, dc: dovecot.Dovecot, root: Path) -> None:
        self.workdir, self.dc, self.root = workdir, dc, root
        self.count = 0

    def deliver(
        self,
        content: bytes,
        to: str = "alice",
        sender: str = "bob@example.net",
        template: str | None = None,
        user: str = "",
    ) -> bytes:
        self.count += 1
        return_path = f"Return-Path: <{sender}>\n".encode()
        data = return_path + b"Received: from client by mx.test; id Q\n" + content
        spool = self.workdir / f"spool-{self.count}"
        spool.write_bytes(data)
        msg = StoredMessage(spool, len(data), len(return_path), sender, f"Q{self.count}", 1.7e9)
        [r] = MboxBackend(self.root, template).deliver(msg, [Recipient(f"{to}@ex.org", to, user)])
        assert r.status is Status.DELIVERED, r
        return data


@pytest.fixture(scope="module")
def box() -> Iterator[Box]:
    """One Dovecot for the module (its shutdown takes seconds); each test has its own user."""
    with dovecot.dovecot_workdir() as wd:
        root = wd / "mail"
        root.mkdir()
        # Dovecot creates its own dotlock beside the mbox: the directory must be writable by it
        dovecot.chown_tree(root)
        location = f"mbox:~/mail:INBOX={root}/%n"
        users = {"alice": "alice-pw", "carol": "carol-pw", "nobody": "nobody-pw"}
        with dovecot.running_dovecot(wd, location, users) as dc:
            yield Box(wd, dc, root)


def crlf(data: bytes) -> bytes:
    return data.replace(b"\n", b"\r\n")


def status(imap: imaplib.IMAP4) -> dict[str, int]:
    typ, data = imap.status("INBOX", "(MESSAGES RECENT UNSEEN)")
    assert typ == "OK"
    return {k.decode(): int(v) for k, v in re.findall(rb"(\w+) (\d+)", data[0])}


def fetch(imap: imaplib.IMAP4, num: int, item: str) -> bytes:
    typ, data = imap.fetch(str(num), f"({item})")
    assert typ == "OK" and isinstance(data[0], tuple), data
    return data[0][1]


def flags(imap: imaplib.IMAP4, num: int) -> set[str]:
    typ, data = imap.fetch(str(num), "(FLAGS)")
    assert typ == "OK"
    match = re.search(rb"FLAGS \(([^)]*)\)", data[0])
    assert match, data
    return set(match.group(1).decode().split())


def test_dovecot_sees_count_recent_unseen_and_exact_bytes(box: Box) -> None:
    plain = box.deliver(PLAIN)
    box.deliver(QUOTED, sender="")  # a bounce: `From MAILER-DAEMON ...` separator
    box.deliver(UTF8)
    dovecot.chown_tree(box.root)
    imap = box.dc.login("alice")
    try:
        assert status(imap) == {"MESSAGES": 3, "RECENT": 3, "UNSEEN": 3}
        assert imap.select("INBOX")[0] == "OK"
        assert all(flags(imap, n) == {"\\Recent"} for n in (1, 2, 3))
        assert fetch(imap, 1, "BODY.PEEK[TEXT]") == crlf(PLAIN.split(b"\n\n", 1)[1])
        header = fetch(imap, 1, "BODY.PEEK[HEADER]")
        assert header == crlf(plain.split(b"\n\n", 1)[0] + b"\n\n")  # Return-Path first
        assert fetch(imap, 3, "BODY.PEEK[TEXT]") == crlf(UTF8.split(b"\n\n", 1)[1])
        # Dovecot, like Python's mailbox module, does not undo mboxrd quoting: it shows the
        # stored lines. Asserted so that a change on either side is noticed.
        assert fetch(imap, 2, "BODY.PEEK[TEXT]") == crlf(
            b">From the start of a line\n>>From already quoted\nFromage\n"
        )
        assert flags(imap, 1) == {"\\Recent"}  # PEEK left them unseen
    finally:
        imap.logout()


def test_delivery_while_dovecot_has_the_mailbox_open(box: Box) -> None:
    box.deliver(PLAIN, to="carol")
    dovecot.chown_tree(box.root)
    imap = box.dc.login("carol")
    try:
        assert imap.select("INBOX") == ("OK", [b"1"])
        assert imap.store("1", "+FLAGS", "\\Seen")[0] == "OK"
        box.deliver(UTF8, to="carol")  # appended (dotlock + fcntl) while Dovecot has it open
        typ, _data = imap.noop()
        assert typ == "OK"
        assert fetch(imap, 2, "BODY.PEEK[TEXT]") == crlf(UTF8.split(b"\n\n", 1)[1])
        assert "\\Seen" not in flags(imap, 2)
    finally:
        imap.logout()  # Dovecot writes `Status: RO` for message 1 into the mbox now
    raw = (box.root / "carol").read_bytes()
    assert b"\nStatus: RO\n" in raw  # Dovecot rewrote our file; our next append must cope
    box.deliver(PLAIN, to="carol")
    imap = box.dc.login("carol")
    try:
        assert status(imap) == {"MESSAGES": 3, "RECENT": 1, "UNSEEN": 2}
        imap.select("INBOX")
        assert fetch(imap, 3, "BODY.PEEK[TEXT]") == crlf(PLAIN.split(b"\n\n", 1)[1])
    finally:
        imap.logout()
    assert not (box.root / "carol.lock").exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="files are given to the user only as root")
def test_home_template_gives_the_mbox_to_its_user(box: Box) -> None:
    # no chown by the test: owner_for() finds the system user `nobody` through {user}
    box.deliver(PLAIN, to="nobody-box", template=f"{box.root}/{{user}}", user="nobody@example.org")
    path = box.root / "nobody"
    assert (path.stat().st_uid, path.stat().st_gid) == dovecot.mail_owner()
    imap = box.dc.login("nobody")
    try:
        assert status(imap) == {"MESSAGES": 1, "RECENT": 1, "UNSEEN": 1}
    finally:
        imap.logout()
