"""The durable queue store: commit, recover after crashes, atomic updates, safe deletion."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from postier.delivery.base import StoredMessage
from postier.queue import ids
from postier.queue.store import (
    DELIVERED,
    PENDING,
    EntryExists,
    EntryNotFound,
    QueueEntry,
    QueueStore,
)

REPO = Path(__file__).resolve().parents[1]


def make_spool(
    directory: Path,
    sender: str = "alice@example.org",
    body: bytes = b"hello\n",
    queue_id: str | None = None,
) -> StoredMessage:
    """A finished spool file as the session leaves it (base.py's format)."""
    queue_id = queue_id or ids.new_queue_id()
    head = f"Return-Path: <{sender}>\n".encode()
    data = head + b"Received: from client by mx.test; now\nSubject: test\n\n" + body
    path = directory / f"spool-{queue_id}"
    path.write_bytes(data)
    return StoredMessage(
        path=path,
        size=len(data),
        content_offset=len(head),
        sender=sender,
        queue_id=queue_id,
        received_at=1000.0,
    )


@pytest.fixture
def store(tmp_path: Path) -> QueueStore:
    return QueueStore(tmp_path / "q")


def test_ids_unique_sortable_and_shaped() -> None:
    made = [ids.new_queue_id() for _ in range(5000)]
    assert len(set(made)) == len(made)
    assert made == sorted(made)
    assert all(ids.is_queue_id(i) and len(i) == ids.ID_LENGTH for i in made)
    assert not ids.is_queue_id("../../etc/passwd")
    assert not ids.is_queue_id(made[0].lower())
    assert abs(ids.id_time(made[0]) - ids.id_time(made[-1])) < 3600


def test_ids_unique_across_processes() -> None:
    code = "from postier.queue.ids import new_queue_id as n\nfor _ in range(2000): print(n())"
    procs = [
        subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, cwd=REPO)
        for _ in range(4)
    ]
    seen: list[str] = []
    for p in procs:
        out, _ = p.communicate(timeout=60)
        seen += out.decode().split()
    assert len(seen) == 8000 and len(set(seen)) == 8000


def test_commit_links_body_and_records_envelope(store: QueueStore, tmp_path: Path) -> None:
    spool = make_spool(tmp_path)
    entry = store.commit(
        spool, spool.sender, ["bob@example.net", "carol@example.net", "bob@example.net"]
    )
    assert [r.address for r in entry.recipients] == ["bob@example.net", "carol@example.net"]
    body = store.body_path(entry.queue_id)
    assert os.path.samestat(body.stat(), spool.path.stat())  # hard link, no copy
    loaded = store.load(spool.queue_id)
    assert loaded == entry
    assert loaded.sender == "alice@example.org" and loaded.arrival == 1000.0
    assert all(r.state == PENDING and r.attempts == 0 for r in loaded.recipients)
    msg = store.message(loaded)
    assert msg.path.read_bytes()[msg.content_offset :].startswith(b"Received:")
    spool.path.unlink()  # the session removes its spool file: the queue keeps the body
    assert store.read_headers(loaded).endswith(b"Subject: test\n")
    assert [e.queue_id for e in store.list()] == [entry.queue_id]
    assert os.listdir(store.tmp_dir) == []


