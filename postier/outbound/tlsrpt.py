"""TLS-RPT (RFC 8460): count TLS outcomes per policy domain, and write the daily JSON report.

Why SQLite under the queue directory: the counts must survive a restart (a day's report
covers the whole day), several processes may count at once, and the house rule
(docs/architecture.md) keeps such shared
state in one small SQLite file per concern. The file runs in WAL mode with synchronous=NORMAL:
a count lost to a power cut costs one line in a report, while an fsync per delivery attempt
on the event loop would cost every message some latency.

What is counted: every attempt made under an MTA-STS or DANE policy (success, or failure
with its RFC 8460 result type), and policy failures found before any connection
(`sts-policy-fetch-error`, `sts-policy-invalid`). Sending the report (a gzip'd
`application/tlsrpt+gzip` message to each `mailto:` rua, or an HTTPS POST) is the queue's
job; `build_reports` gives it everything it needs.
"""

from __future__ import annotations

import datetime as dt
import gzip
import json
import logging
import os
import sqlite3
import threading
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from postier.log import event
from postier.outbound.mta_sts import ReportPolicy
from postier.outbound.tls_policy import TlsFailure

log = logging.getLogger("postier.outbound.tlsrpt")

MEDIA_TYPE = "application/tlsrpt+gzip"  # RFC 8460 §5.3 (the JSON itself: application/tlsrpt+json)
DB_NAME = "tlsrpt.sqlite"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outcomes (
    day TEXT NOT NULL,
    policy_domain TEXT NOT NULL,
    policy_type TEXT NOT NULL,
    policy_strings TEXT NOT NULL,
    mx_patterns TEXT NOT NULL,
    result_type TEXT NOT NULL,
    sending_ip TEXT NOT NULL,
    receiving_mx TEXT NOT NULL,
    receiving_ip TEXT NOT NULL,
    reason TEXT NOT NULL,
    count INTEGER NOT NULL,
    PRIMARY KEY (day, policy_domain, policy_type, policy_strings, mx_patterns, result_type,
                 sending_ip, receiving_mx, receiving_ip, reason)
)
"""
_UPSERT = """
INSERT INTO outcomes VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 1)
ON CONFLICT DO UPDATE SET count = count + 1
"""


def _today() -> str:
    return dt.datetime.now(dt.UTC).date().isoformat()


@dataclass(frozen=True, slots=True)
class Report:
    """One day's report for one policy domain, ready to send."""

    policy_domain: str
    report_id: str
    data: dict[str, Any]  # the RFC 8460 JSON object
    filename: str  # §5.3: submitter!policy-domain!begin!end!id.json.gz
    subject: str  # §5.3: "Report Domain: ... Submitter: ... Report-ID: <...>"

    def json_bytes(self) -> bytes:
        return json.dumps(self.data, indent=1).encode()

    def gzipped(self) -> bytes:
        return gzip.compress(self.json_bytes(), mtime=0)


def parse_tlsrpt_txt(records: Sequence[str]) -> list[str]:
    """The rua URIs of a `_smtp._tls.<domain>` TXT record (RFC 8460 §3), or [] when there is
    not exactly one `v=TLSRPTv1` record. Only mailto: and https: URIs are kept."""
    ours = [r for r in records if r.replace(" ", "").startswith("v=TLSRPTv1;")]
    if len(ours) != 1:
        return []
    fields: dict[str, str] = {}
    for part in ours[0].split(";"):
        key, sep, value = part.strip().partition("=")
        if sep:
            fields.setdefault(key.strip(), value.strip())
    uris = [u.strip() for u in fields.get("rua", "").split(",")]
    return [u for u in uris if u.startswith(("mailto:", "https:"))]


