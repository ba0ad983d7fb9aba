"""Logging: one event a line, `key=value` fields, greppable by session and queue id.

Example:
  2026-11-22T04:50:00.123Z INFO  postier session=Sa1b2c event=rcpt qid=01JD... to=<a@b> result=250

With `--log-format json` the same line is one JSON object with the same keys:
  {"time": "2026-...Z", "level": "INFO", "process": "postier", "event": "rcpt", "session": ...}

Every event also goes to the registered observers (the metrics count what happens from the
events the code already logs, so no counters are sprinkled through the session code). With
no observer the cost is one truth test per event.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import sys
import time
from collections.abc import Callable
from typing import TextIO

from postier.log_writer import LineWriter, json_object

_LOGGER = logging.getLogger("postier")

LOG_FORMATS = ("text", "json")

Observer = Callable[[str, dict[str, object]], None]
_observers: list[Observer] = []
# The daemon's handler, once setup() has run (None in a library use and in most tests).
_writer: LineWriter | None = None


def add_observer(observer: Observer) -> None:
    """Call `observer(name, fields)` for every event, whatever the log level."""
    if observer not in _observers:
        _observers.append(observer)


def remove_observer(observer: Observer) -> None:
    if observer in _observers:
        _observers.remove(observer)


# A value with none of these is written as it is (the common case: one regex match).
_PLAIN = re.compile(r'[^ "=\\\r\n]+')
_plain = _PLAIN.fullmatch


def _escape(text: str) -> str:
    """A value that is not plain: never let a peer's bytes split a log line or forge fields."""
    text = text.replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r")
    if not text or any(c in text for c in ' "='):
        text = '"' + text.replace('"', '\\"') + '"'
    return text


def fields(**kv: object) -> str:
    return render(kv)


def render(kv: dict[str, object]) -> str:
    """`k=v k="quoted v"`, None values left out: the text form of an event's fields.

    Written for the hot path (seven events a message): integers need no quoting, a plain
    text value takes one regex match, and only a value with a space, quote, equals sign,
    backslash or line break (or an empty one) is escaped."""
    parts = []
    for k, v in kv.items():
        if v is None:
            continue
        t = type(v)
        if t is int:
            parts.append(f"{k}={v}")
            continue
        text = v if t is str else str(v)
        parts.append(f"{k}={text}" if _plain(text) else f"{k}={_escape(text)}")
    return " ".join(parts)


_UNESCAPE = {"n": "\n", "r": "\r"}


def parse_fields(line: str) -> dict[str, str] | None:
    """Read `k=v k="quoted \\"v\\""` back into a dict (None when the line is not in that form)."""
    out: dict[str, str] = {}
    i, n = 0, len(line)
    while i < n:
        eq = line.find("=", i)
        if eq <= i or " " in line[i:eq]:
            return None
        key = line[i:eq]
        i = eq + 1
        if i < n and line[i] == '"':
            chars: list[str] = []
            i += 1
            while i < n and line[i] != '"':
                if line[i] == "\\" and i + 1 < n:
                    i += 1
                    chars.append(_UNESCAPE.get(line[i], line[i]))
                else:
                    chars.append(line[i])
                i += 1
            if i >= n:
                return None
            value = "".join(chars)
            i += 1
        else:
            end = line.find(" ", i)
            end = n if end < 0 else end
            value = line[i:end]
            i = end
        out[key] = value
        while i < n and line[i] == " ":
            i += 1
    return out


class _Fields:
    """The fields of one event, rendered only when a handler formats the record."""

    __slots__ = ("kv",)

    def __init__(self, kv: dict[str, object]) -> None:
        self.kv = kv

    def __str__(self) -> str:
        return render(self.kv)


_EVENT_FORMAT = "event=%s %s"


def event(
    name: str, level: int = logging.INFO, logger: logging.Logger = _LOGGER, **kv: object
) -> None:
    """Log one event and tell the observers (the metrics) about it."""
    if _observers:
        _notify(name, kv)
    if logger.isEnabledFor(level):
        write_event(name, level, logger, kv)


