"""Limits of a live server: connections, message size, recipients, errors, timeouts.

Each limit gets its reply code, a log line, and proof that the server goes on serving.
Timeouts are exercised with short settings (1 s); the test waits for the server's 421, with
a generous safety bound, and never measures how long anything took.
"""

from __future__ import annotations

import select
import smtplib
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.server import PostierServer, make_server
from tests.server import wait_until as poll_until
from tests.test_integration_smtp import Raw, split_stored

SAFETY_TIMEOUT = 20.0


@pytest.fixture
def start(tmp_path: Path) -> Iterator[Callable[..., PostierServer]]:
    """`start("--flag", "value", ...)`: a live server with those flags, stopped afterwards."""
    servers: list[PostierServer] = []

    def _start(*flags: str) -> PostierServer:
        srv = make_server(tmp_path / f"srv{len(servers)}", extra=list(flags))
        servers.append(srv)
        return srv.start()

    yield _start
    codes = [srv.stop() for srv in servers]
    assert codes == [0] * len(servers)


def greet(srv: PostierServer, source: str | None = None) -> Raw:
    c = Raw.__new__(Raw)
    c.sock = socket.create_connection(
        ("127.0.0.1", srv.mx_port),
        timeout=SAFETY_TIMEOUT,
        source_address=(source, 0) if source else None,
    )
    c.buf = b""
    return c


def ehlo(c: Raw) -> None:
    assert c.reply()[0] == 220
    c.send(b"EHLO limits.test\r\n")
    assert c.reply()[0] == 250


def nothing_pending(c: Raw) -> bool:
    """True if the server has sent nothing we have not read (a non-blocking look, no wait)."""
    if c.buf:
        return False
    readable, _, _ = select.select([c.sock], [], [], 0)
    return not readable


def wait_until(predicate, what: str) -> None:  # type: ignore[no-untyped-def]
    assert poll_until(predicate, SAFETY_TIMEOUT), f"never happened: {what}"


def log_count(srv: PostierServer, needle: str) -> int:
    return srv.log().count(needle)


# ---- connections -----------------------------------------------------------------------------
def test_connection_cap(start: Callable[..., PostierServer]) -> None:
    srv = start("--max-connections", "5")
    held = [greet(srv) for _ in range(5)]
    for c in held:
        assert c.reply()[0] == 220
    extra = greet(srv)
    code, text = extra.reply()
    assert code == 421 and "4.7.0" in text, text
    assert extra.closed()
    extra.close()
    wait_until(lambda: "event=refused" in srv.log(), "a log line for the refusal")
    assert "421 4.7.0" in next(x for x in srv.log().splitlines() if "event=refused" in x)
    # The held sessions still work, and a freed slot is given to the next client.
    held[0].send(b"NOOP\r\n")
    assert held[0].reply()[0] == 250
    held[0].send(b"QUIT\r\n")
    assert held[0].reply()[0] == 221
    assert held[0].closed()
    held[0].close()
    wait_until(lambda: log_count(srv, "event=disconnect") >= 2, "the QUIT session to end")
    again = greet(srv)
    assert again.reply()[0] == 220
    for c in [again, *held[1:]]:
        c.close()


def test_per_ip_cap(start: Callable[..., PostierServer], tmp_path: Path) -> None:
    # Loopback is exempt from the per-IP cap by default; this test's clients stand in for
    # one remote address, so nothing is exempt here.
    (tmp_path / "no-exempt.toml").write_text("exempt_networks = []\n")
    srv = start("--max-connections-per-ip", "3", "-c", str(tmp_path / "no-exempt.toml"))
    held = [greet(srv, "127.0.0.1") for _ in range(3)]
    for c in held:
        assert c.reply()[0] == 220
    extra = greet(srv, "127.0.0.1")
    code, text = extra.reply()
    assert code == 421 and "4.7.0" in text, text
    assert extra.closed()
    extra.close()
    wait_until(lambda: "event=refused" in srv.log(), "a log line for the refusal")
    # Another address is not affected (Linux routes all of 127.0.0.0/8 to lo).
    try:
        other = greet(srv, "127.0.0.2")
    except OSError:
        pytest.skip("cannot use 127.0.0.2 as a source address here")
    assert other.reply()[0] == 220
    other.send(b"QUIT\r\n")
    assert other.reply()[0] == 221
    for c in [other, *held]:
        c.close()


