"""DMARC (RFC 7489): alignment, policies and DNS failures, records served on loopback DNS."""

from __future__ import annotations

import asyncio

import pytest

from postier.dns import Resolver
from postier.mailauth import DkimResult, SpfResult
from postier.mailauth.dmarc import DmarcResult, check_dmarc, organizational_domain
from tests.dnsserver import DnsServer
from tests.mailauth_dns import txt_zone

ZONE = txt_zone(
    {
        "_dmarc.example.test": "v=DMARC1; p=reject; sp=quarantine; rua=mailto:d@example.test",
        "_dmarc.own.example.test": "v=DMARC1; p=none",
        "_dmarc.strict.test": "v=DMARC1; p=reject; adkim=s; aspf=s",
        "_dmarc.none.test": "v=DMARC1; p=none",
        "_dmarc.pct.test": "v=DMARC1; p=reject; pct=50",
        "_dmarc.twice.test": ["v=DMARC1; p=reject", "v=DMARC1; p=none"],
        "_dmarc.huge.test": "v=DMARC1; p=reject; " + "x=y; " * 1000,
        "_dmarc.badp.test": "v=DMARC1; p=bogus",
        "_dmarc.ruaonly.test": "v=DMARC1; rua=mailto:d@ruaonly.test",
        "_dmarc.notdmarc.test": "v=spf1 -all",
        "_dmarc.example.co.uk": "v=DMARC1; p=quarantine",
    }
)
ZONE["_dmarc.temp.test"] = "SERVFAIL"


@pytest.fixture(scope="module")
def dns_server():
    with DnsServer(ZONE) as server:
        yield server


def spf(result: str, domain: str) -> SpfResult:
    return SpfResult(result, "mailfrom", domain, f"bounce@{domain}")


def dkim(result: str, domain: str) -> DkimResult:
    return DkimResult(result, domain, "sel1", "abcdefgh")


NOTHING = spf("none", "elsewhere.test")


def dmarc(server, from_domains, spf_result=NOTHING, dkim_results=(), sample=lambda: 0.0):
    resolver = Resolver("127.0.0.1", server.port, timeout=1.0)
    return asyncio.run(
        check_dmarc(resolver, from_domains, spf_result, list(dkim_results), sample=sample)
    )


def test_organizational_domain_comes_from_the_public_suffix_list():
    assert organizational_domain("a.b.example.test") == "example.test"
    assert organizational_domain("mail.example.co.uk") == "example.co.uk"
    assert organizational_domain("co.uk") == "co.uk"
    assert organizational_domain("Foo.GitHub.io.") == "foo.github.io"


@pytest.mark.parametrize(
    ("spf_result", "dkim_results", "expected"),
    [
        (spf("pass", "bounces.example.test"), [], "pass"),  # relaxed SPF alignment
        (NOTHING, [dkim("pass", "mail.example.test")], "pass"),  # relaxed DKIM alignment
        (spf("pass", "other.test"), [dkim("pass", "other.test")], "fail"),  # misaligned
        (spf("fail", "example.test"), [dkim("fail", "example.test")], "fail"),
        (spf("softfail", "example.test"), [dkim("neutral", "example.test")], "fail"),
        (
            spf("fail", "example.test"),
            [dkim("pass", "other.test"), dkim("pass", "example.test")],
            "pass",
        ),
    ],
)
def test_alignment_relaxed(dns_server, spf_result, dkim_results, expected):
    result = dmarc(dns_server, ["example.test"], spf_result, dkim_results)
    assert result.result == expected
    assert result.disposition == ("none" if expected == "pass" else "reject")


def test_alignment_strict(dns_server):
    sub = dmarc(
        dns_server,
        ["strict.test"],
        spf("pass", "mail.strict.test"),
        [dkim("pass", "mail.strict.test")],
    )
    assert (sub.result, sub.disposition) == ("fail", "reject")
    exact = dmarc(dns_server, ["strict.test"], NOTHING, [dkim("pass", "strict.test")])
    assert exact.result == "pass"


def test_subdomain_policy_applies_to_subdomains(dns_server):
    sub = dmarc(dns_server, ["news.example.test"])
    assert (sub.result, sub.policy, sub.disposition) == ("fail", "quarantine", "quarantine")
    own = dmarc(dns_server, ["own.example.test"])  # a subdomain with its own record: its p=
    assert (own.result, own.policy, own.disposition) == ("fail", "none", "none")


def test_p_none_and_quarantine_at_an_organizational_domain_under_a_public_suffix(dns_server):
    assert dmarc(dns_server, ["none.test"]).disposition == "none"
    result = dmarc(dns_server, ["mail.example.co.uk"])
    assert (result.result, result.policy) == ("fail", "quarantine")


def test_temporary_errors_never_reject(dns_server):
    spf_temp = dmarc(dns_server, ["example.test"], spf("temperror", "example.test"))
    assert (spf_temp.result, spf_temp.disposition) == ("temperror", "temperror")
    dkim_temp = dmarc(dns_server, ["example.test"], NOTHING, [dkim("temperror", "example.test")])
    assert (dkim_temp.result, dkim_temp.disposition) == ("temperror", "temperror")
    record_temp = dmarc(dns_server, ["temp.test"], spf("fail", "temp.test"))
    assert (record_temp.result, record_temp.disposition) == ("temperror", "temperror")


def test_a_temporary_error_under_p_none_asks_for_nothing(dns_server):
    result = dmarc(dns_server, ["none.test"], spf("temperror", "none.test"))
    assert (result.result, result.disposition) == ("temperror", "none")


def test_a_temporary_error_that_could_not_align_does_not_matter(dns_server):
    result = dmarc(dns_server, ["example.test"], spf("temperror", "other.test"))
    assert (result.result, result.disposition) == ("fail", "reject")


def test_pct_samples_failures(dns_server):
    assert dmarc(dns_server, ["pct.test"], sample=lambda: 0.2).disposition == "reject"
    assert dmarc(dns_server, ["pct.test"], sample=lambda: 0.7).disposition == "quarantine"


@pytest.mark.parametrize(
    ("domain", "expected"),
    [
        ("nodmarc.test", "none"),
        ("twice.test", "none"),
        ("notdmarc.test", "none"),
        ("huge.test", "permerror"),
        ("badp.test", "permerror"),
    ],
)
def test_missing_or_unusable_records(dns_server, domain, expected):
    result = dmarc(dns_server, [domain])
    assert (result.result, result.disposition) == (expected, "none")


def test_rua_without_p_means_p_none(dns_server):
    result = dmarc(dns_server, ["ruaonly.test"])
    assert (result.result, result.policy, result.disposition) == ("fail", "none", "none")


def test_several_authors_the_strictest_decides(dns_server):
    result = dmarc(dns_server, ["none.test", "example.test"], spf("pass", "none.test"))
    assert (result.from_domain, result.disposition) == ("example.test", "reject")


def test_no_author_domain(dns_server):
    assert dmarc(dns_server, []) == DmarcResult("none", reason="no author domain in From")
