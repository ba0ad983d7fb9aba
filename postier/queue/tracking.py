"""The scheduler's memory of queue entries between loads: one record per entry, and a heap.

The queue files hold what must survive a crash (per-recipient state, next attempt times);
this holds what only the running scheduler needs: when each entry is next dispatched,
whether it was flushed, and which of its domains have an attempt running (updates of an
entry's file take the entry's lock, `QueueStore.locked`). One `Tracked` record per
entry keeps those consistent; the heap orders the due times and may hold stale items, which
`pop_due` skips.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field

from postier.queue.entry import QueueEntry


@dataclass(slots=True)
class Tracked:
    """What the scheduler knows about one queue entry between loads from disk."""

    due: float | None = None  # next dispatch (its item in the heap); None: not scheduled
    forced: bool = False  # flushed: every pending recipient is tried at the next dispatch
    inflight: set[str] = field(default_factory=set)  # domains with an attempt running
    # The entry as just committed by this process (`Scheduler.enqueue`): its first dispatch
    # takes it instead of reading the file it was written to a moment ago.
    fresh: QueueEntry | None = None


class Tracker:
    """The records and the heap of due times; every change to either goes through here."""

    def __init__(self) -> None:
        self.heap: list[tuple[float, str]] = []  # (due, queue id)
        self._records: dict[str, Tracked] = {}

    def get(self, queue_id: str) -> Tracked | None:
        return self._records.get(queue_id)

    def track(self, queue_id: str) -> Tracked:
        """The entry's record, made on first use."""
        tracked = self._records.get(queue_id)
        if tracked is None:
            tracked = self._records[queue_id] = Tracked()
        return tracked

    def schedule(self, queue_id: str, when: float) -> None:
        """Dispatch the entry at `when`, unless it is already due earlier."""
        tracked = self.track(queue_id)
        if tracked.due is not None and tracked.due <= when:
            return
        tracked.due = when
        heapq.heappush(self.heap, (when, queue_id))

    def pop_due(self, now: float) -> list[str]:
        """The entries due at `now`, taken off the schedule, earliest first."""
        due: list[str] = []
        while self.heap and self.heap[0][0] <= now:
            when, queue_id = heapq.heappop(self.heap)
            tracked = self._records.get(queue_id)
            if tracked is not None and tracked.due == when:
                tracked.due = None
                due.append(queue_id)
        return due

    def next_time(self) -> float | None:
        """The earliest due time in the heap (possibly a stale one: a harmless early wake)."""
        return self.heap[0][0] if self.heap else None

    def scheduled(self) -> list[str]:
        """The entries waiting for a dispatch time (not those only in flight)."""
        return [qid for qid, t in self._records.items() if t.due is not None]

    def done_with(self, queue_id: str, domain: str) -> Tracked:
        """An attempt for `domain` has ended (or will not happen); the entry's record."""
        tracked = self.track(queue_id)
        tracked.inflight.discard(domain)
        return tracked

    def forget(self, queue_id: str) -> None:
        """The entry is gone (done or deleted): drop its record once no attempt runs."""
        tracked = self._records.get(queue_id)
        if tracked is None:
            return
        tracked.due = None
        tracked.forced = False
        if not tracked.inflight:
            del self._records[queue_id]
