"""GroupSync: every caller returns only after an fsync that started after its call."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from postier.delivery import dirsync, maildir


def test_concurrent_callers_share_fsyncs_and_all_return(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []
    gate = threading.Event()
    real = dirsync.fsync_dir

    def slow_fsync(path: str) -> None:
        calls.append(1)
        gate.wait(5)
        real(path)

    monkeypatch.setattr(dirsync, "fsync_dir", slow_fsync)
    syncer = maildir.GroupSync()
    threads = [threading.Thread(target=syncer.sync, args=(str(tmp_path),)) for _ in range(16)]
    for t in threads:
        t.start()
    gate.set()
    for t in threads:
        t.join(10)
    assert not any(t.is_alive() for t in threads)
    assert 1 <= len(calls) < 16  # shared: at most one running fsync plus one follow-up round
    assert list(syncer._syncs) == [str(tmp_path)]  # one group commit per directory


def test_a_failed_fsync_raises_for_its_caller_and_others_retry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    failures = [OSError(5, "I/O error")]
    real = dirsync.fsync_dir

    def flaky(path: str) -> None:
        if failures:
            raise failures.pop()
        real(path)

    monkeypatch.setattr(dirsync, "fsync_dir", flaky)
    syncer = maildir.GroupSync()
    with pytest.raises(OSError):
        syncer.sync(str(tmp_path))
    syncer.sync(str(tmp_path))  # the next one succeeds
