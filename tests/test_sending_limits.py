"""Per-user sending limits through the daemon: exactly N pass, the next gets 450 4.7.1.

Real parts: `postier serve` with 2 workers and the submissions listener, smtplib logging in
over implicit TLS, a restart between rounds, the Prometheus endpoint. Each message goes
over its own connection, so the workers' SO_REUSEPORT spreads them: the count is only
exact when the workers share it.
"""

from __future__ import annotations

import asyncio
import re
import smtplib
import urllib.request
from pathlib import Path

from postier.checks.ratelimit import RateLimiter
from postier.checks.sending_limits import SendingLimits
from postier.inbound.transaction import Transaction
from postier.protocol.address import Address
from tests.server import free_port
from tests.test_tls_integration import client_context, start_tls_server

ALICE, PW = "alice@example.org", "alice-secret"


def submit(port: int, rcpts: list[str]) -> tuple[int, list[int]]:
    """MAIL's code, and each RCPT's (empty when MAIL was refused); DATA when all passed."""
    with smtplib.SMTP_SSL("127.0.0.1", port, context=client_context(), timeout=30) as s:
        s.login(ALICE, PW)
        code, _ = s.mail(ALICE)
        if code != 250:
            return code, []
        codes = [s.rcpt(r)[0] for r in rcpts]
        if codes and all(c == 250 for c in codes):
            s.data(b"Subject: limits\r\n\r\nlimits\r\n")
        return code, codes


def test_messages_and_recipients_per_hour_shared_by_workers_and_kept_over_restart(
    tmp_path: Path,
) -> None:
    conf = tmp_path / "limits.toml"
    conf.write_text("[limits]\nmax_messages_per_hour = 4\nmax_recipients_per_hour = 6\n")
    metrics = free_port()
    tls = start_tls_server(
        tmp_path / "srv",
        extra=["-c", str(conf), "--workers", "2", "--metrics", f"127.0.0.1:{metrics}"],
    )
    srv = tls.server
    try:
        # Recipients: 6 pass (over 3 messages), the 7th RCPT gets 450 4.7.1.
        assert submit(tls.submissions, [ALICE, ALICE]) == (250, [250, 250])
        assert submit(tls.submissions, [ALICE, ALICE]) == (250, [250, 250])
        assert submit(tls.submissions, [ALICE, ALICE, ALICE]) == (250, [250, 250, 450])
        # Messages: 3 MAILs so far; the 4th passes, the 5th gets 450.
        assert submit(tls.submissions, [])[0] == 250
        assert submit(tls.submissions, [])[0] == 450
        srv.stop()
        srv.start()
        assert submit(tls.submissions, [])[0] == 450  # a restart gives no fresh allowance
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics", timeout=30) as r:
            text = r.read().decode()
        assert re.search(r'postier_user_limit_refusals_total\{limit="messages"\} [1-9]', text)
        with smtplib.SMTP_SSL("127.0.0.1", tls.submissions, context=client_context()) as s:
            s.login(ALICE, PW)
            code, text_ = s.mail(ALICE)
            assert (code, text_[:5]) == (450, b"4.7.1")
    finally:
        srv.stop()
    log = srv.log()
    assert "event=user-limit" in log and "limit=recipients" in log and "limit=messages" in log


def test_unauthenticated_sessions_are_not_counted(tmp_path: Path) -> None:
    limits = SendingLimits(RateLimiter(tmp_path / "l.sqlite"), 1, 1)
    anonymous = Transaction(queue_id="q", sender=None, auth_user=None)
    for _ in range(3):
        assert asyncio.run(limits.at_mail(anonymous)).reply is None
        assert asyncio.run(limits.at_rcpt(anonymous, Address("a", "b.test"))).reply is None
    user = Transaction(queue_id="q", sender=None, auth_user="u@b.test")
    assert asyncio.run(limits.at_mail(user)).reply is None
    assert asyncio.run(limits.at_mail(user)).reply.code == 450
