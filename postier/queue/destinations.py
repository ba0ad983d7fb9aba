"""The scheduler's units of work: a job (one entry, one domain), a destination (one domain's
jobs and workers), and one attempt that always yields a result for every recipient.

A backend may raise, crash or forget a recipient; `attempt` turns each of those into
temporary failures, so the queue's decision (`postier.queue.decide`) always sees a complete
answer and nothing is lost to a bug in a backend.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from postier.delivery.base import (
    Recipient,
    RecipientResult,
    RelaySession,
    StoredMessage,
    result_from_error,
    temporary,
)
from postier.errors import DeliveryError
from postier.queue.entry import QueueEntry

log = logging.getLogger("postier.queue")


@dataclass(slots=True)
class Job:
    entry: QueueEntry  # as read at dispatch: only its fixed fields (body, sender) are used
    domain: str
    addresses: list[str]


@dataclass(slots=True)
class Destination:
    domain: str
    jobs: deque[Job] = field(default_factory=deque)
    workers: int = 0  # running worker tasks (connections), at most per_destination_limit
    dead_until: float = 0.0  # no new attempt before this (RFC 5321 4.5.4.1)


async def attempt(
    session: RelaySession, message: StoredMessage, recipients: Sequence[Recipient], *, domain: str
) -> list[RecipientResult]:
    """Send `message` over `session`; one result per recipient, whatever the backend did."""
    try:
        results = list(await session.send(message, recipients))
    except DeliveryError as exc:
        results = [result_from_error(r, exc) for r in recipients]
    except Exception as exc:  # a bug in a backend must not lose the message
        log.exception("event=delivery_error qid=%s domain=%s", message.queue_id, domain)
        why = f"internal error: {type(exc).__name__}: {exc}"
        results = [temporary(r, why) for r in recipients]
    got = {res.recipient.address for res in results}
    results += [temporary(r, "no result from backend") for r in recipients if r.address not in got]
    return results
