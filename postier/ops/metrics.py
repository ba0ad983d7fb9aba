"""Prometheus metrics, counted from the events the code already logs.

Nothing in the session or delivery code counts anything: `MetricsObserver` is registered
with `postier.log.add_observer` and turns events (connect, disconnect, message, tls,
auth-failed, delivery, reload ...) into counters. So the metrics follow the log lines an
operator already greps, and code being reshaped keeps its metrics as long as its events stay.

Workers are separate processes: prometheus-client's multiprocess mode keeps each worker's
values in files under one directory, and a scrape sums them (`MultiProcessCollector`), so the
counters add up across workers and survive a worker's restart. The queue figures are read
from the queue directory at scrape time (stat only), so any process can answer.

The environment variable PROMETHEUS_MULTIPROC_DIR must be set before prometheus_client is
first imported (it picks its value class then): `postier.ops.metrics_runtime` does that,
and this module is imported only afterwards.
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector

PREFIX = "postier"
RECENT_BUCKET = 10.0  # seconds per bucket of the recent-messages window
RECENT_WINDOWS = {"1m": 60.0, "1h": 3600.0}


class MetricsObserver:
    """Turns log events into metric updates; one per worker process."""

    def __init__(self) -> None:
        def counter(name: str, text: str, labels: tuple[str, ...] = ()) -> Counter:
            return Counter(f"{PREFIX}_{name}", text, labels, registry=None)

        self.connections = counter(
            "connections",
            "SMTP connections, by listener and how they ended",
            ("listener", "result"),
        )
        self.sessions_open = Gauge(
            f"{PREFIX}_sessions_open",
            "SMTP sessions open now",
            ("listener",),
            registry=None,
            multiprocess_mode="livesum",
        )
        self.messages = counter(
            "messages", "Messages at end of DATA, by listener and result", ("listener", "result")
        )
        self.message_bytes = counter("message_bytes", "Bytes of accepted messages", ("listener",))
        self.deliveries = counter(
            "deliveries", "Deliveries per recipient or mailbox, by backend and status",
            ("backend", "status"),
        )  # fmt: skip
        self.attempts = counter(
            "delivery_attempts", "Outbound SMTP delivery attempts, by result and TLS",
            ("result", "tls"),
        )  # fmt: skip
        self.auth_failures = counter("auth_failures", "Failed SMTP AUTH attempts", ("listener",))
        self.tls = counter("tls_sessions", "Inbound TLS handshakes, by version", ("version",))
        self.reloads = counter("reloads", "Reloads of a file, by result", ("result",))
        self.auth_verdicts = counter(
            "auth_verdicts", "Inbound SPF, DKIM (per signature) and DMARC verdicts on mx",
            ("method", "result"),
        )  # fmt: skip
        self.user_limits = counter(
            "user_limit_refusals", "MAIL or RCPT refused by a per-user hourly limit", ("limit",)
        )
        # For `postier status`: accepted messages in the last minute and hour (a counter's
        # rate needs two scrapes; this gauge needs one). Refreshed by refresh_recent().
        self.recent = Gauge(
            f"{PREFIX}_messages_recent",
            "Messages accepted in the last minute or hour, by window",
            ("window",),
            registry=None,
            multiprocess_mode="livesum",
        )
        # Inbound protection (checks/): refusals and filter verdicts, from their own events.
        self.rate_limited = counter(
            "client_rate_limited", "Clients over a rate limit, by what was limited", ("kind",)
        )
        self.dnsbl_listed = counter("dnsbl_listed", "Clients refused as listed by DNSBLs")
        self.dnsbl_errors = counter(
            "dnsbl_errors", "DNSBL look-ups that failed (client let through)", ("dnsbl",)
        )
        self.greylisted = counter("greylisted", "Recipients greylisted, by reason", ("why",))
        self.rspamd_scans = counter(
            "rspamd_scans", "Messages scanned by rspamd, by action", ("action",)
        )
        self.rspamd_unavailable = counter(
            "rspamd_unavailable", "rspamd scans that failed, by fail_open", ("fail_open",)
        )
        self._buckets: deque[list[float]] = deque()  # [bucket start, count], oldest first
        self._listener: dict[object, str] = {}  # session id -> listener, while it is open

    def __call__(self, name: str, kv: dict[str, object]) -> None:
        handler = self._handlers.get(name)
        if handler is not None:
            handler(self, kv)

    def _listener_of(self, kv: dict[str, object]) -> str:
        return self._listener.get(kv.get("session"), "unknown")

    def _on_connect(self, kv: dict[str, object]) -> None:
        listener = str(kv.get("listener", "unknown"))
        self._listener[kv.get("session")] = listener
        self.sessions_open.labels(listener).inc()

    def _on_disconnect(self, kv: dict[str, object]) -> None:
        listener = self._listener.pop(kv.get("session"), None)
        if listener is None:
            return
        self.sessions_open.labels(listener).dec()
        self.connections.labels(listener, str(kv.get("reason", "closed"))).inc()

    def _on_message(self, kv: dict[str, object]) -> None:
        listener = self._listener_of(kv)
        code = str(kv.get("result", ""))
        result = {"2": "accepted", "4": "tempfail", "5": "rejected"}.get(code[:1], "unknown")
        self.messages.labels(listener, result).inc()
        if result == "accepted":
            start = time.monotonic() // RECENT_BUCKET * RECENT_BUCKET
            if self._buckets and self._buckets[-1][0] == start:
                self._buckets[-1][1] += 1
            else:
                self._buckets.append([start, 1])
            for window in RECENT_WINDOWS:  # at once; refresh_recent() lets them decay
                self.recent.labels(window).inc()
        size = kv.get("size")
        if result == "accepted" and isinstance(size, int) and size > 0:
            self.message_bytes.labels(listener).inc(size)

    def refresh_recent(self) -> None:
        """Set the recent-messages gauges from the buckets; drop buckets older than an hour."""
        now = time.monotonic()
        horizon = max(RECENT_WINDOWS.values())
        while self._buckets and self._buckets[0][0] < now - horizon - RECENT_BUCKET:
            self._buckets.popleft()
        for window, seconds in RECENT_WINDOWS.items():
            count = sum(c for start, c in self._buckets if start + RECENT_BUCKET > now - seconds)
            self.recent.labels(window).set(count)

    def _on_message_rejected(self, kv: dict[str, object]) -> None:
        self.messages.labels(self._listener_of(kv), "rejected").inc()

    def _on_auth_failed(self, kv: dict[str, object]) -> None:
        self.auth_failures.labels(self._listener_of(kv)).inc()

    def _on_tls(self, kv: dict[str, object]) -> None:
        info = str(kv.get("tls", ""))
        version = next(
            (p[8:] for p in info.split() if p.startswith("version=")), "unknown"
        )  # fmt: skip
        self.tls.labels(version).inc()

    def _on_delivery(self, kv: dict[str, object]) -> None:
        """One SMTP or LMTP attempt: counts per recipient class."""
        backend = str(kv.get("backend", "unknown"))
        counts = {s: kv.get(s, 0) for s in ("delivered", "deferred", "bounced")}
        for status, n in counts.items():
            if isinstance(n, int) and n > 0:
                self.deliveries.labels(backend, status).inc(n)
        if backend == "smtp":
            if kv.get("host") is None:
                result = "no-connection"
            else:
                result = next((s for s in ("bounced", "deferred") if counts[s]), "delivered")
            self.attempts.labels(result, str(kv.get("tls", "no"))).inc()

    def _on_mailbox_delivered(self, kv: dict[str, object]) -> None:
        self.deliveries.labels(str(kv.get("backend", "unknown")), "delivered").inc()

    def _on_mailbox_failed(self, kv: dict[str, object]) -> None:
        self.deliveries.labels(str(kv.get("backend", "unknown")), "deferred").inc()

    def _on_reload(self, kv: dict[str, object]) -> None:
        self.reloads.labels(str(kv.get("result", "ok"))).inc()

    def _on_mailauth(self, kv: dict[str, object]) -> None:
        """One `event=mailauth` line: spf=R dkim=R[,R...] dmarc=R."""
        for method in ("spf", "dkim", "dmarc"):
            for result in str(kv.get(method, "")).split(","):
                if result:
                    self.auth_verdicts.labels(method, result).inc()

    def _on_client_rate_limited(self, kv: dict[str, object]) -> None:
        self.rate_limited.labels(str(kv.get("kind", "unknown"))).inc()

    def _on_dnsbl_listed(self, kv: dict[str, object]) -> None:
        self.dnsbl_listed.inc()

    def _on_dnsbl_error(self, kv: dict[str, object]) -> None:
        self.dnsbl_errors.labels(str(kv.get("dnsbl", "unknown"))).inc()

    def _on_greylisted(self, kv: dict[str, object]) -> None:
        self.greylisted.labels(str(kv.get("why", "unknown"))).inc()

    def _on_rspamd_scanned(self, kv: dict[str, object]) -> None:
        self.rspamd_scans.labels(str(kv.get("action", "unknown"))).inc()

    def _on_rspamd_unavailable(self, kv: dict[str, object]) -> None:
        self.rspamd_unavailable.labels(str(kv.get("fail_open", False)).lower()).inc()

    def _on_user_limit(self, kv: dict[str, object]) -> None:
        self.user_limits.labels(str(kv.get("limit", "unknown"))).inc()

    _handlers = {
        "connect": _on_connect,
        "disconnect": _on_disconnect,
        "message": _on_message,
        "message-rejected": _on_message_rejected,
        "auth-failed": _on_auth_failed,
        "tls": _on_tls,
        "delivery": _on_delivery,
        "delivered": _on_mailbox_delivered,
        "deliver_failed": _on_mailbox_failed,
        "reload": _on_reload,
        "mailauth": _on_mailauth,
        "client-rate-limited": _on_client_rate_limited,
        "dnsbl-listed": _on_dnsbl_listed,
        "dnsbl-error": _on_dnsbl_error,
        "greylisted": _on_greylisted,
        "rspamd-scanned": _on_rspamd_scanned,
        "rspamd-unavailable": _on_rspamd_unavailable,
        "user-limit": _on_user_limit,
    }


class QueueCollector:
    """Queue entries by state and the oldest entry's age, from the queue directory.

    Only names and stat(): an envelope file per entry in env/, files waiting in maildrop/,
    unreadable envelopes in corrupt/. The age comes from the body file, written once at
    commit (the envelope is rewritten at every attempt)."""

    STATES = {"queued": ("env", ".json"), "maildrop": ("maildrop", ""), "corrupt": ("corrupt", "")}

    def __init__(self, queue_dir: Path) -> None:
        self.queue_dir = queue_dir

    def collect(self) -> Iterator[GaugeMetricFamily]:
        entries = GaugeMetricFamily(
            f"{PREFIX}_queue_entries", "Messages in the queue, by state", labels=["state"]
        )
        for state, (sub, suffix) in self.STATES.items():
            entries.add_metric([state], float(len(self._names(sub, suffix))))
        yield entries
        oldest = GaugeMetricFamily(
            f"{PREFIX}_queue_oldest_age_seconds", "Age of the oldest queued message"
        )
        now, first = time.time(), None
        for name in self._names("env", ".json"):
            try:
                mtime = os.stat(self.queue_dir / "body" / name[: -len(".json")]).st_mtime
            except OSError:
                continue  # delivered or deleted since the listing
            first = mtime if first is None else min(first, mtime)
        oldest.add_metric([], max(0.0, now - first) if first is not None else 0.0)
        yield oldest

    def _names(self, sub: str, suffix: str) -> list[str]:
        try:
            return [n for n in os.listdir(self.queue_dir / sub) if n.endswith(suffix)]
        except OSError:
            return []


def exposition(multiproc_dir: str, queue_dir: Path) -> bytes:
    """The text a scrape gets: every worker's values summed, plus the queue figures."""
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=multiproc_dir)
    registry.register(QueueCollector(queue_dir))  # type: ignore[arg-type]
    return generate_latest(registry)
