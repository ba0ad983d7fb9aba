"""The protocol says when a mail transaction ends, and why (ServerConnection, sans I/O)."""

from __future__ import annotations

import pytest

from postier.protocol import replies as R
from postier.protocol.events import (
    NEED_DATA,
    ConnectionClosed,
    EndReason,
    Event,
    TransactionEnded,
)
from postier.protocol.server import ServerConnection
from postier.protocol.state import ServerConfig

EHLO = b"EHLO c.example\r\n"
MAIL = b"MAIL FROM:<a@example.net>\r\nRCPT TO:<b@example.org>\r\n"


def run(
    *inputs: bytes, report: bool = True, refuse_end: bool = False, tls: bool = False
) -> list[Event]:
    conn = ServerConnection(
        ServerConfig(hostname="mx.test", report_transaction_end=report, starttls_available=tls)
    )
    conn.greeting()
    events: list[Event] = []
    for data in inputs:
        conn.receive_data(data)
        while (event := conn.next_event()) is not NEED_DATA:
            events.append(event)
            if conn.pending is not None:
                if refuse_end and type(event).__name__ == "EndOfData":
                    conn.reject(R.STORAGE_FAILED)
                else:
                    conn.accept()
        if conn.phase.value == "tls-pending":
            conn.tls_started()
            events += list(iter(conn.next_event, NEED_DATA))
    return events


def ends(events: list[Event]) -> list[TransactionEnded]:
    return [e for e in events if isinstance(e, TransactionEnded)]


@pytest.mark.parametrize(
    ("tail", "reason"),
    [
        (b"RSET\r\n", EndReason.RSET),
        (b"EHLO again.example\r\n", EndReason.HELLO),
        (b"HELO again.example\r\n", EndReason.HELLO),
        (b"DATA\r\nSubject: x\r\n\r\nbody\r\n.\r\n", EndReason.ACCEPTED),
        (b"DATA\r\nbare\nLF\r\n.\r\n", EndReason.REJECTED),
    ],
)
def test_each_way_a_transaction_ends(tail: bytes, reason: EndReason) -> None:
    events = run(EHLO, MAIL, tail.split(b"\r\n", 1)[0] + b"\r\n", tail.split(b"\r\n", 1)[1])
    assert ends(events) == [TransactionEnded(reason)]


def test_refused_end_of_data() -> None:
    events = run(EHLO, MAIL, b"DATA\r\n", b"x\r\n.\r\n", refuse_end=True)
    assert ends(events) == [TransactionEnded(EndReason.REJECTED)]


def test_quit_and_lost_connection_end_it_before_the_close() -> None:
    events = run(EHLO, MAIL, b"QUIT\r\n")
    assert events[-2:] == [TransactionEnded(EndReason.CLOSED, "quit"), ConnectionClosed("quit")]
    conn = ServerConnection(ServerConfig(hostname="mx.test", report_transaction_end=True))
    conn.greeting()
    for data in (EHLO, MAIL):
        conn.receive_data(data)
        while conn.next_event() is not NEED_DATA:
            conn.accept()
    conn.connection_lost("peer closed")
    assert list(iter(conn.next_event, NEED_DATA)) == [
        TransactionEnded(EndReason.CLOSED, "peer closed"),
        ConnectionClosed("peer closed"),
    ]


def test_starttls_ends_it() -> None:
    events = run(EHLO, MAIL, b"STARTTLS\r\n", tls=True)
    assert ends(events) == [TransactionEnded(EndReason.STARTTLS)]


def test_nothing_when_no_transaction_was_open_or_when_not_asked() -> None:
    assert ends(run(EHLO, b"RSET\r\n", b"QUIT\r\n")) == []
    assert ends(run(EHLO, MAIL, b"RSET\r\n", report=False)) == []
    # A refused MAIL opens nothing.
    assert ends(run(EHLO, b"MAIL FROM:<bad\r\n", b"RSET\r\n")) == []