def line(
    name: str, level: int = logging.INFO, logger: logging.Logger = _LOGGER, **kv: object
) -> None:
    """Log one event line that the observers must not count (a detail of another event)."""
    if logger.isEnabledFor(level):
        write_event(name, level, logger, kv)


def write_event(name: str, level: int, logger: logging.Logger, kv: dict[str, object]) -> None:
    """Straight to the daemon's `LineWriter` when it alone would handle the record (the
    usual case: see log_writer.py for why); through `logging` when anything else listens
    (a test's capture handler, a filter, a handler of a library's choosing)."""
    writer = _writer
    if writer is not None and _only_writer(logger, writer):
        writer.event_line(level, name, kv, "" if writer.json_format else render(kv))
    else:
        logger.log(level, _EVENT_FORMAT, name, _Fields(kv))


def _only_writer(logger: logging.Logger, writer: LineWriter) -> bool:
    """True when a record from `logger` would reach `writer` and nothing else."""
    current: logging.Logger | None = logger
    while current is not None:
        if current.filters:
            return False
        handlers = current.handlers
        if current.parent is None:  # the root
            return len(handlers) == 1 and handlers[0] is writer and writer.level <= 0
        if handlers or not current.propagate:
            return False
        current = current.parent
    return False  # pragma: no cover - every logger's chain ends at the root


def attach_loop(loop: asyncio.AbstractEventLoop | None) -> None:
    """The worker's loop, on its own thread: its lines are batched per iteration cheaply.
    Call with None before the loop stops (its lines are then written at once)."""
    if _writer is not None:
        _writer.attach_loop(loop)


def flush() -> None:
    """Write what the daemon's handler holds (before a fork or `os._exit`)."""
    if _writer is not None:
        _writer.flush()


def _notify(name: str, kv: dict[str, object]) -> None:
    for observer in list(_observers):
        try:
            observer(name, kv)
        except Exception:  # an observer's bug must never break a session
            _LOGGER.exception("event=observer-failed observer=%r", observer)


class _Formatter(logging.Formatter):
    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        t = time.gmtime(record.created)
        return time.strftime("%Y-%m-%dT%H:%M:%S", t) + f".{int(record.msecs):03d}Z"


class _JsonFormatter(_Formatter):
    """One JSON object a line: the text form's keys, values typed where they are numbers."""

    def __init__(self, process: str) -> None:
        super().__init__()
        self.process = process

    def format(self, record: logging.LogRecord) -> str:
        stamp, args = self.formatTime(record), record.args
        if record.msg is _EVENT_FORMAT and isinstance(args, tuple) and len(args) == 2:
            kv = args[1].kv if isinstance(args[1], _Fields) else {}
            out = json_object(stamp, record.levelname, self.process, str(args[0]), kv)
        else:
            out = json_object(stamp, record.levelname, self.process, None, {})
            message = record.getMessage()
            parsed = parse_fields(message) if message.startswith("event=") else None
            if parsed is None:
                out["message"] = message
            else:  # a line written as "event=... k=v" by hand: the same keys
                out.update(parsed)
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


def setup(
    level: str = "info", worker: int | None = None, fmt: str = "text", stream: TextIO | None = None
) -> None:
    """The daemon's logging: one `LineWriter` on standard error (or `stream`) at the root."""
    # Our lines carry their own context (session, qid); the caller's file and line, thread
    # and process names would cost a stack walk per line for nothing (~8% of CPU at load).
    logging._srcfile = None  # type: ignore[attr-defined]
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    global _writer
    tag = "postier" if worker is None else f"postier[w{worker}]"
    handler = LineWriter(stream or sys.stderr, tag, json_format=fmt == "json")
    if fmt == "json":
        handler.setFormatter(_JsonFormatter(tag))
    else:
        handler.setFormatter(_Formatter(f"%(asctime)s %(levelname)-5s {tag} %(message)s"))
    _writer = handler
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(getattr(logging, level.upper(), logging.INFO))
