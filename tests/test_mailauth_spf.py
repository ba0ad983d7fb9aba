"""SPF verdicts (RFC 7208) through pyspf with every look-up answered by a loopback responder."""

from __future__ import annotations

import asyncio

import pytest

from postier.dns import Resolver
from postier.mailauth import SpfResult, check_spf
from tests.dnsserver import DnsServer
from tests.mailauth_dns import txt, txt_zone

INCLUDES = " ".join(f"include:i{n}.limits.test" for n in range(11))

ZONE = txt_zone(
    {
        "pass.test": "v=spf1 ip4:192.0.2.0/24 ip6:2001:db8::/32 -all",
        "fail.test": "v=spf1 -all",
        "soft.test": "v=spf1 ~all",
        "neutral.test": "v=spf1 ?all",
        "syntax.test": "v=spf1 ip4:192.0.2.300 -all",
        "unknown.test": "v=spf1 frobnicate:example.test -all",
        "twice.test": ["v=spf1 -all", "v=spf1 +all"],
        "lookups.test": f"v=spf1 {INCLUDES} -all",
        "void.test": "v=spf1 a:nx1.void.test a:nx2.void.test a:nx3.void.test -all",
        "macro.test": "v=spf1 exists:%{i}._ip.macro.test exists:%{l}._user.macro.test -all",
        "helo.example.test": "v=spf1 ip4:192.0.2.9 -all",
        "redirect.test": "v=spf1 redirect=pass.test",
        "mxmech.test": "v=spf1 mx -all",
        "temp-include.test": "v=spf1 include:servfail.test -all",
        "huge.test": "v=spf1 " + " ".join(f"ip4:198.51.100.{n % 250}" for n in range(400)),
    }
)
for n in range(11):
    ZONE[f"i{n}.limits.test"] = {"TXT": [txt("v=spf1 ip4:203.0.113.1 -all")]}
ZONE["192.0.2.7._ip.macro.test"] = {"A": ["127.0.0.2"]}
ZONE["bob._user.macro.test"] = {"A": ["127.0.0.2"]}
ZONE["mxmech.test"]["MX"] = [(10, "mail.mxmech.test")]
ZONE["mail.mxmech.test"] = {"A": ["192.0.2.20"], "AAAA": ["2001:db8:20::1"]}
ZONE["none.test"] = {"A": ["192.0.2.1"]}
ZONE["servfail.test"] = "SERVFAIL"
ZONE["silent.test"] = "TIMEOUT"


@pytest.fixture(scope="module")
def dns_server():
    with DnsServer(ZONE) as server:
        yield server


def spf(server: DnsServer, ip: str, mail_from: str, helo: str = "client.test") -> SpfResult:
    resolver = Resolver("127.0.0.1", server.port, timeout=1.0)
    return asyncio.run(check_spf(resolver, ip, mail_from, helo))


@pytest.mark.parametrize(
    ("ip", "mail_from", "expected"),
    [
        ("192.0.2.5", "alice@pass.test", "pass"),
        ("198.51.100.1", "alice@pass.test", "fail"),
        ("192.0.2.5", "alice@fail.test", "fail"),
        ("192.0.2.5", "alice@soft.test", "softfail"),
        ("192.0.2.5", "alice@neutral.test", "neutral"),
        ("192.0.2.5", "alice@none.test", "none"),
        ("192.0.2.5", "alice@nxdomain.test", "none"),
        ("192.0.2.5", "alice@syntax.test", "permerror"),
        ("192.0.2.5", "alice@unknown.test", "permerror"),
        ("192.0.2.5", "alice@twice.test", "permerror"),
        ("192.0.2.5", "alice@lookups.test", "permerror"),
        ("192.0.2.5", "alice@void.test", "permerror"),
        ("192.0.2.5", "alice@servfail.test", "temperror"),
        ("192.0.2.5", "alice@temp-include.test", "temperror"),
        ("192.0.2.5", "alice@silent.test", "temperror"),
        ("2001:db8::5", "alice@pass.test", "pass"),
        ("2001:db9::5", "alice@pass.test", "fail"),
        ("::ffff:192.0.2.5", "alice@pass.test", "pass"),
        ("192.0.2.7", "alice@macro.test", "pass"),
        ("192.0.2.8", "bob@macro.test", "pass"),
        ("192.0.2.8", "alice@macro.test", "fail"),
        ("192.0.2.5", "alice@redirect.test", "pass"),
        ("192.0.2.20", "alice@mxmech.test", "pass"),
        ("2001:db8:20::1", "alice@mxmech.test", "pass"),
        ("192.0.2.21", "alice@mxmech.test", "fail"),
    ],
)
def test_mail_from_verdicts(dns_server, ip, mail_from, expected):
    result = spf(dns_server, ip, mail_from)
    assert result.result == expected, result
    assert result.identity == "mailfrom"
    assert result.domain == mail_from.rpartition("@")[2]


def test_null_sender_checks_the_helo_identity(dns_server):
    ok = spf(dns_server, "192.0.2.9", "", "helo.example.test")
    assert (ok.result, ok.identity, ok.domain) == ("pass", "helo", "helo.example.test")
    bad = spf(dns_server, "192.0.2.10", "", "helo.example.test")
    assert (bad.result, bad.identity) == ("fail", "helo")


def test_nothing_to_check_is_none(dns_server):
    assert spf(dns_server, "192.0.2.9", "", "[192.0.2.9]").result == "none"
    assert spf(dns_server, "192.0.2.9", "", "").result == "none"


def test_record_over_4k_is_permerror_without_parsing(dns_server):
    result = spf(dns_server, "192.0.2.5", "alice@huge.test")
    assert result.result == "permerror"
    assert "4096" in result.reason


def test_the_lookup_limit_stops_asking(dns_server):
    before = len(dns_server.queries)
    spf(dns_server, "192.0.2.5", "alice@lookups.test")
    asked = [q for q in dns_server.queries[before:] if q[0].endswith("limits.test")]
    assert len(asked) <= 11  # RFC 7208 §4.6.4: 10 terms; the 11th is refused


def test_answers_are_cached_for_their_ttl(dns_server):
    resolver = Resolver("127.0.0.1", dns_server.port, timeout=1.0)

    async def twice() -> None:
        await check_spf(resolver, "192.0.2.5", "alice@redirect.test", "client.test")
        before = len(dns_server.queries)
        again = await check_spf(resolver, "192.0.2.5", "alice@redirect.test", "client.test")
        assert again.result == "pass"
        assert dns_server.queries[before:] == []

    asyncio.run(twice())


def test_evaluation_runs_off_the_event_loop(dns_server):
    """The loop keeps serving while pyspf waits on a silent server in the thread pool."""
    resolver = Resolver("127.0.0.1", dns_server.port, timeout=1.0)

    async def main() -> int:
        ticks = 0
        task = asyncio.ensure_future(check_spf(resolver, "192.0.2.5", "a@silent.test", "h.test"))
        while not task.done():
            ticks += 1
            await asyncio.sleep(0.01)
        assert task.result().result == "temperror"
        return ticks

    assert asyncio.run(main()) > 5
