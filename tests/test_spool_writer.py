"""The spool writer: header lines added at any time before delivery, and the streaming
header-field filter (RFC 8601 §5 will use it to drop forged Authentication-Results)."""

from __future__ import annotations

from pathlib import Path

import pytest

from postier.inbound.header_scan import MAX_HELD_FIELD, HeaderScanner
from postier.spool import FLUSH_AT, SpoolWriter

TRACE = b"Return-Path: <a@example.net>\nReceived: from c.example by mx.test; now\n"


def writer(tmp_path: Path, **kw: object) -> SpoolWriter:
    return SpoolWriter(tmp_path / "spool", "Q1", TRACE, **kw)  # type: ignore[arg-type]


def test_small_message_headers_added_in_memory(tmp_path: Path) -> None:
    w = writer(tmp_path, scan_headers=True)
    assert not w.add(b"Subject: hi\r\n\r\nbody\r\n")
    assert not w.on_disk
    assert w.header_names == {b"subject"}
    w.add_header_lines(b"Authentication-Results: mx.test; none\n", above_received=True)
    w.add_header_lines(b"Message-ID: <Q1@mx.test>\n")
    w.finish()
    assert w.path.read_bytes() == (
        b"Return-Path: <a@example.net>\n"
        b"Authentication-Results: mx.test; none\n"
        b"Received: from c.example by mx.test; now\n"
        b"Message-ID: <Q1@mx.test>\n"
        b"Subject: hi\n\nbody\n"
    )
    assert w.size == w.path.stat().st_size
    assert w.content_offset == len(b"Return-Path: <a@example.net>\n")


def test_headers_added_after_a_flush_rewrite_the_file(tmp_path: Path) -> None:
    w = writer(tmp_path, scan_headers=True)
    body = b"x" * 998 + b"\r\n"
    w.add(b"From: <a@example.net>\r\n\r\n")
    while not w.add(body):
        pass
    w.flush()  # over FLUSH_AT: on disk now, as a large message is
    assert w.on_disk and w.size > FLUSH_AT
    w.add(b"the end\r\n")
    w.add_header_lines(b"Date: today\n")
    inode = w.path.stat().st_ino
    w.finish()
    data = w.path.read_bytes()
    assert data.startswith(TRACE + b"Date: today\nFrom: <a@example.net>\n\n")
    assert data.endswith(b"x\nthe end\n")
    assert w.size == len(data)
    assert w.path.stat().st_ino != inode  # a new file, renamed over the old name
    assert sorted(p.name for p in w.path.parent.iterdir()) == ["Q1.spool"]


def test_finish_again_after_a_check_added_a_line(tmp_path: Path) -> None:
    w = writer(tmp_path)
    w.add(b"Subject: s\r\n\r\nb\r\n")
    w.finish()  # a check reads the finished file...
    first = w.path.read_bytes()
    w.finish()  # ...finishing again without changes does nothing
    assert w.path.read_bytes() == first
    w.add_header_lines(b"Authentication-Results: mx.test; spf=pass\n", above_received=True)
    w.finish()
    data = w.path.read_bytes()
    assert data == first.replace(
        b"Received:", b"Authentication-Results: mx.test; spf=pass\nReceived:", 1
    )
    assert w.size == len(data)


def _count_calls(monkeypatch: pytest.MonkeyPatch, name: str) -> list[object]:
    import os

    calls: list[object] = []
    real = getattr(os, name)
    monkeypatch.setattr(os, name, lambda *a, **kw: (calls.append(a), real(*a, **kw))[1])
    return calls


def test_complete_gives_checks_a_copy_in_memory_and_finish_writes_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A check reads an in-memory copy; the header it adds costs no rewrite: one file, one
    fsync, no rename."""
    fsyncs = _count_calls(monkeypatch, "fsync")
    replaces = _count_calls(monkeypatch, "replace")
    w = writer(tmp_path, drop_field=lambda name, field: name == b"x-drop")
    w.add(b"Subject: s\r\nX-Drop: me")  # the message ends inside its header section
    w.complete()
    # the last field decided at the end
    assert w.readable_path.read_bytes() == TRACE + b"Subject: s\n"
    assert w.readable_size == len(TRACE + b"Subject: s\n")
    assert not w.path.exists() and fsyncs == []
    w.add_header_lines(b"Authentication-Results: mx.test; none\n", above_received=True)
    w.finish()
    assert len(fsyncs) == 1 and replaces == []
    assert w.path.read_bytes() == (
        b"Return-Path: <a@example.net>\nAuthentication-Results: mx.test; none\n"
        b"Received: from c.example by mx.test; now\nSubject: s\n"
    )
    assert w.size == w.path.stat().st_size
    assert w.readable_path == w.path  # the copy is gone with finish()


def test_complete_on_disk_then_a_header_costs_one_rewrite_and_one_fsync(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A message flushed before its end (a large one) is completed in its spool file."""
    fsyncs = _count_calls(monkeypatch, "fsync")
    w = writer(tmp_path)
    w.add(b"Subject: s\r\n\r\nbody\r\n")
    w.flush()  # as the handler does every FLUSH_AT bytes
    w.complete()
    assert w.readable_path == w.path
    assert w.path.read_bytes() == TRACE + b"Subject: s\n\nbody\n" and fsyncs == []
    w.add_header_lines(b"Authentication-Results: mx.test; none\n", above_received=True)
    w.finish()
    assert len(fsyncs) == 1
    assert w.path.read_bytes().startswith(
        b"Return-Path: <a@example.net>\nAuthentication-Results: mx.test; none\nReceived:"
    )


