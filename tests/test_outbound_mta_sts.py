"""MTA-STS (RFC 8461): parsing, then delivery under enforce/testing against real receivers.

The policy host is a loopback HTTPS server (tests/outbound_helpers.PolicyHost) with a
certificate from the same private CA as the receiving MX; DNS is our loopback responder.
"""

from __future__ import annotations

import asyncio
import logging
import smtplib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from postier.delivery.base import RecipientResult, Status
from postier.delivery.smtp import SmtpRelay, Timeouts
from postier.dns import Resolver, SecureLookups
from postier.outbound.mta_sts import MtaSts, PolicyError, StsPolicy, parse_policy, parse_txt
from postier.outbound.tls_policy import TlsPolicy
from postier.outbound.tlsrpt import TlsReports
from postier.tls import client_context
from tests.outbound_helpers import (
    Pki,
    PolicyHost,
    Receivers,
    SecureDnsServer,
    policy_text,
    rcpt,
    start_receivers,
    stored,
)
from tests.server import make_server, wait_until

STS_DOMAINS = (
    "sts.test",
    "wrongname.test",
    "plain.test",
    "outside.test",
    "testing.test",
    "cached.test",
    "bad.test",
    "testingout.test",
)


World = tuple[Receivers, SecureDnsServer, PolicyHost]


def _zone() -> dict[str, object]:
    zone: dict[str, object] = {}
    for d in STS_DOMAINS:
        zone[d] = {"MX": [(10, f"mx.{d}")]}
        zone[f"mx.{d}"] = {"A": ["127.0.0.1"]}
        zone[f"mta-sts.{d}"] = {"A": ["127.0.0.1"]}
        zone[f"_mta-sts.{d}"] = {"TXT": ['"v=STSv1; id=1"']}
    zone["testing.test"] = {"MX": [(10, "mx2.testing.test")]}  # no certificate names it
    zone["mx2.testing.test"] = {"A": ["127.0.0.1"]}
    return zone


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    root = tmp_path_factory.mktemp("sts")
    pki = Pki(root / "pki")
    recv = start_receivers(root, pki)
    try:
        with (
            SecureDnsServer(_zone()) as dns_server,
            PolicyHost(pki, [f"mta-sts.{d}" for d in STS_DOMAINS]) as host,
        ):
            host.policies.update(
                {
                    "mta-sts.sts.test": policy_text("enforce", "mx.sts.test"),
                    "mta-sts.wrongname.test": policy_text("enforce", "mx.wrongname.test"),
                    "mta-sts.plain.test": policy_text("enforce", "mx.plain.test"),
                    "mta-sts.outside.test": policy_text("enforce", "mx.elsewhere.test"),
                    "mta-sts.testing.test": policy_text("testing", "*.testing.test", eol="\n"),
                    "mta-sts.cached.test": policy_text("enforce", "mx.cached.test"),
                    "mta-sts.testingout.test": policy_text("testing", "mx.elsewhere.test"),
                }
            )
            yield recv, dns_server, host
    finally:
        recv.tls.stop()
        recv.plain.stop()


def send(
    world: World,
    tmp: Path,
    to: str,
    *,
    plain: bool = False,
    cache: Path | None = None,
    reports: TlsReports | None = None,
) -> tuple[RecipientResult, str]:
    recv, dns_server, host = world
    resolver = Resolver("127.0.0.1", dns_server.port, timeout=2.0)
    context = client_context(verify=True, ca_file=recv.pki.ca_file)
    sts = MtaSts(
        SecureLookups(resolver),
        cache or tmp / "cache",
        context=context,
        port=host.port,
        timeout=1.0,
        reports=reports,
    )
    relay = SmtpRelay(
        "client.test",
        resolver=resolver,
        timeouts=Timeouts.uniform(10.0),
        remote_port=(recv.plain if plain else recv.tls).mx_port,
        tls_policy=TlsPolicy(mta_sts=sts, reports=reports),
        ca_file=str(recv.pki.ca_file),
    )

    async def go() -> tuple[RecipientResult, str]:
        async with relay.session(to.rpartition("@")[2]) as s:
            res = await s.send(stored(tmp), rcpt(to))
            return res[0], s.tls_state()

    return asyncio.run(go())


# --- parsing ---------------------------------------------------------------------------------


@pytest.mark.parametrize("eol", ["\r\n", "\n", "\r"])
def test_policy_line_endings_and_unknown_keys(eol: str) -> None:
    text = eol.join(
        [
            "version: STSv1",
            "mode: enforce",
            "mx: MX1.Example.com.",
            "mx: *.example.net",
            "future_key: whatever",
            "max_age: 604800",
            "",
        ]
    )
    policy = parse_policy(text)
    assert (policy.mode, policy.mx, policy.max_age) == (
        "enforce",
        ("mx1.example.com", "*.example.net"),
        604800,
    )
    assert policy.matches("mx1.example.com") and policy.matches("a.example.net")
    assert not policy.matches("a.b.example.net") and not policy.matches("example.net")


