"""DataReader: only CRLF.CRLF ends the data, dot-unstuffing, bare CR/LF, size, bounded memory."""

from __future__ import annotations

import os
from unittest import mock

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from postier.protocol import dot
from postier.protocol.dot import DataReader

MAX_EXAMPLES = int(os.environ.get("POSTIER_HYPOTHESIS_EXAMPLES", "200"))
BIG = 35 * 1024 * 1024


def run(chunks: list[bytes], max_size: int = BIG) -> tuple[DataReader, bytes]:
    reader = DataReader(max_size)
    out = bytearray()
    for chunk in chunks:
        out += reader.feed(chunk)
    return reader, bytes(out)


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({min(max(c, 0), len(data)) for c in cuts})
    parts, prev = [], 0
    for p in [*points, len(data)]:
        parts.append(data[prev:p])
        prev = p
    return parts


def stuff(lines: list[bytes]) -> bytes:
    return b"".join((b"." + ln if ln.startswith(b".") else ln) + b"\r\n" for ln in lines)


# ---- the terminator ---------------------------------------------------------------------------

MESSAGE = b"Subject: hi\r\n\r\nline one\r\n..dotted\r\nlast\r\n.\r\nQUIT\r\n"
CONTENT = b"Subject: hi\r\n\r\nline one\r\n.dotted\r\nlast\r\n"


@pytest.mark.parametrize("cut", range(len(MESSAGE) + 1))
def test_terminator_in_every_split_position(cut: int) -> None:
    reader, out = run([MESSAGE[:cut], MESSAGE[cut:]])
    assert reader.done
    assert out == CONTENT
    assert reader.rest == b"QUIT\r\n"
    assert not reader.bad_line_endings and not reader.overflow
    assert reader.size == len(CONTENT)


@pytest.mark.parametrize("first", range(len(MESSAGE) + 1))
def test_terminator_in_every_three_way_split(first: int) -> None:
    for second in range(first, len(MESSAGE) + 1):
        parts = [MESSAGE[:first], MESSAGE[first:second], MESSAGE[second:]]
        reader, out = run(parts)
        assert reader.done and out == CONTENT and reader.rest == b"QUIT\r\n"


def test_one_byte_at_a_time() -> None:
    reader, out = run([MESSAGE[i : i + 1] for i in range(len(MESSAGE))])
    assert reader.done and out == CONTENT and reader.rest == b"QUIT\r\n"


def test_empty_message() -> None:
    for cut in range(4):
        reader, out = run([b".\r\n"[:cut], b".\r\n"[cut:]])
        assert reader.done and out == b"" and reader.size == 0 and reader.rest == b""


def test_message_of_one_empty_line() -> None:
    reader, out = run([b"\r\n.\r\n"])
    assert reader.done and out == b"\r\n"


def test_no_terminator_means_not_done() -> None:
    reader, out = run([b"a\r\nb\r\n", b".x\r\n", b"..\r\n"])
    assert not reader.done
    assert out == b"a\r\nb\r\nx\r\n.\r\n"


def test_feed_after_done_goes_to_rest() -> None:
    reader, _ = run([b"x\r\n.\r\nMAIL"])
    assert reader.feed(b" FROM:<>\r\n") == b""
    assert reader.rest == b"MAIL FROM:<>\r\n"


def test_output_is_whole_lines() -> None:
    reader = DataReader(BIG)
    assert reader.feed(b"abc") == b""
    assert reader.feed(b"def\r") == b""
    assert reader.feed(b"\nghi") == b"abcdef\r\n"
    assert reader.feed(b"\r\n.\r\n") == b"ghi\r\n"
    assert reader.done


# ---- dot-unstuffing ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("wire", "content"),
    [
        (b"..\r\n.\r\n", b".\r\n"),
        (b"...\r\n.\r\n", b"..\r\n"),
        (b"..x\r\n.\r\n", b".x\r\n"),
        (b"a\r\n..\r\nb\r\n.\r\n", b"a\r\n.\r\nb\r\n"),
        (b"a\r\n.b\r\n.\r\n", b"a\r\nb\r\n"),  # a lone leading dot is removed too (§4.5.2)
        (b"a.b\r\n.\r\n", b"a.b\r\n"),  # dots inside a line stay
        (b"..\r\n..\r\n..\r\n.\r\n", b".\r\n.\r\n.\r\n"),
        (b".\x00\r\n.\r\n", b"\x00\r\n"),
    ],
)
def test_dot_unstuffing(wire: bytes, content: bytes) -> None:
    for cut in range(len(wire) + 1):
        reader, out = run([wire[:cut], wire[cut:]])
        assert reader.done and out == content, cut
        assert reader.size == len(content)


line_bytes = st.binary(max_size=40).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b""))
dotted_line = st.one_of(line_bytes, line_bytes.map(lambda b: b"." + b), st.just(b"."))
bodies = st.lists(dotted_line, max_size=30)