def test_keeps_serving_while_1000_idle_connections_are_open(
    start: Callable[..., PostierServer],
) -> None:
    srv = start("--max-connections", "2000", "--max-connections-per-ip", "2000")
    idle = []
    try:
        for _ in range(1000):
            idle.append(socket.create_connection(("127.0.0.1", srv.mx_port), SAFETY_TIMEOUT))
        with smtplib.SMTP("127.0.0.1", srv.mx_port, timeout=SAFETY_TIMEOUT) as c:
            c.sendmail("s@remote.test", ["alice@example.org"], b"Subject: busy\r\n\r\nx\r\n")
        assert len(srv.maildir_files("alice")) == 1
        # The idle ones were greeted too.
        for s in idle[::100]:
            assert s.recv(100).startswith(b"220 ")
    finally:
        for s in idle:
            s.close()


# ---- message size ----------------------------------------------------------------------------
def test_message_size_limit(start: Callable[..., PostierServer]) -> None:
    srv = start("--max-message-size", "10000")
    c = greet(srv)
    assert c.reply()[0] == 220
    c.send(b"EHLO limits.test\r\n")
    code, text = c.reply()
    assert code == 250 and "SIZE 10000" in text
    c.send(b"MAIL FROM:<s@remote.test>\r\nRCPT TO:<alice@example.org>\r\nDATA\r\n")
    assert c.replies(3) == [250, 250, 354]
    # 20000 bytes; some lines look like commands: if the server stopped reading data at the
    # limit, they would be answered as commands.
    line = b"x" * 98 + b"\r\n"
    body = b"Subject: big\r\n\r\n" + (line * 49 + b"RSET\r\n") * 4 + line * 4
    assert len(body) > 20000
    for i in range(0, len(body), 1000):
        c.send(body[i : i + 1000])
    c.send(b"NOOP\r\n")  # still message content
    assert nothing_pending(c), "the server answered before the end of data"
    c.send(b".\r\n")
    code, text = c.reply()
    assert code == 552 and "5.3.4" in text, text
    # In sync: the next reply is the next command's, and a new transaction works.
    c.send(b"NOOP\r\n")
    assert c.reply()[0] == 250
    c.send(b"MAIL FROM:<s@remote.test>\r\nRCPT TO:<alice@example.org>\r\nDATA\r\n")
    assert c.replies(3) == [250, 250, 354]
    small = b"Subject: small\r\n\r\n" + line * 90
    c.send(small + b".\r\n")
    assert c.reply()[0] == 250
    c.send(b"QUIT\r\n")
    assert c.reply()[0] == 221
    c.close()
    [path] = srv.maildir_files("alice")
    assert split_stored(path.read_bytes())[1] == small.replace(b"\r\n", b"\n")
    assert list((srv.mail_root / ".postier-tmp").iterdir()) == []
    assert srv.logged("552 5.3.4")


def test_size_parameter_over_the_limit(start: Callable[..., PostierServer]) -> None:
    srv = start("--max-message-size", "10000")
    with smtplib.SMTP("127.0.0.1", srv.mx_port, timeout=SAFETY_TIMEOUT) as c:
        c.ehlo("limits.test")
        assert c.does_esmtp and c.esmtp_features["size"] == "10000"
        code, text = c.mail("s@remote.test", ["SIZE=10001"])
        assert code == 552 and text.startswith(b"5.3.4"), text
        assert c.mail("s@remote.test", ["SIZE=10000"])[0] == 250
        assert c.rcpt("alice@example.org")[0] == 250
        # smtplib's own size check is bypassed: the server refuses at the end of data.
        code, _ = c.data(b"Subject: big\r\n\r\n" + (b"y" * 70 + b"\r\n") * 200)
        assert code == 552
    assert srv.maildir_files("alice") == []


