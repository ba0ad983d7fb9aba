"""Sub-addressing and catch-all, delivered for real (issue 15): alice+tag reaches alice's
Maildir with the full address in Delivered-To; aliases take sub-addresses too; a users-file
line `@domain mailbox` is the catch-all, and known users and aliases win over it."""

from __future__ import annotations

import smtplib
from collections.abc import Iterator
from email import message_from_bytes
from pathlib import Path

import pytest

from postier.policy import LocalTarget, Policy, load_users
from tests.server import PostierServer, make_server

USERS = "alice@example.org\nbob@example.org\n@other.test catchbox\nbob@other.test bob\n"
ALIASES = "team: alice, bob\nsales@other.test: alice@example.org\n"


@pytest.fixture
def srv(tmp_path: Path) -> Iterator[PostierServer]:
    server = make_server(
        tmp_path / "srv", users=USERS, aliases=ALIASES, domains=("example.org", "other.test")
    ).start()
    try:
        yield server
    finally:
        assert server.stop() == 0


def send(srv: PostierServer, rcpts: list[str], subject: str) -> None:
    with smtplib.SMTP("127.0.0.1", srv.mx_port, timeout=30) as s:
        s.sendmail("sender@remote.test", rcpts, f"Subject: {subject}\r\n\r\nbody\r\n")


def messages(srv: PostierServer, mailbox: str) -> dict[str, list[str]]:
    """Subject -> the Delivered-To values of each message in the mailbox."""
    out: dict[str, list[str]] = {}
    for path in srv.maildir_files(mailbox):
        msg = message_from_bytes(path.read_bytes())
        out[str(msg["Subject"])] = [str(v) for v in msg.get_all("Delivered-To", [])]
    return out


def test_sub_address_reaches_the_user_with_the_full_address_kept(srv: PostierServer) -> None:
    send(srv, ["alice+lists@example.org"], "tagged")
    send(srv, ["alice@example.org"], "plain")
    # The full address is kept when it says more than the user's own address.
    assert messages(srv, "alice") == {"tagged": ["alice+lists@example.org"], "plain": []}


def test_alias_takes_sub_addresses(srv: PostierServer) -> None:
    send(srv, ["team+launch@example.org"], "to the team")
    assert "to the team" in messages(srv, "alice")
    assert "to the team" in messages(srv, "bob")
    # Two mailboxes share one hard-linked file: no Delivered-To rather than a wrong one.
    assert messages(srv, "alice")["to the team"] == []


def test_catch_all_takes_unknown_names_only(srv: PostierServer) -> None:
    send(srv, ["whoever@other.test"], "stray")
    send(srv, ["bob@other.test"], "for bob")
    send(srv, ["sales@other.test"], "for sales")
    assert messages(srv, "catchbox") == {"stray": ["whoever@other.test"]}
    assert messages(srv, "bob") == {"for bob": []}  # a known user wins, at their own address
    # An alias wins; it ends at alice's own address, so no Delivered-To is needed.
    assert messages(srv, "alice") == {"for sales": []}
    # The catch-all is per domain: example.org has none, so strangers there are refused.
    with smtplib.SMTP("127.0.0.1", srv.mx_port, timeout=30) as s:
        s.ehlo("client.test")
        s.mail("sender@remote.test")
        assert s.rcpt("whoever@example.org")[0] == 550


def test_relayed_copy_never_carries_delivered_to(tmp_path: Path) -> None:
    """Delivered-To lies before content_offset, with Return-Path: the queue's copy for a
    remote recipient starts after it."""
    from postier.spool import SpoolWriter

    header = b"Return-Path: <a@b.test>\nReceived: from x\n"
    w = SpoolWriter(tmp_path, "Q1", header, delivered_to="alice+t@example.org")
    w.add(b"Subject: s\r\n\r\nbody\r\n")
    w.finish()
    data = w.path.read_bytes()
    assert data.startswith(b"Return-Path: <a@b.test>\nDelivered-To: alice+t@example.org\n")
    assert data[w.content_offset :].startswith(b"Received: from x\n")


def test_delimiter_off_and_catch_all_parsing(tmp_path: Path) -> None:
    users = tmp_path / "users"
    users.write_text(USERS)
    loaded = load_users(users, ["example.org", "other.test"])
    off = Policy(["example.org", "other.test"], loaded, {"team": ["alice"]}, "")
    assert off.resolve_local("alice+x", "example.org") is None
    assert off.resolve_local("team+x", "example.org") is None
    on = Policy(["example.org", "other.test"], loaded, {"team": ["alice"]}, "+")
    (target,) = on.resolve_local("team+x", "example.org") or []
    assert isinstance(target, LocalTarget) and target.user.mailbox == "alice"
    (stray,) = on.resolve_local("x", "other.test") or []
    assert isinstance(stray, LocalTarget) and stray.user.mailbox == "catchbox"
    assert not on.knows("x", "other.test") and on.knows("alice+y", "example.org")
