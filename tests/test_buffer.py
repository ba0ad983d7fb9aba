"""LineBuffer: CRLF-only line splitting, a hard limit, bounded memory, resynchronisation."""

from __future__ import annotations

import pytest

from postier.protocol.buffer import LineBuffer, LineTooLong


def drain(buf: LineBuffer) -> list[bytes | LineTooLong]:
    out: list[bytes | LineTooLong] = []
    while (line := buf.next_line()) is not None:
        out.append(line)
    return out


def feed_split(data: bytes, cut: int, max_line: int = 512) -> list[bytes | LineTooLong]:
    buf = LineBuffer(max_line)
    out: list[bytes | LineTooLong] = []
    for part in (data[:cut], data[cut:]):
        buf.feed(part)
        out += drain(buf)
    return out


def test_single_line() -> None:
    buf = LineBuffer(512)
    buf.feed(b"EHLO example.org\r\n")
    assert buf.next_line() == b"EHLO example.org"
    assert buf.next_line() is None
    assert len(buf) == 0


def test_several_lines_in_one_feed() -> None:
    buf = LineBuffer(512)
    buf.feed(b"MAIL FROM:<a@b.c>\r\nRCPT TO:<d@e.f>\r\nDATA\r\nNOOP")
    assert drain(buf) == [b"MAIL FROM:<a@b.c>", b"RCPT TO:<d@e.f>", b"DATA"]
    assert len(buf) == 4  # the partial "NOOP" waits for its CRLF
    buf.feed(b"\r\n")
    assert drain(buf) == [b"NOOP"]


def test_empty_line() -> None:
    buf = LineBuffer(512)
    buf.feed(b"\r\n\r\nX\r\n")
    assert drain(buf) == [b"", b"", b"X"]


DIALOGUE = b"EHLO a.example\r\nMAIL FROM:<x@y.z>\r\n\r\nRCPT TO:<postmaster>\r\nQUIT\r\n"
EXPECTED = [b"EHLO a.example", b"MAIL FROM:<x@y.z>", b"", b"RCPT TO:<postmaster>", b"QUIT"]


@pytest.mark.parametrize("cut", range(len(DIALOGUE) + 1))
def test_split_at_every_byte_boundary(cut: int) -> None:
    assert feed_split(DIALOGUE, cut) == EXPECTED


def test_one_byte_at_a_time() -> None:
    buf = LineBuffer(512)
    out: list[bytes | LineTooLong] = []
    for i in range(len(DIALOGUE)):
        buf.feed(DIALOGUE[i : i + 1])
        out += drain(buf)
    assert out == EXPECTED


def test_crlf_split_across_feeds() -> None:
    buf = LineBuffer(512)
    buf.feed(b"NOOP\r")
    assert buf.next_line() is None
    buf.feed(b"\n")
    assert buf.next_line() == b"NOOP"
    assert buf.next_line() is None


def test_cr_then_lf_after_several_empty_feeds() -> None:
    buf = LineBuffer(512)
    buf.feed(b"NOOP\r")
    for _ in range(3):
        assert buf.next_line() is None
        buf.feed(b"")
    buf.feed(b"\nRSET\r\n")
    assert drain(buf) == [b"NOOP", b"RSET"]


@pytest.mark.parametrize(
    ("data", "lines"),
    [
        (b"NOOP\nRSET\r\n", [b"NOOP\nRSET"]),
        (b"a\n\nb\r\n", [b"a\n\nb"]),
        (b"a\rb\r\n", [b"a\rb"]),
        (b"a\r\rb\r\n", [b"a\r\rb"]),
        (b"a\n\r\n", [b"a\n"]),
        (b"a\r\r\n", [b"a\r"]),
        (b"\n\r\n", [b"\n"]),
    ],
)
def test_bare_lf_and_cr_stay_inside_the_line(data: bytes, lines: list[bytes]) -> None:
    for cut in range(len(data) + 1):
        assert feed_split(data, cut) == lines


def test_bare_lf_alone_never_ends_a_line() -> None:
    buf = LineBuffer(512)
    buf.feed(b"MAIL FROM:<a@b.c>\nRCPT TO:<d@e.f>\n")
    assert buf.next_line() is None


def test_limit_exactly_at() -> None:
    buf = LineBuffer(10)
    buf.feed(b"x" * 10 + b"\r\n")
    assert buf.next_line() == b"x" * 10


def test_limit_exactly_at_split_before_lf() -> None:
    buf = LineBuffer(10)
    buf.feed(b"x" * 10 + b"\r")
    assert buf.next_line() is None
    buf.feed(b"\n")
    assert buf.next_line() == b"x" * 10


def test_limit_one_over() -> None:
    buf = LineBuffer(10)
    buf.feed(b"x" * 11 + b"\r\nNEXT\r\n")
    result = buf.next_line()
    assert isinstance(result, LineTooLong)
    assert result.length == 11
    assert buf.next_line() == b"NEXT"