def test_commit_copies_across_file_systems(
    store: QueueStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spool = make_spool(tmp_path)
    real_link = os.link

    def link(src: os.PathLike[str], dst: os.PathLike[str]) -> None:
        if Path(src) == spool.path:
            raise OSError(18, "Invalid cross-device link")
        real_link(src, dst)

    monkeypatch.setattr(os, "link", link)
    entry = store.commit(spool, spool.sender, ["bob@example.net"])
    body = store.body_path(entry.queue_id)
    assert not os.path.samestat(body.stat(), spool.path.stat())
    assert body.read_bytes() == spool.path.read_bytes()
    assert entry.content_offset == spool.content_offset


def test_commit_twice_is_refused(store: QueueStore, tmp_path: Path) -> None:
    spool = make_spool(tmp_path)
    store.commit(spool, spool.sender, ["bob@example.net"])
    with pytest.raises(EntryExists):
        store.commit(spool, spool.sender, ["bob@example.net"])


def test_failed_commit_leaves_nothing_and_can_be_retried(
    store: QueueStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spool = make_spool(tmp_path)

    def disk_full(entry: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(store, "_write_env", disk_full)
    with pytest.raises(OSError):
        store.commit(spool, spool.sender, ["bob@example.net"])
    assert not store.body_path(spool.queue_id).exists()
    monkeypatch.undo()
    # A body left by a crash during an earlier attempt of the same id does not block it:
    os.link(spool.path, store.body_path(spool.queue_id))
    entry = store.commit(spool, spool.sender, ["bob@example.net"])
    assert store.load(entry.queue_id) == entry


def test_recover_removes_half_written_entries(store: QueueStore, tmp_path: Path) -> None:
    good = store.commit(make_spool(tmp_path), "alice@example.org", ["bob@example.net"])
    # A crash after the body was written but before the envelope rename:
    half = ids.new_queue_id()
    store.body_path(half).write_bytes(b"Return-Path: <x@y>\n\nbody\n")
    # ... and one during the envelope write (temporary file never renamed):
    (store.tmp_dir / f"{half}.json").write_bytes(b'{"queue_id": "')
    # An envelope whose body vanished, and one that is not JSON at all:
    orphan = ids.new_queue_id()
    store.env_path(orphan).write_bytes(json.dumps({"queue_id": orphan}).encode())
    broken = ids.new_queue_id()
    store.body_path(broken).write_bytes(b"x")
    store.env_path(broken).write_bytes(b"\x00garbage")

    entries = store.recover()
    assert [e.queue_id for e in entries] == [good.queue_id]
    assert not store.body_path(half).exists()
    assert not store.env_path(orphan).exists()
    assert (store.corrupt_dir / f"{broken}.json").exists()
    assert os.listdir(store.tmp_dir) == []
    with pytest.raises(EntryNotFound):
        store.load(half)


def test_update_is_atomic_and_never_resurrects(store: QueueStore, tmp_path: Path) -> None:
    entry = store.commit(make_spool(tmp_path), "alice@example.org", ["bob@example.net"])
    entry.recipients[0].state = DELIVERED
    entry.recipients[0].attempts = 1
    store.update(entry)
    assert store.load(entry.queue_id).recipients[0].state == DELIVERED
    assert store.remove(entry.queue_id)
    with pytest.raises(EntryNotFound):
        store.update(entry)
    assert not store.env_path(entry.queue_id).exists()
    assert not store.body_path(entry.queue_id).exists()
    assert store.remove(entry.queue_id) is False


def test_concurrent_update_and_delete(store: QueueStore, tmp_path: Path) -> None:
    """A delivery finishing while `queue delete` runs: whoever wins, nothing half remains."""
    for _ in range(20):
        entry = store.commit(make_spool(tmp_path), "a@example.org", ["b@example.net"])
        barrier = threading.Barrier(2)

        def updater(e: QueueEntry, barrier: threading.Barrier) -> None:
            barrier.wait()
            for i in range(50):
                e.recipients[0].attempts = i
                try:
                    store.update(e)
                except EntryNotFound:
                    return

        t = threading.Thread(target=updater, args=(entry, barrier))
        t.start()
        barrier.wait()
        assert store.remove(entry.queue_id)
        t.join(30)
        assert not store.env_path(entry.queue_id).exists()
        assert not store.body_path(entry.queue_id).exists()
    assert store.list() == []


def test_flush_requests(store: QueueStore) -> None:
    assert store.take_flush_requests() == (False, set())
    qid = ids.new_queue_id()
    store.request_flush(qid)
    store.request_flush()
    assert store.take_flush_requests() == (True, {qid})
    assert store.take_flush_requests() == (False, set())
    with pytest.raises(EntryNotFound):
        store.request_flush("../etc")


_CRASHER = textwrap.dedent("""
    import sys
    from pathlib import Path
    from postier.delivery.base import StoredMessage
    from postier.queue.ids import new_queue_id
    from postier.queue.store import QueueStore
    store = QueueStore(sys.argv[1])
    work = Path(sys.argv[2])
    for n in range(100000):
        qid = new_queue_id()
        head = b"Return-Path: <a@example.org>\\n"
        data = head + b"Subject: %d\\n\\n" % n + b"x" * (n % 5000) + b"\\n"
        p = work / qid
        p.write_bytes(data)
        store.commit(StoredMessage(p, len(data), len(head), "a@example.org", qid, 1.0),
                     "a@example.org", ["b@example.net"])
        p.unlink()
        print(qid, n, flush=True)  # only after commit returned: this is our "250"
""")


@pytest.mark.parametrize("kill_after", [1, 7, 25])
def test_sigkill_mid_commit_keeps_every_committed_entry(tmp_path: Path, kill_after: int) -> None:
    qdir, work = tmp_path / "q", tmp_path / "work"
    work.mkdir()
    proc = subprocess.Popen(
        [sys.executable, "-c", _CRASHER, str(qdir), str(work)], stdout=subprocess.PIPE, cwd=REPO
    )
    assert proc.stdout is not None
    acknowledged: dict[str, int] = {}
    try:
        for _ in range(kill_after):
            line = proc.stdout.readline()
            assert line, "the committing process died early"
            qid, n = line.split()
            acknowledged[qid.decode()] = int(n)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
    rest = proc.stdout.read().split()  # lines written before the kill landed
    proc.stdout.close()
    for qid, n in zip(rest[::2], rest[1::2], strict=False):
        acknowledged[qid.decode()] = int(n)
    store = QueueStore(qdir)
    entries = {e.queue_id: e for e in store.recover()}
    assert set(acknowledged) <= set(entries)  # every acknowledged commit survived
    for qid, entry in entries.items():  # and everything recovered is whole
        data = store.body_path(qid).read_bytes()
        assert entry.size == len(data)
        n = int(data.split(b"Subject: ")[1].split(b"\n")[0])
        assert data.endswith(b"x" * (n % 5000) + b"\n")
    assert sorted(os.listdir(store.body_dir)) == sorted(entries)
    assert os.listdir(store.tmp_dir) == []


def test_commit_can_prepend_headers_after_return_path(store: QueueStore, tmp_path: Path) -> None:
    """The commit hook for signing: the queued body gains the lines, the spool file does not."""
    spool = make_spool(tmp_path)
    original = spool.path.read_bytes()
    signature = b"DKIM-Signature: v=1; a=ed25519-sha256; d=example.org; s=sel;\n b=abc\n"
    entry = store.commit(spool, spool.sender, ["bob@example.net"], prepend=signature)
    body = store.body_path(entry.queue_id).read_bytes()
    head = original[: spool.content_offset]
    assert body == head + signature + original[spool.content_offset :]
    assert entry.content_offset == spool.content_offset and entry.size == len(body)
    assert store.read_headers(entry).startswith(signature + b"Received: ")
    assert spool.path.read_bytes() == original  # a copy, not a link to the spool's inode
    assert os.stat(spool.path).st_nlink == 1


@pytest.mark.parametrize("directory", ["queue", "queue/", "./queue"])
def test_text_paths_name_the_same_files(
    tmp_path: Path, directory: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """body_file is the key the commit leaves a message's content under (Preloaded) and
    the attempt looks it up by str(message.path): the two must be the same string."""
    monkeypatch.chdir(tmp_path)
    store = QueueStore(directory)
    qid = ids.new_queue_id()
    assert store.body_file(qid) == str(store.body_path(qid))
    assert store.env_file(qid) == str(store.env_path(qid))
    with pytest.raises(EntryNotFound):
        store.body_file("../x")


def test_commit_envelope_returns_the_bytes_it_wrote(store: QueueStore, tmp_path: Path) -> None:
    """What the wake-up datagram carries instead of encoding the entry a second time."""
    spool = make_spool(tmp_path)
    entry, envelope = store.commit_envelope(spool, spool.sender, ["bob@example.net"])
    assert store.env_path(entry.queue_id).read_bytes() == envelope
    assert QueueEntry.from_json(envelope) == entry == store.load(entry.queue_id)