@settings(max_examples=MAX_EXAMPLES, deadline=None)
@given(lines=bodies, cuts=st.lists(st.integers(min_value=0, max_value=2000), max_size=12))
def test_round_trip_any_body(lines: list[bytes], cuts: list[int]) -> None:
    body = b"".join(ln + b"\r\n" for ln in lines)
    wire = stuff(lines) + b".\r\n"
    reader, out = run(split_at(wire, cuts))
    assert reader.done
    assert out == body
    assert reader.size == len(body)
    assert not reader.bad_line_endings and not reader.overflow
    assert reader.rest == b""


@settings(max_examples=MAX_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    lines=st.lists(
        st.one_of(
            dotted_line,
            st.binary(min_size=9, max_size=60).map(
                lambda b: b.replace(b"\r", b"x").replace(b"\n", b"y")
            ),
        ),
        max_size=20,
    ),
    cuts=st.lists(st.integers(min_value=0, max_value=1500), max_size=12),
)
def test_round_trip_with_long_lines_cut_into_pieces(lines: list[bytes], cuts: list[int]) -> None:
    """With a tiny tail limit every long line comes out in pieces: the body is still exact."""
    body = b"".join(ln + b"\r\n" for ln in lines)
    wire = stuff(lines) + b".\r\nNOOP\r\n"
    with mock.patch.object(dot, "_MAX_TAIL", 8):
        reader = DataReader(BIG)
        pieces = [reader.feed(part) for part in split_at(wire, cuts)]
    assert reader.done
    assert b"".join(pieces) == body
    assert all(not p.endswith(b"\r") for p in pieces)
    assert reader.size == len(body)
    assert not reader.bad_line_endings
    assert reader.rest == b"NOOP\r\n"


# ---- SMTP smuggling (issue 7 item 1) ---------------------------------------------------------

SMUGGLING = [
    b"\n.\n",
    b"\r.\r",
    b"\r.\n",
    b"\n.\r",
    b"\n.\r\n",
    b"\r\n.\n",
    b"\r.\r\n",
    b"\r\n.\r",
    b"\r\n\x00.\r\n",
    b"\r\n.\x00\r\n",
]
# Variants that hold a CR or LF not paired as CRLF: the message must be refused.
BARE = {
    b"\n.\n",
    b"\r.\r",
    b"\r.\n",
    b"\n.\r",
    b"\n.\r\n",
    b"\r\n.\n",
    b"\r.\r\n",
    b"\r\n.\r",
}
SMUGGLED = b"MAIL FROM:<evil@attacker.example>\r\nRCPT TO:<victim@example.org>\r\nDATA\r\n"


@pytest.mark.parametrize("fake", SMUGGLING, ids=repr)
def test_smuggling_variant_does_not_end_data(fake: bytes) -> None:
    wire = b"Subject: one\r\n\r\nbody" + fake + SMUGGLED + b"Subject: two\r\n\r\nx\r\n.\r\nQUIT\r\n"
    for cut in range(len(wire) + 1):
        reader = DataReader(BIG)
        out = reader.feed(wire[:cut])
        if cut < len(wire) - len(b"QUIT\r\n"):
            assert not reader.done, (fake, cut)
        out += reader.feed(wire[cut:])
        assert reader.done, cut
        # Only the real CRLF.CRLF ended it: the smuggled commands were content, not "rest".
        assert reader.rest == b"QUIT\r\n", cut
        assert reader.bad_line_endings is (fake in BARE), cut
        if fake not in BARE:
            assert SMUGGLED in out


@pytest.mark.parametrize("fake", SMUGGLING, ids=repr)
def test_smuggling_variant_right_at_the_start(fake: bytes) -> None:
    # Straight after the DATA line: the content's first line starts with the variant.
    wire = fake + b"x\r\n.\r\n"
    for cut in range(len(wire) + 1):
        reader, _ = run([wire[:cut], wire[cut:]])
        assert reader.done and reader.rest == b"", cut
        assert reader.bad_line_endings is (fake in BARE)


@pytest.mark.parametrize("fake", sorted(BARE), ids=repr)
def test_bare_variant_alone_is_flagged(fake: bytes) -> None:
    reader, out = run([b"a" + fake + b"b\r\n.\r\n"])
    assert reader.done
    assert reader.bad_line_endings
    assert out == b""  # nothing of a refused message is passed on


@pytest.mark.parametrize(
    "content",
    [b"a\nb\r\n", b"a\rb\r\n", b"\n\r\n", b"a\r\r\n", b"a\n\n\r\n", b"x" * 100 + b"\r"],
    ids=repr,
)
def test_bare_cr_or_lf_is_flagged(content: bytes) -> None:
    reader, _ = run([content, b"\r\n.\r\n"])
    assert reader.done and reader.bad_line_endings