def test_limit_one_over_fed_bytewise() -> None:
    buf = LineBuffer(10)
    out: list[bytes | LineTooLong] = []
    for byte in b"y" * 11 + b"\r\nNEXT\r\n":
        buf.feed(bytes([byte]))
        out += drain(buf)
    assert len(out) == 2
    assert isinstance(out[0], LineTooLong)
    assert out[0].length == 11
    assert out[1] == b"NEXT"


@pytest.mark.parametrize("over", [1, 2, 100, 5000])
def test_over_limit_split_everywhere_in_crlf(over: int) -> None:
    line = b"z" * (10 + over)
    data = line + b"\r\nOK\r\n"
    for cut in (len(line) - 1, len(line), len(line) + 1, len(line) + 2):
        out = feed_split(data, cut, max_line=10)
        assert len(out) == 2, cut
        assert isinstance(out[0], LineTooLong)
        assert out[0].length == len(line)
        assert out[1] == b"OK"


def test_million_bytes_without_crlf_is_bounded_and_resyncs() -> None:
    limit = 512
    buf = LineBuffer(limit)
    chunk = b"A" * 1024
    results: list[bytes | LineTooLong] = []
    peak = 0
    for _ in range(1_000_000 // len(chunk)):
        buf.feed(chunk)
        results += drain(buf)
        peak = max(peak, len(buf))
    buf.feed(b"B" * (1_000_000 % len(chunk)))
    results += drain(buf)
    assert results == []
    # Never more than the limit plus one feed is held, however long the line grows.
    assert peak <= limit + 2 + len(chunk)
    assert len(buf) <= limit + 2 + len(chunk)
    buf.feed(b"\r\nNOOP\r\n")
    results += drain(buf)
    assert len(results) == 2
    too_long = results[0]
    assert isinstance(too_long, LineTooLong)
    assert too_long.length == 1_000_000
    assert results[1] == b"NOOP"
    assert len(buf) == 0


def test_overflow_with_cr_at_end_of_a_feed() -> None:
    buf = LineBuffer(8)
    buf.feed(b"x" * 50 + b"\r")
    assert buf.next_line() is None
    assert len(buf) <= 1  # only a possible CR is kept
    buf.feed(b"\nNOOP\r\n")
    out = drain(buf)
    assert isinstance(out[0], LineTooLong)
    assert out[0].length == 50
    assert out[1:] == [b"NOOP"]


def test_overflow_cr_not_followed_by_lf() -> None:
    buf = LineBuffer(8)
    buf.feed(b"x" * 50 + b"\r")
    assert buf.next_line() is None
    buf.feed(b"yy\r\nNOOP\r\n")
    out = drain(buf)
    assert isinstance(out[0], LineTooLong)
    assert out[0].length == 53
    assert out[1:] == [b"NOOP"]


def test_two_too_long_lines_each_reported_once() -> None:
    buf = LineBuffer(4)
    out: list[bytes | LineTooLong] = []
    for part in (b"aaaaaaa", b"aaaa\r\nbbbbbbbbbb", b"bbb\r", b"\nok\r\n"):
        buf.feed(part)
        out += drain(buf)
    assert [type(x) for x in out] == [LineTooLong, LineTooLong, bytes]
    assert [x.length for x in out[:2] if isinstance(x, LineTooLong)] == [11, 13]
    assert out[2] == b"ok"


def test_take_all_returns_everything_buffered() -> None:
    buf = LineBuffer(512)
    buf.feed(b"DATA\r\nSubject: x\r\n\r\nbody")
    assert buf.next_line() == b"DATA"
    assert buf.take_all() == b"Subject: x\r\n\r\nbody"
    assert len(buf) == 0
    assert buf.next_line() is None
    buf.feed(b"NOOP\r\n")
    assert buf.next_line() == b"NOOP"


def test_clear_drops_everything() -> None:
    buf = LineBuffer(512)
    buf.feed(b"MAIL FROM:<evil@x.y>\r\nRCPT TO:<v@x.y>\r\npartial")
    assert buf.clear() == len(b"MAIL FROM:<evil@x.y>\r\nRCPT TO:<v@x.y>\r\npartial")
    assert len(buf) == 0
    assert buf.next_line() is None
    buf.feed(b"EHLO a\r\n")
    assert buf.next_line() == b"EHLO a"


def test_clear_resets_overflow_state() -> None:
    buf = LineBuffer(8)
    buf.feed(b"x" * 100)
    assert buf.next_line() is None
    buf.clear()
    buf.feed(b"NOOP\r\n")
    assert buf.next_line() == b"NOOP"  # not reported as the tail of the long line


def test_clear_forgets_a_pending_cr() -> None:
    buf = LineBuffer(512)
    buf.feed(b"abc\r")
    assert buf.next_line() is None
    buf.clear()
    buf.feed(b"\nNOOP\r\n")
    # The LF no longer pairs with the cleared CR: it stays inside the next line.
    assert buf.next_line() == b"\nNOOP"


def test_line_too_long_repr() -> None:
    assert repr(LineTooLong(7)) == "LineTooLong(7)"
