"""Recording attempts' results: in the background, several per thread-pool job.

A connection goes on with its next message while the last one's results are recorded
(`Scheduler._record_all`), and `effects.record_attempts` records a batch in one job, each
attempt answered on its own."""

from __future__ import annotations

import asyncio
import functools
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from postier.delivery.base import Recipient, delivered
from postier.queue.decide import RetryPolicy
from postier.queue.effects import record_attempts
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