@pytest.mark.parametrize(
    "text",
    [
        "mode: enforce\nmx: mx.example.com\nmax_age: 86400\n",  # no version
        "version: STSv2\nmode: enforce\nmx: mx.example.com\nmax_age: 86400\n",
        "version: STSv1\nmode: strict\nmx: mx.example.com\nmax_age: 86400\n",
        "version: STSv1\nmode: enforce\nmax_age: 86400\n",  # no mx
        "version: STSv1\nmode: enforce\nmx: mx.example.com\nmax_age: -1\n",
        "version: STSv1\nmode: enforce\nmx: mx.example.com\nmax_age: 99999999999\n",
        "version: STSv1\nmode: enforce\nmx: mx*.example.com\nmax_age: 86400\n",
        "version: STSv1\nmode: enforce\nmx: mx.*.example.com\nmax_age: 86400\n",
        "version: STSv1\nmode: enforce\nmx: *.*.example.com\nmax_age: 86400\n",
        "version: STSv1\nmode: enforce\nmx: *\nmax_age: 86400\n",
        "version: STSv1\nmode enforce\n",
        "\x00\xff garbage",
    ],
)
def test_bad_policies_are_refused(text: str) -> None:
    with pytest.raises(PolicyError):
        parse_policy(text)


def test_mode_none_needs_no_mx() -> None:
    assert parse_policy("version: STSv1\r\nmode: none\r\nmax_age: 0\r\n").mx == ()


def test_txt_record() -> None:
    assert parse_txt(["v=STSv1; id=20260101T0000;"]) == "20260101T0000"
    assert parse_txt(["v=STSv1; id=2026-01-01"]) is None  # letters and digits only
    assert parse_txt(["v=STSv1; id=20260101"]) == "20260101"
    assert parse_txt(["v=STSv1;id=abc", "v=spf1 -all"]) == "abc"
    assert parse_txt(["v=STSv1; id=a", "v=STSv1; id=b"]) is None  # more than one
    assert parse_txt(["v=STSv1; id="]) is None and parse_txt([]) is None
    assert parse_txt(["v=STSv1; id=" + "x" * 33]) is None


# --- delivery ---------------------------------------------------------------------------------


