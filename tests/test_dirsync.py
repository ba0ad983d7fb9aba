"""Group commit of the queue's directory fsyncs: every caller is covered, errors reach all."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from postier.delivery.dirsync import DirSync

THREADS = 16
CALLS = 40


def _hammer(sync: DirSync) -> list[BaseException]:
    errors: list[BaseException] = []
    start = threading.Barrier(THREADS)

    def run() -> None:
        start.wait()
        for _ in range(CALLS):
            try:
                sync.sync()
            except BaseException as exc:  # collected for the assertion below
                errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads)
    return errors


def test_alone_each_call_makes_its_own_fsync(tmp_path: Path) -> None:
    sync = DirSync(tmp_path)
    for _ in range(3):
        sync.sync()
    assert sync.rounds == 3


def test_concurrent_callers_all_return_and_share_rounds(tmp_path: Path) -> None:
    sync = DirSync(tmp_path)
    assert _hammer(sync) == []
    assert 0 < sync.rounds <= THREADS * CALLS


def test_a_failed_fsync_fails_every_caller_it_was_to_cover(tmp_path: Path) -> None:
    sync = DirSync(tmp_path / "missing")
    with pytest.raises(FileNotFoundError):
        sync.sync()
    errors = _hammer(sync)
    assert len(errors) == THREADS * CALLS
    assert all(isinstance(e, FileNotFoundError) for e in errors)
