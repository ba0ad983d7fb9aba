"""The daemon's log handler: the same lines as the standard formatter, in order, batched."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
import threading

import pytest

from postier import log
from postier.log_writer import LineWriter

STAMP = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z"


class CountingStream(io.StringIO):
    """A stream that counts its writes: one per batch, not one per line."""

    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, s: str) -> int:
        self.writes += 1
        return super().write(s)


@pytest.fixture
def installed(monkeypatch: pytest.MonkeyPatch):
    """log.setup() on a private stream, the root logger restored afterwards."""
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    stream = CountingStream()

    def install(fmt: str = "text") -> LineWriter:
        log.setup("info", fmt=fmt, stream=stream)
        assert log._writer is not None
        return log._writer

    yield install, stream
    log.flush()
    monkeypatch.setattr(log, "_writer", None)
    root.handlers[:], _ = saved
    root.setLevel(saved[1])


def _standard_line(fmt: str, name: str, **kv: object) -> str:
    """What the standard path makes of the same event (the reference)."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    if fmt == "json":
        handler.setFormatter(log._JsonFormatter("postier"))
    else:
        handler.setFormatter(log._Formatter("%(asctime)s %(levelname)-5s postier %(message)s"))
    logger = logging.Logger("reference")
    logger.addHandler(handler)
    logger.info(log._EVENT_FORMAT, name, log._Fields(kv))
    return stream.getvalue()


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_fast_path_writes_what_the_standard_formatter_writes(installed, fmt: str) -> None:
    install, stream = installed
    install(fmt)
    kv = {"session": "ab12", "to": "<a b@example.org>", "n": 3, "gone": None, "x": 'q"=\n'}
    log.event("rcpt", **kv)
    ours, reference = stream.getvalue(), _standard_line(fmt, "rcpt", **kv)
    # equal but for the time of day
    if fmt == "json":
        a, b = json.loads(ours), json.loads(reference)
        assert a.pop("time") and b.pop("time")
        assert a == b
    else:
        assert re.sub(STAMP, "T", ours) == re.sub(STAMP, "T", reference)
        assert re.fullmatch(STAMP + r" INFO  postier event=rcpt .*\n", ours)


def test_lines_made_on_the_loop_are_written_once_per_iteration(installed) -> None:
    install, stream = installed
    install()

    async def session() -> int:
        for n in range(5):
            log.event("step", n=n)
        written_before_yield = stream.writes
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        return written_before_yield

    assert asyncio.run(session()) == 0  # nothing written inside the iteration
    assert stream.writes == 1
    assert [line.split("n=")[1] for line in stream.getvalue().splitlines()] == list("01234")


def test_standard_records_and_thread_lines_keep_their_order(installed) -> None:
    install, stream = installed
    install()

    async def session() -> None:
        log.event("first")
        logging.getLogger("postier.other").warning("a library's own words")
        # a line from another thread is written at once, after what the loop buffered
        thread = threading.Thread(target=log.event, args=("from-thread",))
        thread.start()
        thread.join()
        log.event("last")

    asyncio.run(session())
    log.flush()
    lines = stream.getvalue().splitlines()
    assert [re.sub(STAMP + r" \S+ +postier ", "", line) for line in lines] == [
        "event=first ",
        "a library's own words",
        "event=from-thread ",
        "event=last ",
    ]


def test_a_capture_handler_gets_records_not_the_fast_path(installed) -> None:
    """With any other handler listening (pytest's caplog), records go the standard way."""
    install, stream = installed
    install()
    seen: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record)

    keeper = Keep()
    logging.getLogger("postier").addHandler(keeper)
    try:
        log.event("mail", qid="Q1")
    finally:
        logging.getLogger("postier").removeHandler(keeper)
    log.flush()
    assert [r.getMessage() for r in seen] == ["event=mail qid=Q1"]
    assert "event=mail qid=Q1" in stream.getvalue()


def test_a_broken_stream_loses_lines_not_the_session(installed) -> None:
    install, stream = installed
    writer = install()
    stream.close()
    log.event("after-close")  # no exception
    writer.flush()


def test_time_stamps_are_the_standard_formatters_across_ms_and_second_edges() -> None:
    """The stamp is cached per millisecond: never stale across a millisecond or a second."""
    writer = LineWriter(io.StringIO(), "postier")
    reference = log._Formatter()
    base = 1_764_650_000.0
    times = [base + 0.0004, base + 0.0009, base + 0.001, base + 0.9995, base + 1.0, base + 1.001]
    times += [base + 0.0004, base + 61.25]  # back in time (a clock step), then far ahead
    for created in times:
        record = logging.LogRecord("x", logging.INFO, __file__, 1, "m", None, None)
        record.created, record.msecs = created, int((created - int(created)) * 1000)
        assert writer.timestamp(created) == reference.formatTime(record), created


def test_quote_fast_path_and_escapes() -> None:
    assert log.fields(a="plain", b="", c="a b", d='x"y', e="l\nr\r", f=7, g=None) == (
        'a=plain b="" c="a b" d="x\\"y" e=l\\nr\\r f=7'
    )


def test_an_attached_loop_batches_without_asking_asyncio(installed) -> None:
    """The daemon attaches its worker's loop; lines from other threads are still at once."""
    install, stream = installed
    install()

    async def session() -> tuple[int, int]:
        log.attach_loop(asyncio.get_running_loop())
        log.event("on-loop")
        before = stream.writes
        thread = threading.Thread(target=log.event, args=("from-thread",))
        thread.start()
        thread.join()
        return before, stream.writes

    before, after_thread = asyncio.run(session())
    log.attach_loop(None)
    assert before == 0
    assert after_thread == 1  # the thread's line, after the loop's buffered one
    lines = stream.getvalue().splitlines()
    assert ["on-loop" in lines[0], "from-thread" in lines[1]] == [True, True]
