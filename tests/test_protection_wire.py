"""Client rate limits, DNSBL and greylisting in a running server, against real clients.

Every client is smtplib on loopback with a chosen source address (127.0.0.0/8 is all ours);
the lists are served by the loopback DNS responder; time moves through the server's test
clock file (POSTIER_TEST_CLOCK_FILE), never by waiting. These tests set
`exempt_networks` themselves so that loopback clients are checked.
"""

from __future__ import annotations

import smtplib
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from postier.checks.protection import TEST_CLOCK_ENV
from tests.dnsserver import DnsServer
from tests.server import PostierServer, free_port, make_server

MSG = b"From: a@remote.test\r\nTo: alice@example.org\r\nSubject: hi\r\n\r\nHello.\r\n"
V6_NIBBLES = "1." + "0." * 31  # ::1, reversed nibbles

ZONE = {
    "2.0.0.127.bl.test": {"A": ["127.0.0.2"], "TXT": ['"Listed: see https://bl.test/q"']},
    "3.0.0.127.bl.test": {"A": ["127.255.255.254"]},
    "4.0.0.127.bl.test": "TIMEOUT",
    "5.0.0.127.weak.test": {"A": ["127.0.0.4"]},
    "6.0.0.127.weak.test": {"A": ["127.0.0.4"]},
    "6.0.0.127.weak2.test": {"A": ["127.0.0.4"]},
    V6_NIBBLES + "bl.test": {"A": ["127.0.0.2"], "TXT": ['"IPv6 listed"']},
    "spf.test": {"TXT": ['"v=spf1 ip4:127.0.0.0/8 ip6:::1 -all"']},
    "nospf.test": {"TXT": ['"v=spf1 -all"']},
}


@pytest.fixture(scope="module")
def dns() -> Iterator[DnsServer]:
    with DnsServer(ZONE) as server:
        yield server


