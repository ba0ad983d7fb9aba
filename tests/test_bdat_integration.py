"""BDAT against a live `postier serve`: what the mailbox holds, limits, and kill -9.

What "stored exactly" means here: the mailbox formats (and the spool) end lines with LF, so
CRLF is stored as LF, as for DATA; every other octet — a bare CR, a bare LF, NUL, 8-bit —
is kept as it came (docs/esmtp.md explains the choice).
"""

from __future__ import annotations

import itertools
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.rawsmtp import RawReplies
from tests.server import PostierServer, make_server

SAFETY_TIMEOUT = 15.0  # seconds; a bound on a hung server, never a measurement
HEADER = b"From: s@remote.test\r\nTo: alice@example.org\r\nSubject: binary\r\n\r\n"
BINARY = b"\x00NUL bare\rCR bare\nLF \xff\xfe\r\r\n\n\r.\r\n.\r\nend\r\n"


class Client(RawReplies):
    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=SAFETY_TIMEOUT)
        self.buf = b""
        assert self.reply()[0] == 220

    def command(self, line: bytes) -> tuple[int, str]:
        self.send(line + b"\r\n")
        return self.reply()

    def close(self) -> None:
        self.sock.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PostierServer]:
    srv = make_server(tmp_path_factory.mktemp("bdat"), extra=["--max-message-size", "4096"]).start()
    try:
        yield srv
    finally:
        assert srv.stop() == 0


def open_transaction(port: int, body: str = "") -> Client:
    client = Client(port)
    assert client.command(b"EHLO client.test")[0] == 250
    client.send(f"MAIL FROM:<s@remote.test>{body}\r\nRCPT TO:<alice@example.org>\r\n".encode())
    assert [client.reply()[0], client.reply()[0]] == [250, 250]
    return client


def stored_content(path: Path) -> bytes:
    """The message as stored, below our Return-Path and Received lines."""
    data = path.read_bytes()
    return data[data.index(b"\nFrom: s@remote.test") + 1 :]


def new_messages(srv: PostierServer, before: set[Path]) -> list[Path]:
    return [p for p in srv.maildir_files("alice") if p not in before]


def test_ehlo_advertises_chunking_and_binarymime(server: PostierServer) -> None:
    client = Client(server.mx_port)
    try:
        code, text = client.command(b"EHLO client.test")
        assert code == 250
        assert "250-BINARYMIME" in text and "250-CHUNKING" in text
    finally:
        client.close()


def test_one_binary_chunk_is_stored_exactly(server: PostierServer) -> None:
    before = set(server.maildir_files("alice"))
    message = HEADER + BINARY
    client = open_transaction(server.mx_port, " BODY=BINARYMIME")
    try:
        client.send(b"BDAT %d LAST\r\n" % len(message) + message)
        code, text = client.reply()
        assert code == 250, text
    finally:
        client.close()
    [path] = new_messages(server, before)
    assert stored_content(path) == message.replace(b"\r\n", b"\n")


def test_many_pipelined_chunks_and_a_zero_length_last(server: PostierServer) -> None:
    before = set(server.maildir_files("alice"))
    message = HEADER + BINARY
    cuts = [0, 1, 7, 8, len(HEADER) - 1, len(HEADER) + 5, len(message)]
    client = open_transaction(server.mx_port)
    try:
        wire = b"".join(
            b"BDAT %d\r\n" % (end - start) + message[start:end]
            for start, end in itertools.pairwise(cuts)
        )
        client.send(wire + b"BDAT 0 LAST\r\n")
        replies = [client.reply() for _ in range(len(cuts))]
        assert [code for code, _ in replies] == [250] * len(cuts), replies
        assert replies[0][1] == "250 2.0.0 1 octets received"
        assert client.command(b"NOOP")[0] == 250
    finally:
        client.close()
    [path] = new_messages(server, before)
    assert stored_content(path) == message.replace(b"\r\n", b"\n")


def test_bdat_then_data_is_503(server: PostierServer) -> None:
    client = open_transaction(server.mx_port)
    try:
        client.send(b"BDAT 6\r\nhello\n")
        assert client.reply()[0] == 250
        code, text = client.command(b"DATA")
        assert (code, text[4:9]) == (503, "5.5.1")
        assert client.command(b"RSET")[0] == 250
    finally:
        client.close()


