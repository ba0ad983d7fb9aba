"""Outbound address control: `--outbound-family` and `--outbound-bind`.

The receiving side is smtp-sink listening on 127.0.0.1 and ::1 on one port, behind a
dual-stack MX name from the loopback DNS responder; its dump headers (`X-Client-Addr`) are
the receiving server's record of where each connection came from.
"""

from __future__ import annotations

import smtplib
from pathlib import Path

import pytest

from postier.config import build
from postier.errors import ConfigError, DeliveryError
from postier.outbound.source import OutboundSource, parse_binds, sending_addresses
from tests.dnsserver import DnsServer
from tests.server import free_port, make_server, wait_until
from tests.sinks import SmtpSink, have


def test_family_filters_addresses_in_order() -> None:
    both = ["::1", "127.0.0.1", "2001:db8::5", "192.0.2.7"]
    assert OutboundSource("ipv4").usable("mx", both) == ["127.0.0.1", "192.0.2.7"]
    assert OutboundSource("ipv6").usable("mx", both) == ["::1", "2001:db8::5"]
    assert OutboundSource().usable("mx", both) == both
    with pytest.raises(DeliveryError) as none_left:
        OutboundSource("ipv4").usable("v6only.test", ["::1"])
    assert not none_left.value.permanent and none_left.value.enhanced == "4.4.4"


def test_bind_per_family() -> None:
    source = OutboundSource("both", parse_binds(["127.0.0.2", "[::1]"], "both", "x"))
    assert source.local_addr("192.0.2.1") == ("127.0.0.2", 0)
    assert source.local_addr("2001:db8::1") == ("::1", 0)
    assert OutboundSource("both", ("127.0.0.2",)).local_addr("2001:db8::1") is None


@pytest.mark.parametrize(
    ("family", "binds", "problem"),
    [
        ("ipv5", [], "not one of"),
        ("both", ["host.example"], "not an IP address"),
        ("both", ["127.0.0.2", "127.0.0.3"], "two IPv4"),
        ("ipv4", ["::1"], "IPv6 but outbound_family is ipv4"),
    ],
)
def test_bad_settings_exit_with_a_line(family: str, binds: list[str], problem: str) -> None:
    with pytest.raises(ConfigError, match=problem):
        build({}, {"outbound_family": family, "outbound_bind": binds})


def test_doctor_checks_ptr_of_the_sending_addresses_only() -> None:
    ours = ["192.0.2.10", "2001:db8::10"]
    assert sending_addresses("both", [], ours) == ours
    assert sending_addresses("ipv4", [], ours) == ["192.0.2.10"]
    assert sending_addresses("both", ["192.0.2.99"], ours) == ["192.0.2.99", "2001:db8::10"]


# ---- through the daemon --------------------------------------------------------------------


@pytest.mark.skipif(not have("/usr/sbin/smtp-sink"), reason="postfix not installed")
@pytest.mark.parametrize(
    ("flags", "expect_v6", "client"),
    [
        ([], True, b"ipv6:::1"),  # both: IPv6 first, as the MX's AAAA comes first
        (["--outbound-family", "ipv4", "--outbound-bind", "127.0.0.2"], False, b"127.0.0.2"),
        (["--outbound-family", "ipv6", "--outbound-bind", "::1"], True, b"ipv6:::1"),
    ],
)
def test_dual_stack_mx_reached_over_the_chosen_family_from_the_bound_address(
    pub: Path, flags: list[str], expect_v6: bool, client: bytes
) -> None:
    port = free_port()
    zone = {
        "dual.test": {"MX": [(10, "mx.dual.test")]},
        "mx.dual.test": {"A": ["127.0.0.1"], "AAAA": ["::1"]},
    }
    with (
        DnsServer(zone) as dns,
        SmtpSink(pub / "v4", port=port) as v4,
        SmtpSink(pub / "v6", host="::1", port=port) as v6,
    ):
        srv = make_server(
            pub / "srv",
            extra=["--dns-server", f"127.0.0.1:{dns.port}", "--remote-port", str(port), *flags],
        ).start()
        try:
            with smtplib.SMTP("127.0.0.1", srv.local_port, timeout=30) as s:
                s.sendmail("alice@example.org", ["x@dual.test"], "Subject: fam\r\n\r\nfam\r\n")
            assert wait_until(lambda: v4.messages() or v6.messages())
            got, other = (v6, v4) if expect_v6 else (v4, v6)
            assert other.messages() == []
            assert f"X-Client-Addr: {client.decode()}".encode() in got.messages()[0]
        finally:
            srv.stop()
