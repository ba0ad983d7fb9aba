"""Logging: one event a line, `key=value` fields, greppable by session and queue id.

Example:
  2026-11-22T04:50:00.123Z INFO  postier session=Sa1b2c event=rcpt qid=01JD... to=<a@b> result=250
"""

from __future__ import annotations

import logging
import sys
import time

_LOGGER = logging.getLogger("postier")


def _quote(value: object) -> str:
    text = str(value)
    # Never let a peer's bytes split a log line or forge fields.
    text = text.replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r")
    if not text or any(c in text for c in ' "='):
        text = '"' + text.replace('"', '\\"') + '"'
    return text


def fields(**kv: object) -> str:
    return " ".join(f"{k}={_quote(v)}" for k, v in kv.items() if v is not None)


def event(
    name: str, level: int = logging.INFO, logger: logging.Logger = _LOGGER, **kv: object
) -> None:
    if logger.isEnabledFor(level):
        logger.log(level, "event=%s %s", name, fields(**kv))


class _Formatter(logging.Formatter):
    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        t = time.gmtime(record.created)
        return time.strftime("%Y-%m-%dT%H:%M:%S", t) + f".{int(record.msecs):03d}Z"


def setup(level: str = "info", worker: int | None = None) -> None:
    # Our lines carry their own context (session, qid); the caller's file and line, thread
    # and process names would cost a stack walk per line for nothing (~8% of CPU at load).
    logging._srcfile = None  # type: ignore[attr-defined]
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    handler = logging.StreamHandler(sys.stderr)
    tag = "postier" if worker is None else f"postier[w{worker}]"
    handler.setFormatter(_Formatter(f"%(asctime)s %(levelname)-5s {tag} %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(getattr(logging, level.upper(), logging.INFO))
