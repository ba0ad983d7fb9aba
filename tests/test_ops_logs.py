"""Log formats: `--log-format json` gives one object a line with the text form's keys.

Also the observer hook the metrics use: every event reaches the observers, whatever the level.
"""

from __future__ import annotations

import json
import logging
import re
import smtplib
import subprocess
import sys
import time
from pathlib import Path

from postier import log
from tests.server import PostierServer, make_server


def start_and_wait(srv: PostierServer) -> None:
    """PostierServer.start waits for the text form of the ready line; this takes either."""
    srv.proc = subprocess.Popen(
        [sys.executable, "-m", "postier", "serve", *srv.args],
        stdout=subprocess.DEVNULL,
        stderr=srv.log_path.open("ab"),
        stdin=subprocess.DEVNULL,
        cwd=srv.root,
    )
    deadline = time.monotonic() + 30
    while not re.search(r'event=ready|"event": "ready"', srv.log()):
        assert srv.proc.poll() is None, srv.log()
        assert time.monotonic() < deadline, srv.log()
        time.sleep(0.05)


def test_json_lines_carry_the_same_keys_as_text(tmp_path: Path) -> None:
    text_srv = make_server(tmp_path / "text")
    json_srv = make_server(tmp_path / "json", extra=["--log-format", "json"])
    for srv in (text_srv, json_srv):
        start_and_wait(srv)
        try:
            with smtplib.SMTP("127.0.0.1", srv.mx_port, timeout=30) as client:
                client.sendmail("a@example.net", ["bob@example.org"], "Subject: x\r\n\r\nhi\r\n")
        finally:
            assert srv.stop() == 0
    text_rcpt = next(x for x in text_srv.log().splitlines() if "event=rcpt" in x)
    assert " INFO  postier session=" not in text_rcpt  # unchanged: the event comes first
    assert "event=rcpt session=" in text_rcpt and "to=<bob@example.org>" in text_rcpt

    objects = [json.loads(line) for line in json_srv.log().splitlines() if line.strip()]
    assert all({"time", "level", "process"} <= o.keys() for o in objects)
    assert all("event" in o for o in objects), [o for o in objects if "event" not in o]
    by_event = {o.get("event"): o for o in objects}
    assert {"starting", "listening", "ready", "connect", "rcpt", "stopped"} <= by_event.keys()
    rcpt = by_event["rcpt"]
    assert rcpt["to"] == "<bob@example.org>" and rcpt["level"] == "INFO"
    text_keys = {part.split("=", 1)[0] for part in text_rcpt.split(" ") if "=" in part}
    assert text_keys == (rcpt.keys() - {"time", "level", "process"})
    assert isinstance(by_event["ready"]["pid"], int)


def test_bad_log_format_is_a_config_error(tmp_path: Path) -> None:
    srv = make_server(tmp_path, extra=["--log-format", "xml"])
    try:
        srv.start()
    except RuntimeError as exc:
        assert "postier exited 2" in str(exc) and "log_format" in str(exc)
    else:
        srv.stop()
        raise AssertionError("--log-format xml was accepted")


def test_observers_see_every_event_whatever_the_level() -> None:
    seen: list[tuple[str, dict[str, object]]] = []

    def observe(name: str, kv: dict[str, object]) -> None:
        seen.append((name, dict(kv)))

    def broken(name: str, kv: dict[str, object]) -> None:
        raise RuntimeError("observer bug")

    quiet = logging.getLogger("postier.test-quiet")
    quiet.setLevel(logging.CRITICAL)
    log.add_observer(broken)
    log.add_observer(observe)
    try:
        log.event("delivery", logging.DEBUG, quiet, backend="maildir", status="delivered")
    finally:
        log.remove_observer(observe)
        log.remove_observer(broken)
    log.event("after", logger=quiet)
    assert seen == [("delivery", {"backend": "maildir", "status": "delivered"})]