# ---- recipients and errors -------------------------------------------------------------------
def test_101st_recipient_gets_452(server: PostierServer) -> None:
    c = greet(server)
    ehlo(c)
    c.send(b"MAIL FROM:<s@remote.test>\r\n" + b"RCPT TO:<alice@example.org>\r\n" * 101)
    codes = c.replies(102)
    assert codes == [250] + [250] * 100 + [452]
    c.send(b"RCPT TO:<bob@example.org>\r\n")
    code, text = c.reply()
    assert code == 452 and "4.5.3" in text
    c.send(b"DATA\r\n")
    assert c.reply()[0] == 354
    c.send(b"Subject: many\r\n\r\n.\r\n")
    assert c.reply()[0] == 250
    c.close()
    assert len(server.maildir_files("alice")) == 1
    assert server.maildir_files("bob") == []


def test_configured_recipient_limit(start: Callable[..., PostierServer]) -> None:
    srv = start("--max-recipients", "5")
    with smtplib.SMTP("127.0.0.1", srv.mx_port, timeout=SAFETY_TIMEOUT) as c:
        c.ehlo("limits.test")
        c.mail("s@remote.test")
        for _ in range(5):
            assert c.rcpt("bob@example.org")[0] == 250
        code, text = c.rcpt("alice@example.org")
        assert code == 452 and text.startswith(b"4.5.3")


def test_repeated_errors_close_the_session(server: PostierServer) -> None:
    c = greet(server)
    ehlo(c)
    codes = []
    for i in range(20):
        try:
            c.send(b"RCPT TO:<alice@example.org>\r\n" if i % 2 else b"BOGUS\r\n")
            codes.append(c.reply())
        except (ConnectionError, BrokenPipeError):
            break
    assert [code for code, _ in codes[:10]] == [500, 503] * 5
    assert codes[10][0] == 421 and "4.7.0" in codes[10][1], codes
    assert len(codes) == 11
    assert c.closed()
    c.close()
    wait_until(lambda: "reason=\"too many errors\"" in server.log()
               or "reason=too many errors" in server.log(), "the disconnect log line")  # fmt: skip


# ---- slow clients ----------------------------------------------------------------------------
def test_command_timeout(start: Callable[..., PostierServer]) -> None:
    srv = start("--command-timeout", "1")
    c = greet(srv)
    ehlo(c)
    # Say nothing: the server gives up (the safety bound is the socket timeout).
    code, text = c.reply()
    assert code == 421 and "4.4.2" in text, text
    assert c.closed()
    c.close()
    wait_until(lambda: "event=timeout" in srv.log(), "event=timeout in the log")
    # Others are still served.
    with smtplib.SMTP("127.0.0.1", srv.mx_port, timeout=SAFETY_TIMEOUT) as s:
        s.sendmail("s@remote.test", ["alice@example.org"], b"Subject: t\r\n\r\nx\r\n")
    assert len(srv.maildir_files("alice")) == 1


def test_data_timeout_mid_message(start: Callable[..., PostierServer]) -> None:
    srv = start("--data-timeout", "1")
    c = greet(srv)
    ehlo(c)
    c.send(b"MAIL FROM:<s@remote.test>\r\nRCPT TO:<alice@example.org>\r\nDATA\r\n")
    assert c.replies(3) == [250, 250, 354]
    c.send(b"Subject: stalled\r\n\r\nhalf a mess")
    code, text = c.reply()
    assert code == 421 and "4.4.2" in text, text
    assert c.closed()
    c.close()
    wait_until(lambda: "event=disconnect" in srv.log(), "the disconnect")
    assert srv.maildir_files("alice") == []
    assert list((srv.mail_root / ".postier-tmp").iterdir()) == []


