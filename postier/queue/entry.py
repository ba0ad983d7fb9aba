"""A queue entry: the envelope and per-recipient state of one queued message, and its file.

The envelope file (`DIR/env/<id>.json`, see `postier.queue.store`) is JSON:

    {"version": 1, "queue_id": ..., "sender": ..., "arrival": ..., "size": ...,
     "content_offset": ..., "smtputf8": ..., "body_8bit": ..., "delay_warned": ...,
     "recipients": [{"address": ..., "state": "pending|delivered|failed", "attempts": ...,
                     "code": ..., "enhanced": ..., "reply": ..., "last_attempt": ...,
                     "next_attempt": ..., "remote_mta": ..., "notify": ..., "orcpt": ...,
                     "tls_policy": ..., "tls_failure": ...},
                    ...], "ret": ..., "envid": ..., "requiretls": ...}

The format grows by adding keys (the DSN parameters came that way: "notify" and "orcpt" per
recipient, "ret" and "envid" for the envelope): a key this version does not know is ignored
on load, and a key it knows but does not find takes its default, so old and new daemons
read each other's entries. Recipient states are `Status` values in memory and keep their
original names on disk ("pending", "delivered", "failed"), which every earlier version reads.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from postier.delivery.base import Status
from postier.queue.ids import is_queue_id

# A recipient's state in the queue, in delivery's vocabulary (see `Status`).
PENDING = Status.QUEUED
DELIVERED = Status.DELIVERED
FAILED = Status.PERMANENT

FORMAT_VERSION = 1
_ON_DISK = {PENDING: "pending", DELIVERED: "delivered", FAILED: "failed"}
_FROM_DISK = {name: state for state, name in _ON_DISK.items()}


def state_name(state: Status) -> str:
    """The name a person (and the envelope file) knows the state by: pending/delivered/failed."""
    return _ON_DISK[state]


@dataclass(slots=True)
class RecipientState:
    """One recipient's progress; `code`/`enhanced`/`reply` are the last reply received."""

    address: str
    state: Status = PENDING
    attempts: int = 0
    code: int = 0
    enhanced: str = ""
    reply: str = ""
    last_attempt: float = 0.0
    next_attempt: float = 0.0  # 0: at once
    remote_mta: str = ""
    notify: str = ""  # DSN NOTIFY as given, e.g. "SUCCESS,FAILURE"; "" when absent
    orcpt: str = ""  # DSN ORCPT decoded, "rfc822;user@example.org"; "" when absent
    tls_policy: str = ""  # the TLS policy of the last remote attempt (mta-sts, dane, ...)
    tls_failure: str = ""  # the last TLS failure toward its destination ("" when none)

    @property
    def domain(self) -> str:
        return self.address.rpartition("@")[2].lower()

    @property
    def last_reply(self) -> str:
        """The last reply as one line, `451 4.3.0 text`, or "" before any attempt."""
        if not self.code:
            return self.reply
        return " ".join(p for p in (str(self.code), self.enhanced, self.reply) if p)

    def to_dict(self) -> dict[str, Any]:
        # Every field is a str, number or Status: no deep copy needed (dataclasses.asdict
        # makes one, and cost more than the rest of a commit's Python together).
        data = {name: getattr(self, name) for name in _RECIPIENT_FIELDS}
        data["state"] = state_name(self.state)
        return data

    @classmethod
    def from_dict(cls, data: object) -> RecipientState:
        if not isinstance(data, dict):
            raise ValueError(f"recipient is {type(data).__name__}, not an object")
        known = _known(cls, data)
        state = known.get("state", "pending")
        if state not in _FROM_DISK:
            raise ValueError(f"recipient {known.get('address')!r}: unknown state {state!r}")
        known["state"] = _FROM_DISK[state]
        return _build(cls, known)


@dataclass(slots=True)
class QueueEntry:
    """A committed message: its envelope and per-recipient state (the JSON file's content)."""

    queue_id: str
    sender: str  # "" for the null sender <>
    arrival: float
    size: int
    content_offset: int
    recipients: list[RecipientState] = field(default_factory=list)
    smtputf8: bool = False
    body_8bit: bool = False
    delay_warned: bool = False
    ret: str = ""  # DSN RET: "FULL", "HDRS" or "" (absent)
    envid: str = ""  # DSN ENVID, decoded
    requiretls: bool = False  # MAIL FROM ... REQUIRETLS (RFC 8689), kept for every retry

    def pending(self) -> list[RecipientState]:
        return [r for r in self.recipients if r.state is PENDING]

    def is_final(self) -> bool:
        """True once no recipient is pending: the entry can be removed."""
        return all(r.state is not PENDING for r in self.recipients)

    def copy(self) -> QueueEntry:
        """An independent copy (recipients included), for decisions that must not mutate."""
        return dataclasses.replace(
            self, recipients=[dataclasses.replace(r) for r in self.recipients]
        )

    def to_json(self) -> bytes:
        """One line of JSON: without `indent`, json uses its C encoder (ten times faster)."""
        data = {name: getattr(self, name) for name in _ENTRY_FIELDS}
        data["recipients"] = [r.to_dict() for r in self.recipients]
        data["version"] = FORMAT_VERSION
        return json.dumps(data, ensure_ascii=False).encode("utf-8")

    @classmethod
    def from_json(cls, raw: bytes) -> QueueEntry:
        """Parse an envelope file; ValueError (saying what is wrong) for a bad one."""
        data = json.loads(raw)  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        if not isinstance(data, dict):
            raise ValueError(f"envelope is {type(data).__name__}, not an object")
        known = _known(cls, data)
        known["recipients"] = [RecipientState.from_dict(r) for r in data.get("recipients", [])]
        entry = _build(cls, known)
        if not isinstance(entry.queue_id, str) or not is_queue_id(entry.queue_id):
            raise ValueError(f"bad queue id {entry.queue_id!r}")
        return entry


_RECIPIENT_FIELDS = tuple(f.name for f in dataclasses.fields(RecipientState))
_ENTRY_FIELDS = tuple(f.name for f in dataclasses.fields(QueueEntry))
_NAMES = {RecipientState: frozenset(_RECIPIENT_FIELDS), QueueEntry: frozenset(_ENTRY_FIELDS)}


def _known(cls: type, data: dict[str, Any]) -> dict[str, Any]:
    """The keys `cls` has a field for; the others belong to a newer format and are ignored."""
    names = _NAMES[cls]
    return {k: v for k, v in data.items() if k in names}


def _build(cls: type[Any], known: dict[str, Any]) -> Any:
    try:
        return cls(**known)
    except TypeError as exc:  # a required key is missing
        raise ValueError(str(exc).replace("__init__() ", "")) from None
