"""RFC 2920 §3.1 group enders: input behind them before their reply is a sync error."""

from __future__ import annotations

import pytest

from postier.protocol.events import NEED_DATA, ConnectionClosed, ProtocolViolation
from postier.protocol.server import ServerConnection
from postier.protocol.state import ServerConfig


def run(data: bytes) -> tuple[bytes, list[object]]:
    conn = ServerConnection(ServerConfig(hostname="mx.test"))
    conn.greeting()
    conn.receive_data(b"EHLO c.test\r\n")
    conn.next_event()
    conn.accept()
    assert conn.next_event() is NEED_DATA
    conn.data_to_send()
    conn.receive_data(data)
    events = []
    while (ev := conn.next_event()) is not NEED_DATA:
        events.append(ev)
        if conn.pending is not None:
            conn.accept()
    return conn.data_to_send(), events


@pytest.mark.parametrize("verb", [b"NOOP", b"VRFY someone", b"EXPN list", b"HELO again.test"])
def test_input_behind_a_group_ender_closes(verb: bytes) -> None:
    out, events = run(verb + b"\r\nQUIT\r\n")
    assert out.startswith(b"554 5.5.0"), out
    assert any(isinstance(e, ProtocolViolation) for e in events)
    assert any(isinstance(e, ConnectionClosed) for e in events)


def test_refused_data_with_content_behind_it_never_reads_content_as_commands() -> None:
    # DATA without recipients is refused; the "message" behind it must not become commands.
    out, _ = run(b"MAIL FROM:<a@b.test>\r\nDATA\r\nRCPT TO:<x@y.test>\r\n.\r\n")
    assert b"554 5.5.0" in out
    assert b"2.1.5" not in out  # the smuggled RCPT was never answered


def test_mail_and_rcpt_may_be_pipelined() -> None:
    out, _ = run(b"MAIL FROM:<a@b.test>\r\nRCPT TO:<x@y.test>\r\nRSET\r\n")
    assert out.count(b"250 ") == 3, out


def test_noop_alone_is_fine() -> None:
    out, events = run(b"NOOP\r\n")
    assert out == b"250 2.0.0 OK\r\n"
    assert events == []
