"""The seeds' `-pass FILE`: the same option as -P/--pass, with a seed-style `login password`
file, and its meaning kept: on the submission listener only authenticated users may send."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path

import pytest

from postier.cli import make_parser
from tests.server import PostierServer, free_port, make_server
from tests.test_tls_integration import Client, client_context, write_pair


def test_pass_spellings_are_one_option() -> None:
    parser = make_parser()
    for argv in (["-pass", "f"], ["-P", "f"], ["--pass", "f"], ["-Pf"]):
        assert parser.parse_args(["serve", *argv]).passwords == "f"


@pytest.fixture
def seed_server(tmp_path: Path) -> Iterator[tuple[PostierServer, int]]:
    cert, key = tmp_path / "tls" / "cert.pem", tmp_path / "tls" / "key.pem"
    write_pair(cert, key, "mx.test")
    (tmp_path / "login_pass.txt").write_text("alice secret1\nbob secret2\n")
    submission = free_port()
    srv = make_server(
        tmp_path / "srv",
        extra=[
            "-pass", str(tmp_path / "login_pass.txt"),
            "--submission", f"127.0.0.1:{submission}",
            "--tls-cert", str(cert), "--tls-key", str(key),
        ],
    ).start()  # fmt: skip
    try:
        yield srv, submission
    finally:
        srv.stop()


def test_seed_file_auth_and_only_authenticated_users_send(
    seed_server: tuple[PostierServer, int],
) -> None:
    srv, port = seed_server
    assert srv.logged("plain-text passwords")  # the seed file works, with its warning
    c = Client(port)
    try:
        assert c.reply()[0] == 220
        c.ehlo()
        c.starttls(context=client_context())
        c.ehlo()
        assert c.cmd("MAIL FROM:<alice@example.org>")[0] == 530  # no AUTH yet
        token = base64.b64encode(b"\0alice\0secret1").decode()
        assert c.cmd(f"AUTH PLAIN {token}")[0] == 235
        assert c.cmd("MAIL FROM:<alice@example.org>")[0] == 250
        assert c.cmd("RCPT TO:<bob@example.org>")[0] == 250
        assert c.cmd("DATA")[0] == 354
        c.send(b"Subject: seed\r\n\r\nhello\r\n.\r\n")
        assert c.reply()[0] == 250
    finally:
        c.close()
    assert len(srv.maildir_files("bob")) == 1
