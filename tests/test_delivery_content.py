"""A queued message's content in memory: read whole when small, kept from commit, bounded."""

from __future__ import annotations

from pathlib import Path

from postier.delivery.content import WHOLE, Preloaded, read_body


def _spool(path: Path, content: bytes) -> int:
    head = b"Return-Path: <a@example.org>\n"
    path.write_bytes(head + content)
    return len(head)


def test_a_small_message_is_read_whole_after_return_path(tmp_path: Path) -> None:
    path = tmp_path / "m"
    offset = _spool(path, b"Subject: hi\n\nbody\n")
    assert read_body(path, offset, path.stat().st_size) == b"Subject: hi\n\nbody\n"


def test_a_large_or_missing_one_is_left_to_streaming(tmp_path: Path) -> None:
    path = tmp_path / "m"
    offset = _spool(path, b"X" * (WHOLE + 1))
    assert read_body(path, offset, path.stat().st_size) is None
    # a size that understates the file never makes it read past the limit
    assert read_body(path, offset, offset + 10) is None
    assert read_body(tmp_path / "gone", 0, 10) is None


def test_preloaded_gives_each_content_once() -> None:
    cache = Preloaded()
    cache.put(Path("/q/body/A"), b"one")
    assert cache.take("/q/body/A") == b"one"
    assert cache.take("/q/body/A") is None


def test_preloaded_drops_the_oldest_beyond_its_bound() -> None:
    cache = Preloaded(max_bytes=10)
    cache.put("a", b"1234")
    cache.put("b", b"5678")
    cache.put("c", b"90ab")  # 12 bytes: "a" goes
    assert cache.take("a") is None
    assert cache.take("b") == b"5678" and cache.take("c") == b"90ab"
    cache.put("huge", b"x" * 11)  # larger than the bound: never kept
    assert len(cache) == 0
