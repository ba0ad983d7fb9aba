"""DNSBL look-ups against a loopback DNS responder serving the list zones."""

from __future__ import annotations

import asyncio

import dns.asyncresolver
import pytest

from postier.checks.dnsbl import DnsblChecker, DnsblSite, query_name
from tests.dnsserver import DnsServer


def resolver_for(server: DnsServer) -> dns.asyncresolver.Resolver:
    res = dns.asyncresolver.Resolver(configure=False)
    res.nameservers = ["127.0.0.1"]
    res.port = server.port
    res.lifetime = res.timeout = 1.0
    return res


ZONE = {
    "2.0.0.192.bl.test": {"A": ["127.0.0.2"], "TXT": ['"Listed: see https://bl.test/q?192.0.0.2"']},
    "2.0.0.192.weak.test": {"A": ["127.0.0.4"]},
    "3.0.0.192.weak.test": {"A": ["127.0.0.4"]},
    "3.0.0.192.other.test": {"A": ["127.0.0.9"]},
    "5.0.0.192.bl.test": {"A": ["127.255.255.254"]},
    "6.0.0.192.bl.test": {"A": ["192.0.0.1"]},
    "7.0.0.192.bl.test": "TIMEOUT",
    ("1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.bl.test"): {
        "A": ["127.0.0.3"]
    },
}


def run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(coro)


def test_query_names() -> None:
    assert query_name("192.0.0.2", "bl.test") == "2.0.0.192.bl.test"
    assert query_name("::ffff:192.0.0.2", "bl.test") == "2.0.0.192.bl.test"
    assert query_name("2001:db8::1", "bl.test").startswith("1.0.0.0.0.0.0.0.0.0.0.0.")
    assert query_name("2001:db8::1", "bl.test").endswith(".8.b.d.0.1.0.0.2.bl.test")


def test_site_syntax() -> None:
    assert DnsblSite.parse("zen.spamhaus.org") == DnsblSite("zen.spamhaus.org", 1)
    site = DnsblSite.parse("bl.example=127.0.0.2,127.0.0.4*3")
    assert site.weight == 3 and site.codes == {"127.0.0.2", "127.0.0.4"}
    for bad in ("", "nodot", "bl.example*x", "bl.example=300.1.1.1"):
        with pytest.raises(ValueError):
            DnsblSite.parse(bad)


def test_listed_ipv4_with_reason_and_unlisted() -> None:
    with DnsServer(ZONE) as server:
        checker = DnsblChecker([DnsblSite("bl.test")], resolver_for(server))
        hit = run(checker.check("192.0.0.2"))
        assert hit.listed(1) and hit.reason().startswith("Listed: see")
        assert not run(checker.check("192.0.0.100")).listed(1)


def test_listed_ipv6_nibbles() -> None:
    with DnsServer(ZONE) as server:
        checker = DnsblChecker([DnsblSite("bl.test")], resolver_for(server))
        assert run(checker.check("2001:db8::1")).listed(1)


def test_error_codes_and_foreign_answers_are_ignored() -> None:
    with DnsServer(ZONE) as server:
        checker = DnsblChecker([DnsblSite("bl.test")], resolver_for(server))
        assert not run(checker.check("192.0.0.5")).listed(1)  # 127.255.255.254
        assert not run(checker.check("192.0.0.6")).listed(1)  # outside 127/8


def test_timeout_is_not_a_listing() -> None:
    with DnsServer(ZONE) as server:
        checker = DnsblChecker([DnsblSite("bl.test")], resolver_for(server))
        result = run(checker.check("192.0.0.7"))
        assert not result.listed(1) and result.errors == ("bl.test",)


def test_weighted_threshold_and_code_filter() -> None:
    sites = [DnsblSite.parse("weak.test*1"), DnsblSite.parse("other.test=127.0.0.2*1")]
    with DnsServer(ZONE) as server:
        checker = DnsblChecker(sites, resolver_for(server))
        one = run(checker.check("192.0.0.2"))  # weak only
        assert one.score == 1 and not one.listed(2)
        two = run(checker.check("192.0.0.3"))  # weak + other, but other's code is not 127.0.0.2
        assert two.score == 1
        checker2 = DnsblChecker(
            [DnsblSite.parse("weak.test"), DnsblSite.parse("other.test")], resolver_for(server)
        )
        assert run(checker2.check("192.0.0.3")).listed(2)


def test_answers_are_cached() -> None:
    with DnsServer(ZONE) as server:
        checker = DnsblChecker([DnsblSite("bl.test")], resolver_for(server))

        async def twice() -> None:
            await checker.check("192.0.0.2")
            await checker.check("192.0.0.2")

        run(twice())
        assert server.queries.count(("2.0.0.192.bl.test", "A")) == 1
