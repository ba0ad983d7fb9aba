"""Sending the daily TLS-RPT reports (RFC 8460 §5): to each `mailto:` rua as a message
committed to our own queue, to each `https:` rua as a POST.

Why through the queue: a report is mail like any other, so it gets the queue's retries and
durability, and the DKIM signature every message of ours gets at commit (`sign_own`, the
hostname's keys: §5.3 asks for a signed report). Its envelope sender is `<>`: a report
nobody can take must not come back to us as a bounce (as with DSNs, nothing is sent to
`<>`).

When: the process that runs the scheduler runs `ReportSender.run`, which sends every full
UTC day that has tallies (so a day missed while the daemon was down goes out at the next
start) and then sleeps until just after the next UTC midnight. A day is forgotten per
policy domain once its report has been handed over (queued, or POSTed, or refused by the
collector: §5.3 asks for no more than a best effort); a domain whose `_smtp._tls` look-up
failed temporarily keeps its counts for the next run, up to `MAX_AGE_DAYS`.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import email.policy
import io
import logging
import socket
import ssl
import time
import urllib.parse
from collections.abc import Callable
from email.generator import BytesGenerator
from email.mime.application import MIMEApplication
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from email.utils import formatdate, make_msgid

from postier.config import Config
from postier.dns import DnsTemporaryError, Resolver, parse_dns_server
from postier.errors import DeliveryError
from postier.log import event
from postier.outbound.tlsrpt import MEDIA_TYPE, Report, TlsReports, parse_tlsrpt_txt

__all__ = ["MAX_AGE_DAYS", "QueueOwn", "ReportSender", "report_message", "start_tls_reports"]

log = logging.getLogger("postier.outbound.tlsrpt")

MAX_AGE_DAYS = 7  # counts older than this are dropped even when their domain never answered
RETURN_PATH = b"Return-Path: <>\n"
AFTER_MIDNIGHT = 300.0  # seconds: let the day's last attempts finish counting
RETRY_AFTER = 3600.0  # a run that could not finish (DNS trouble) tries again this soon

# Commit our own message to the queue (blocking, thread pool): (spool-format bytes,
# content offset, recipients) -> queue id. The daemon's `Outbound.queue_own`.
QueueOwn = Callable[[bytes, int, list[str]], str]


class PostError(Exception):
    """An https: rua did not take the report."""


def report_message(report: Report, *, hostname: str, to: str, now: float) -> bytes:
    """The RFC 8460 §5.3 message in spool format (LF, after a `Return-Path: <>` line)."""
    pol = email.policy.default.clone(linesep="\n")
    outer = MIMEMultipart("report", report_type="tlsrpt", policy=pol)
    outer["From"] = f"TLS reporting <postmaster@{hostname}>"
    outer["To"] = f"<{to}>"
    outer["Subject"] = report.subject
    outer["Date"] = formatdate(now, usegmt=True)
    outer["Message-ID"] = make_msgid(domain=hostname)
    outer["TLS-Report-Domain"] = report.policy_domain
    outer["TLS-Report-Submitter"] = hostname
    outer["Auto-Submitted"] = "auto-generated"
    text = MIMEText(
        f"This is an aggregate TLS report from {hostname} for {report.policy_domain}\n"
        f"(RFC 8460). The report itself is attached.\n",
        policy=pol,
    )
    attachment = MIMEApplication(report.gzipped(), MEDIA_TYPE.partition("/")[2], policy=pol)
    attachment.add_header("Content-Disposition", "attachment", filename=report.filename)
    outer.attach(text)
    outer.attach(attachment)
    for part in (text, attachment):
        del part["MIME-Version"]
    buf = io.BytesIO()
    buf.write(RETURN_PATH)
    BytesGenerator(buf, policy=pol, mangle_from_=False).flatten(outer)
    return buf.getvalue()


def _mailto_address(uri: str) -> str | None:
    """`mailto:a@b.example?subject=x` -> `a@b.example`; None for anything unusable."""
    address = urllib.parse.unquote(uri.removeprefix("mailto:").partition("?")[0]).strip()
    local, at, domain = address.rpartition("@")
    if not (at and local and domain) or any(c in address for c in " \t\r\n<>,"):
        return None
    return address


def _post_blocking(
    uri: str, address: str, body: bytes, context: ssl.SSLContext, timeout: float
) -> int:
    """POST `body` to `uri` at `address` (name checked by the certificate, sent as Host)."""
    import http.client

    url = urllib.parse.urlsplit(uri)
    host, port = url.hostname or "", url.port or 443
    path = url.path or "/"
    if url.query:
        path += "?" + url.query
    try:
        sock = socket.create_connection((address, port), timeout=timeout)
    except OSError as exc:
        raise PostError(f"connect to {host}[{address}]:{port}: {exc}") from None
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.sock = context.wrap_socket(sock, server_hostname=host)
        conn.request(
            "POST",
            path,
            body=body,
            headers={"Host": host, "Content-Type": MEDIA_TYPE, "Connection": "close"},
        )
        status = conn.getresponse().status
    except (OSError, http.client.HTTPException) as exc:
        why = "timeout" if isinstance(exc, TimeoutError) else str(exc) or type(exc).__name__
        raise PostError(f"POST to {uri}: {why}") from None
    finally:
        conn.close()
    if not 200 <= status < 300:
        raise PostError(f"POST to {uri} answered {status}")
    return status


class ReportSender:
    """Builds each finished day's reports from `reports` and hands them over."""

    def __init__(
        self,
        reports: TlsReports,
        resolver: Resolver,
        queue_own: QueueOwn,
        *,
        hostname: str,
        context: ssl.SSLContext,
        timeout: float = 30.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.reports = reports
        self.resolver = resolver
        self.queue_own = queue_own
        self.hostname = hostname
        self.context = context
        self.timeout = timeout
        self.clock = clock

    def _today(self) -> str:
        return dt.datetime.fromtimestamp(self.clock(), dt.UTC).date().isoformat()

    async def send_due(self) -> bool:
        """Send every day before today (UTC). False when some domain must be tried again."""
        today = self._today()
        done = True
        days = await asyncio.to_thread(self.reports.days)
        for day in days:
            if day < today:
                done = await self.send_day(day) and done
        return done

    async def send_day(self, day: str) -> bool:
        """Send `day`'s reports; forget each domain handed over. False if one must wait."""
        built = await asyncio.to_thread(
            self.reports.build_reports,
            day,
            self.hostname,
            f"mailto:postmaster@{self.hostname}",
            self.hostname,
        )
        oldest = dt.date.fromisoformat(self._today()) - dt.timedelta(MAX_AGE_DAYS)
        too_old = day < oldest.isoformat()
        done = True
        for report in built:
            try:
                records = await self.resolver.txt(f"_smtp._tls.{report.policy_domain}")
                ruas = parse_tlsrpt_txt([r.decode("utf-8", "replace") for r in records])
            except (DnsTemporaryError, ValueError) as exc:
                event("tlsrpt-report", logging.WARNING, log, day=day,
                      domain=report.policy_domain, result="dns-failed", reason=str(exc),
                      kept=not too_old)  # fmt: skip
                if too_old:
                    await asyncio.to_thread(self.reports.forget, day, report.policy_domain)
                else:
                    done = False
                continue
            for uri in ruas:
                await self._hand_over(day, report, uri)
            if not ruas:
                event("tlsrpt-report", logger=log, day=day, domain=report.policy_domain,
                      result="no-rua")  # fmt: skip
            await asyncio.to_thread(self.reports.forget, day, report.policy_domain)
        return done

    async def _hand_over(self, day: str, report: Report, uri: str) -> None:
        fields = {"day": day, "domain": report.policy_domain, "rua": uri, "id": report.report_id}
        if uri.startswith("mailto:"):
            address = _mailto_address(uri)
            if address is None:
                event("tlsrpt-report", logging.WARNING, log, result="bad-rua", **fields)
                return
            data = report_message(report, hostname=self.hostname, to=address, now=self.clock())
            try:
                qid = await asyncio.to_thread(self.queue_own, data, len(RETURN_PATH), [address])
            except OSError as exc:
                event("tlsrpt-report", logging.ERROR, log, result="queue-failed",
                      reason=str(exc), **fields)  # fmt: skip
                return
            event("tlsrpt-report", logger=log, result="queued", qid=qid, **fields)
            return
        try:
            status = await self._post(uri, report.gzipped())
        except PostError as exc:
            event("tlsrpt-report", logging.WARNING, log, result="post-failed",
                  reason=str(exc), **fields)  # fmt: skip
            return
        event("tlsrpt-report", logger=log, result="posted", status=status, **fields)

    async def _post(self, uri: str, body: bytes) -> int:
        url = urllib.parse.urlsplit(uri)
        if not url.hostname:
            raise PostError(f"{uri}: no host")
        try:
            addresses = await self.resolver.addresses(url.hostname)
        except DeliveryError as exc:  # name not found, or DNS trouble
            raise PostError(f"{url.hostname}: {exc}") from None
        last = PostError(f"{url.hostname}: no address")
        for address in addresses:
            try:
                return await asyncio.wait_for(
                    asyncio.to_thread(
                        _post_blocking, uri, address, body, self.context, self.timeout
                    ),
                    self.timeout + 1.0,
                )
            except TimeoutError:
                last = PostError(f"POST to {uri} timed out")
            except PostError as exc:
                last = exc
        raise last

    def seconds_to_next_run(self) -> float:
        """Until just after the next UTC midnight."""
        now = dt.datetime.fromtimestamp(self.clock(), dt.UTC)
        midnight = dt.datetime.combine(now.date() + dt.timedelta(1), dt.time(), dt.UTC)
        return (midnight - now).total_seconds() + AFTER_MIDNIGHT

    async def run(self, stop: asyncio.Event) -> None:
        """Send what is due now, then once a day, until `stop` is set."""
        while not stop.is_set():
            try:
                done = await self.send_due()
            except Exception:  # a bug here must not take the scheduler's process down
                log.exception("TLS-RPT report run failed")
                done = False
            delay = self.seconds_to_next_run()
            if not done:
                delay = min(delay, RETRY_AFTER)
            try:
                await asyncio.wait_for(stop.wait(), delay)
            except TimeoutError:
                pass


def start_tls_reports(
    config: Config, queue_own: QueueOwn, stop: asyncio.Event
) -> asyncio.Task[None]:
    """The daily report run of the daemon (the process that runs the scheduler).

    Everything is built inside the task: loading the CA store takes a while, and the
    daemon's start-up (which goes on to take its reload baselines) must not wait for it.
    """
    return asyncio.get_running_loop().create_task(_run_reports(config, queue_own, stop))


async def _run_reports(config: Config, queue_own: QueueOwn, stop: asyncio.Event) -> None:
    from postier.outbound.tlsrpt import DB_NAME
    from postier.tls import client_context

    resolver = Resolver()
    if config.dns_server:  # validated at start-up by make_relay
        resolver = Resolver(*parse_dns_server(config.dns_server))
    context = await asyncio.to_thread(client_context, verify=True, ca_file=config.tls_ca_file)
    sender = ReportSender(
        TlsReports(config.queue_dir / DB_NAME),
        resolver,
        queue_own,
        hostname=config.hostname,
        context=context,
    )
    await sender.run(stop)
