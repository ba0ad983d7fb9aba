"""The queue scheduler: when to try each recipient, over which connection, and what then.

Model (a small Postfix qmgr):
- A heap of (due time, queue id). `enqueue(id)` makes an entry due at once; at dispatch the
  entry is read from disk (or taken as `enqueue` was handed it, just committed) and its due
  pending recipients are grouped by domain into jobs.
- One `Destination` per domain (`postier.queue.destinations`) holds a deque of jobs and
  at most `per_destination_limit` worker tasks (connections). A worker opens a session (a
  `Relay`'s keeps its connection) and takes the next job for the same domain from the
  deque: many messages to one domain share a connection, for up to `connection_reuse_time`
  seconds (Postfix's smtp_connection_reuse_time_limit, 300 s), or `messages_per_connection`
  messages when every connection slot is taken (another destination may be waiting for one).
- After each attempt the entry is re-read and `decide.apply_results` says, as data, what
  the attempt means (delivered, retry when, bounce, expiry, delay warning; the rules are in
  `postier.queue.decide`). `postier.queue.effects` then applies that `Outcome` (reports to
  the sender first, then the entry's update or removal) and the scheduler sets the next
  dispatch time. This is recorded in the background by one task (`_record_all`), several
  attempts per thread-pool job, while the connection goes on with its next message. Each
  record reads, decides and writes under the entry's file lock (`QueueStore.locked`), which
  also keeps out a router adding recipients from another worker.
- What the scheduler knows about an entry between loads is one record
  (`postier.queue.tracking`): when it is next due, whether it was flushed, and which
  domains have an attempt running (until it is recorded).
- A destination whose attempt failed as a whole (no connection, or every recipient
  temporary) is "dead" for `destination_hold` seconds (default: the first back-off step):
  other messages for it wait instead of trying at once (RFC 5321 §4.5.4.1). `flush` revives.
- Nothing is ever sent to the null sender. Bounces and delay warnings are committed to
  the queue as new entries (sender <>), so they are as durable as mail; one to a local
  sender is delivered through `local_deliver` when `is_local` says its domain is ours.
- A backend is reached through a `RelaySession` (`postier.delivery.base.open_session`):
  SmtpRelay's own sessions; any other backend, and local delivery, one attempt per session.

Other processes reach the daemon through the queue directory: `postier queue flush [ID]`
drops a request file in DIR/flush/ (QueueStore.request_flush), which `run()` polls every
`poll_interval` seconds with one listdir (the daemon's other workers announce new entries
on a socket there instead, `postier.queue.wakeup`, which calls `enqueue`); `postier queue
delete` removes the entry with `QueueStore.remove`, and the next load here simply misses it.

Times come from the injectable `clock`, so tests drive back-off and expiry by advancing a
fake clock and calling `run_once()` / `drain()`; only `run()` sleeps.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import Executor
from contextlib import AbstractAsyncContextManager
from typing import Any, TypeVar

from postier.delivery.base import (
    DeliverFn,
    NetworkBackend,
    Recipient,
    RecipientResult,
    RelaySession,
    SingleAttempt,
    Status,
    open_session,
)
from postier.queue.decide import DEFAULT_SCHEDULE, RetryPolicy
from postier.queue.destinations import Destination, Job, attempt
from postier.queue.effects import Recorded, record_attempts
from postier.queue.store import EntryNotFound, QueueEntry, QueueStore
from postier.queue.tracking import Tracker

log = logging.getLogger("postier.queue")
T = TypeVar("T")

# At most this many attempts' results recorded in one thread-pool job (bounds its latency).
RECORD_BATCH = 64
# A finished attempt waiting to be recorded: the job, its results, the remote host, and
# the future resolved once it is recorded.
_Unrecorded = tuple[Job, list[RecipientResult], str, "asyncio.Future[None]"]

__all__ = ["DEFAULT_SCHEDULE", "Scheduler"]


class Scheduler:
    """Delivers queued entries; see the module docstring. Runs on one asyncio loop."""

    def __init__(
        self,
        store: QueueStore,
        backend_for_domain: Callable[[str], NetworkBackend],
        *,
        hostname: str,
        schedule: Sequence[float] = DEFAULT_SCHEDULE,
        max_age: float = 5 * 86400,
        delay_warning_after: float = 4 * 3600,
        per_destination_limit: int = 4,
        max_connections: int = 100,
        messages_per_connection: int = 100,
        connection_reuse_time: float = 300.0,
        destination_hold: float | None = None,
        jitter: float = 0.1,
        local_deliver: DeliverFn | None = None,
        is_local: Callable[[str], bool] = lambda domain: False,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
        executor: Executor | None = None,
        poll_interval: float = 1.0,
        sign_own: Callable[[bytes, int], bytes] | None = None,
    ) -> None:
        self.policy = RetryPolicy(
            schedule=tuple(float(s) for s in schedule),
            max_age=max_age,
            delay_warning_after=delay_warning_after,
            jitter=jitter,
            rng=rng or random.Random(),
        )
        self.store = store
        self.backend_for_domain = backend_for_domain
        self.hostname = hostname
        self.sign_own = sign_own  # DKIM for our own DSNs: (bytes, content_offset) -> bytes
        self.per_destination_limit = max(1, per_destination_limit)
        self.messages_per_connection = max(1, messages_per_connection)
        self.connection_reuse_time = connection_reuse_time
        first_step = self.policy.schedule[0]
        self.destination_hold = first_step if destination_hold is None else destination_hold
        self.local_deliver = local_deliver
        self.is_local = is_local
        self.clock = clock
        self.executor = executor
        self.poll_interval = poll_interval
        self._tracker = Tracker()
        self._heap = self._tracker.heap  # (due, queue id), read by tests
        self._dests: dict[str, Destination] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        # Finished attempts not recorded yet, and whether the task recording them runs
        # (`_record_all`).
        self._unrecorded: list[_Unrecorded] = []
        self._recording = False
        self._connections = asyncio.Semaphore(max_connections)
        self._wake = asyncio.Event()
        self._stopping = False
        self._runner: asyncio.Task[None] | None = None
        self._lock_fd: int | None = None

    # -- public API ----------------------------------------------------------------------
    async def recover(self) -> list[QueueEntry]:
        """Start-up: clean the store after a crash and schedule every committed entry.

        Raises RuntimeError if another scheduler already runs on this queue directory.
        """
        if self._lock_fd is None:
            try:
                self._lock_fd = await self._io(self.store.lock_for_daemon)
            except BlockingIOError:
                raise RuntimeError(
                    f"{self.store.directory}: another postier daemon is delivering from this queue"
                ) from None
        entries = await self._io(self.store.recover)
        for entry in entries:
            self._tracker.schedule(
                entry.queue_id, min((r.next_attempt for r in entry.pending()), default=0.0)
            )
        log.info("event=queue_recovered entries=%d", len(entries))
        return entries

    async def start(self) -> int:
        """`recover()`, then run the loop in the background. Returns the entries found."""
        entries = await self.recover()
        self._runner = asyncio.create_task(self.run(), name="queue-scheduler")
        return len(entries)

    def enqueue(self, queue_id: str, entry: QueueEntry | None = None) -> None:
        """A committed entry is ready: its first attempt starts at once.

        `entry` is the entry exactly as `QueueStore.commit` returned it, when the caller has
        it: the dispatch then skips reading it back (one thread-pool hop less per message)."""
        self._tracker.schedule(queue_id, 0.0)
        if entry is not None and entry.queue_id == queue_id:
            self._tracker.track(queue_id).fresh = entry
        self._wake.set()

    def flush(self, queue_id: str | None = None) -> None:
        """Retry now: one entry, or all of them; dead destinations are revived."""
        if queue_id is None:
            ids = self._tracker.scheduled()
            for dest in self._dests.values():
                dest.dead_until = 0.0
        else:
            ids = [queue_id]
        for qid in ids:
            self._tracker.track(qid).forced = True
            self._tracker.schedule(qid, 0.0)
        self._wake.set()

    async def run(self) -> None:
        """The loop: poll flush requests, dispatch what is due, sleep until the next."""
        last_poll = -1e18
        while not self._stopping:
            now = self.clock()
            if now - last_poll >= self.poll_interval or now < last_poll:
                last_poll = now
                await self.poll_requests()
            await self.run_once()
            delay = self.poll_interval
            next_time = self._tracker.next_time()
            if next_time is not None:
                delay = min(delay, max(0.0, next_time - self.clock()))
            self._wake.clear()
            try:
                async with asyncio.timeout(delay):
                    await self._wake.wait()
            except TimeoutError:
                pass

    async def poll_requests(self) -> None:
        """Act on `postier queue flush` requests (files in DIR/flush/, one listdir)."""
        try:
            everything, ids = await self._io(self.store.take_flush_requests)
        except OSError as exc:
            log.error("event=flush_poll_failed error=%r", str(exc))
            return
        if everything:
            self.flush()
        for qid in sorted(ids):
            self.flush(qid)

    async def run_once(self) -> None:
        """Dispatch every entry that is due now (the attempts run as background tasks)."""
        now = self.clock()
        for qid in self._tracker.pop_due(now):
            try:
                await self._dispatch(qid)
            except Exception:  # e.g. the disk: keep the entry scheduled, try again later
                log.exception("event=dispatch_error qid=%s", qid)
                self._tracker.schedule(qid, now + self.policy.schedule[0])

    async def drain(self) -> None:
        """Wait until no attempt is running (tests; graceful stop)."""
        for _ in range(1_000_000):
            if not self._tasks:
                return
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def stop(self, grace: float = 30.0) -> None:
        """Stop dispatching; give running attempts `grace` seconds, then cancel them (their
        recipients stay pending and are retried at the next start)."""
        self._stopping = True
        self._wake.set()
        if self._runner is not None:
            await asyncio.gather(self._runner, return_exceptions=True)
        if self._tasks:
            _, pending = await asyncio.wait(list(self._tasks), timeout=grace)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def next_due(self, queue_id: str) -> float | None:
        """When the entry is next dispatched (None: not scheduled or in flight)."""
        tracked = self._tracker.get(queue_id)
        return None if tracked is None else tracked.due

    def backoff(self, attempts: int) -> float:
        """Delay after the `attempts`-th failed attempt, with jitter (spreads retries)."""
        return self.policy.backoff(attempts)

    # -- dispatch and workers ------------------------------------------------------------
    async def _io(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    def _spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _dispatch(self, queue_id: str) -> None:
        known = self._tracker.get(queue_id)
        entry: QueueEntry | None = None
        if known is not None:  # good for the first dispatch only: attempts change the file
            entry, known.fresh = known.fresh, None
        try:
            if entry is None:
                entry = await self._io(self.store.load, queue_id)
        except EntryNotFound:
            self._tracker.forget(queue_id)
            return
        except (OSError, ValueError) as exc:
            log.error("event=queue_load_failed qid=%s error=%r", queue_id, str(exc))
            return
        if entry.is_final():  # a crash between the last update and the removal
            await self._io(self.store.remove, queue_id)
            self._tracker.forget(queue_id)
            return
        tracked = self._tracker.track(queue_id)
        forced, tracked.forced = tracked.forced, False
        now = self.clock()
        groups: dict[str, list[str]] = {}
        later: list[float] = []
        for r in entry.pending():
            if r.domain in tracked.inflight:
                if forced:  # flushed mid-attempt: retry once that attempt has ended
                    tracked.forced = True
                continue
            if forced or r.next_attempt <= now:
                groups.setdefault(r.domain, []).append(r.address)
            else:
                later.append(r.next_attempt)
        for domain, addresses in groups.items():
            dest = self._dests.get(domain) or self._dests.setdefault(domain, Destination(domain))
            if dest.dead_until > now and not forced:
                later.append(dest.dead_until)
                continue
            tracked.inflight.add(domain)
            dest.jobs.append(Job(entry, domain, addresses))
            while dest.workers < self.per_destination_limit and dest.workers < len(dest.jobs):
                dest.workers += 1
                self._spawn(self._worker(dest))
        if later:
            self._tracker.schedule(queue_id, min(later))

    async def _worker(self, dest: Destination) -> None:
        try:
            while dest.jobs and not self._stopping:
                async with self._connections:
                    if not dest.jobs:  # another worker took them while we waited
                        break
                    try:
                        await self._work(dest)
                    except Exception:  # e.g. backend_for_domain or session setup: a bug
                        log.exception("event=worker_error domain=%s", dest.domain)
                        dest.dead_until = self.clock() + self.destination_hold
                self._defer_if_dead(dest)
        finally:
            dest.workers -= 1

    async def _work(self, dest: Destination) -> None:
        """One connection's worth of jobs: as many as the session takes."""
        opened: AbstractAsyncContextManager[RelaySession]
        if self.local_deliver is not None and self.is_local(dest.domain):
            opened = SingleAttempt(self.local_deliver)
        else:
            opened = open_session(self.backend_for_domain(dest.domain), dest.domain)
        async with opened as session:
            recorded: asyncio.Future[None] | None = None
            # A new session costs a connection, EHLO and the routing and TLS-policy look-ups:
            # it goes on while mail for here waits, for a time; by count only when the slots
            # are all taken, so that another destination waiting for one gets its turn.
            until = time.monotonic() + self.connection_reuse_time
            sent = 0
            while True:
                if not dest.jobs and recorded is not None:
                    # Nothing more to send yet: before closing, give the last attempt the
                    # time its recording takes, as more mail for here often comes meanwhile.
                    await asyncio.wait([recorded])
                # The first job was let through knowing the destination's state (a flush
                # may force one to a dead destination); later ones stop when it died.
                if not dest.jobs or (sent and dest.dead_until > self.clock()):
                    break
                if sent and self._connection_due(sent, until):
                    break
                recorded = await self._attempt(dest, dest.jobs.popleft(), session)
                sent += 1

    def _connection_due(self, sent: int, until: float) -> bool:
        """A session that has sent `sent` messages gives its connection slot back."""
        if sent >= self.messages_per_connection and self._connections.locked():
            return True
        return time.monotonic() >= until

    def _defer_if_dead(self, dest: Destination) -> None:
        """The destination just failed: queued jobs wait for it instead of trying now."""
        if dest.dead_until <= self.clock():
            return
        while dest.jobs:
            job = dest.jobs.popleft()
            self._tracker.done_with(job.entry.queue_id, dest.domain)
            self._tracker.schedule(job.entry.queue_id, dest.dead_until)

    async def _attempt(
        self, dest: Destination, job: Job, session: RelaySession
    ) -> asyncio.Future[None]:
        """One job over `session`; returns what resolves once its results are recorded."""
        message = self.store.message(job.entry)
        recipients = [Recipient(a) for a in job.addresses]
        results = await attempt(session, message, recipients, domain=dest.domain)
        # A session knows whether its connection stands; without one (or with none left),
        # every recipient failing temporarily is the best sign the destination is down.
        if all(res.status is Status.TEMPORARY for res in results) and not session.connected:
            dest.dead_until = self.clock() + self.destination_hold
        # Recorded in the background: the connection goes on with its next job meanwhile,
        # instead of waiting for a thread-pool job queued behind the inbound commits.
        recorded = asyncio.get_running_loop().create_future()
        self._unrecorded.append((job, results, session.host, recorded))
        if not self._recording:
            self._recording = True
            self._spawn(self._record_all())
        return recorded

    # -- the attempts' results: decide, then apply -----------------------------------------
    async def _record_all(self) -> None:
        """Record every finished attempt, a batch per thread-pool job, until none is left.

        One recorder at a time, in order: two domains' attempts of one entry finishing
        together are applied one after the other, each reading the entry as the other left
        it (each under the entry's lock, `effects.record_attempt`)."""
        batch: list[_Unrecorded] = []
        try:
            while self._unrecorded:
                batch = self._unrecorded[:RECORD_BATCH]
                del self._unrecorded[:RECORD_BATCH]
                attempts = [(job.entry.queue_id, res, host) for job, res, host, _ in batch]
                try:
                    done = await self._io(
                        functools.partial(
                            record_attempts,
                            self.store,
                            attempts,
                            now=self.clock(),
                            policy=self.policy,
                            hostname=self.hostname,
                            sign=self.sign_own,
                        )
                    )
                except Exception as exc:  # the pool itself failed: every one is retried
                    done = [exc] * len(batch)
                for (job, _, _, recorded), result in zip(batch, done, strict=True):
                    try:
                        self._recorded(job, result)
                    except Exception:  # a bug: the others are still recorded
                        log.exception("event=record_error qid=%s", job.entry.queue_id)
                    recorded.set_result(None)
                batch = []
        finally:
            self._recording = False
            for *_, recorded in batch:  # cancelled (stop): nobody waits for these any more
                recorded.cancel()

    def _recorded(self, job: Job, result: Recorded | BaseException) -> None:
        """Back on the loop with one attempt's record: the reports, the next dispatch."""
        qid = job.entry.queue_id
        if isinstance(result, EntryNotFound):
            log.info("event=queue_entry_gone qid=%s (deleted during delivery)", qid)
            self._tracker.done_with(qid, job.domain)
            self._tracker.forget(qid)
            return
        if isinstance(result, BaseException):
            log.error("event=queue_update_failed qid=%s", qid, exc_info=result)
            self._tracker.done_with(qid, job.domain)
            self._tracker.schedule(qid, self.clock() + self.policy.schedule[0])
            return
        outcome, notices, kept = result
        for notice in notices:
            self.enqueue(notice)
        if not kept:  # `postier queue delete` won the race
            self._tracker.done_with(qid, job.domain)
            self._tracker.forget(qid)
            return
        tracked = self._tracker.done_with(qid, job.domain)
        if outcome.final:
            self._tracker.forget(qid)
        else:
            later = outcome.next_attempt(skip_domains=tracked.inflight)
            if later is not None:
                self._tracker.schedule(qid, 0.0 if tracked.forced else later)
        self._wake.set()
