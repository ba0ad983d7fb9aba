"""The Prometheus endpoint, scraped for real: valid for promtool during a load, counters that
add up across two workers, a busy port refused with exit 2, odd requests answered 400."""

from __future__ import annotations

import http.client
import shutil
import smtplib
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.server import PostierServer, free_port, make_server

SESSIONS = 20
MESSAGES_PER_SESSION = 3


def scrape(port: int, path: str = "/metrics") -> tuple[int, str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read().decode()
    finally:
        conn.close()


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def total(values: dict, name: str, **labels: str) -> float:
    return sum(
        v
        for (n, lab), v in values.items()
        if n == name and all(dict(lab).get(k) == want for k, want in labels.items())
    )


@pytest.fixture
def metrics_server(tmp_path: Path) -> Iterator[tuple[PostierServer, int]]:
    port = free_port()
    srv = make_server(tmp_path / "srv", extra=["--workers", "2", "--metrics", f"127.0.0.1:{port}"])
    srv.start()
    yield srv, port
    assert srv.stop() == 0


def _send(srv: PostierServer, index: int, errors: list[str]) -> None:
    try:
        with smtplib.SMTP("127.0.0.1", srv.mx_port, timeout=60) as client:
            for n in range(MESSAGES_PER_SESSION):
                body = f"Subject: {index}.{n}\r\n\r\n" + "x" * 100 + "\r\n"
                client.sendmail("load@example.net", ["alice@example.org"], body)
    except Exception as exc:  # collected and asserted by the test
        errors.append(repr(exc))


def test_scrape_during_load_is_valid_and_counters_add_up(
    metrics_server: tuple[PostierServer, int], tmp_path: Path
) -> None:
    srv, port = metrics_server
    assert scrape(port, "/healthz") == (200, "ok\n")
    errors: list[str] = []
    threads = [threading.Thread(target=_send, args=(srv, i, errors)) for i in range(SESSIONS)]
    for t in threads:
        t.start()
    during = scrape(port)
    for t in threads:
        t.join(120)
    assert errors == []
    assert during[0] == 200

    promtool = shutil.which("promtool")
    if promtool is not None:
        check = subprocess.run(
            [promtool, "check", "metrics"], input=during[1], capture_output=True, text=True
        )
        assert check.returncode == 0, check.stdout + check.stderr

    sent = SESSIONS * MESSAGES_PER_SESSION
    deadline = time.monotonic() + 30
    while True:  # the last disconnects are logged just after the clients' QUIT
        values = samples(scrape(port)[1])
        if total(values, "postier_connections_total") >= SESSIONS or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert total(values, "postier_messages_total", listener="mx", result="accepted") == sent
    assert total(values, "postier_connections_total", listener="mx", result="quit") == SESSIONS
    assert total(values, "postier_sessions_open") == 0
    assert total(values, "postier_message_bytes_total", listener="mx") > sent * 100
    assert len(srv.maildir_files("alice")) == sent
    # Both workers took sessions, and their counts are summed in one scrape.
    assert srv.logged("postier[w0] event=message", "postier[w1] event=message")
    assert total(values, "postier_queue_entries", state="queued") == 0
    if promtool is not None:
        final = subprocess.run(
            [promtool, "check", "metrics"], input=scrape(port)[1], capture_output=True, text=True
        )
        assert final.returncode == 0, final.stdout + final.stderr


def _raw(port: int, payload: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        try:
            s.sendall(payload)
            s.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the server may close on a huge request before reading all of it
        chunks = []
        try:
            while chunk := s.recv(65536):
                chunks.append(chunk)
        except ConnectionResetError:
            pass
        return b"".join(chunks)


def test_odd_and_huge_requests_get_400_or_close(metrics_server: tuple[PostierServer, int]) -> None:
    _, port = metrics_server
    for payload in (
        b"GET /metrics HTTP/1.1\r\nX: " + b"a" * 100_000 + b"\r\n\r\n",
        b"\x00\xff\xfe garbage\r\n\r\n",
        b"GET\r\n\r\n",
        b"GET /metrics\r\n\r\n",
        b"\r\n" * 10_000,
    ):
        answer = _raw(port, payload)
        assert answer == b"" or answer.startswith(b"HTTP/1.1 400 "), answer[:100]
    assert _raw(port, b"POST /metrics HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 405 ")
    assert _raw(port, b"GET /other HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 404 ")
    head = _raw(port, b"HEAD /metrics HTTP/1.0\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ") and head.endswith(b"\r\n\r\n")
    assert scrape(port)[0] == 200  # still serving


def test_a_busy_metrics_port_is_exit_2(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        srv = make_server(tmp_path, extra=["--metrics", f"127.0.0.1:{port}"])
        with pytest.raises(RuntimeError, match="postier exited 2") as exc:
            srv.start()
    assert "metrics: cannot listen on 127.0.0.1:" in str(exc.value)


def test_grafana_dashboard_uses_only_exposed_names() -> None:
    import json
    import re

    root = Path(__file__).resolve().parent.parent
    dashboard = json.loads((root / "contrib" / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    names = {n for e in exprs for n in re.findall(r"\bpostier_[a-z_]+", e)}
    from postier.ops.metrics import MetricsObserver, QueueCollector

    observer = MetricsObserver()
    exposed = {
        m._name + ("_total" if m._type == "counter" else "")
        for m in vars(observer).values()
        if hasattr(m, "_type")
    }
    exposed |= {f.name for f in QueueCollector(root / "no-queue").collect()}
    assert names == exposed
