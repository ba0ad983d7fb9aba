"""TLS-RPT reports sent (RFC 8460 §5): the daemon that runs the queue sends yesterday's
tallies (counted before it started: they survive a restart) to a `mailto:` rua, as a
DKIM-signed multipart/report through its own queue to our listener, and to an `https:` rua
as a POST to a loopback HTTPS collector; then the day is forgotten. DNS is the loopback
responder; the collector's certificate comes from a trustme CA."""

from __future__ import annotations

import asyncio
import datetime as dt
import email
import email.policy
import gzip
import http.server
import json
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from postier.dns import Resolver
from postier.outbound.mta_sts import ReportPolicy
from postier.outbound.tls_policy import TlsFailure
from postier.outbound.tlsrpt import DB_NAME, MEDIA_TYPE, TlsReports
from postier.outbound.tlsrpt_send import ReportSender
from postier.queue.store import QueueStore
from postier.tls import client_context
from tests.dnsserver import DnsServer
from tests.outbound_helpers import Pki
from tests.server import PostierServer, make_server
from tests.test_outbound_tlsrpt import check_schema

MAIL_DOMAIN = "mailrpt.test"
HTTPS_DOMAIN = "httpsrpt.test"


class Collector:
    """An HTTPS server on loopback that keeps every POST (path, headers, body)."""

    def __init__(self, pki: Pki) -> None:
        self.posts: list[tuple[str, dict[str, str], bytes]] = []
        chain, key = pki.issue("collector.test", into=pki.dir / "collector")
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(chain, key)
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                owner.posts.append((self.path, dict(self.headers.items()), body))
                self.send_response(201)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.httpd.socket = context.wrap_socket(self.httpd.socket, server_side=True)
        self.port = self.httpd.server_address[1]
        self._thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    def __enter__(self) -> Collector:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self._thread.join(timeout=5)


def _wait(predicate: Any, attempts: int = 300) -> Any:
    """Bounded polling (a count of tries, no time threshold)."""
    for _ in range(attempts):
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    return predicate()


@pytest.fixture
def started(tmp_path: Path) -> Iterator[tuple[PostierServer, PostierServer, Collector, Path]]:
    pki = Pki(tmp_path / "pki")
    receiver = make_server(
        tmp_path / "recv", users="tlsrpt@reports.test\n", domains=("reports.test",)
    )
    with Collector(pki) as collector:
        zone = {
            f"_smtp._tls.{MAIL_DOMAIN}": {"TXT": ['"v=TLSRPTv1; rua=mailto:tlsrpt@reports.test"']},
            f"_smtp._tls.{HTTPS_DOMAIN}": {
                "TXT": [f'"v=TLSRPTv1; rua=https://collector.test:{collector.port}/v1/tlsrpt"']
            },
            "reports.test": {"MX": [(10, "mx.reports.test")]},
            "mx.reports.test": {"A": ["127.0.0.1"]},
            "collector.test": {"A": ["127.0.0.1"]},
        }
        with DnsServer(zone) as dns_server:
            keys = tmp_path / "dkim"
            subprocess.run(
                [sys.executable, "-m", "postier", "dkim", "keygen", "mx.test",
                 "--dkim-keys", str(keys), "--type", "ed25519"],
                check=True, capture_output=True, timeout=60,
            )  # fmt: skip
            queue_dir = tmp_path / "sender" / "queue"
            _tally(queue_dir / DB_NAME)
            sender = make_server(
                tmp_path / "sender",
                users="x@origin.test\n",
                domains=("origin.test",),
                extra=[
                    "--dns-server", f"127.0.0.1:{dns_server.port}",
                    "--remote-port", str(receiver.mx_port),
                    "--tls-ca-file", str(pki.ca_file),
                    "--dkim-keys", str(keys),
                ],
            )  # fmt: skip
            receiver.start()
            try:
                sender.start()
                try:
                    yield sender, receiver, collector, queue_dir
                finally:
                    sender.stop()
            finally:
                receiver.stop()


def _yesterday() -> str:
    return (dt.datetime.now(dt.UTC).date() - dt.timedelta(days=1)).isoformat()


def _today() -> str:
    return dt.datetime.now(dt.UTC).date().isoformat()