def test_bare_lf_in_a_long_line_cut_into_pieces_is_flagged() -> None:
    reader = DataReader(BIG)
    reader.feed(b"x" * 100_000 + b"\n" + b"y" * 100_000)
    reader.feed(b"\r\n.\r\n")
    assert reader.done and reader.bad_line_endings


def test_nul_is_not_a_line_ending() -> None:
    reader, out = run([b"a\x00b\r\n\x00\r\n.\r\n"])
    assert reader.done and not reader.bad_line_endings
    assert out == b"a\x00b\r\n\x00\r\n"


# ---- size limit ---------------------------------------------------------------------------


def test_exactly_at_the_limit_is_fine() -> None:
    reader, out = run([b"12345678\r\n.\r\n"], max_size=10)
    assert reader.done and not reader.overflow and out == b"12345678\r\n"


def test_overflow_flagged_content_stops_terminator_found() -> None:
    reader = DataReader(100)
    first = reader.feed(b"a" * 50 + b"\r\n")
    assert first == b"a" * 50 + b"\r\n"
    second = reader.feed(b"b" * 60 + b"\r\n")
    assert second == b""
    assert reader.overflow
    more = reader.feed(b"c\r\n" * 1000)
    assert more == b""
    assert not reader.done
    assert reader.feed(b".\r\nRSET\r\n") == b""
    assert reader.done and reader.overflow and not reader.bad_line_endings
    assert reader.rest == b"RSET\r\n"
    assert reader.size == 52 + 62 + 3000


def test_overflow_with_smuggling_past_the_limit_still_needs_crlf_dot_crlf() -> None:
    reader = DataReader(10)
    reader.feed(b"x" * 100 + b"\r\n")
    reader.feed(b"\n.\n" + SMUGGLED)
    assert not reader.done
    reader.feed(b"\r\n.\r\n")
    assert reader.done and reader.overflow and reader.bad_line_endings and reader.rest == b""


def test_fifty_megabyte_line_is_bounded_in_memory() -> None:
    reader = DataReader(BIG)
    chunk = b"A" * 65536
    peak = 0
    total = 0
    for _ in range(50 * 1024 * 1024 // len(chunk)):
        total += len(reader.feed(chunk))
        peak = max(peak, len(reader._buf))
    assert peak <= 2 * len(chunk)
    assert reader.overflow and not reader.done
    assert total <= BIG  # nothing past the limit was passed on
    reader.feed(b"\r\n.\r\nQUIT\r\n")
    assert reader.done and reader.overflow and not reader.bad_line_endings
    assert reader.rest == b"QUIT\r\n"
    assert reader.size == 50 * 1024 * 1024 + 2


def test_fifty_megabyte_line_with_small_limit() -> None:
    reader = DataReader(1000)
    chunk = b"B" * 65536
    for _ in range(50 * 1024 * 1024 // len(chunk)):
        assert reader.feed(chunk) == b""
        assert len(reader._buf) <= 2 * len(chunk)
    reader.feed(b"\r")
    reader.feed(b"\n.")
    reader.feed(b"\r\n")
    assert reader.done and reader.overflow and reader.rest == b""


def test_long_line_under_the_limit_is_passed_on_in_pieces_exactly() -> None:
    line = bytes(range(33, 127)) * 3000  # 282,000 bytes, no CR/LF
    wire = b"." + line + b"\r\nend\r\n.\r\n"
    reader = DataReader(BIG)
    pieces = [reader.feed(wire[i : i + 4096]) for i in range(0, len(wire), 4096)]
    assert reader.done and not reader.overflow and not reader.bad_line_endings
    assert b"".join(pieces) == line + b"\r\nend\r\n"  # the leading dot was unstuffed once
    assert all(not p.endswith(b"\r") for p in pieces)
    assert max(len(p) for p in pieces) <= 2 * 65536


def test_dot_after_a_cut_long_line_is_not_the_terminator() -> None:
    reader = DataReader(BIG)
    out = reader.feed(b"z" * 70_000 + b".")
    out += reader.feed(b"\r\n")  # "zzzz...z." is one line; its final "." ends nothing
    assert not reader.done
    assert out == b"z" * 70_000 + b".\r\n"
    reader.feed(b".\r\n")
    assert reader.done


# ---- pipelined bytes after the terminator ---------------------------------------------------


@pytest.mark.parametrize("cut", range(len(b"x\r\n.\r\nMAIL FROM:<>\r\nRCPT") + 1))
def test_rest_holds_pipelined_bytes(cut: int) -> None:
    wire = b"x\r\n.\r\nMAIL FROM:<>\r\nRCPT"
    reader, out = run([wire[:cut], wire[cut:]])
    assert reader.done
    assert out == b"x\r\n"
    assert reader.rest == b"MAIL FROM:<>\r\nRCPT"


def test_rest_after_empty_message() -> None:
    reader, _ = run([b".\r\n.\r\n"])
    assert reader.done and reader.rest == b".\r\n"
