"""One transaction, one lifecycle, on a live server: every way a transaction ends is logged
with its reason, its spool file is gone, and the disconnect line says how the session ended.
Also the > 256 KiB submission that once lost its Message-ID and Date silently."""

from __future__ import annotations

import re
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.server import PostierServer, make_server
from tests.test_submission import ALICE, BOB, logged_in, sub  # noqa: F401 (a fixture)
from tests.test_tls_integration import Client, TlsServer, log_offset, wait_log

SPOOL = ".postier-tmp"


@pytest.fixture(scope="module")
def mx(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PostierServer]:
    srv = make_server(tmp_path_factory.mktemp("lifecycle")).start()
    try:
        yield srv
    finally:
        srv.stop()


def session_of(line: str) -> str:
    m = re.search(r"session=(\S+)", line)
    assert m, line
    return m.group(1)


def open_transaction(srv: PostierServer) -> Client:
    c = Client(srv.mx_port)
    assert c.reply()[0] == 220
    assert c.ehlo()[0] == 250
    assert c.cmd("MAIL FROM:<someone@example.net>")[0] == 250
    assert c.cmd("RCPT TO:<alice@example.org>")[0] == 250
    return c


def spool_files(srv: PostierServer) -> list[Path]:
    return list((srv.mail_root / SPOOL).glob("*.spool"))


@pytest.mark.parametrize(("command", "reason"), [("RSET", "rset"), ("EHLO again.test", "helo")])
def test_reset_mid_transaction_then_close(mx: PostierServer, command: str, reason: str) -> None:
    at = log_offset(mx)
    c = open_transaction(mx)
    assert c.cmd(command)[0] == 250
    c.sock.close()
    line = wait_log(mx, r"event=transaction-reset .*reason=" + reason, at)
    sid = session_of(line)
    assert "qid=" in line
    end = wait_log(mx, rf"session={sid} .*event=disconnect|event=disconnect .*session={sid}", at)
    assert 'reason="peer closed"' in end, end
    assert "mid-transaction" not in mx.log()[at:]


def test_close_mid_data_disposes_the_spool_file(mx: PostierServer) -> None:
    at = log_offset(mx)
    c = open_transaction(mx)
    assert c.cmd("DATA")[0] == 354
    c.send(b"Subject: big\r\n\r\n" + (b"z" * 998 + b"\r\n") * 400)  # > 256 KiB: on disk
    c.sock.shutdown(socket.SHUT_WR)
    line = wait_log(mx, r"event=transaction-reset .*reason=closed", at)
    assert 'detail="peer closed"' in line, line
    wait_log(mx, r"event=disconnect", at)
    assert spool_files(mx) == []
    c.sock.close()


def test_large_submission_gets_message_id_and_date(sub: TlsServer) -> None:  # noqa: F811
    at = log_offset(sub.server)
    before = set(sub.server.maildir_files("bob"))
    c = logged_in(sub.submission)
    assert c.cmd(f"MAIL FROM:<{ALICE}>")[0] == 250
    assert c.cmd(f"RCPT TO:<{BOB}>")[0] == 250
    assert c.cmd("DATA")[0] == 354
    big = b"From: <alice@example.org>\r\nSubject: big\r\n\r\n" + (b"b" * 998 + b"\r\n") * 400
    c.send(big + b".\r\n")
    assert c.reply()[0] == 250
    c.sock.close()
    wait_log(sub.server, r"event=headers-added .*added=2", at)
    [new] = set(sub.server.maildir_files("bob")) - before
    head = new.read_text().split("\n\n", 1)[0]
    assert "\nMessage-ID: <" in head and "\nDate: " in head, head
