"""The queue scheduler: when to try each recipient, over which connection, and what then.

Model (a small Postfix qmgr):
- A heap of (due time, queue id). `enqueue(id)` makes an entry due at once; at dispatch the
  entry is read from disk and its due pending recipients are grouped by domain into jobs.
- One `_Destination` per domain holds a deque of jobs and at most `per_destination_limit`
  worker tasks (connections). A worker on a backend with `session(domain)` (SmtpRelay) keeps
  its connection and takes the next job for the same domain from the deque, up to
  `messages_per_connection`: many messages to one domain share a connection.
- After each attempt the entry is re-read under a per-entry lock, the results are applied
  and it is written back (`QueueStore.update`): delivered → done; permanent → failed and a
  bounce; temporary → retry after `schedule[attempts-1]` (the last step repeating) with
  ±`jitter`, capped at the expiry time; a temporary failure at or after `max_age` → failed
  (status 4.4.7) and a bounce. An entry with no pending recipient left is removed.
- A destination whose attempt failed as a whole (no connection, or every recipient
  temporary) is "dead" for `destination_hold` seconds (default: the first back-off step):
  other messages for it wait instead of trying at once (RFC 5321 §4.5.4.1). `flush` revives.
- A delay warning (RFC 3464 Action: delayed) goes once per message when it is still pending
  after `delay_warning_after` seconds (0: never). Nothing is ever sent to the null sender.
- Bounces are committed to the queue as new entries (sender <>), so they are as durable as
  mail; a bounce to a local sender is delivered through `local_deliver` when `is_local`
  says its domain is ours.

Other processes reach the daemon through the queue directory: `postier queue flush [ID]`
drops a request file in DIR/flush/ (QueueStore.request_flush), which `run()` polls every
`poll_interval` seconds with one listdir; `postier queue delete` removes the entry with
`QueueStore.remove`, and the next load here simply misses it.

Times come from the injectable `clock`, so tests drive back-off and expiry by advancing a
fake clock and calling `run_once()` / `drain()`; only `run()` sleeps.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import os
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any, TypeVar

from postier.delivery.base import (
    AsyncBackend,
    Recipient,
    RecipientResult,
    Status,
    StoredMessage,
    result_from_error,
)
from postier.errors import DeliveryError
from postier.queue.bounce import (
    EXPIRED_STATUS,
    DsnRecipient,
    dsn_recipient,
    queue_dsn,
    status_for,
)
from postier.queue.store import DELIVERED, FAILED, PENDING, EntryNotFound, QueueEntry, QueueStore

log = logging.getLogger("postier.queue")
T = TypeVar("T")

DEFAULT_SCHEDULE: tuple[float, ...] = (60, 300, 900, 1800, 3600, 7200)
DeliverFn = Callable[[StoredMessage, Sequence[Recipient]], Awaitable[list[RecipientResult]]]


@dataclass(slots=True)
class _Job:
    entry: QueueEntry  # as read at dispatch: only its fixed fields (body, sender) are used
    domain: str
    addresses: list[str]


@dataclass(slots=True)
class _Destination:
    domain: str
    jobs: deque[_Job] = field(default_factory=deque)
    workers: int = 0  # running worker tasks (connections), at most per_destination_limit
    dead_until: float = 0.0  # no new attempt before this (RFC 5321 4.5.4.1)


class Scheduler:
    """Delivers queued entries; see the module docstring. Runs on one asyncio loop."""

    def __init__(
        self,
        store: QueueStore,
        backend_for_domain: Callable[[str], AsyncBackend],
        *,
        hostname: str,
        schedule: Sequence[float] = DEFAULT_SCHEDULE,
        max_age: float = 5 * 86400,
        delay_warning_after: float = 4 * 3600,
        per_destination_limit: int = 4,
        max_connections: int = 100,
        messages_per_connection: int = 100,
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
        if not schedule or any(s <= 0 for s in schedule):
            raise ValueError("retry schedule must be a non-empty list of positive delays")
        self.store = store
        self.backend_for_domain = backend_for_domain
        self.hostname = hostname
        self.schedule = tuple(float(s) for s in schedule)
        self.max_age = max_age
        self.delay_warning_after = delay_warning_after
        self.per_destination_limit = max(1, per_destination_limit)
        self.messages_per_connection = max(1, messages_per_connection)
        self.destination_hold = self.schedule[0] if destination_hold is None else destination_hold
        self.jitter = jitter
        self.local_deliver = local_deliver
        self.is_local = is_local
        self.clock = clock
        self.rng = rng or random.Random()
        self.executor = executor
        self.poll_interval = poll_interval
        self.sign_own = sign_own  # DKIM for our own DSNs (bytes, content_offset) -> bytes
        self._heap: list[tuple[float, str]] = []
        self._when: dict[str, float] = {}
        self._forced: set[str] = set()
        self._inflight: dict[str, set[str]] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._dests: dict[str, _Destination] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
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
                raise RuntimeError(f"{self.store.directory}: another postier daemon is "
                                   "delivering from this queue") from None
        entries = await self._io(self.store.recover)
        for entry in entries:
            self._schedule(entry.queue_id, min((r.next_attempt for r in entry.pending()),
                                               default=0.0))
        log.info("event=queue_recovered entries=%d", len(entries))
        return entries

    async def start(self) -> int:
        """`recover()`, then run the loop in the background. Returns the entries found."""
        entries = await self.recover()
        self._runner = asyncio.create_task(self.run(), name="queue-scheduler")
        return len(entries)

    def enqueue(self, queue_id: str) -> None:
        """A committed entry is ready: its first attempt starts at once."""
        self._schedule(queue_id, 0.0)
        self._wake.set()

    def flush(self, queue_id: str | None = None) -> None:
        """Retry now: one entry, or all of them; dead destinations are revived."""
        ids = list(self._when) if queue_id is None else [queue_id]
        if queue_id is None:
            for dest in self._dests.values():
                dest.dead_until = 0.0
        for qid in ids:
            self._forced.add(qid)
            self._schedule(qid, 0.0)
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
            if self._heap:
                delay = min(delay, max(0.0, self._heap[0][0] - self.clock()))
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
        due: list[str] = []
        while self._heap and self._heap[0][0] <= now:
            when, qid = heapq.heappop(self._heap)
            if self._when.get(qid) == when:
                del self._when[qid]
                due.append(qid)
        for qid in due:
            try:
                await self._dispatch(qid)
            except Exception:  # e.g. the disk: keep the entry scheduled, try again later
                log.exception("event=dispatch_error qid=%s", qid)
                self._schedule(qid, now + self.schedule[0])

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
        return self._when.get(queue_id)

    # -- internals -----------------------------------------------------------------------
    async def _io(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    def _schedule(self, queue_id: str, when: float) -> None:
        current = self._when.get(queue_id)
        if current is not None and current <= when:
            return
        self._when[queue_id] = when
        heapq.heappush(self._heap, (when, queue_id))

    def _spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def backoff(self, attempts: int) -> float:
        """Delay after the `attempts`-th failed attempt, with jitter (spreads retries)."""
        base = self.schedule[min(max(attempts, 1), len(self.schedule)) - 1]
        return base * self.rng.uniform(1.0 - self.jitter, 1.0 + self.jitter)

    async def _dispatch(self, queue_id: str) -> None:
        try:
            entry = await self._io(self.store.load, queue_id)
        except EntryNotFound:
            self._forget(queue_id)
            return
        except (OSError, ValueError) as exc:
            log.error("event=queue_load_failed qid=%s error=%r", queue_id, str(exc))
            return
        if entry.is_final():  # a crash between the last update and the removal
            await self._io(self.store.remove, queue_id)
            self._forget(queue_id)
            return
        forced = queue_id in self._forced
        self._forced.discard(queue_id)
        now = self.clock()
        inflight = self._inflight.setdefault(queue_id, set())
        groups: dict[str, list[str]] = {}
        later: list[float] = []
        for r in entry.pending():
            if r.domain in inflight:
                if forced:  # flushed mid-attempt: retry once that attempt has ended
                    self._forced.add(queue_id)
                continue
            if forced or r.next_attempt <= now:
                groups.setdefault(r.domain, []).append(r.address)
            else:
                later.append(r.next_attempt)
        for domain, addresses in groups.items():
            dest = self._dests.get(domain) or self._dests.setdefault(domain, _Destination(domain))
            if dest.dead_until > now and not forced:
                later.append(dest.dead_until)
                continue
            inflight.add(domain)
            dest.jobs.append(_Job(entry, domain, addresses))
            while dest.workers < self.per_destination_limit and dest.workers < len(dest.jobs):
                dest.workers += 1
                self._spawn(self._worker(dest))
        if later:
            self._schedule(queue_id, min(later))

    def _forget(self, queue_id: str) -> None:
        self._when.pop(queue_id, None)
        self._forced.discard(queue_id)
        if not self._inflight.get(queue_id):
            self._inflight.pop(queue_id, None)
            self._locks.pop(queue_id, None)

    async def _worker(self, dest: _Destination) -> None:
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

    async def _work(self, dest: _Destination) -> None:
        """One connection's worth of jobs: a single job, or as many as the session takes."""
        if self.local_deliver is not None and self.is_local(dest.domain):
            await self._attempt(dest, dest.jobs.popleft(), self.local_deliver, None)
            return
        backend = self.backend_for_domain(dest.domain)
        opener = getattr(backend, "session", None)
        if opener is None:
            await self._attempt(dest, dest.jobs.popleft(), backend.deliver, None)
            return
        async with opener(dest.domain) as session:
            for _ in range(self.messages_per_connection):
                if not dest.jobs or dest.dead_until > self.clock():
                    break
                await self._attempt(dest, dest.jobs.popleft(), session.send, session)

    def _defer_if_dead(self, dest: _Destination) -> None:
        """The destination just failed: queued jobs wait for it instead of trying now."""
        if dest.dead_until <= self.clock():
            return
        while dest.jobs:
            job = dest.jobs.popleft()
            qid = job.entry.queue_id
            self._inflight.get(qid, set()).discard(dest.domain)
            self._schedule(qid, dest.dead_until)

    async def _attempt(
        self, dest: _Destination, job: _Job, send: DeliverFn, session: object | None
    ) -> None:
        recipients = [Recipient(a) for a in job.addresses]
        message = self.store.message(job.entry)
        try:
            results = list(await send(message, recipients))
        except DeliveryError as exc:
            results = [result_from_error(r, exc) for r in recipients]
        except Exception as exc:  # a bug in a backend must not lose the message
            log.exception("event=delivery_error qid=%s domain=%s", message.queue_id, dest.domain)
            results = [RecipientResult(r, Status.TEMPORARY, 451, "4.3.0",
                                       f"internal error: {type(exc).__name__}: {exc}")
                       for r in recipients]
        got = {res.recipient.address for res in results}
        results += [RecipientResult(r, Status.TEMPORARY, 451, "4.3.0", "no result from backend")
                    for r in recipients if r.address not in got]
        remote = str(getattr(session, "host", "") or "")
        # With a session we know whether the connection itself failed (no stream); without
        # one, every recipient failing temporarily is the best sign we have.
        if all(res.status is Status.TEMPORARY for res in results) and (
            getattr(session, "stream", None) is None
        ):
            dest.dead_until = self.clock() + self.destination_hold
        try:
            await self._record(job, results, remote)
        except Exception:
            log.exception("event=queue_update_failed qid=%s", message.queue_id)
            self._inflight.get(message.queue_id, set()).discard(dest.domain)
            self._schedule(message.queue_id, self.clock() + self.schedule[0])

    async def _record(self, job: _Job, results: list[RecipientResult], remote: str) -> None:
        """Apply one attempt's results to the entry on disk; bounce, warn, reschedule."""
        qid = job.entry.queue_id
        lock = self._locks.setdefault(qid, asyncio.Lock())
        notices: list[str] = []
        async with lock:
            try:
                entry = await self._io(self.store.load, qid)
            except EntryNotFound:
                log.info("event=queue_entry_gone qid=%s (deleted during delivery)", qid)
                self._inflight.get(qid, set()).discard(job.domain)
                self._forget(qid)
                return
            now = self.clock()
            by_address = {r.address: r for r in entry.recipients}
            failed: list[DsnRecipient] = []
            for res in results:
                rs = by_address.get(res.recipient.address)
                if rs is None or rs.state != PENDING:
                    continue
                rs.attempts += 1
                rs.code, rs.enhanced, rs.reply = res.code, res.enhanced, res.text
                rs.last_attempt = now
                rs.remote_mta = remote or rs.remote_mta
                if res.status is Status.DELIVERED:
                    rs.state = DELIVERED
                    event = "delivered"
                elif res.status is Status.PERMANENT or now - entry.arrival >= self.max_age:
                    rs.state = FAILED
                    event = "bounced" if res.status is Status.PERMANENT else "expired"
                    status = (status_for(res.code, res.enhanced, failed=True)
                              if res.status is Status.PERMANENT else EXPIRED_STATUS)
                    failed.append(dsn_recipient(rs, status))
                else:
                    rs.next_attempt = min(now + self.backoff(rs.attempts),
                                          entry.arrival + self.max_age)
                    event = "deferred"
                log.info("event=%s qid=%s to=<%s> attempts=%d reply=%r", event, qid,
                         rs.address, rs.attempts, rs.last_reply)
            if failed:
                notices += await self._notify(entry, failed, "failed", now)
            if (self.delay_warning_after > 0 and not entry.delay_warned
                    and now - entry.arrival >= self.delay_warning_after):
                waiting = [dsn_recipient(r, status_for(r.code, r.enhanced, failed=False))
                           for r in entry.pending() if r.attempts > 0]
                if waiting:
                    notices += await self._notify(entry, waiting, "delayed", now)
                    entry.delay_warned = True
            if entry.is_final():
                await self._io(self.store.remove, qid)
                log.info("event=removed qid=%s", qid)
            else:
                try:
                    await self._io(self.store.update, entry)
                except EntryNotFound:  # `postier queue delete` won the race
                    self._inflight.get(qid, set()).discard(job.domain)
                    self._forget(qid)
                    return
        inflight = self._inflight.get(qid, set())
        inflight.discard(job.domain)
        if entry.is_final():
            self._forget(qid)
        else:
            later = [r.next_attempt for r in entry.pending() if r.domain not in inflight]
            if later:
                self._schedule(qid, 0.0 if qid in self._forced else min(later))
        for notice in notices:
            self.enqueue(notice)
        self._wake.set()

    async def _notify(self, entry: QueueEntry, recipients: list[DsnRecipient], action: str,
                      now: float) -> list[str]:
        """Queue a DSN to the sender (never to <>). Committed before the entry's update: a
        crash in between repeats the report rather than losing it."""
        notice = await self._io(lambda: queue_dsn(
            self.store, entry, recipients, hostname=self.hostname, action=action, now=now,
            will_retry_until=entry.arrival + self.max_age, sign=self.sign_own))
        log.info("event=dsn qid=%s action=%s to=<%s> dsn_qid=%s", entry.queue_id, action,
                 entry.sender, notice or "none (null sender)")
        return [notice] if notice else []
