"""NumberedSpoolBackend (`-F spool`), read back by a small reader of the documented format,
plus the shared durability helpers in postier.delivery.fsutil.
"""

from __future__ import annotations

import errno
import multiprocessing
import os
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from postier.delivery import fsutil
from postier.delivery import numbered as numbered_mod
from postier.delivery.base import Recipient, Status, StoredMessage
from postier.delivery.numbered import NumberedSpoolBackend

RECEIVED = b"Received: from client.example by mx.test; id Q\n"


def make_message(spool: Path, body: bytes, sender: str = "bob@example.net", qid: str = "Q1"):
    """A spool file as postier.spool writes it (see postier/delivery/base.py)."""
    return_path = f"Return-Path: <{sender}>\n".encode()
    data = return_path + RECEIVED + body
    path = spool / f"spool-{qid}"
    path.write_bytes(data)
    return StoredMessage(path, len(data), len(return_path), sender, qid, 1_700_000_000.0)


def body(n: int | str, size: int = 0) -> bytes:
    return f"Subject: message {n}\n\nbody {n}\n".encode() + b"p" * size + b"\n"


def rcpt(name: str = "alice") -> Recipient:
    return Recipient(f"{name}@example.org", name)


def read_spool(directory: Path) -> list[tuple[int, bytes, str]]:
    """The reader the format's docstring describes: digit names are messages, each with a
    `<N>.status` of one line of flags; dot files and orphan statuses are ignored."""
    out = []
    for entry in directory.iterdir():
        if entry.name.isascii() and entry.name.isdigit():
            status = (directory / f"{entry.name}.status").read_text()
            assert status.endswith("\n") and status.count("\n") == 1
            out.append((int(entry.name), entry.read_bytes(), status.strip()))
    return sorted(out)


def snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in directory.iterdir()}


@pytest.fixture
def spool(tmp_path: Path) -> Path:
    d = tmp_path / "spool"
    d.mkdir()
    return d


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "mail"  # created by the backend on first delivery


# ---------------------------------------------------------------- format


def test_numbers_from_one_with_recent_status(spool: Path, root: Path) -> None:
    backend = NumberedSpoolBackend(root)
    msgs = [make_message(spool, body(i), qid=f"Q{i}") for i in range(3)]
    for m in msgs:
        [r] = backend.deliver(m, [rcpt()])
        assert r.status is Status.DELIVERED and r.code == 250
    box = root / "alice"
    got = read_spool(box)
    assert [(n, s) for n, _c, s in got] == [(1, "\\Recent"), (2, "\\Recent"), (3, "\\Recent")]
    assert [c for _n, c, _s in got] == [m.path.read_bytes() for m in msgs]
    assert stat.S_IMODE(box.stat().st_mode) == 0o700
    assert {stat.S_IMODE(p.stat().st_mode) for p in box.iterdir()} == {0o600}
    assert sorted(p.name for p in box.iterdir()) == [
        ".lock",
        "1",
        "1.status",
        "2",
        "2.status",
        "3",
        "3.status",
    ]
    assert (box / ".lock").read_text() == "3\n"


def test_one_copy_per_mailbox_and_bad_names(spool: Path, root: Path) -> None:
    msg = make_message(spool, body(1))
    results = NumberedSpoolBackend(root).deliver(
        msg, [rcpt(), Recipient("al@example.org", "alice"), Recipient("x@example.org", ".x")]
    )
    assert [r.code for r in results] == [250, 250, 451]
    assert len(read_spool(root / "alice")) == 1
    assert sorted(p.name for p in root.iterdir()) == ["alice"]


@pytest.fixture
def three(spool: Path, root: Path) -> Path:
    backend = NumberedSpoolBackend(root)
    for i in range(3):
        backend.deliver(make_message(spool, body(i), qid=f"Q{i}"), [rcpt()])
    return root / "alice"


def _next_number(spool: Path, root: Path, backend: NumberedSpoolBackend | None = None) -> int:
    before = {n for n, _c, _s in read_spool(root / "alice")}
    [r] = (backend or NumberedSpoolBackend(root)).deliver(make_message(spool, body("n")), [rcpt()])
    assert r.status is Status.DELIVERED
    [new] = {n for n, _c, _s in read_spool(root / "alice")} - before
    return new


@pytest.mark.parametrize("hint", [None, b"", b"garbage\n", b"1\n", b"0\n"])
def test_a_lost_or_stale_hint_never_reuses_a_number(
    three: Path, spool: Path, root: Path, hint: bytes | None
) -> None:
    if hint is None:
        (three / ".lock").unlink()
    else:
        (three / ".lock").write_bytes(hint)
    assert _next_number(spool, root) == 4


def test_a_stale_hint_is_caught_by_a_backend_that_already_verified(
    three: Path, spool: Path, root: Path
) -> None:
    backend = NumberedSpoolBackend(root)
    assert _next_number(spool, root, backend) == 4
    (three / ".lock").write_bytes(b"2\n")  # e.g. a crash lost the last hint update
    assert _next_number(spool, root, backend) == 5


