"""TLS-RPT (RFC 8460): tallies that survive a restart, and the daily report checked against
the RFC's JSON schema (§4.4) after a gzip round trip."""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path
from typing import Any

from postier.outbound.mta_sts import ReportPolicy
from postier.outbound.tls_policy import TlsFailure
from postier.outbound.tlsrpt import MEDIA_TYPE, TlsReports, parse_tlsrpt_txt

DAY = "2026-11-30"
STS = ReportPolicy(
    "example.test",
    "sts",
    ("version: STSv1", "mode: testing", "mx: *.example.test", "max_age: 86400"),
    ("*.example.test",),
)
TLSA = ReportPolicy("dane.test", "tlsa", ("3 1 1 " + "ab" * 32,))
RESULT_TYPES = {
    "starttls-not-supported", "certificate-host-mismatch", "certificate-expired",
    "certificate-not-trusted", "validation-failure", "tlsa-invalid", "dnssec-invalid",
    "dane-required", "sts-policy-fetch-error", "sts-policy-invalid", "sts-webpki-invalid",
}  # fmt: skip
DATETIME = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z")


def check_schema(report: dict[str, Any]) -> None:
    """The required members and types of RFC 8460 §4.4, and nothing outside its names."""
    assert set(report) == {
        "organization-name",
        "date-range",
        "contact-info",
        "report-id",
        "policies",
    }
    assert all(
        isinstance(report[k], str) and report[k]
        for k in ("organization-name", "contact-info", "report-id")
    )
    dates = report["date-range"]
    assert set(dates) == {"start-datetime", "end-datetime"}
    assert all(DATETIME.fullmatch(v) for v in dates.values())
    assert isinstance(report["policies"], list) and report["policies"]
    for item in report["policies"]:
        assert set(item) <= {"policy", "summary", "failure-details"}
        policy = item["policy"]
        assert set(policy) <= {"policy-type", "policy-string", "policy-domain", "mx-host"}
        assert policy["policy-type"] in ("tlsa", "sts", "no-policy-found")
        assert isinstance(policy["policy-domain"], str)
        for key in ("policy-string", "mx-host"):
            assert all(isinstance(s, str) for s in policy.get(key, []))
        summary = item["summary"]
        assert set(summary) == {"total-successful-session-count", "total-failure-session-count"}
        assert all(isinstance(v, int) and v >= 0 for v in summary.values())
        details = item.get("failure-details", [])
        assert (
            sum(d["failed-session-count"] for d in details)
            == summary["total-failure-session-count"]
        )
        for d in details:
            assert set(d) <= {
                "result-type",
                "sending-mta-ip",
                "receiving-mx-hostname",
                "receiving-mx-helo",
                "receiving-ip",
                "failed-session-count",
                "additional-information",
                "failure-reason-code",
            }
            assert d["result-type"] in RESULT_TYPES
            assert isinstance(d["failed-session-count"], int)


def test_counts_survive_a_restart_and_build_a_valid_report(tmp_path: Path) -> None:
    db = tmp_path / "queue" / "tlsrpt.sqlite"
    reports = TlsReports(db)
    for _ in range(3):
        reports.record(STS, "mx1.example.test", "192.0.2.1", sending_ip="127.0.0.1", day=DAY)
    expired = TlsFailure("certificate-expired", "certificate of mx2.example.test: expired")
    reports.record(STS, "mx2.example.test", "192.0.2.2", expired, sending_ip="::1", day=DAY)
    reports.close()  # a restart
    reports = TlsReports(db)
    reports.record(STS, "mx2.example.test", "192.0.2.2", expired, sending_ip="::1", day=DAY)
    reports.record(TLSA, "mx.dane.test", "192.0.2.3", day=DAY)
    reports.record_policy_failure("gone.test", "sts-policy-fetch-error", "404", day=DAY)
    reports.record(TLSA, "mx.dane.test", "192.0.2.3", day="2026-12-01")  # another day
    assert reports.days() == [DAY, "2026-12-01"]

    built = {
        r.policy_domain: r
        for r in reports.build_reports(
            DAY, "postier at mx.sender.test", "postmaster@sender.test", "mx.sender.test"
        )
    }
    assert set(built) == {"example.test", "dane.test", "gone.test"}
    sts = built["example.test"]
    data = json.loads(gzip.decompress(sts.gzipped()))  # what goes into the message
    check_schema(data)
    (item,) = data["policies"]
    assert item["policy"] == {
        "policy-type": "sts",
        "policy-domain": "example.test",
        "policy-string": list(STS.strings),
        "mx-host": ["*.example.test"],
    }
    assert item["summary"] == {
        "total-successful-session-count": 3,
        "total-failure-session-count": 2,
    }
    (detail,) = item["failure-details"]
    assert detail["result-type"] == "certificate-expired"
    assert (detail["sending-mta-ip"], detail["receiving-ip"]) == ("::1", "192.0.2.2")
    assert detail["receiving-mx-hostname"] == "mx2.example.test"
    assert detail["failed-session-count"] == 2
    assert data["date-range"] == {
        "start-datetime": f"{DAY}T00:00:00Z",
        "end-datetime": f"{DAY}T23:59:59Z",
    }
    assert sts.filename == "mx.sender.test!example.test!1795996800!1796083199.json.gz"
    assert sts.subject == (
        f"Report Domain: example.test Submitter: mx.sender.test Report-ID: <{data['report-id']}>"
    )
    assert MEDIA_TYPE == "application/tlsrpt+gzip"
    for other in ("dane.test", "gone.test"):
        check_schema(json.loads(gzip.decompress(built[other].gzipped())))
    gone = json.loads(built["gone.test"].json_bytes())["policies"][0]
    assert gone["policy"]["policy-type"] == "no-policy-found"
    assert gone["failure-details"][0]["result-type"] == "sts-policy-fetch-error"

    reports.forget(DAY)
    assert reports.days() == ["2026-12-01"]
    reports.close()


def test_rua_record() -> None:
    record = "v=TLSRPTv1; rua=mailto:tls@example.test,https://r.example.test/v1"
    assert parse_tlsrpt_txt([record, "v=spf1 -all"]) == [
        "mailto:tls@example.test",
        "https://r.example.test/v1",
    ]
    assert parse_tlsrpt_txt([record, record]) == []  # more than one
    assert parse_tlsrpt_txt(["v=TLSRPTv1; rua=ftp://x.test"]) == []
    assert parse_tlsrpt_txt([]) == []


def test_an_unwritable_database_costs_no_delivery(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    reports = TlsReports(tmp_path / "file" / "tlsrpt.sqlite")  # parent is not a directory
    try:
        reports.record(STS, "mx1.example.test", "192.0.2.1")
    except OSError:
        raise AssertionError("record must not raise") from None
