"""BDAT (RFC 3030 CHUNKING) in the sans-I/O server: chunks, sync, limits and bad input."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from postier.protocol.chunk import BdatCommand, ChunkReader, parse_bdat
from postier.protocol.events import (
    ConnectionClosed,
    Data,
    DataChunk,
    DataRejected,
    EndOfData,
    Event,
    Mail,
    ProtocolViolation,
    TransactionEnded,
)
from postier.protocol.replies import Reply
from postier.protocol.server import ServerConnection
from postier.protocol.state import Phase
from tests.test_server_protocol import Peer, codes

BINARY = b"Subject: bin\r\n\r\n\x00\x01 bare\rCR bare\nLF \r\r\n\n\r\xff.\r\n.\r\n"


def content(events: list[Event]) -> bytes:
    return b"".join(e.data for e in events if isinstance(e, DataChunk))


def open_transaction(**config: object) -> Peer:
    peer = Peer(report_transaction_end=True, **config)
    peer.ehlo()
    assert codes(peer.send(b"MAIL FROM:<a@b.example>\r\nRCPT TO:<u@example.org>\r\n")) == [
        250,
        250,
    ]
    peer.new_events()
    return peer


def test_ehlo_offers_chunking_and_binarymime() -> None:
    out = Peer().send(b"EHLO client.example\r\n")
    assert b"250-CHUNKING\r\n" in out and b"250-BINARYMIME\r\n" in out


def test_one_chunk_keeps_every_octet() -> None:
    peer = open_transaction()
    out = peer.send(b"BDAT %d LAST\r\n" % len(BINARY) + BINARY)
    assert codes(out) == [250]
    events = peer.new_events()
    assert isinstance(events[0], Data) and events[0].chunking
    assert content(events) == BINARY
    assert EndOfData(size=len(BINARY)) in events
    assert isinstance(events[-1], TransactionEnded)
    assert peer.conn.phase is Phase.COMMAND


def test_many_chunks_then_zero_length_last() -> None:
    peer = open_transaction()
    out = peer.send(b"BDAT 3\r\nabcBDAT 5\r\nde\r\r\nBDAT 0 LAST\r\n")
    assert out == (
        b"250 2.0.0 3 octets received\r\n250 2.0.0 5 octets received\r\n250 2.0.0 OK\r\n"
    )
    events = peer.new_events()
    assert content(events) == b"abcde\r\r\n"
    assert EndOfData(size=8) in events


def test_a_crlf_split_between_chunks_comes_out_whole() -> None:
    peer = open_transaction()
    peer.send(b"BDAT 2\r\na\rBDAT 3 LAST\r\n\nb\r")
    pieces = [e.data for e in peer.new_events() if isinstance(e, DataChunk)]
    assert pieces == [b"a", b"\r\nb\r"]  # the CR waits for its LF; the final CR is content


def test_bdat_then_data_is_503_and_the_transaction_goes_on() -> None:
    peer = open_transaction()
    assert codes(peer.send(b"BDAT 5\r\nhello")) == [250]
    out = peer.send(b"DATA\r\n")
    assert out.startswith(b"503 5.5.1 DATA not allowed after BDAT")
    assert codes(peer.send(b"BDAT 0 LAST\r\n")) == [250]


def test_binarymime_requires_bdat() -> None:
    peer = Peer()
    peer.ehlo()
    out = peer.send(b"MAIL FROM:<a@b.example> BODY=BINARYMIME\r\nRCPT TO:<u@example.org>\r\n")
    assert codes(out) == [250, 250]
    peer.new_events()
    assert peer.send(b"DATA\r\n").startswith(b"503 5.5.1 BODY=BINARYMIME requires BDAT")
    assert codes(peer.send(b"BDAT 1 LAST\r\n\x00")) == [250]


def test_size_limit_counts_every_chunk_and_fails_at_last() -> None:
    peer = open_transaction(max_message_size=10)
    out = peer.send(b"BDAT 6\r\n123456BDAT 6\r\n789012BDAT 3 LAST\r\nabc")
    assert codes(out) == [250, 552, 552]
    events = peer.new_events()
    assert content(events) == b"123456"
    assert any(isinstance(e, DataRejected) for e in events)
    assert not any(isinstance(e, EndOfData) for e in events)
    # The session is in sync: the next transaction works.
    out = peer.send(b"MAIL FROM:<a@b.example>\r\nRCPT TO:<u@example.org>\r\nBDAT 2 LAST\r\nok")
    assert codes(out) == [250, 250, 250]


def test_a_chunk_beyond_the_limit_is_read_then_refused() -> None:
    peer = open_transaction(max_message_size=10)
    out = peer.send(b"BDAT 30 LAST\r\n" + b"RSET\r\n" * 5)
    assert out.startswith(b"552 5.3.4")
    assert peer.conn.phase is Phase.COMMAND
    assert codes(peer.send(b"NOOP\r\n")) == [250]


def test_chunk_bytes_never_become_commands_even_when_refused() -> None:
    peer = Peer()
    peer.ehlo()
    # No transaction: refused, but its 20 octets (a MAIL command) are skipped.
    out = peer.send(b"BDAT 20\r\nMAIL FROM:<evil@x>\r\nNOOP\r\n")
    assert codes(out) == [503, 250]
    assert not any(isinstance(e, Mail) for e in peer.new_events())


def test_chunk_arriving_one_octet_at_a_time() -> None:
    peer = open_transaction()
    peer.send(b"BDAT %d LAST\r\n" % len(BINARY))
    out = b""
    for octet in BINARY:
        out += peer.send(bytes([octet]))
    assert codes(out) == [250]
    assert content(peer.new_events()) == BINARY


def test_application_refusing_the_first_chunk_skips_it() -> None:
    peer = open_transaction()

    def refuse_data(conn: ServerConnection, event: Event) -> None:
        conn.reject(Reply(451, "4.3.0", "no spool")) if isinstance(event, Data) else conn.accept()

    out = peer.send(b"BDAT 6 LAST\r\nNOOP\r\n", refuse_data)
    assert codes(out) == [451]
    assert codes(peer.send(b"NOOP\r\n")) == [250]


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (b"BDAT 5 FOO\r\nhello", 501),
        (b"BDAT 5 LAST LAST\r\nhello", 501),
    ],
)
def test_bad_keyword_with_a_known_size_is_501_and_the_session_goes_on(
    line: bytes, expected: int
) -> None:
    peer = open_transaction()
    assert codes(peer.send(line)) == [expected]
    # A failed chunk fails the transaction: the LAST gets the same answer.
    assert codes(peer.send(b"BDAT 2 LAST\r\nok")) == [expected]
    assert codes(peer.send(b"NOOP\r\n")) == [250]


def test_last_twice_is_503_with_the_octets_skipped() -> None:
    peer = open_transaction()
    out = peer.send(b"BDAT 2 LAST\r\nokBDAT 6 LAST\r\nRSET\r\nNOOP\r\n")
    assert codes(out) == [250, 503, 250]


@pytest.mark.parametrize("arg", [b"", b" ", b" -5", b" five", b" 5x", b" +5", b" " + b"9" * 21])
def test_unknown_chunk_size_is_501_and_closes(arg: bytes) -> None:
    peer = open_transaction()
    out = peer.send(b"BDAT" + arg + b"\r\nMAIL FROM:<evil@x>\r\n")
    assert out.startswith(b"501 5.5.4 Syntax: BDAT")
    kinds = [type(e) for e in peer.new_events()]
    assert ProtocolViolation in kinds and kinds[-1] is ConnectionClosed
    assert Mail not in kinds


def test_parse_bdat() -> None:
    assert parse_bdat("0 LAST") == BdatCommand(0, last=True)
    assert parse_bdat("12 last") == BdatCommand(12, last=True)
    assert parse_bdat("12") == BdatCommand(12, last=False)
    assert isinstance(parse_bdat("-1"), Reply)


@settings(max_examples=200, deadline=None)
@given(
    body=st.binary(max_size=300),
    chunk_cuts=st.lists(st.integers(0, 300), max_size=6),
    read_cuts=st.lists(st.integers(0, 400), max_size=8),
)
def test_any_interleaving_of_chunks_and_reads_gives_the_same_content(
    body: bytes, chunk_cuts: list[int], read_cuts: list[int]
) -> None:
    """Chunk sizes and TCP segmentation change nothing: the same octets, CRLF kept whole."""
    cuts = sorted({c for c in chunk_cuts if c <= len(body)} | {0, len(body)})
    wire = b""
    for start, end in itertools.pairwise(cuts):
        wire += b"BDAT %d\r\n" % (end - start) + body[start:end]
    wire += b"BDAT 0 LAST\r\n"
    peer = open_transaction()
    out = b""
    pos = 0
    for cut in [*sorted(c for c in read_cuts if c < len(wire)), len(wire)]:
        if cut > pos:
            out += peer.send(wire[pos:cut])
            pos = cut
    assert codes(out) == [250] * len(cuts)
    pieces = [e.data for e in peer.new_events() if isinstance(e, DataChunk)]
    assert b"".join(pieces) == body
    assert all(not p.endswith(b"\r") for p in pieces[:-1])


def test_chunk_reader_holds_back_a_trailing_cr() -> None:
    buf = bytearray(b"ab\r")
    reader = ChunkReader(100, buf)
    reader.start(3, last=False)
    assert reader.read() == b"ab" and reader.chunk_complete
    buf += b"\n"
    reader.start(1, last=True)
    assert reader.read() == b"\r\n"