def test_numbers_of_deleted_messages_are_not_handed_out_again(
    three: Path, spool: Path, root: Path
) -> None:
    for name in ("3", "3.status"):
        (three / name).unlink()
    assert _next_number(spool, root) == 4


def test_crash_leftovers_are_reused_or_removed(three: Path, spool: Path, root: Path) -> None:
    # a crash between the status rename and the message rename, half-written temp files from
    # a crash two days ago, and a temp file of a delivery in progress in another process
    (three / "4.status").write_bytes(b"\\Seen\n")
    for leftover in (".tmp.1.2.ab", ".tmp.1.2.ab.status"):
        (three / leftover).write_bytes(b"half a mess")
        os.utime(three / leftover, (time.time() - 48 * 3600,) * 2)
    (three / ".tmp.3.4.cd").write_bytes(b"in progress")
    assert _next_number(spool, root) == 4  # no gap: 4 was never a visible message
    assert read_spool(three)[-1][2] == "\\Recent"  # the orphan status was replaced
    assert sorted(p.name for p in three.iterdir() if p.name.startswith(".tmp")) == [".tmp.3.4.cd"]


# ---------------------------------------------------------------- concurrency


def _check_fifty(box: Path, spool: Path) -> None:
    got = read_spool(box)
    assert [n for n, _c, _s in got] == list(range(1, 51))  # no gap, no duplicate
    assert all(s == "\\Recent" for _n, _c, s in got)
    expected = {(spool / f"spool-Q{i}").read_bytes() for i in range(50)}
    assert {c for _n, c, _s in got} == expected
    assert not [p for p in box.iterdir() if p.name.startswith(".tmp")]


def test_fifty_threads_one_mailbox(spool: Path, root: Path) -> None:
    backend = NumberedSpoolBackend(root)
    msgs = [make_message(spool, body(i, i * 331), qid=f"Q{i}") for i in range(50)]
    with ThreadPoolExecutor(max_workers=50) as pool:
        results = list(pool.map(lambda m: backend.deliver(m, [rcpt()])[0], msgs))
    assert all(r.status is Status.DELIVERED for r in results)
    _check_fifty(root / "alice", spool)


def _deliver_batch(root: str, spool: str, indexes: list[int]) -> list[str]:
    """Runs in a child process, with threads of its own: processes AND threads contend."""
    backend = NumberedSpoolBackend(Path(root))

    def one(i: int) -> str:
        path = Path(spool) / f"spool-Q{i}"
        data = path.read_bytes()
        msg = StoredMessage(
            path, len(data), data.index(b"\n") + 1, "bob@example.net", f"Q{i}", time.time()
        )
        return backend.deliver(msg, [rcpt()])[0].reply_line

    with ThreadPoolExecutor(max_workers=len(indexes)) as pool:
        return list(pool.map(one, indexes))


def test_fifty_deliveries_from_five_processes(spool: Path, root: Path) -> None:
    for i in range(50):
        make_message(spool, body(i, i * 331), qid=f"Q{i}")
    with multiprocessing.get_context("spawn").Pool(5) as pool:
        batches = [list(range(k, 50, 5)) for k in range(5)]
        replies = pool.starmap(_deliver_batch, [(str(root), str(spool), b) for b in batches])
    assert all(r.startswith("250 ") for batch in replies for r in batch)
    _check_fifty(root / "alice", spool)


