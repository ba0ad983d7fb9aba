"""Carry out what `decide.apply_results` decided: the log, the reports, the entry's file.

Blocking (`record_attempt` reads the entry, decides and applies in one go; the scheduler
hands several attempts to one thread-pool job, `record_attempts`). The reports are
committed to the queue before the entry is updated: a crash in between repeats a report
rather than losing it.

The removal of a finished entry is lazy (`QueueStore.remove(..., sync=False)`): its
directory is not fsync'd, so a crash soon after may bring the entry back and the next start
delivers it again. That is the queue's at-least-once rule (a crash between the remote 250
and any removal repeats the message too), and it saves a directory fsync per message.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

from postier.delivery.base import RecipientResult
from postier.log import line
from postier.queue.bounce import queue_dsn
from postier.queue.decide import Outcome, RetryPolicy, apply_results
from postier.queue.store import EntryNotFound, QueueStore

log = logging.getLogger("postier.queue")


def apply_outcome(
    store: QueueStore,
    outcome: Outcome,
    *,
    hostname: str,
    now: float,
    retry_until: float,
    sign: Callable[[bytes, int], bytes] | None = None,
    held: bool = False,
) -> tuple[list[str], bool]:
    """Log each change, queue the reports owed to the sender (never to <>), then write the
    entry back or remove it when final. Returns (the reports' queue ids, whether the entry
    is still there: False when `postier queue delete` removed it meanwhile). `held`: the
    caller holds the entry's lock (`QueueStore.locked`)."""
    entry = outcome.entry
    qid = entry.queue_id
    # `line`: the daemon's writer takes these directly, not through logging's records; and
    # no observer counts them (the metrics count the attempt's `delivery` event).
    for c in outcome.changes:
        line(c.event, logger=log, qid=qid, to=f"<{c.address}>", attempts=c.attempts,
             reply=c.reply)  # fmt: skip
    notices: list[str] = []
    reports = (
        ("failed", outcome.failed),
        ("delayed", outcome.delayed),
        ("delivered", outcome.succeeded),  # each recipient says delivered or relayed
    )
    for action, recipients in reports:
        if not recipients:
            continue
        notice = queue_dsn(store, entry, recipients, hostname=hostname, action=action, now=now,
                           will_retry_until=retry_until, sign=sign)  # fmt: skip
        line("dsn", logger=log, qid=qid, action=action, to=f"<{entry.sender}>",
             dsn_qid=notice or "none (null sender)")  # fmt: skip
        notices += [notice] if notice else []
    if outcome.final:
        store.remove(qid, sync=False, held=held)  # lazy: see the module docstring
        line("removed", logger=log, qid=qid)
        return notices, True
    try:
        store.update(entry, held=held)
    except EntryNotFound:
        return notices, False
    return notices, True


Recorded = tuple[Outcome, list[str], bool]


def record_attempt(
    store: QueueStore,
    queue_id: str,
    results: Sequence[RecipientResult],
    *,
    now: float,
    policy: RetryPolicy,
    remote_mta: str,
    hostname: str,
    sign: Callable[[bytes, int], bytes] | None = None,
) -> Recorded:
    """One attempt's results, in one thread-pool job: read the entry as it is now (another
    domain's attempt may have changed it), decide (`apply_results`), apply (`apply_outcome`).

    All three under the entry's lock: a worker's router may add recipients to this entry
    meanwhile (`QueueStore.add_recipients`, local recipients whose delivery failed), and a
    decision made on the entry read before that write would overwrite or remove them.

    Returns (the outcome, the reports' queue ids, whether the entry is still there); raises
    `EntryNotFound` when it was deleted during the attempt."""
    with store.locked(queue_id):
        entry = store.load(queue_id)
        outcome = apply_results(entry, results, now, policy, remote_mta=remote_mta)
        notices, kept = apply_outcome(
            store, outcome, hostname=hostname, now=now, retry_until=policy.expires_at(entry),
            sign=sign, held=True,
        )  # fmt: skip
    return outcome, notices, kept


def record_attempts(
    store: QueueStore,
    attempts: Sequence[tuple[str, Sequence[RecipientResult], str]],
    *,
    now: float,
    policy: RetryPolicy,
    hostname: str,
    sign: Callable[[bytes, int], bytes] | None = None,
) -> list[Recorded | Exception]:
    """`record_attempt` for several attempts (queue id, results, remote MTA) in one
    thread-pool job, in order: one hand-over from the loop for all of them. Each gets its
    own answer; a failure (`EntryNotFound`, the disk) is returned in its place, not raised,
    so that the others are still recorded."""
    out: list[Recorded | Exception] = []
    for queue_id, results, remote in attempts:
        try:
            out.append(record_attempt(store, queue_id, results, now=now, policy=policy,
                                      remote_mta=remote, hostname=hostname, sign=sign))  # fmt: skip
        except Exception as exc:
            out.append(exc)
    return out