def test_talking_before_the_greeting(start: Callable[..., PostierServer], tmp_path: Path) -> None:
    """A client that does not wait for the 220 is a spam engine: 554 and close."""
    conf = tmp_path / "pause.toml"
    conf.write_text("greet_pause = 2\n")  # seconds before the greeting (a TOML-only setting)
    srv = start("-c", str(conf))
    c = greet(srv)
    c.send(b"EHLO eager.test\r\n")  # at once, well inside the pause
    code, text = c.reply()
    assert code == 554, text
    assert c.closed()
    c.close()
    wait_until(lambda: "event=protocol-violation" in srv.log(), "the violation logged")
    # A patient client is served.
    with smtplib.SMTP("127.0.0.1", srv.mx_port, timeout=SAFETY_TIMEOUT) as s:
        assert s.noop()[0] == 250


# ---- TOML-only limits: whole-session cap, minimum data rate, free space ------------------------
def _toml(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_session_time_cap(start: Callable[..., PostierServer], tmp_path: Path) -> None:
    srv = start("-c", _toml(tmp_path, "session.toml", "session_timeout = 1\n"))
    c = greet(srv)
    ehlo(c)
    # A client that keeps the session busy forever: the whole-session cap ends it.
    for _ in range(int(SAFETY_TIMEOUT / 0.05)):
        c.send(b"NOOP\r\n")
        code, text = c.reply()
        if code != 250:
            break
        time.sleep(0.05)
    assert code == 421 and "4.4.2" in text, text
    assert c.closed()
    c.close()


def test_minimum_data_rate(start: Callable[..., PostierServer], tmp_path: Path) -> None:
    conf = _toml(tmp_path, "rate.toml", "min_data_rate = 100000\ndata_timeout = 5\n")
    srv = start("-c", conf)
    c = greet(srv)
    ehlo(c)
    c.send(b"MAIL FROM:<s@remote.test>\r\nRCPT TO:<alice@example.org>\r\nDATA\r\n")
    assert c.replies(3) == [250, 250, 354]
    # Trickle a few bytes at a time, far below 100 kB/s, until the server gives up.
    for _ in range(int(SAFETY_TIMEOUT / 0.05)):
        try:
            c.send(b"slow\r\n")
        except (BrokenPipeError, ConnectionResetError):
            break
        if not nothing_pending(c):
            break
        time.sleep(0.05)
    reply = c.reply()
    assert reply[0] == 421 and "4.4.2" in reply[1], reply
    c.close()
    wait_until(lambda: "event=timeout" in srv.log(), "the slow client logged")
    assert srv.maildir_files("alice") == []


def test_low_free_space_refuses_at_mail(
    start: Callable[..., PostierServer], tmp_path: Path
) -> None:
    # Demand more free space than any disk has.
    srv = start("-c", _toml(tmp_path, "disk.toml", f"min_free_space = {10**18}\n"))
    with smtplib.SMTP("127.0.0.1", srv.mx_port, timeout=SAFETY_TIMEOUT) as c:
        c.ehlo("limits.test")
        code, text = c.mail("s@remote.test")
        assert code == 452 and text.startswith(b"4.3.1"), text
        assert c.noop()[0] == 250
    wait_until(lambda: "low disk space" in srv.log(), "the refusal logged")


def test_message_size_boundary(start: Callable[..., PostierServer]) -> None:
    """The limit counts the content as received (unstuffed, CRLF included): equal passes."""
    srv = start("--max-message-size", "10000")
    line = b"w" * 98 + b"\r\n"
    exact = line * 100  # 10000 bytes
    with smtplib.SMTP("127.0.0.1", srv.mx_port, timeout=SAFETY_TIMEOUT) as c:
        c.ehlo("limits.test")
        for content, expected in ((exact, 250), (exact + b"w\r\n", 552), (b"." + exact[1:], 250)):
            c.mail("s@remote.test")
            c.rcpt("alice@example.org")
            code, text = c.data(content)  # "." is stuffed: 10001 on the wire
            assert code == expected, (len(content), code, text)
    assert len(srv.maildir_files("alice")) == 2