HOLD_LOCK = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDWR)
fcntl.lockf(fd, fcntl.LOCK_EX)
print("locked", flush=True)
sys.stdin.read()
"""


def test_a_lock_held_elsewhere_gives_451_after_a_bounded_wait(three: Path, spool: Path) -> None:
    before = snapshot(three)
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(three / ".lock")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "locked\n"
        backend = NumberedSpoolBackend(three.parent, lock_timeout=0.2)
        [r] = backend.deliver(make_message(spool, body(9)), [rcpt()])
        assert r.reply_line.startswith("451 4.3.0") and "locked" in r.text
        assert snapshot(three) == before
    finally:
        holder.communicate("")


# ---------------------------------------------------------------- failure injection


def _assert_451_and_unchanged(results, box: Path, before: dict[str, bytes]) -> None:
    [r] = results
    assert r.status is Status.TEMPORARY and r.reply_line.startswith("451 4.3.0 ")
    assert snapshot(box) == before


def test_file_where_the_mailbox_directory_should_be(spool: Path, tmp_path: Path) -> None:
    (tmp_path / "mail").mkdir()
    (tmp_path / "mail" / "alice").write_bytes(b"precious")
    [r] = NumberedSpoolBackend(tmp_path / "mail").deliver(make_message(spool, body(1)), [rcpt()])
    assert r.reply_line.startswith("451 4.3.0")
    assert (tmp_path / "mail" / "alice").read_bytes() == b"precious"


@pytest.mark.parametrize("failing_call", [1, 2, 3, 4])  # msg, status, dir after each rename
def test_fsync_failure_at_each_step_leaves_nothing(
    three: Path, spool: Path, root: Path, monkeypatch: pytest.MonkeyPatch, failing_call: int
) -> None:
    before = snapshot(three)
    real_fsync = os.fsync
    calls = []

    def failing_fsync(fd: int) -> None:
        calls.append(fd)
        if len(calls) == failing_call:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        real_fsync(fd)

    monkeypatch.setattr(numbered_mod.os, "fsync", failing_fsync)
    results = NumberedSpoolBackend(root).deliver(make_message(spool, body(9, 5000)), [rcpt()])
    assert len(calls) >= failing_call
    _assert_451_and_unchanged(results, three, before)
    monkeypatch.undo()
    assert _next_number(spool, root) == 4  # and the lock was released


def test_rename_failure_removes_the_status_already_placed(
    three: Path, spool: Path, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = snapshot(three)
    real_rename = os.rename

    def failing_rename(src, dst) -> None:
        if not str(dst).endswith(".status"):
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        real_rename(src, dst)

    monkeypatch.setattr(numbered_mod.os, "rename", failing_rename)
    results = NumberedSpoolBackend(root).deliver(make_message(spool, body(9)), [rcpt()])
    _assert_451_and_unchanged(results, three, before)


@pytest.fixture
def tiny_fs(tmp_path: Path) -> Iterator[Path]:
    """A 64 KiB tmpfs: a really full disk, not a simulated one."""
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()}); see the fsync tests")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_full_disk_leaves_the_mailbox_as_it_was(spool: Path, tiny_fs: Path) -> None:
    backend = NumberedSpoolBackend(tiny_fs)
    assert backend.deliver(make_message(spool, body(0), qid="Q0"), [rcpt()])[0].code == 250
    box = tiny_fs / "alice"
    before = snapshot(box)
    big = make_message(spool, body(1, 200_000), qid="Q1")
    _assert_451_and_unchanged(backend.deliver(big, [rcpt()]), box, before)
    assert "No space left on device" in backend.deliver(big, [rcpt()])[0].text
    assert backend.deliver(make_message(spool, body(2), qid="Q2"), [rcpt()])[0].code == 250
    assert [n for n, _c, _s in read_spool(box)] == [1, 2]


# ---------------------------------------------------------------- fsutil


def test_atomic_write_replaces_whole_files_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "f"
    fsutil.atomic_write(target, b"one")
    fsutil.atomic_write(target, b"two", mode=0o640)
    assert target.read_bytes() == b"two" and stat.S_IMODE(target.stat().st_mode) == 0o640

    def failing_fsync(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(fsutil.os, "fsync", failing_fsync)
    with pytest.raises(OSError):
        fsutil.atomic_write(target, b"three")
    assert target.read_bytes() == b"two" and [p.name for p in tmp_path.iterdir()] == ["f"]


def test_ensure_dir_creates_parents_with_mode_and_fsyncs_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[str] = []
    real = fsutil.fsync_dir
    monkeypatch.setattr(fsutil, "fsync_dir", lambda p: (synced.append(str(p)), real(p)))
    old_umask = os.umask(0o077)
    try:
        made = fsutil.ensure_dir(tmp_path / "a" / "b", 0o750)
    finally:
        os.umask(old_umask)
    assert made.is_dir() and stat.S_IMODE(made.stat().st_mode) == 0o750
    assert synced == [str(tmp_path), str(tmp_path / "a")]
    assert fsutil.ensure_dir(made) == made  # existing: nothing to do
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(NotADirectoryError):
        fsutil.ensure_dir(tmp_path / "file" / "x")


@pytest.mark.parametrize("kernel", [True, False])
def test_copy_from_offset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kernel: bool) -> None:
    if not kernel:

        def no_sendfile(*args: object) -> int:
            raise OSError(errno.EINVAL, "unsupported")

        monkeypatch.setattr(fsutil.os, "sendfile", no_sendfile)
    data = os.urandom(300_000)
    (tmp_path / "src").write_bytes(data)
    fd = os.open(tmp_path / "dst", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        with open(tmp_path / "src", "rb") as src:
            assert fsutil.copy_from(src, fd, 17) == len(data) - 17
    finally:
        os.close(fd)
    assert (tmp_path / "dst").read_bytes() == data[17:]


def test_ensure_dir_races_with_itself(tmp_path: Path) -> None:
    # regression: a peer creating the directory between two checks made this raise
    for round_ in range(20):
        target = tmp_path / f"r{round_}" / "a" / "b"
        barrier = threading.Barrier(8)

        def make(target: Path = target, barrier: threading.Barrier = barrier) -> Path:
            barrier.wait()
            return fsutil.ensure_dir(target)

        with ThreadPoolExecutor(max_workers=8) as pool:
            assert set(pool.map(lambda _i: make(), range(8))) == {target}