def _tally(db: Path) -> None:
    """Counts from an earlier run of the daemon: yesterday's (to send) and today's (to keep)."""
    reports = TlsReports(db)
    sts = ReportPolicy(
        MAIL_DOMAIN, "sts", ("version: STSv1", "mode: enforce", "mx: mx.mailrpt.test"),
        ("mx.mailrpt.test",),
    )  # fmt: skip
    tlsa = ReportPolicy(HTTPS_DOMAIN, "tlsa", ("3 1 1 " + "ab" * 32,))
    failure = TlsFailure("certificate-host-mismatch", "certificate of mx: wrong name")
    for _ in range(3):
        reports.record(sts, "mx.mailrpt.test", "127.0.0.1", day=_yesterday())
    reports.record(sts, "mx.mailrpt.test", "127.0.0.1", failure, day=_yesterday())
    reports.record(tlsa, "mx.httpsrpt.test", "127.0.0.1", day=_yesterday())
    reports.record(sts, "mx.mailrpt.test", "127.0.0.1", day=_today())
    reports.close()


def _report_of(part_bytes: bytes) -> dict[str, Any]:
    data = json.loads(gzip.decompress(part_bytes))
    check_schema(data)
    return data


def test_reports_sent_to_mailto_and_https_then_forgotten(
    started: tuple[PostierServer, PostierServer, Collector, Path],
) -> None:
    sender, receiver, collector, queue_dir = started
    files = _wait(lambda: receiver.maildir_files("tlsrpt"))
    assert len(files) == 1, sender.log() + receiver.log()
    msg = email.message_from_bytes(files[0].read_bytes(), policy=email.policy.default)
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "tlsrpt"
    assert msg["Subject"].startswith(
        f"Report Domain: {MAIL_DOMAIN} Submitter: mx.test Report-ID: <"
    )
    assert msg["TLS-Report-Domain"] == MAIL_DOMAIN
    assert msg["From"].addresses[0].addr_spec == "postmaster@mx.test"
    assert "d=mx.test" in str(msg["DKIM-Signature"]).replace(" ", "")
    attachments = [p for p in msg.walk() if p.get_content_type() == MEDIA_TYPE]
    assert len(attachments) == 1
    assert attachments[0].get_filename().endswith(".json.gz")
    report = _report_of(attachments[0].get_content())
    (policy,) = report["policies"]
    assert policy["policy"]["policy-domain"] == MAIL_DOMAIN
    assert policy["summary"] == {
        "total-successful-session-count": 3,
        "total-failure-session-count": 1,
    }
    assert policy["failure-details"][0]["result-type"] == "certificate-host-mismatch"
    assert report["date-range"]["start-datetime"] == f"{_yesterday()}T00:00:00Z"

    assert _wait(lambda: collector.posts), sender.log()
    path, headers, body = collector.posts[0]
    assert path == "/v1/tlsrpt" and headers["Content-Type"] == MEDIA_TYPE
    posted = _report_of(body)
    assert posted["policies"][0]["policy"]["policy-domain"] == HTTPS_DOMAIN

    reports = TlsReports(queue_dir / DB_NAME)
    try:
        assert _wait(lambda: reports.days() == [_today()]), reports.days()
    finally:
        reports.close()
    assert sender.logged("event=tlsrpt-report")


def test_dns_trouble_keeps_the_day_and_no_rua_forgets_it(tmp_path: Path) -> None:
    """A temporary failure of the `_smtp._tls` look-up keeps the counts for the next run
    (never a lost report for a DNS hiccup); a domain without rua has nobody to send to."""
    db = tmp_path / DB_NAME
    reports = TlsReports(db)
    for domain in ("broken.test", "norua.test"):
        reports.record(ReportPolicy(domain, "tlsa"), f"mx.{domain}", "127.0.0.1", day="2026-11-30")
    store = QueueStore(tmp_path / "queue")
    queued: list[str] = []

    def queue_own(data: bytes, offset: int, recipients: list[str]) -> str:
        queued.append(
            store.commit_bytes(data, "", recipients, arrival=0, content_offset=offset).queue_id
        )
        return queued[-1]

    zone = {
        "_smtp._tls.broken.test": "SERVFAIL",
        "_smtp._tls.norua.test": {"TXT": ['"v=spf1 -all"']},
    }
    with DnsServer(zone) as dns_server:
        sender = ReportSender(
            reports,
            Resolver("127.0.0.1", dns_server.port, timeout=1.0),
            queue_own,
            hostname="mx.test",
            context=client_context(verify=True),
            clock=lambda: dt.datetime(2026, 12, 1, 0, 10, tzinfo=dt.UTC).timestamp(),
        )
        assert asyncio.run(sender.send_due()) is False
    assert queued == []
    report = reports.build_reports("2026-11-30", "o", "c", "s")
    assert [r.policy_domain for r in report] == ["broken.test"]  # kept for the next run
    assert sender.seconds_to_next_run() == 86400 - 600 + 300
    reports.close()