def test_enforce_with_matching_mx_and_valid_certificate(
    world: World, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "postier")
    res, tls = send(world, tmp_path, "alice@sts.test")
    assert res.status is Status.DELIVERED and tls == "verified" and res.tls_policy == "mta-sts"
    assert (tmp_path / "cache" / "sts.test.json").is_file()
    assert any("tls=verified policy=mta-sts" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize(
    ("to", "plain", "enhanced", "reason"),
    [
        ("alice@wrongname.test", False, "4.7.5", "certificate-host-mismatch"),
        ("alice@plain.test", True, "4.7.10", "starttls-not-supported"),
        ("alice@outside.test", False, "4.7.5", "validation-failure"),
    ],
)
def test_enforce_defers_with_the_reason(
    world,
    tmp_path: Path,
    to: str,  # type: ignore[no-untyped-def]
    plain: bool,
    enhanced: str,
    reason: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, "postier")
    recv = world[0]
    server = recv.plain if plain else recv.tls
    before = recv.delivered(server)
    res, _ = send(world, tmp_path, to, plain=plain)
    assert (res.status, res.enhanced) == (Status.TEMPORARY, enhanced), res.text
    assert res.tls_failure.startswith(reason) and res.tls_policy == "mta-sts"
    assert recv.delivered(server) == before
    refused = [r.getMessage() for r in caplog.records if "event=tls_refused" in r.getMessage()]
    assert refused and "policy=mta-sts" in refused[0] and f"result={reason}" in refused[0]
    if to.endswith("outside.test"):
        assert "mx.elsewhere.test" in res.text


def test_testing_mode_delivers_logs_and_reports(
    world: World, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "postier")
    reports = TlsReports(tmp_path / "tlsrpt.sqlite")
    res, tls = send(world, tmp_path, "alice@testing.test", reports=reports)
    assert res.status is Status.DELIVERED and tls == "encrypted"
    assert res.tls_failure.startswith("certificate-host-mismatch")
    failed = [r.getMessage() for r in caplog.records if "event=tls_failed" in r.getMessage()]
    assert failed and "policy=mta-sts" in failed[0]
    send(world, tmp_path, "alice@sts.test", reports=reports)  # enforce, verified: a success
    day = reports.days()[0]
    built = {r.policy_domain: r.data for r in reports.build_reports(day, "o", "c", "s.test")}
    testing = built["testing.test"]["policies"][0]
    assert "mode: testing" in testing["policy"]["policy-string"]
    assert testing["summary"] == {
        "total-successful-session-count": 0,
        "total-failure-session-count": 1,
    }
    detail = testing["failure-details"][0]
    assert detail["result-type"] == "certificate-host-mismatch"
    assert detail["receiving-mx-hostname"] == "mx2.testing.test"
    assert detail["sending-mta-ip"] == detail["receiving-ip"] == "127.0.0.1"
    assert built["sts.test"]["policies"][0]["summary"]["total-successful-session-count"] == 1
    # testing, and the MX is not in the policy: delivered, reported once
    res, _ = send(world, tmp_path, "alice@testingout.test", reports=reports)
    assert res.status is Status.DELIVERED  # its certificate failed too: that is the last
    built = {r.policy_domain: r.data for r in reports.build_reports(day, "o", "c", "s.test")}
    out = built["testingout.test"]["policies"][0]
    assert out["summary"]["total-failure-session-count"] == 1
    assert out["failure-details"][0]["result-type"] == "validation-failure"
    reports.close()


def test_cache_refetch_and_policy_host_down(world: World, tmp_path: Path) -> None:
    _, dns_server, host = world
    cache = tmp_path / "cache"
    res, _ = send(world, tmp_path, "alice@cached.test", cache=cache)
    assert res.tls_policy == "mta-sts" and host.requests["mta-sts.cached.test"] == 1
    send(world, tmp_path, "alice@cached.test", cache=cache)  # same id: from the cache
    assert host.requests["mta-sts.cached.test"] == 1
    dns_server.zone["_mta-sts.cached.test"] = {"TXT": ['"v=STSv1; id=2"']}
    del host.policies["mta-sts.cached.test"]  # the policy host is "down" (404)
    res, tls = send(world, tmp_path, "alice@cached.test", cache=cache)
    assert host.requests["mta-sts.cached.test"] == 2  # a new id: refetched, and failed
    assert res.status is Status.DELIVERED and res.tls_policy == "mta-sts" and tls == "verified"
    dns_server.zone["_mta-sts.cached.test"] = "SERVFAIL"  # no TXT answer: the cache holds
    res, _ = send(world, tmp_path, "alice@cached.test", cache=cache)
    assert res.tls_policy == "mta-sts"


@pytest.mark.parametrize(
    "body",
    [
        "version: STSv1\nmode: enforce\nmx: mx.*.bad.test\nmax_age: 86400\n",  # bad wildcard
        "mode: enforce\nmx: mx.bad.test\nmax_age: 86400\n",  # no version
        policy_text("enforce", "mx.bad.test") + "x: " + "y" * 70_000 + "\n",  # too large
        "REDIRECT",
        "SLOW",
    ],
)
def test_bad_policy_hosts_fall_back_to_opportunistic(
    world,
    tmp_path: Path,
    body: str,  # type: ignore[no-untyped-def]
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, "postier")
    world[2].policies["mta-sts.bad.test"] = body
    reports = TlsReports(tmp_path / "tlsrpt.sqlite")
    res, tls = send(world, tmp_path, "alice@bad.test", reports=reports)
    assert res.status is Status.DELIVERED and res.tls_policy == "opportunistic"
    assert tls == "encrypted"
    warned = [r.getMessage() for r in caplog.records if "event=mta-sts" in r.getMessage()]
    assert warned and ("sts-policy-invalid" in warned[0] or "sts-policy-fetch-error" in warned[0])
    assert not (tmp_path / "cache" / "bad.test.json").exists()
    (report,) = reports.build_reports(reports.days()[0], "o", "c", "s.test")
    detail = report.data["policies"][0]["failure-details"][0]
    assert detail["result-type"] in ("sts-policy-invalid", "sts-policy-fetch-error")
    reports.close()


def test_expired_cache_is_not_used(tmp_path: Path) -> None:
    policy = StsPolicy("enforce", ("mx.x.test",), 10, "1", fetched_at=100.0)
    assert policy.expired(110.0) and not policy.expired(109.0)


# --- through the daemon: the flags reach the relay --------------------------------------------


def _wait_for(predicate: Callable[[], bool], what: str) -> None:
    assert wait_until(predicate, 30.0, 0.05), f"timed out waiting for {what}"


@pytest.mark.parametrize("sts_on", [True, False])
def test_daemon_applies_mta_sts_flags(world: World, tmp_path: Path, sts_on: bool) -> None:
    recv, dns_server, host = world
    extra = [
        "--dns-server", f"127.0.0.1:{dns_server.port}",
        "--remote-port", str(recv.tls.mx_port),
        "--tls-ca-file", str(recv.pki.ca_file),
        "--mta-sts-port", str(host.port),
    ]  # fmt: skip
    if not sts_on:
        extra.append("--no-mta-sts")
    sender = make_server(
        tmp_path / "sender", users="x@sender.test\n", domains=("sender.test",), extra=extra
    )
    sender.start()
    try:
        before = recv.delivered(recv.tls)
        with smtplib.SMTP("127.0.0.1", sender.local_port, timeout=30) as client:
            client.sendmail("x@sender.test", ["alice@sts.test"], b"Subject: d\r\n\r\nhi\r\n")
        _wait_for(lambda: recv.delivered(recv.tls) > before, "the relayed message")
        _wait_for(lambda: "event=delivery" in sender.log(), "the delivery log line")
        want = "tls=verified policy=mta-sts" if sts_on else "tls=encrypted policy=opportunistic"
        assert want in sender.log()
    finally:
        sender.stop()
