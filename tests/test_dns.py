"""Routing (postier.dns) against real DNS servers on loopback: our responder and dnsmasq.

No query ever leaves the machine: every Resolver here is pointed at 127.0.0.1 and a port we
started. The failure classes are what the queue acts on, so each is asserted exactly.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from collections.abc import Iterator

import pytest

from postier.dns import Resolver, parse_dns_server, to_ascii_domain
from postier.errors import DeliveryError
from tests.dnsserver import DnsServer
from tests.sinks import free_port

ZONE = {
    "example.test": {
        "MX": [
            (20, "mx2.example.test"),
            (10, "mx1a.example.test"),
            (10, "mx1b.example.test"),
            (30, "mx3.example.test"),
        ]
    },
    "mx1a.example.test": {"A": ["127.0.0.1"]},
    "dual.test": {"A": ["127.0.0.1", "127.0.0.2"], "AAAA": ["::1"]},
    "v4only.test": {"A": ["127.0.0.1"]},
    "v6only.test": {"AAAA": ["::1"]},
    "nothing.test": {"TXT": ['"no mail here"']},
    "nullmx.test": {"MX": [(0, ".")]},
    "broken.test": "SERVFAIL",
    "silent.test": "TIMEOUT",
    "half.test": {"A": ["127.0.0.3"], "AAAA": "SERVFAIL"},
    "halfbad.test": {"AAAA": "SERVFAIL"},
    "xn--bcher-kva.test": {"A": ["127.0.0.4"]},
    "big.test": {
        "MX": [(i, f"a-rather-long-mail-exchanger-name-{i:03}.example.test") for i in range(60)]
    },
}


@pytest.fixture(scope="module")
def dns_server() -> Iterator[DnsServer]:
    with DnsServer(ZONE) as server:
        yield server


def resolver(server: DnsServer, **kwargs: object) -> Resolver:
    return Resolver("127.0.0.1", server.port, timeout=1.0, **kwargs)  # type: ignore[arg-type]


def run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(coro)


def error_of(coro) -> DeliveryError:  # type: ignore[no-untyped-def]
    with pytest.raises(DeliveryError) as info:
        run(coro)
    return info.value


# --- pure helpers ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("192.0.2.1", ("192.0.2.1", 53)),
        ("192.0.2.1:5353", ("192.0.2.1", 5353)),
        ("::1", ("::1", 53)),
        ("[::1]", ("::1", 53)),
        ("[::1]:5353", ("::1", 5353)),
        (" 127.0.0.1:53 ", ("127.0.0.1", 53)),
    ],
)
def test_parse_dns_server(text: str, expected: tuple[str, int]) -> None:
    assert parse_dns_server(text) == expected


@pytest.mark.parametrize(
    "text",
    ["", "dns.example", "1.2.3.4:0", "1.2.3.4:70000", "1.2.3.4:x", "[::1", "[::1]x", "300.1.1.1"],
)
def test_parse_dns_server_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_dns_server(text)


def test_to_ascii_domain() -> None:
    assert to_ascii_domain("Example.TEST.") == "example.test"
    assert to_ascii_domain("bücher.test") == "xn--bcher-kva.test"
    assert to_ascii_domain("BÜCHER.test") == "xn--bcher-kva.test"
    with pytest.raises(ValueError):
        to_ascii_domain("")


# --- MX ----------------------------------------------------------------------------------


def test_mx_by_preference_shuffled_among_equals(dns_server: DnsServer) -> None:
    groups: list[list[str]] = []

    def reverse(group: list[str]) -> None:  # deterministic stand-in for random.shuffle
        groups.append(list(group))
        group.reverse()

    hosts = run(resolver(dns_server, shuffle=reverse).mx_hosts("example.test"))
    assert sorted(groups[0]) == ["mx1a.example.test", "mx1b.example.test"]
    assert hosts[:2] == list(reversed(groups[0]))
    assert hosts[2:] == ["mx2.example.test", "mx3.example.test"]


def test_mx_equal_preference_order_varies(dns_server: DnsServer) -> None:
    seen = set()
    res = resolver(dns_server)
    for _ in range(40):  # bounded; both orders have probability 1/2 each time
        seen.add(tuple(run(res.mx_hosts("example.test"))[:2]))
        if len(seen) == 2:
            break
    assert len(seen) == 2


def test_implicit_mx_when_only_addresses(dns_server: DnsServer) -> None:
    res = resolver(dns_server)
    assert run(res.mx_hosts("v4only.test")) == ["v4only.test"]
    assert run(res.mx_hosts("v6only.test")) == ["v6only.test"]
    assert run(res.mx_hosts("V4ONLY.test.")) == ["v4only.test"]


def test_no_mx_no_address_is_permanent(dns_server: DnsServer) -> None:
    err = error_of(resolver(dns_server).mx_hosts("nothing.test"))
    assert (err.permanent, err.code, err.enhanced) == (True, 550, "5.1.2")


def test_null_mx(dns_server: DnsServer) -> None:
    err = error_of(resolver(dns_server).mx_hosts("nullmx.test"))
    assert (err.permanent, err.code, err.enhanced) == (True, 556, "5.1.10")
    assert "null MX" in str(err)


def test_nxdomain_is_permanent(dns_server: DnsServer) -> None:
    err = error_of(resolver(dns_server).mx_hosts("no-such-domain.test"))
    assert (err.permanent, err.code, err.enhanced) == (True, 550, "5.1.2")


def test_servfail_is_temporary(dns_server: DnsServer) -> None:
    err = error_of(resolver(dns_server).mx_hosts("broken.test"))
    assert (err.permanent, err.code, err.enhanced) == (False, 451, "4.4.3")


def test_timeout_is_temporary(dns_server: DnsServer) -> None:
    err = error_of(Resolver("127.0.0.1", dns_server.port, timeout=0.3).mx_hosts("silent.test"))
    assert (err.permanent, err.code, err.enhanced) == (False, 451, "4.4.3")


def test_no_nameserver_listening_is_temporary() -> None:
    port = free_port()  # nothing listens there: ICMP port unreachable, or silence
    err = error_of(Resolver("127.0.0.1", port, timeout=0.5).mx_hosts("example.test"))
    assert not err.permanent
    assert err.code == 451


def test_idna_query_uses_a_labels(dns_server: DnsServer) -> None:
    hosts = run(resolver(dns_server).mx_hosts("bücher.test"))
    assert hosts == ["xn--bcher-kva.test"]
    assert ("xn--bcher-kva.test", "MX") in dns_server.queries
    assert run(resolver(dns_server).addresses("bücher.test")) == ["127.0.0.4"]


def test_large_answer_is_fetched_over_tcp(dns_server: DnsServer) -> None:
    before = dns_server.tcp_queries
    hosts = run(resolver(dns_server).mx_hosts("big.test"))
    assert len(hosts) == 60
    assert hosts[0].endswith("-000.example.test") and hosts[-1].endswith("-059.example.test")
    assert dns_server.tcp_queries > before


# --- addresses ---------------------------------------------------------------------------


def test_addresses_ipv6_first(dns_server: DnsServer) -> None:
    found = run(resolver(dns_server).addresses("dual.test"))
    assert found[0] == "::1"  # within one family, record order is the server's business
    assert sorted(found[1:]) == ["127.0.0.1", "127.0.0.2"]


def test_addresses_of_ip_literals_skip_dns(dns_server: DnsServer) -> None:
    res = resolver(dns_server)
    count = len(dns_server.queries)
    assert run(res.addresses("127.0.0.9")) == ["127.0.0.9"]
    assert run(res.addresses("[::1]")) == ["::1"]
    assert len(dns_server.queries) == count


def test_addresses_one_family_failing_still_answers(dns_server: DnsServer) -> None:
    assert run(resolver(dns_server).addresses("half.test")) == ["127.0.0.3"]


def test_addresses_failure_classes(dns_server: DnsServer) -> None:
    res = resolver(dns_server)
    err = error_of(res.addresses("halfbad.test"))  # AAAA SERVFAIL, A empty: maybe later
    assert (err.permanent, err.enhanced) == (False, "4.4.3")
    err = error_of(res.addresses("no-such-host.test"))
    assert (err.permanent, err.code, err.enhanced) == (True, 550, "5.1.2")
    err = error_of(res.addresses("nothing.test"))  # exists, no A/AAAA
    assert (err.permanent, err.code) == (True, 550)


# --- dnsmasq, a real server from Debian ----------------------------------------------------


@pytest.mark.skipif(shutil.which("dnsmasq") is None, reason="dnsmasq not installed")
def test_with_dnsmasq(tmp_path) -> None:  # type: ignore[no-untyped-def]
    port = free_port()
    proc = subprocess.Popen(
        [
            "dnsmasq",
            "--keep-in-foreground",
            "--conf-file=/dev/null",
            f"--port={port}",
            "--no-resolv",
            "--no-hosts",
            "--listen-address=127.0.0.1",
            "--bind-interfaces",
            "--local=/test/",
            f"--pid-file={tmp_path}/dnsmasq.pid",
            "--mx-host=dm.test,mx2.dm.test,20",
            "--mx-host=dm.test,mx1.dm.test,10",
            "--host-record=mx1.dm.test,127.0.0.1,::1",
            "--host-record=mx2.dm.test,127.0.0.2",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        res = Resolver("127.0.0.1", port, timeout=1.0)
        hosts: list[str] = []
        for _ in range(50):  # bounded wait until dnsmasq answers
            try:
                hosts = run(res.mx_hosts("dm.test"))
                break
            except DeliveryError:
                if proc.poll() is not None:
                    pytest.fail(f"dnsmasq exited: {proc.stderr.read()!r}")  # type: ignore[union-attr]
        assert hosts == ["mx1.dm.test", "mx2.dm.test"]
        assert run(res.addresses("mx1.dm.test")) == ["::1", "127.0.0.1"]
        assert run(res.mx_hosts("mx2.dm.test")) == ["mx2.dm.test"]  # implicit MX
        err = error_of(res.mx_hosts("absent.dm.test"))
        assert (err.permanent, err.code) == (True, 550)
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_cached_answers_what_lookup_answered_without_asking(dns_server: DnsServer) -> None:
    """`cached` (pyspf's shortcut from its pool thread) gives lookup's answer once it is
    cached: records, NODATA and NXDOMAIN alike; before that, and for a bad name, None."""
    r = resolver(dns_server)
    cases = [("dual.test", "A"), ("dual.test", "TXT"), ("nowhere.test", "A")]
    for name, rdtype in cases:
        assert r.cached(name, rdtype) is None
    answers = {case: asyncio.run(r.lookup(*case)) for case in cases}
    asked = len(dns_server.queries)
    for case in cases:
        assert r.cached(*case) == answers[case]
    assert answers[cases[0]] and answers[cases[1]] == [] and answers[cases[2]] == []
    assert len(dns_server.queries) == asked  # from the cache alone
    assert r.cached("bad..name", "A") is None
