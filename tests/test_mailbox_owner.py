"""Mailboxes in the users' homes belong to the users, whatever the format (issue 10, item 4).

As root with `--mailbox-template '<dir>/{user}/...'`, every file backend resolves the mailbox
the same way (`grouped.deliver_per_mailbox`, `paths.owner_for`), so the Maildir (tmp/, new/,
cur/ and the message file), the mbox file and the numbered spool all belong to that user:
the user's own IMAP/POP server must be able to open them. A real server, a real SMTP client,
the system's `nobody` account.
"""

from __future__ import annotations

import os
import pwd
import smtplib
from pathlib import Path

import pytest

from tests.server import PostierServer, make_server

USER = "nobody"
pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="giving files to a user needs root")


def deliver_one(pub: Path, fmt: str, leaf: str) -> tuple[PostierServer, Path]:
    """Start a server delivering to `<pub>/homes/{user}/<leaf>`, send one message to nobody."""
    template = f"{pub}/homes/{{user}}/{leaf}"
    srv = make_server(
        pub / "srv",
        users=f"{USER}@example.org\n",
        extra=["-F", fmt, "--mailbox-template", template],
    ).start()
    try:
        with smtplib.SMTP("127.0.0.1", srv.mx_port, timeout=30) as c:
            c.sendmail("s@remote.test", [f"{USER}@example.org"], b"Subject: mine\r\n\r\nx\r\n")
    finally:
        assert srv.stop() == 0
    return srv, pub / "homes" / USER / leaf


def owners(paths: list[Path]) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_uid, p.stat().st_gid) for p in paths}


@pytest.mark.parametrize("fmt", ["maildir", "mbox", "spool"])
def test_user_template_gives_the_mailbox_to_the_user(pub: Path, fmt: str) -> None:
    account = pwd.getpwnam(USER)
    mine = (account.pw_uid, account.pw_gid)
    leaf = {"maildir": "Maildir", "mbox": "mbox", "spool": "spool"}[fmt]
    srv, box = deliver_one(pub, fmt, leaf)
    if fmt == "maildir":
        [message] = list((box / "new").iterdir())
        paths = [box.parent, box, box / "tmp", box / "new", box / "cur", message]
    elif fmt == "mbox":
        message = box
        paths = [box.parent, box]
    else:
        message = box / "1"
        paths = [box.parent, box, message, box / "1.status"]
    assert b"Subject: mine" in message.read_bytes(), srv.log()
    assert set(owners(paths).values()) == {mine}, owners(paths)
