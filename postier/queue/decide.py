"""What one delivery attempt means for a queue entry: a pure decision, tested without I/O.

`apply_results(entry, results, now, policy)` returns an `Outcome`: the entry as it must be
written back, a line's worth of facts per recipient for the log, and the reports owed to the
sender. It reads no clock, touches no file and does not change its input; the scheduler
(`postier.queue.scheduler`) applies the outcome: reports first, then the entry's update or
removal, then the next dispatch time.

The rules, per recipient still pending (others are ignored: a late or repeated result):
- delivered → DELIVERED;
- permanent → FAILED, reported as "failed" with the reply's status;
- temporary at or after `max_age` since arrival → FAILED, reported with status 4.4.7
  (expired), the last reply as the diagnostic;
- temporary before that → stays pending, next attempt after `schedule[attempts-1]` (the
  last step repeating) with ±`jitter`, never later than the expiry time;
- once per entry, when it is still pending `delay_warning_after` seconds after arrival
  (0: never), the recipients already tried are reported as "delayed".

What is reported follows each recipient's DSN NOTIFY (RFC 3461 §4.1), kept in the entry:
- absent: failures and delays, as before DSN existed;
- NEVER: nothing at all; otherwise FAILURE, DELAY and SUCCESS each turn their report on;
- SUCCESS: a delivery here (no remote MTA: the local backend) is reported "delivered"; a
  hand-off to a next hop that did not take our DSN parameters is reported "relayed"; a
  next hop that took them (`RecipientResult.dsn_passed`) owes the sender the report itself.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field

from postier.delivery.base import RecipientResult, Status
from postier.protocol.dsn import wants_delay, wants_failure, wants_success
from postier.queue.bounce import (
    EXPIRED_STATUS,
    SUCCESS_STATUS,
    DsnRecipient,
    dsn_recipient,
    status_for,
)
from postier.queue.entry import DELIVERED, FAILED, PENDING, QueueEntry

DEFAULT_SCHEDULE: tuple[float, ...] = (60, 300, 900, 1800, 3600, 7200)


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How long and how often to retry. `rng` only spreads retries (jitter): tests seed it."""

    schedule: tuple[float, ...] = DEFAULT_SCHEDULE
    max_age: float = 5 * 86400
    delay_warning_after: float = 4 * 3600
    jitter: float = 0.1
    rng: random.Random = field(default_factory=random.Random, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not self.schedule or any(s <= 0 for s in self.schedule):
            raise ValueError("retry schedule must be a non-empty list of positive delays")

    def backoff(self, attempts: int) -> float:
        """Delay after the `attempts`-th failed attempt, with jitter (spreads retries)."""
        base = self.schedule[min(max(attempts, 1), len(self.schedule)) - 1]
        return base * self.rng.uniform(1.0 - self.jitter, 1.0 + self.jitter)

    def expires_at(self, entry: QueueEntry) -> float:
        return entry.arrival + self.max_age

    def warn_now(self, entry: QueueEntry, now: float) -> bool:
        """Is a delay warning due for `entry` (once, and only if warnings are on)?"""
        return (
            self.delay_warning_after > 0
            and not entry.delay_warned
            and now - entry.arrival >= self.delay_warning_after
        )


@dataclass(frozen=True, slots=True)
class Change:
    """One recipient's step, for the log: `event` is delivered, deferred, bounced or expired."""

    address: str
    event: str
    attempts: int
    reply: str


@dataclass(frozen=True, slots=True)
class Outcome:
    entry: QueueEntry  # to write back (or remove, when `final`)
    changes: tuple[Change, ...] = ()
    failed: tuple[DsnRecipient, ...] = ()  # report to the sender: Action failed
    delayed: tuple[DsnRecipient, ...] = ()  # report to the sender: Action delayed
    # NOTIFY=SUCCESS: each with its own action, "delivered" or "relayed"
    succeeded: tuple[DsnRecipient, ...] = ()

    @property
    def final(self) -> bool:
        """No recipient is pending any more: the entry is done and can be removed."""
        return self.entry.is_final()

    def next_attempt(self, skip_domains: set[str] | frozenset[str] = frozenset()) -> float | None:
        """When the earliest pending recipient outside `skip_domains` is due, if any."""
        due = [r.next_attempt for r in self.entry.pending() if r.domain not in skip_domains]
        return min(due) if due else None


def apply_results(
    entry: QueueEntry,
    results: Sequence[RecipientResult],
    now: float,
    policy: RetryPolicy,
    *,
    remote_mta: str = "",
) -> Outcome:
    """The entry after one attempt that produced `results` (see the module docstring)."""
    after = entry.copy()
    by_address = {r.address: r for r in after.recipients}
    changes: list[Change] = []
    failed: list[DsnRecipient] = []
    succeeded: list[DsnRecipient] = []
    for res in results:
        rs = by_address.get(res.recipient.address)
        if rs is None or rs.state is not PENDING:
            continue
        rs.attempts += 1
        rs.code, rs.enhanced, rs.reply = res.code, res.enhanced, res.text
        rs.last_attempt = now
        rs.remote_mta = remote_mta or rs.remote_mta
        rs.tls_policy = res.tls_policy or rs.tls_policy
        rs.tls_failure = res.tls_failure or rs.tls_failure
        if res.status is Status.DELIVERED:
            rs.state = DELIVERED
            event = "delivered"
            if wants_success(rs.notify) and not res.dsn_passed:
                action = "relayed" if remote_mta else "delivered"
                succeeded.append(dsn_recipient(rs, SUCCESS_STATUS, action))
        elif res.status is Status.PERMANENT:
            rs.state = FAILED
            event = "bounced"
            if wants_failure(rs.notify):
                status = status_for(res.code, res.enhanced, failed=True)
                failed.append(dsn_recipient(rs, status))
        elif now >= policy.expires_at(after):
            rs.state = FAILED
            event = "expired"
            if wants_failure(rs.notify):
                failed.append(dsn_recipient(rs, EXPIRED_STATUS))
        else:
            rs.next_attempt = min(now + policy.backoff(rs.attempts), policy.expires_at(after))
            event = "deferred"
        changes.append(Change(rs.address, event, rs.attempts, rs.last_reply))
    delayed: list[DsnRecipient] = []
    if policy.warn_now(after, now):
        tried = [r for r in after.pending() if r.attempts > 0]
        delayed = [
            dsn_recipient(r, status_for(r.code, r.enhanced, failed=False))
            for r in tried
            if wants_delay(r.notify)
        ]
        if tried:
            # Once per entry, also when every delayed recipient declined the warning.
            after.delay_warned = True
    return Outcome(after, tuple(changes), tuple(failed), tuple(delayed), tuple(succeeded))
