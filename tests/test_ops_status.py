"""`postier status`: read from a running two-worker daemon's metrics endpoint and its queue."""

from __future__ import annotations

import smtplib
import subprocess
import sys
import time
from pathlib import Path

from postier.queue.store import QueueStore
from tests.server import PostierServer, free_port

SAFETY = 60.0


def status(conf: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "postier", "status", "-c", str(conf)],
        capture_output=True,
        text=True,
        timeout=SAFETY,
    )


def test_status_shows_sessions_messages_and_queue(tmp_path: Path) -> None:
    (tmp_path / "users").write_text("alice@example.org\n")
    mx, local, metrics = free_port(), free_port(), free_port()
    conf = tmp_path / "postier.toml"
    conf.write_text(
        f'hostname = "mx.test"\ndomain = ["example.org"]\nusers = "users"\n'
        f'mail_root = "mail"\nqueue_dir = "queue"\nworkers = 2\n'
        f'mx = ["127.0.0.1:{mx}"]\nlocal = ["127.0.0.1:{local}"]\n'
        f'metrics = "127.0.0.1:{metrics}"\n'
    )
    srv = PostierServer(
        root=tmp_path, args=["-c", str(conf)], mx_port=mx, local_port=local,
        mail_root=tmp_path / "mail", log_path=tmp_path / "postier.log",
    )  # fmt: skip
    srv.start()
    try:
        # A deferred entry with a failure, as the scheduler leaves one (retry in an hour).
        store = QueueStore(tmp_path / "queue", create=False)
        entry = store.commit_bytes(
            b"Return-Path: <a@example.org>\nSubject: q\n\nx\n", "a@example.org",
            ["b@remote.example"], arrival=time.time() - 7200, content_offset=0,
        )  # fmt: skip
        r = entry.recipients[0]
        r.attempts, r.code, r.enhanced, r.reply = 1, 451, "4.4.1", "Connection refused"
        r.last_attempt, r.next_attempt = time.time(), time.time() + 3600
        store.update(entry)

        held = smtplib.SMTP("127.0.0.1", mx, timeout=SAFETY)
        with smtplib.SMTP("127.0.0.1", mx, timeout=SAFETY) as client:
            for n in range(3):
                client.sendmail(
                    "s@example.net", ["alice@example.org"], f"Subject: {n}\r\n\r\nx\r\n"
                )
        deadline = time.monotonic() + SAFETY
        while True:
            out = status(conf)
            if "sessions: 1 open" in out.stdout or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        held.quit()
        assert out.returncode == 0, out.stderr
        text = out.stdout
        assert text.startswith("postier on mx.test\n")
        assert f"mx           127.0.0.1:{mx}" in text and "sessions: 1 open" in text
        assert "messages accepted: 3 in the last minute, 3 in the last hour" in text
        assert "outbound sessions: none yet" in text
        assert "queue: 0 waiting, 1 deferred, oldest 2.0h" in text
        assert "  remote.example: 451 4.4.1 Connection refused" in text
    finally:
        assert srv.stop() == 0
    down = status(conf)
    assert down.returncode == 1 and f"daemon not reachable at 127.0.0.1:{metrics}" in down.stdout
