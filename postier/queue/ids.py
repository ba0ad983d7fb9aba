"""Queue ids: short, unique across processes, sortable by time, safe as file names.

An id is 16 characters of Crockford base32 (digits and upper-case letters without I, L, O,
U; the alphabet is in ASCII order, so ids sort the way their timestamps do):

    11 characters: microseconds since the Unix epoch (55 bits, good until the year 3111)
     5 characters: the process id (Linux pids fit in 22 bits; 25 bits are available)

Uniqueness inside one process comes from making the timestamp strictly increasing: two ids
asked for in the same microsecond get consecutive microseconds. Uniqueness across processes
comes from the pid: two live processes never share one, and a pid reused after a process ends
starts from a later microsecond than any id the dead process could have issued (unless it
issued ids faster than real time, i.e. more than a million per second for a while).

The same id names the message everywhere: the session's log lines, our `Received:` header,
the spool file, the queue entry and the maildrop file.
"""

from __future__ import annotations

import os
import re
import threading
import time

ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_TIME_CHARS = 11
_PID_CHARS = 5
ID_LENGTH = _TIME_CHARS + _PID_CHARS
_ID_RE = re.compile(f"[{ALPHABET}]{{{ID_LENGTH}}}")

_lock = threading.Lock()
_last_us = 0
_pid_part = ""  # the pid's five characters, made once per process (see _reset_pid_part)


def _encode(value: int, width: int) -> str:
    chars = []
    for _ in range(width):
        chars.append(ALPHABET[value & 31])
        value >>= 5
    return "".join(reversed(chars))


def new_queue_id() -> str:
    """A fresh id; thread-safe (the session and the thread pool may both ask for ids)."""
    global _last_us
    with _lock:
        now_us = time.time_ns() // 1000
        # Strictly increasing per process, even if the clock steps back or two calls share
        # a microsecond: the id order is then arrival order.
        _last_us = max(now_us, _last_us + 1)
        stamp = _last_us
    return _encode(stamp, _TIME_CHARS) + (_pid_part or _make_pid_part())


def _make_pid_part() -> str:
    """The pid's characters, kept: os.getpid() is a system call, and ids are made for
    every message. A forked worker starts with none (os.register_at_fork below)."""
    global _pid_part
    _pid_part = _encode(os.getpid() & ((1 << 25) - 1), _PID_CHARS)
    return _pid_part


def _reset_pid_part() -> None:
    global _pid_part
    _pid_part = ""


os.register_at_fork(after_in_child=_reset_pid_part)


def is_queue_id(text: str) -> bool:
    """True if `text` is shaped like an id: the check that keeps user input out of paths."""
    return _ID_RE.fullmatch(text) is not None


def id_time(queue_id: str) -> float:
    """The creation time encoded in an id, as seconds since the epoch."""
    value = 0
    for ch in queue_id[:_TIME_CHARS]:
        value = value * 32 + ALPHABET.index(ch)
    return value / 1_000_000
