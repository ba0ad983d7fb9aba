"""The scheduler's wake-up socket: another worker's commit reaches it without a flush file.

Real Unix datagram sockets; the "other worker" is a child process. The scheduler's poll of
flush requests is set to an hour, so only the datagram can have started the delivery.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path

from postier.queue.entry import QueueEntry, RecipientState
from postier.queue.store import QueueStore
from postier.queue.wakeup import (
    MAX_CARRIED,
    SOCKET_NAME,
    WakeupListener,
    WakeupSender,
    decode,
    encode,
)
from tests.test_scheduler import World, aio, ok


def _send_from_another_process(flush_dir: Path, queue_id: str) -> bool:
    code = (
        "import sys; from pathlib import Path; from postier.queue.wakeup import WakeupSender;"
        "print(WakeupSender(Path(sys.argv[1])).send(sys.argv[2]))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(flush_dir), queue_id],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return out.stdout.strip() == "True"


@aio
async def test_a_datagram_from_another_process_starts_the_delivery(tmp_path: Path) -> None:
    w = World(tmp_path, ok, poll_interval=3600.0)
    w.sched.clock = time.time  # the loop really sleeps here
    listener = WakeupListener(w.store.flush_dir, lambda qid, env, content: w.sched.enqueue(qid))
    listener.start()
    runner = asyncio.create_task(w.sched.run())
    try:
        await asyncio.sleep(0)  # the loop's first pass (and its one poll) is behind us
        qid = w.add()
        w.sched._tracker.forget(qid)  # committed by "another worker": this one was never told
        assert await asyncio.to_thread(_send_from_another_process, w.store.flush_dir, qid)
        async with asyncio.timeout(30):
            while not w.backend.calls:
                await asyncio.sleep(0.01)
        assert [c[1] for c in w.backend.calls] == [qid]
    finally:
        listener.close()
        await w.sched.stop(grace=5)
        await asyncio.gather(runner, return_exceptions=True)
    assert not (w.store.flush_dir / SOCKET_NAME).exists()  # closed: senders fall back


@aio
async def test_garbage_on_the_socket_is_ignored(tmp_path: Path) -> None:
    store = QueueStore(tmp_path / "queue")
    got: list[str] = []
    listener = WakeupListener(store.flush_dir, lambda qid, env, content: got.append(qid))
    listener.start()
    try:
        sender = WakeupSender(store.flush_dir)
        assert sender.send("../../etc/passwd")
        assert sender.send("1K0TS74CTYH00ZHR")
        sender.close()
        async with asyncio.timeout(30):
            while not got:
                await asyncio.sleep(0.01)
    finally:
        listener.close()
    assert got == ["1K0TS74CTYH00ZHR"]


def test_without_a_listener_the_sender_says_so(tmp_path: Path) -> None:
    store = QueueStore(tmp_path / "queue")
    assert WakeupSender(store.flush_dir).send("1K0TS74CTYH00ZHR") is False
    (store.flush_dir / SOCKET_NAME).touch()  # a stale file where the socket was
    assert WakeupSender(store.flush_dir).send("1K0TS74CTYH00ZHR") is False


@aio
async def test_flush_requests_leave_the_socket_alone(tmp_path: Path) -> None:
    store = QueueStore(tmp_path / "queue")
    listener = WakeupListener(store.flush_dir, lambda qid, env, content: None)
    listener.start()
    try:
        store.request_flush()
        assert store.take_flush_requests() == (True, set())
        assert (store.flush_dir / SOCKET_NAME).is_socket()
    finally:
        listener.close()


QID = "1K0TS74CTYH00ZHR"


def test_the_envelope_and_content_ride_along_when_small() -> None:
    entry = QueueEntry(QID, "a@example.org", 1.0, 100, 30, [RecipientState("b@relay.test")])
    envelope = entry.to_json()
    assert decode(encode(QID, envelope, b"Subject: x\n\nbody\n")) == (
        QID,
        envelope,
        b"Subject: x\n\nbody\n",
    )
    assert decode(encode(QID, envelope)) == (QID, envelope, None)
    assert decode(encode(QID)) == (QID, None, None)
    big = b"X" * MAX_CARRIED
    assert decode(encode(QID, envelope, big)) == (QID, None, None)  # too large: the id alone


def test_a_datagram_whose_lengths_do_not_add_up_is_the_bare_id() -> None:
    good = encode(QID, b"{}", b"content")
    assert decode(good[:-1]) == (QID, None, None)
    assert decode(good + b"more") == (QID, None, None)
    assert decode(QID.encode() + b" x y\n{}") == (QID, None, None)
    assert decode(b"not-an-id 2 -1\n{}") is None
