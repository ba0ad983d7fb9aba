"""The daemon's log handler: formats postier's events itself and writes lines in batches.

Why not `logging.StreamHandler` with a `Formatter`: at load a session logs about seven
lines per message (connect, helo, mail, rcpt, message, delivery, disconnect), and the
standard path — a `LogRecord`, `Formatter.format`, `strftime` for every line, a `write` and
a `flush` system call per line — cost about 45 µs a line on the event loop, a sixth of the
server's CPU per message. Here an event from `postier.log.event` goes straight to
`event_line` (no record), the time prefix is built once per second, and lines made on the
event loop are written together once per loop iteration: one `write` for every line the
iteration produced.

What does not change: the text and JSON forms are the ones `postier.log` documents, byte
for byte; records that do not come from `event()` (a library's warning, an exception with its
traceback) go through the standard `Formatter` into the same buffer, so the order of lines is
kept; a line made outside the event loop (a thread-pool job, start-up, shutdown) is written
at once, after whatever was buffered. The buffer is flushed before a worker exits and
before a fork (`postier.log.flush`); only a SIGKILL can lose the lines of the iteration in
progress, never more.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from typing import TextIO

# Lines buffered on the loop before a write is forced even inside one iteration.
FLUSH_BYTES = 64 * 1024

_LEVEL_TEXT = {
    logging.DEBUG: "DEBUG",
    logging.INFO: "INFO ",
    logging.WARNING: "WARNING",
    logging.ERROR: "ERROR",
    logging.CRITICAL: "CRITICAL",
}


class LineWriter(logging.Handler):
    """One stream, one buffer; `event_line` for postier's events, `emit` for the rest."""

    def __init__(self, stream: TextIO, tag: str, *, json_format: bool = False) -> None:
        super().__init__()
        self.stream = stream
        self.tag = tag
        self.json_format = json_format
        self._lines: list[str] = []
        self._pending = 0
        self._scheduled = False
        self._buffer_lock = threading.Lock()
        self._second = -1
        self._second_text = ""
        self._msecs = -1
        self._stamp = ""
        # The worker's event loop and its thread (attach_loop): asyncio's own look-up of the
        # running loop makes a getpid() system call each time, and this runs for every line.
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = -1

    def attach_loop(self, loop: asyncio.AbstractEventLoop | None) -> None:
        """Batch the lines made on `loop`'s thread from now on (None: write them at once)."""
        self.flush()
        self._loop = loop
        self._loop_thread = threading.get_ident() if loop is not None else -1

    # ---- making lines --------------------------------------------------------------------
    def timestamp(self, created: float) -> str:
        """`2026-11-22T04:50:00.123Z`: the seconds formatted once per second, the whole
        stamp once per millisecond (under load several lines share each)."""
        second = int(created)
        msecs = int((created - second) * 1000)  # as logging.LogRecord computes it
        if msecs == self._msecs and second == self._second:
            return self._stamp
        if second != self._second:
            self._second_text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            self._second = second
        self._msecs = msecs
        self._stamp = stamp = f"{self._second_text}.{msecs:03d}Z"
        return stamp

    def event_line(self, level: int, name: str, kv: dict[str, object], text: str) -> None:
        """Write one event; `text` is its `k=v` fields rendered (text form; unused in JSON)."""
        stamp = self.timestamp(time.time())
        if self.json_format:
            out = json_object(stamp, logging.getLevelName(level), self.tag, name, kv)
            line = json.dumps(out, ensure_ascii=False)
        else:
            level_text = _LEVEL_TEXT.get(level) or f"{logging.getLevelName(level):<5}"
            line = f"{stamp} {level_text} {self.tag} event={name} {text}"
        self._add(line)

    def emit(self, record: logging.LogRecord) -> None:
        """A record from the standard path (libraries, exceptions): the set formatter."""
        try:
            line = self.format(record)
        except Exception:
            self.handleError(record)
            return
        self._add(line)

    # ---- writing them --------------------------------------------------------------------
    def _add(self, line: str) -> None:
        if threading.get_ident() == self._loop_thread:
            loop = self._loop
        else:  # another thread, or a loop the daemon did not attach (inetd, tests)
            loop = asyncio._get_running_loop()
        with self._buffer_lock:
            self._lines.append(line)
            self._pending += len(line) + 1
            if loop is not None and self._pending < FLUSH_BYTES:
                if not self._scheduled:
                    self._scheduled = True
                    loop.call_soon(self.flush)
                return
        self.flush()

    def flush(self) -> None:
        """Write every buffered line with one write, in the order they were made."""
        with self._buffer_lock:
            self._scheduled = False
            if not self._lines:
                return
            lines, self._lines, self._pending = self._lines, [], 0
            try:
                self.stream.write("\n".join(lines) + "\n")
                self.stream.flush()
            except (OSError, ValueError):
                # Like logging's own handlers: a closed or broken log stream must not take
                # a session down; the lines are lost, nothing else is.
                pass


def json_object(
    stamp: str, level: str, process: str, name: str | None, kv: dict[str, object]
) -> dict[str, object]:
    """The JSON form of a line: the text form's keys, values typed where they are numbers.
    For an event here, and for a record in `postier.log`'s JSON formatter (name None when
    the record is not an event)."""
    out: dict[str, object] = {"time": stamp, "level": level, "process": process}
    if name is not None:
        out["event"] = name
    out.update((k, json_value(v)) for k, v in kv.items() if v is not None)
    return out


def json_value(value: object) -> object:
    """A field's value in the JSON form: numbers and booleans typed, the rest as text."""
    if isinstance(value, bool | int | float | str):
        return value
    return str(value)