def test_size_limit_across_chunks_then_the_session_goes_on(server: PostierServer) -> None:
    before = set(server.maildir_files("alice"))
    client = open_transaction(server.mx_port)
    try:
        piece = b"x" * 1500 + b"\r\n"
        client.send(b"".join(b"BDAT %d\r\n" % len(piece) + piece for _ in range(3)))
        client.send(b"BDAT 2 LAST\r\nok")
        codes = [client.reply()[0] for _ in range(4)]
        assert codes == [250, 250, 552, 552]
        # In sync and usable: a small message goes through on the same connection.
        client.send(b"MAIL FROM:<s@remote.test>\r\nRCPT TO:<alice@example.org>\r\n")
        client.send(b"BDAT %d LAST\r\n" % len(HEADER) + HEADER)
        assert [client.reply()[0] for _ in range(3)] == [250, 250, 250]
    finally:
        client.close()
    assert len(new_messages(server, before)) == 1


@pytest.mark.parametrize(
    ("command", "code", "usable"),
    [
        (b"BDAT", 501, False),
        (b"BDAT -5", 501, False),
        (b"BDAT five LAST", 501, False),
        (b"BDAT 99999 LAST", 552, True),  # beyond the limit: read, then refused
        (b"BDAT 5 LAST LAST", 501, True),
    ],
)
def test_bad_bdat(server: PostierServer, command: bytes, code: int, usable: bool) -> None:
    client = open_transaction(server.mx_port)
    try:
        client.send(command + b"\r\n")
        if command.startswith(b"BDAT 99999"):
            client.send(b"RSET\r\n" * (99999 // 6) + b"RSET\r\n"[: 99999 % 6])
        elif command.startswith(b"BDAT 5 "):
            client.send(b"RSET\r")
        got, text = client.reply()
        assert got == code, text
        if usable:
            assert client.command(b"NOOP")[0] == 250
        else:
            assert "closing" in text
            assert client.sock.recv(100) == b""
    finally:
        client.close()


def test_last_twice(server: PostierServer) -> None:
    client = open_transaction(server.mx_port)
    try:
        client.send(b"BDAT %d LAST\r\n" % len(HEADER) + HEADER + b"BDAT 6 LAST\r\nRSET\r\n")
        assert [client.reply()[0] for _ in range(2)] == [250, 503]
        assert client.command(b"NOOP")[0] == 250
    finally:
        client.close()


def test_kill_9_between_chunks_loses_nothing_acknowledged(tmp_path: Path) -> None:
    srv = make_server(tmp_path / "crash").start()
    spool = srv.mail_root / ".postier-tmp"
    done: Client | None = None
    cut: Client | None = None
    try:
        done = open_transaction(srv.mx_port)
        done.send(b"BDAT %d\r\n" % len(HEADER) + HEADER + b"BDAT 5 LAST\r\nsafe\n")
        assert [done.reply()[0] for _ in range(2)] == [250, 250]
        # A second message whose chunks are acknowledged but whose LAST never comes; big
        # enough that its spool file is on disk when the server dies.
        cut = open_transaction(srv.mx_port)
        piece = (b"y" * 78 + b"\r\n") * 5000
        cut.send(b"BDAT %d\r\n" % len(HEADER) + HEADER + b"BDAT %d\r\n" % len(piece) + piece)
        assert [cut.reply()[0] for _ in range(2)] == [250, 250]
        deadline = time.monotonic() + SAFETY_TIMEOUT
        while not list(spool.glob("*.spool")):
            assert time.monotonic() < deadline, "no spool file appeared"
            time.sleep(0.01)
        srv.kill()
    finally:
        for client in (done, cut):
            if client is not None:
                client.close()
        srv.kill()
    [path] = srv.maildir_files("alice")
    assert stored_content(path).endswith(b"\n\nsafe\n")
    srv.log_path.rename(srv.log_path.with_name(srv.log_path.name + ".killed"))
    again = make_server(tmp_path / "crash").start()
    try:
        assert list(spool.glob("*.spool")) == []
        assert again.maildir_files("alice") == [path]
    finally:
        assert again.stop() == 0