@pytest.fixture
def clock(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "clock"
    path.write_text("0")
    monkeypatch.setenv(TEST_CLOCK_ENV, str(path))
    return path


def serve(tmp: Path, dns: DnsServer, toml: str, **kw: object) -> PostierServer:
    conf = tmp / "postier.toml"
    tmp.mkdir(parents=True, exist_ok=True)
    conf.write_text(toml)
    extra = ["-c", str(conf), "--dns-server", f"127.0.0.1:{dns.port}", *kw.pop("extra", [])]  # type: ignore[misc]
    return make_server(tmp, extra=extra, **kw).start()  # type: ignore[arg-type]


def client(srv: PostierServer, source: str, host: str = "127.0.0.1") -> smtplib.SMTP:
    smtp = smtplib.SMTP(timeout=30, source_address=(source, 0))
    smtp.connect(host, srv.mx_port)
    smtp.ehlo("client.remote.test")
    return smtp


def rcpt_codes(smtp: smtplib.SMTP, sender: str, rcpts: list[str]) -> list[tuple[int, bytes]]:
    code, _ = smtp.mail(sender)
    assert code == 250
    return [smtp.rcpt(r) for r in rcpts]


# ---- DNSBL --------------------------------------------------------------------------------
DNSBL_TOML = """
dnsbl = ["bl.test*2", "weak.test", "weak2.test"]
dnsbl_threshold = 2
exempt_networks = []
"""


@pytest.fixture(scope="module")
def dnsbl_server(
    tmp_path_factory: pytest.TempPathFactory, dns: DnsServer
) -> Iterator[PostierServer]:
    srv = serve(tmp_path_factory.mktemp("dnsbl"), dns, DNSBL_TOML)
    try:
        yield srv
    finally:
        srv.stop()


def test_listed_client_refused_at_rcpt_but_postmaster_accepted(dnsbl_server: PostierServer) -> None:
    with client(dnsbl_server, "127.0.0.2") as smtp:
        (code, text), (pm_code, _), (unknown, unknown_text) = rcpt_codes(
            smtp,
            "a@remote.test",
            ["alice@example.org", "postmaster@example.org", "nobody@example.org"],
        )
        assert (
            code == 554 and text.startswith(b"5.7.1") and b"Listed: see https://bl.test/q" in text
        )
        assert pm_code == 250
        assert (unknown, unknown_text) == (code, text)  # no hint which users exist
        code, _ = smtp.data(MSG)
        assert code == 250
    assert dnsbl_server.logged("event=dnsbl-listed")


def test_error_code_answer_is_ignored(dnsbl_server: PostierServer) -> None:
    with client(dnsbl_server, "127.0.0.3") as smtp:
        assert rcpt_codes(smtp, "a@remote.test", ["alice@example.org"])[0][0] == 250
    assert dnsbl_server.logged("event=dnsbl-odd-answer")


def test_timeout_lets_the_client_through_with_a_log_line(dnsbl_server: PostierServer) -> None:
    with client(dnsbl_server, "127.0.0.4") as smtp:
        assert rcpt_codes(smtp, "a@remote.test", ["alice@example.org"])[0][0] == 250
    log = dnsbl_server.log()
    assert "event=dnsbl-error" in log and "ip=127.0.0.4" in log


def test_weighted_threshold(dnsbl_server: PostierServer) -> None:
    with client(dnsbl_server, "127.0.0.5") as smtp:  # one weak list: 1 < 2
        assert rcpt_codes(smtp, "a@remote.test", ["alice@example.org"])[0][0] == 250
    with client(dnsbl_server, "127.0.0.6") as smtp:  # two weak lists: 2
        assert rcpt_codes(smtp, "a@remote.test", ["alice@example.org"])[0][0] == 554


def test_unlisted_client_delivers(dnsbl_server: PostierServer) -> None:
    with client(dnsbl_server, "127.0.0.7") as smtp:
        smtp.sendmail("a@remote.test", ["bob@example.org"], MSG)
    assert dnsbl_server.maildir_files("bob")


def test_listed_ipv6_client_in_nibble_format(tmp_path: Path, dns: DnsServer) -> None:
    srv = serve(tmp_path / "v6", dns, DNSBL_TOML, mx_host="::1")
    try:
        with client(srv, "::1", host="::1") as smtp:
            (code, text), (pm_code, _) = rcpt_codes(
                smtp, "a@remote.test", ["alice@example.org", "postmaster@example.org"]
            )
            assert code == 554 and b"IPv6 listed" in text
            assert pm_code == 250
    finally:
        srv.stop()


def test_exempt_client_is_never_looked_up(tmp_path: Path, dns: DnsServer) -> None:
    srv = serve(
        tmp_path / "ex",
        dns,
        DNSBL_TOML.replace("exempt_networks = []", 'exempt_networks = ["127.0.0.2"]'),
    )
    try:
        with client(srv, "127.0.0.2") as smtp:
            assert rcpt_codes(smtp, "a@remote.test", ["alice@example.org"])[0][0] == 250
    finally:
        srv.stop()


# ---- greylisting --------------------------------------------------------------------------
GREY_TOML = """
greylist = true
greylist_delay = 300
greylist_expire = 86400
greylist_allow_domains = ["spf.test", "nospf.test"]
exempt_networks = []
"""


def advance(clock: Path, seconds: float) -> None:
    clock.write_text(str(float(clock.read_text()) + seconds))


def attempt(
    srv: PostierServer, source: str, sender: str, rcpt: str = "alice@example.org"
) -> tuple[int, bytes]:
    with client(srv, source) as smtp:
        result = rcpt_codes(smtp, sender, [rcpt])[0]
        if result[0] == 250:
            assert smtp.data(MSG)[0] == 250
        return result


def test_greylist_first_early_window_and_no_leak(
    tmp_path: Path, dns: DnsServer, clock: Path
) -> None:
    srv = serve(tmp_path / "g", dns, GREY_TOML)
    try:
        first = attempt(srv, "127.0.1.2", "a@remote.test")
        assert first[0] == 451 and first[1].startswith(b"4.7.1")
        # An unknown recipient gets the very same reply: nothing tells which users exist.
        assert attempt(srv, "127.0.1.2", "a@remote.test", "nobody@example.org") == first
        advance(clock, 100)
        assert attempt(srv, "127.0.1.2", "a@remote.test")[0] == 451  # too early
        advance(clock, 250)
        assert attempt(srv, "127.0.1.2", "a@remote.test")[0] == 250  # in the window
        assert srv.maildir_files("alice")
        # The network passed: another sender from another address of its /24 passes at once.
        assert attempt(srv, "127.0.1.9", "b@elsewhere.test", "bob@example.org")[0] == 250
        # Past the pass, an unknown recipient gets the policy's 550.
        assert attempt(srv, "127.0.1.2", "a@remote.test", "nobody@example.org")[0] == 550
        assert srv.logged("event=greylisted")
    finally:
        srv.stop()


def test_greylist_pass_survives_a_restart(tmp_path: Path, dns: DnsServer, clock: Path) -> None:
    srv = serve(tmp_path / "r", dns, GREY_TOML)
    try:
        assert attempt(srv, "127.0.2.2", "a@remote.test")[0] == 451
        srv.stop()
        srv.start()
        advance(clock, 301)
        assert attempt(srv, "127.0.2.2", "a@remote.test")[0] == 250
        srv.stop()
        srv.start()
        assert attempt(srv, "127.0.2.3", "c@remote.test")[0] == 250  # the network is known
    finally:
        srv.stop()


def test_greylist_state_is_shared_by_two_workers(
    tmp_path: Path, dns: DnsServer, clock: Path
) -> None:
    srv = serve(tmp_path / "w", dns, GREY_TOML, extra=["--workers", "2"])
    try:
        assert attempt(srv, "127.0.3.2", "a@remote.test")[0] == 451
        advance(clock, 301)
        assert attempt(srv, "127.0.3.2", "a@remote.test")[0] == 250
        # Whichever worker takes each connection, all know the network passed.
        for n in range(8):
            assert attempt(srv, "127.0.3.3", f"s{n}@remote.test")[0] == 250
        assert attempt(srv, "127.0.4.2", "a@remote.test")[0] == 451  # another network does not
    finally:
        srv.stop()


def test_greylist_allow_list_needs_spf_pass(tmp_path: Path, dns: DnsServer, clock: Path) -> None:
    srv = serve(tmp_path / "a", dns, GREY_TOML)
    try:
        assert attempt(srv, "127.0.5.2", "news@spf.test")[0] == 250  # listed and SPF pass
        assert attempt(srv, "127.0.6.2", "news@nospf.test")[0] == 451  # listed, SPF fail
        assert attempt(srv, "127.0.7.2", "news@other.test")[0] == 451  # not listed
    finally:
        srv.stop()


# ---- rate limits --------------------------------------------------------------------------
RATE_TOML = """
client_connections_per_minute = 3
client_messages_per_minute = 2
client_recipients_per_minute = 4
exempt_networks = ["127.0.0.9"]
"""


def test_connections_exactly_n_then_421_and_reset(
    tmp_path: Path, dns: DnsServer, clock: Path
) -> None:
    metrics_port = free_port()
    srv = serve(tmp_path / "c", dns, RATE_TOML, extra=["--metrics", f"127.0.0.1:{metrics_port}"])
    try:
        for _ in range(3):
            client(srv, "127.0.8.2").quit()
        smtp = smtplib.SMTP(timeout=30, source_address=("127.0.8.2", 0))
        code, text = smtp.connect("127.0.0.1", srv.mx_port)
        smtp.close()
        assert code == 421 and text.startswith(b"4.7.0")
        client(srv, "127.0.8.3").quit()  # another address has its own allowance
        for _ in range(10):
            client(srv, "127.0.0.9").quit()  # exempt
        advance(clock, 60)
        client(srv, "127.0.8.2").quit()
        assert srv.logged("event=client-rate-limited")
        url = f"http://127.0.0.1:{metrics_port}/metrics"
        scrape = urllib.request.urlopen(url, timeout=30).read().decode()
        assert 'postier_client_rate_limited_total{kind="connections"} 1.0' in scrape
    finally:
        srv.stop()


def test_messages_and_recipients_exactly_n_then_450(
    tmp_path: Path, dns: DnsServer, clock: Path
) -> None:
    srv = serve(tmp_path / "m", dns, RATE_TOML)
    try:
        with client(srv, "127.0.9.2") as smtp:
            for _ in range(2):
                smtp.sendmail("a@remote.test", ["alice@example.org"], MSG)
            code, text = smtp.mail("a@remote.test")
            assert code == 450 and text.startswith(b"4.7.1")
        with client(srv, "127.0.9.3") as smtp:
            codes = rcpt_codes(
                smtp,
                "a@remote.test",
                [f"{u}@example.org" for u in ("alice", "bob", "carol", "alice", "bob")],
            )
            assert [c for c, _ in codes] == [250, 250, 250, 250, 450]
            assert codes[4][1].startswith(b"4.7.1")
            smtp.rset()
            advance(clock, 15)  # one recipient's worth of allowance comes back
            assert (
                rcpt_codes(smtp, "a@remote.test", ["alice@example.org", "bob@example.org"])[0][0]
                == 250
            )
            assert smtp.rcpt("carol@example.org")[0] == 450
    finally:
        srv.stop()
