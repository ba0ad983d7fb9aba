"""Transport routes: the table's syntax and matching, and each kind through the whole daemon.

Real parts: `postier serve` as a subprocess, the loopback DNS responder, Postfix's smtp-sink
(SMTP and, with -L, LMTP) as next hops, smtplib as the client.
"""

from __future__ import annotations

import smtplib
from pathlib import Path

import pytest

from postier.config import build
from postier.errors import ConfigError
from postier.outbound.routes import Route, RouteTable, parse_routes_table
from tests.dnsserver import DnsServer
from tests.server import PostierServer, make_server, wait_until
from tests.sinks import SmtpSink, have

# ---- syntax and matching -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "route"),
    [
        ("smtp:[10.0.0.5]:2525", Route("smtp", host="10.0.0.5", port=2525, mx=False)),
        ("smtp:[relay.example]", Route("smtp", host="relay.example", mx=False)),
        ("smtp:Relay.Example:587", Route("smtp", host="relay.example", port=587, mx=True)),
        ("smtp:[::1]:25", Route("smtp", host="::1", port=25, mx=False)),
        ("lmtp:/run/dovecot/lmtp", Route("lmtp", target="/run/dovecot/lmtp")),
        ("lmtp:127.0.0.1:24", Route("lmtp", target="127.0.0.1:24")),
        ("error:5.1.2 moved", Route("error", enhanced="5.1.2", text="moved")),
        ("error:4.3.0 come back later", Route("error", enhanced="4.3.0", text="come back later")),
    ],
)
def test_route_syntax(spec: str, route: Route) -> None:
    assert Route.parse(spec) == route
    assert Route.parse(str(route)) == route  # what check-config prints reads back


@pytest.mark.parametrize(
    "spec", ["smtp:", "smtp:host:99999", "lmtp:", "error:moved", "error:2.0.0 ok", "uucp:x", "x"]
)
def test_bad_routes_are_refused(spec: str) -> None:
    with pytest.raises(ValueError):
        Route.parse(spec)


def test_error_route_codes() -> None:
    assert (Route.parse("error:5.1.2 moved").code, Route.parse("error:4.3.0 x").code) == (550, 450)


def test_exact_then_most_specific_subdomain() -> None:
    table = RouteTable(
        parse_routes_table(
            {
                "example.org": "smtp:[10.0.0.1]",
                ".example.org": "smtp:[10.0.0.2]",
                ".lists.example.org": "lmtp:/run/lmtp",
            },
            "routes",
        )
    )
    host = lambda d: (r := table.lookup(d)) and (r.host or r.target)  # noqa: E731
    assert host("example.org") == "10.0.0.1"
    assert host("EXAMPLE.ORG.") == "10.0.0.1"
    assert host("a.example.org") == "10.0.0.2"
    assert host("a.b.example.org") == "10.0.0.2"
    assert host("lists.example.org") == "10.0.0.2"
    assert host("x.lists.example.org") == "/run/lmtp"
    assert table.lookup("notexample.org") is None
    assert table.lookup("org") is None


def test_routes_in_toml(tmp_path: Path) -> None:
    from postier.config import load_toml

    conf = tmp_path / "postier.toml"
    conf.write_text(
        'routes = { "example.net" = "smtp:[10.0.0.5]:25", ".x.test" = "error:5.1.2 gone" }\n'
    )
    cfg = build(load_toml(conf), {})
    assert dict(cfg.routes) == {"example.net": "smtp:[10.0.0.5]:25", ".x.test": "error:5.1.2 gone"}
    conf.write_text('[routes]\n"example.net" = "smtp:[10.0.0.5]:25"\n')
    assert dict(build(load_toml(conf), {}).routes) == {"example.net": "smtp:[10.0.0.5]:25"}
    conf.write_text('routes = { "example.net" = "pigeon:roof" }\n')
    with pytest.raises(ConfigError, match=r"example\.net.*pigeon"):
        load_toml(conf)


# ---- through the daemon --------------------------------------------------------------------

needs_sink = pytest.mark.skipif(not have("/usr/sbin/smtp-sink"), reason="postfix not installed")


def routed_server(
    root: Path, dns: DnsServer, routes: dict[str, str], remote_port: int
) -> PostierServer:
    table = ", ".join(f'"{k}" = "{v}"' for k, v in routes.items())
    root.mkdir(parents=True, exist_ok=True)
    (root / "postier.toml").write_text(f"routes = {{ {table} }}\n")
    return make_server(
        root,
        domains=("example.org", "lmtp.example.org"),
        users="alice@example.org\nbob@lmtp.example.org\n",
        extra=[
            "-c", str(root / "postier.toml"),
            "--dns-server", f"127.0.0.1:{dns.port}",
            "--remote-port", str(remote_port),
        ],
    )  # fmt: skip


def send(
    srv: PostierServer, rcpts: list[str], body: str, sender: str = "alice@example.org"
) -> None:
    with smtplib.SMTP("127.0.0.1", srv.local_port, timeout=30) as s:
        s.sendmail(sender, rcpts, f"Subject: {body}\r\n\r\n{body}\r\n")


@needs_sink
def test_each_kind_of_route(pub: Path) -> None:
    """smtp:[host]:port (no MX look-up), smtp:host (its MX), .subdomain, lmtp:, error:."""
    with (
        SmtpSink(pub / "fixed") as fixed,
        SmtpSink(pub / "viamx") as viamx,
        SmtpSink(pub / "lmtp", options=("-L",)) as lmtp,
    ):
        zone = {
            # The routed domains' own MX records point nowhere useful: a route wins.
            "fixed.test": {"MX": [(10, "nowhere.test")]},
            "relayhost.test": {"MX": [(10, "mx.relayhost.test")]},
            "mx.relayhost.test": {"A": ["127.0.0.1"]},
        }
        with DnsServer(zone) as dns:
            routes = {
                "fixed.test": f"smtp:[127.0.0.1]:{fixed.port}",
                ".sub.test": "smtp:relayhost.test",
                "lmtp.example.org": f"lmtp:127.0.0.1:{lmtp.port}",
                "old.test": "error:5.1.2 moved to new.test",
            }
            srv = routed_server(pub / "srv", dns, routes, viamx.port).start()
            try:
                send(srv, ["x@fixed.test"], "to-fixed")
                send(srv, ["y@deep.sub.test"], "to-sub")
                send(srv, ["bob@lmtp.example.org"], "to-lmtp")
                send(srv, ["z@old.test"], "to-error")
                assert wait_until(lambda: fixed.messages() and viamx.messages())
                assert b"to-fixed" in fixed.messages()[0]
                assert b"to-sub" in viamx.messages()[0]
                # The local domain's mail went over LMTP at once, not into a Maildir.
                assert b"to-lmtp" in lmtp.messages()[0]
                assert b"X-Client-Proto: LMTP" in lmtp.messages()[0]
                assert not srv.maildir_files("bob")
                # fixed.test's MX was never asked: [host] means no MX look-up.
                assert ("fixed.test", "MX") not in dns.queries
                assert ("relayhost.test", "MX") in dns.queries
                # The error route bounced to the sender with its status.
                assert wait_until(lambda: srv.maildir_files("alice"))
                bounce = srv.maildir_files("alice")[0].read_bytes()
                assert b"5.1.2" in bounce and b"moved to new.test" in bounce
            finally:
                srv.stop()
            assert srv.logged("backend=error")