class TlsReports:
    """The tallies (`record`) and the reports built from them (`build_reports`)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._db: sqlite3.Connection | None = None
        self._pid = 0

    def _conn(self) -> sqlite3.Connection:
        if self._db is None or self._pid != os.getpid():  # one connection per process
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            db = sqlite3.connect(self.path, timeout=10.0, check_same_thread=False)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute(_SCHEMA)
            self._db, self._pid = db, os.getpid()
        return self._db

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    def _add(self, *row: str) -> None:
        try:
            with self._lock, self._conn() as db:
                db.execute(_UPSERT, row)
        except (sqlite3.Error, OSError) as exc:  # a lost count must never cost a delivery
            event("tlsrpt-count-failed", logging.WARNING, log, path=str(self.path), reason=str(exc))

    def record(
        self,
        policy: ReportPolicy,
        host: str,
        address: str,
        failure: TlsFailure | None = None,
        *,
        sending_ip: str = "",
        day: str | None = None,
    ) -> None:
        """Count one attempt under `policy`: a success, or a failure of its result type."""
        self._add(
            day or _today(),
            policy.domain,
            policy.policy_type,
            json.dumps(list(policy.strings)),
            json.dumps(list(policy.mx_patterns)),
            failure.result_type if failure else "",
            sending_ip,
            host,
            address,
            str(failure)[:500] if failure else "",
        )

    def record_policy_failure(
        self, domain: str, result_type: str, reason: str, *, day: str | None = None
    ) -> None:
        """A policy that could not be had (fetch error, invalid policy): §4.3.2.2."""
        self._add(
            day or _today(),
            domain,
            "no-policy-found",
            "[]",
            "[]",
            result_type,
            "",
            "",
            "",
            reason[:500],
        )

    def days(self) -> list[str]:
        with self._lock:
            rows = self._conn().execute("SELECT DISTINCT day FROM outcomes ORDER BY day")
            return [r[0] for r in rows]

    def forget(self, day: str, domain: str | None = None) -> None:
        """Drop a day's counts (of one policy domain) once its reports are sent or given up."""
        with self._lock, self._conn() as db:
            if domain is None:
                db.execute("DELETE FROM outcomes WHERE day = ?", (day,))
            else:
                db.execute(
                    "DELETE FROM outcomes WHERE day = ? AND policy_domain = ?", (day, domain)
                )

    def build_reports(
        self, day: str, organization: str, contact: str, submitter: str
    ) -> list[Report]:
        """One RFC 8460 report per policy domain counted on `day` (UTC, YYYY-MM-DD)."""
        with self._lock:
            rows = (
                self._conn()
                .execute(
                    "SELECT policy_domain, policy_type, policy_strings, mx_patterns, result_type,"
                    " sending_ip, receiving_mx, receiving_ip, reason, count FROM outcomes"
                    " WHERE day = ? ORDER BY policy_domain, policy_type, policy_strings",
                    (day,),
                )
                .fetchall()
            )
        by_domain: dict[str, dict[tuple[str, str, str], dict[str, Any]]] = {}
        for (
            domain,
            ptype,
            strings,
            mx,
            result,
            sending_ip,
            receiving_mx,
            receiving_ip,
            reason,
            count,
        ) in rows:
            policies = by_domain.setdefault(domain, {})
            entry = policies.get((ptype, strings, mx))
            if entry is None:
                policy: dict[str, Any] = {"policy-type": ptype, "policy-domain": domain}
                if json.loads(strings):
                    policy["policy-string"] = json.loads(strings)
                if json.loads(mx):
                    policy["mx-host"] = json.loads(mx)
                entry = {
                    "policy": policy,
                    "summary": {
                        "total-successful-session-count": 0,
                        "total-failure-session-count": 0,
                    },
                }
                policies[(ptype, strings, mx)] = entry
            if not result:
                entry["summary"]["total-successful-session-count"] += count
                continue
            entry["summary"]["total-failure-session-count"] += count
            detail: dict[str, Any] = {"result-type": result, "failed-session-count": count}
            for key, value in (
                ("sending-mta-ip", sending_ip),
                ("receiving-mx-hostname", receiving_mx),
                ("receiving-ip", receiving_ip),
                ("failure-reason-code", reason),
            ):
                if value:
                    detail[key] = value
            entry.setdefault("failure-details", []).append(detail)
        start = f"{day}T00:00:00Z"
        end = f"{day}T23:59:59Z"
        stamp = day.replace("-", "")
        reports = []
        for domain, policies in by_domain.items():
            report_id = f"{stamp}.{uuid.uuid4()}@{submitter}"
            data = {
                "organization-name": organization,
                "date-range": {"start-datetime": start, "end-datetime": end},
                "contact-info": contact,
                "report-id": report_id,
                "policies": list(policies.values()),
            }
            begin_ts = int(dt.datetime.fromisoformat(f"{day}T00:00:00+00:00").timestamp())
            filename = f"{submitter}!{domain}!{begin_ts}!{begin_ts + 86399}.json.gz"
            subject = f"Report Domain: {domain} Submitter: {submitter} Report-ID: <{report_id}>"
            reports.append(Report(domain, report_id, data, filename, subject))
        return reports
