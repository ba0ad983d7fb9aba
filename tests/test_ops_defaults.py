"""Defaults that use the machine: workers per core, loopback exempt from the per-IP cap.

The seeds' acceptance test opens 100 parallel clients from one machine; with the default cap
of 50 per address the 51st used to get 421. Clients in `exempt_networks` skip that cap (as
Postfix exempts `$mynetworks`); with the list emptied, the cap applies to them again.
"""

from __future__ import annotations

import smtplib
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from postier.config import auto_workers, build, load_toml
from postier.errors import ConfigError
from postier.net.limits import ConnectionTracker
from postier.netaddr import parse_networks
from tests.server import PostierServer, make_server

CLIENTS = 100


def test_workers_default_to_one_per_core() -> None:
    assert build({}, {}).workers == auto_workers() >= 1
    assert build({}, {"workers": "auto"}).workers == auto_workers()
    assert build({}, {"workers": "3"}).workers == 3
    with pytest.raises(ConfigError, match="workers"):
        build({}, {"workers": "0"})


def test_exempt_networks_default_to_loopback_and_are_validated(tmp_path: Path) -> None:
    assert build({}, {}).exempt_networks == ("127.0.0.0/8", "::1/128")
    conf = tmp_path / "postier.toml"
    conf.write_text("exempt_networks = []\n")
    assert build(load_toml(conf), {}).exempt_networks == ()
    conf.write_text('exempt_networks = ["10.0.0.0/33"]\n')
    with pytest.raises(ConfigError, match=r"exempt_networks.*not a network"):
        load_toml(conf)


def test_check_config_names_a_bad_network(tmp_path: Path) -> None:
    conf = tmp_path / "postier.toml"
    conf.write_text('exempt_networks = ["loopback"]\n')
    proc = subprocess.run(
        [sys.executable, "-m", "postier", "check-config", "-c", str(conf)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "exempt_networks" in proc.stderr and "'loopback'" in proc.stderr


def test_tracker_exempts_only_the_listed_networks() -> None:
    tracker = ConnectionTracker(10, 1, parse_networks(["127.0.0.0/8", "::1/128"], "test"))
    assert tracker.admit("127.0.0.1") is None
    assert tracker.admit("127.0.0.1") is None  # over the per-IP cap, but exempt
    assert tracker.admit("::ffff:127.0.0.1") is None  # IPv4-mapped loopback
    assert tracker.admit("192.0.2.1") is None
    refused = tracker.admit("192.0.2.1")
    assert refused is not None and refused.code == 421
    for ip in ("127.0.0.1", "127.0.0.1", "::ffff:127.0.0.1", "192.0.2.1"):
        tracker.release(ip)
    assert tracker.total == 0 and tracker.per_ip == {}


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[list[PostierServer]]:
    started: list[PostierServer] = []
    yield started
    for srv in started:
        srv.stop()


def _open_clients(srv: PostierServer) -> tuple[list[smtplib.SMTP], list[str]]:
    """Open CLIENTS sessions at once (each reads its greeting and stays open)."""
    clients: list[smtplib.SMTP] = []
    refused: list[str] = []
    for _ in range(CLIENTS):
        try:
            clients.append(smtplib.SMTP("127.0.0.1", srv.mx_port, timeout=30))
        except smtplib.SMTPConnectError as exc:
            refused.append(f"{exc.smtp_code} {exc.smtp_error!r}")
    return clients, refused


def test_100_parallel_loopback_clients_all_get_250_with_defaults(
    tmp_path: Path, servers: list[PostierServer]
) -> None:
    srv = make_server(tmp_path / "srv", extra=["--workers", "auto"])
    servers.append(srv.start())
    clients, refused = _open_clients(srv)
    try:
        assert refused == []
        for i, client in enumerate(clients):
            body = f"Subject: {i}\r\n\r\nmessage {i}\r\n"
            assert client.sendmail("sender@example.net", ["alice@example.org"], body) == {}
    finally:
        for client in clients:
            client.close()
    assert len(srv.maildir_files("alice")) == CLIENTS


def test_with_no_exempt_networks_loopback_clients_hit_the_per_ip_cap(
    tmp_path: Path, servers: list[PostierServer]
) -> None:
    conf = tmp_path / "postier.toml"
    conf.write_text("exempt_networks = []\n")
    srv = make_server(tmp_path / "srv", extra=["--workers", "auto", "-c", str(conf)])
    servers.append(srv.start())
    clients, refused = _open_clients(srv)
    for client in clients:
        client.close()
    assert refused, "no client was refused"
    assert all(r.startswith("421 ") and "4.7.0" in r for r in refused), refused
    assert len(clients) <= 50  # the default cap of 50 per address, split among the workers
