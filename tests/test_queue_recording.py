"""Recording attempts' results: in the background, several per thread-pool job.

A connection goes on with its next message while the last one's results are recorded
(`Scheduler._record_all`), and `effects.record_attempts` records a batch in one job, each
attempt answered on its own."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from postier.delivery.base import Recipient, delivered
from postier.queue.decide import RetryPolicy
from postier.queue.effects import record_attempts
from postier.queue.entry import PENDING
from postier.queue.store import EntryNotFound
from tests.test_scheduler import World, aio, commit


class HoldingExecutor(ThreadPoolExecutor):
    """A real thread pool whose record jobs wait for `release`; counts them."""

    def __init__(self) -> None:
        super().__init__(max_workers=4)
        self.release = threading.Event()
        self.record_jobs = 0

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        if isinstance(fn, functools.partial) and fn.func is record_attempts:
            self.record_jobs += 1
            job = fn

            def held() -> Any:
                self.release.wait(60)
                return job()

            return super().submit(held)
        return super().submit(fn, *args, **kwargs)


@aio
async def test_the_connection_goes_on_while_the_last_attempt_is_recorded(tmp_path: Path) -> None:
    pool = HoldingExecutor()
    try:
        w = World(tmp_path, session=True, per_destination_limit=1, executor=pool)
        queued = [commit(w.store, tmp_path, "a@example.org", [f"u{i}@example.net"], 0.0)
                  for i in range(3)]  # fmt: skip
        for qid in queued:  # as just committed here: dispatched without a thread-pool job
            w.sched.enqueue(qid, w.store.load(qid))
        await w.sched.run_once()
        for _ in range(1000):  # the three sent on one connection, none recorded yet
            if len(w.backend.calls) == 3:
                break
            await asyncio.sleep(0.001)
        assert w.backend.sessions == [queued]
        assert len(w.store.list()) == 3  # nothing recorded: the record job is held
        pool.release.set()
        await w.settle()
        assert w.store.list() == []
        assert pool.record_jobs < 3  # those finished while a job was held go in one
    finally:
        pool.release.set()
        pool.shutdown()


def test_a_batch_records_each_attempt_on_its_own(tmp_path: Path) -> None:
    w = World(tmp_path)
    first, gone, last = (commit(w.store, tmp_path, "a@example.org", [f"{u}@example.net"], 0.0)
                         for u in ("b", "c", "d"))  # fmt: skip
    w.store.remove(gone)  # `postier queue delete` during the attempt
    attempts = [
        (qid, [delivered(Recipient(f"{u}@example.net"), "250 ok")], "mx.example.net")
        for qid, u in ((first, "b"), (gone, "c"), (last, "d"))
    ]
    done = record_attempts(w.store, attempts, now=10.0, policy=RetryPolicy(), hostname="mx.test")
    assert isinstance(done[1], EntryNotFound)
    for result in (done[0], done[2]):
        assert not isinstance(result, Exception)
        outcome, notices, kept = result
        assert outcome.final and notices == [] and kept
    assert w.store.list() == []


def test_recipients_added_while_an_attempt_is_recorded_are_kept(tmp_path: Path) -> None:
    """The record reads, decides and writes under the entry's lock. A router adding local
    recipients meanwhile (`add_recipients`, under that lock) either comes before the read,
    and the record sees them, or after the write: never between, where the record's removal
    of the "finished" entry (or its rewrite) would lose them after their 250."""
    w = World(tmp_path)
    qid = commit(w.store, tmp_path, "a@example.org", ["b@example.net"], 0.0)
    attempt = [(qid, [delivered(Recipient("b@example.net"), "250 ok")], "mx.example.net")]
    done: list[object] = []

    def record() -> None:
        policy = RetryPolicy()
        done.extend(record_attempts(w.store, attempt, now=10.0, policy=policy, hostname="mx.test"))

    with w.store.locked(qid):  # as add_recipients holds it
        recorder = threading.Thread(target=record)
        recorder.start()
        recorder.join(0.5)  # it waits for the lock (before the fix: it had read the entry)
        entry = w.store.load(qid)
        added = dataclasses.replace(entry.recipients[0], address="local@example.org")
        entry.recipients.append(added)
        w.store.update(entry, held=True)  # what add_recipients writes
    recorder.join(60)
    assert not recorder.is_alive() and not isinstance(done[0], Exception), done
    left = w.store.load(qid)  # not removed: one recipient still to deliver
    state = {r.address: r.state for r in left.recipients}
    assert state["local@example.org"] is PENDING
    assert state["b@example.net"] is not PENDING  # the attempt's result is recorded
