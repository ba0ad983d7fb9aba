"""Removing header fields from a stored message after the fact (rspamd's milter removals, a
rewritten Subject): only the header section changes, folded fields go whole, the body and
the fields added above and below our Received stay."""

from __future__ import annotations

from pathlib import Path

from postier.spool import SpoolWriter

PROLOGUE = b"Return-Path: <a@remote.test>\nReceived: from x by mx.test\n"


def writer(tmp_path: Path, content: bytes) -> SpoolWriter:
    w = SpoolWriter(tmp_path, "Q1", PROLOGUE)
    w.add(content)
    return w


def test_removal_after_the_file_is_finished(tmp_path: Path) -> None:
    w = writer(
        tmp_path,
        b"Subject: hello\r\nX-Spam: No\r\n folded on\r\nFrom: a@remote.test\r\n\r\n"
        b"Subject: in the body stays\r\nX-Spam: No\r\n",
    )
    w.finish()
    w.remove_fields(lambda name, _field: name in (b"subject", b"x-spam"))
    w.add_header_lines(b"X-Spam: Yes\nSubject: ***SPAM*** hello\n")
    w.finish()
    data = w.path.read_bytes()
    assert data == PROLOGUE + (
        b"X-Spam: Yes\nSubject: ***SPAM*** hello\nFrom: a@remote.test\n\n"
        b"Subject: in the body stays\nX-Spam: No\n"
    )
    assert w.size == len(data)


def test_removal_before_the_first_flush_and_a_message_without_body(tmp_path: Path) -> None:
    w = writer(tmp_path, b"X-Drop: 1\r\nKeep: 2\r\n")
    w.remove_fields(lambda name, _field: name == b"x-drop")
    w.finish()
    assert w.path.read_bytes() == PROLOGUE + b"Keep: 2\n"


def test_large_body_is_copied_untouched(tmp_path: Path) -> None:
    body = b"line of the body, Subject: not a field\r\n" * 100_000
    w = writer(tmp_path, b"Subject: x\r\n\r\n")
    w.add(body)
    w.flush()
    w.finish()
    w.remove_fields(lambda name, _field: name == b"subject")
    w.finish()
    assert w.path.read_bytes() == PROLOGUE + b"\n" + body.replace(b"\r\n", b"\n")