def test_discard_closes_the_in_memory_copy(tmp_path: Path) -> None:
    w = writer(tmp_path)
    w.add(b"Subject: s\r\n\r\nb\r\n")
    w.complete()
    copy = w.readable_path
    assert copy.exists()
    w.discard()
    assert not copy.exists() and not w.path.exists()


def test_discard_without_a_file_and_twice(tmp_path: Path) -> None:
    w = writer(tmp_path)
    w.add(b"Subject: s\r\n\r\nb\r\n")
    w.discard()
    assert not w.on_disk and not w.path.exists()
    w2 = writer(tmp_path)
    w2.add(b"x\r\n")
    w2.flush()
    assert w2.on_disk
    w2.discard()
    w2.discard()
    assert not w2.path.exists()


# ---- the header-field filter -----------------------------------------------------------------
def ours(name: bytes, field: bytes) -> bool:
    """Drop Authentication-Results fields that claim to come from mx.test."""
    return (
        name == b"authentication-results"
        and field.split(b":", 1)[1].split(b";")[0].strip() == b"mx.test"
    )


MESSAGE = (
    b"Authentication-Results: mx.test; dmarc=pass\n"
    b"From: <a@example.net>\n"
    b"Authentication-Results:\n\tmx.test;\n\tspf=pass\n"
    b"Authentication-Results: other.example; spf=fail\n"
    b"Subject: folded\n two\n"
    b"\n"
    b"Authentication-Results: mx.test; in the body stays\n"
)
EXPECTED = (
    b"From: <a@example.net>\n"
    b"Authentication-Results: other.example; spf=fail\n"
    b"Subject: folded\n two\n"
    b"\n"
    b"Authentication-Results: mx.test; in the body stays\n"
)


@pytest.mark.parametrize("cut", [1, 7, 45, 60, 80, 100, 1000])
def test_filter_drops_whole_folded_fields_across_chunk_boundaries(cut: int) -> None:
    scanner = HeaderScanner(ours)
    out = b""
    for i in range(0, len(MESSAGE), cut):
        out += scanner.feed(MESSAGE[i : i + cut])
    out += scanner.close()
    assert out == EXPECTED
    assert {b"from", b"subject", b"authentication-results"} <= scanner.names


def test_filter_in_the_writer_with_crlf_lines(tmp_path: Path) -> None:
    w = writer(tmp_path, drop_field=ours)
    crlf = MESSAGE.replace(b"\n", b"\r\n")
    w.add(crlf[:50])  # the protocol hands whole lines; a split here is a long-line piece
    w.add(crlf[50:])
    w.finish()
    assert w.path.read_bytes() == TRACE + EXPECTED


def test_message_ending_inside_its_header_section() -> None:
    scanner = HeaderScanner(ours)
    out = scanner.feed(b"Subject: x\nAuthentication-Results: mx.test; x\n")
    assert out == b"Subject: x\n"  # the last field is held until its end is known
    assert scanner.close() == b""


def test_a_huge_field_is_decided_on_its_start_and_memory_stays_bounded() -> None:
    scanner = HeaderScanner(ours)
    piece = b"\tspf=pass " + b"y" * 1000 + b"\n"
    out = scanner.feed(b"Authentication-Results: mx.test;\n")
    for _ in range(2 * MAX_HELD_FIELD // len(piece)):
        out += scanner.feed(piece)
        assert len(scanner._held) <= MAX_HELD_FIELD + len(piece)
    out += scanner.feed(b"Subject: kept\n\nbody\n")
    assert out == b"Subject: kept\n\nbody\n"


def test_without_a_filter_everything_passes() -> None:
    scanner = HeaderScanner()
    out = scanner.feed(MESSAGE[:30]) + scanner.feed(MESSAGE[30:]) + scanner.close()
    assert out == MESSAGE


def test_content_of_a_message_written_whole_is_the_file_after_return_path(
    tmp_path: Path,
) -> None:
    """What the queue's commit hands to the first relay attempt instead of a file read."""
    w = writer(tmp_path)
    w.add(b"Subject: hi\r\n\r\nbody\r\n")
    w.complete()  # the checks' in-memory copy: the file is still written once, at finish
    w.add_header_lines(b"Authentication-Results: mx.test; none\n", above_received=True)
    assert w.content is None  # nothing written yet
    w.finish()
    assert w.content == w.path.read_bytes()[w.content_offset :]
    assert w.content.startswith(b"Authentication-Results: mx.test; none\nReceived: ")


def test_no_content_once_written_in_pieces_or_rewritten(tmp_path: Path) -> None:
    large = writer(tmp_path / "large")
    large.add(b"From: <a@example.net>\r\n\r\n")
    while not large.add(b"x" * 998 + b"\r\n"):
        pass
    large.flush()
    large.add(b"the end\r\n")
    large.finish()
    assert large.content is None
    again = writer(tmp_path / "again")
    again.add(b"Subject: hi\r\n\r\nbody\r\n")
    again.finish()
    assert again.content is not None
    again.add_header_lines(b"X-Late: yes\n")
    again.finish()  # rewritten with the new line: what was in memory is stale
    assert again.content is None
    assert b"X-Late: yes\n" in again.path.read_bytes()
