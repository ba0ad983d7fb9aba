"""The rspamd client against Debian's real rspamd on loopback (private config, no Redis)."""

from __future__ import annotations

import asyncio
import resource
from collections.abc import Iterator
from pathlib import Path

import pytest

from postier.checks.rspamd_client import (
    RspamdClient,
    RspamdUnavailable,
    RspamdVerdict,
    ScanEnvelope,
)
from tests.dnsserver import DnsServer
from tests.rspamd import Rspamd, rspamd_available
from tests.server import free_port

pytestmark = pytest.mark.skipif(not rspamd_available(), reason="rspamd is not installed")

ENV = ScanEnvelope(
    ip="192.0.2.10",
    helo="mail.remote.example",
    sender="someone@remote.example",
    recipients=["alice@example.org", "bob@example.org"],
    hostname="mx.example.org",
    queue_id="TESTQID",
)


@pytest.fixture(scope="module")
def rspamd() -> Iterator[Rspamd]:
    with DnsServer({}) as dns:
        server = Rspamd(dns.port).start()
        try:
            yield server
        finally:
            server.stop()


def spool(tmp_path: Path, subject: str, body: bytes = b"Hello.\n") -> tuple[Path, int]:
    """A message in postier's spool format: Return-Path first, LF endings."""
    path = tmp_path / "m.spool"
    head = b"Return-Path: <someone@remote.example>\n"
    msg = (
        b"Received: from mail.remote.example ([192.0.2.10]) by mx.example.org\n"
        b"From: Someone <someone@remote.example>\nTo: alice@example.org\n"
        b"Subject: " + subject.encode() + b"\nMessage-ID: <1@remote.example>\n"
        b"Date: Wed, 02 Dec 2026 07:00:00 +0000\n\n" + body
    )
    path.write_bytes(head + msg)
    return path, len(head)


async def scan(client: RspamdClient, path: Path, offset: int) -> RspamdVerdict:
    try:
        return await client.check(path, offset, ENV)
    finally:
        await client.close()


@pytest.mark.parametrize(
    ("marker", "action"),
    [
        ("XREJECTX", "reject"),
        ("XSOFTX", "soft reject"),
        ("XSPAMX", "add header"),
        ("XREWRITEX", "rewrite subject"),
        ("plain", "no action"),
    ],
)
def test_actions(rspamd: Rspamd, tmp_path: Path, marker: str, action: str) -> None:
    path, offset = spool(tmp_path, f"hello {marker}")
    verdict = asyncio.run(scan(RspamdClient(rspamd.url, timeout=20), path, offset))
    assert verdict.action == action
    if action == "reject":
        assert "test marker" in verdict.message
    if action == "rewrite subject":
        assert verdict.subject == "***SPAM*** hello XREWRITEX"


def test_repeated_scans_on_rspamd_that_closes(rspamd: Rspamd, tmp_path: Path) -> None:
    """rspamd 3.4 answers `Connection: close`: every scan still works, nothing is pooled."""
    path, offset = spool(tmp_path, "hello")

    async def three() -> list[str]:
        client = RspamdClient(rspamd.url, timeout=20)
        try:
            out = [(await client.check(path, offset, ENV)).action for _ in range(3)]
            assert client._idle == []
            return out
        finally:
            await client.close()

    assert asyncio.run(three()) == ["no action"] * 3


def test_keepalive_reuses_one_connection(tmp_path: Path) -> None:
    """Against an HTTP/1.1 peer that keeps connections open (newer rspamd does), three scans
    use one connection; when the peer drops the idle connection, the next scan reconnects."""
    path, offset = spool(tmp_path, "hello")
    answer = b'{"action": "no action", "score": 0.5, "required_score": 15}'
    connections = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(writer)
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
            await reader.readexactly(length)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(answer), answer))
            await writer.drain()

    async def go() -> None:
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        client = RspamdClient(f"http://127.0.0.1:{port}", timeout=5)
        try:
            for _ in range(3):
                assert (await client.check(path, offset, ENV)).score == 0.5
            assert len(connections) == 1
            connections[0].close()
            await asyncio.sleep(0.1)
            assert (await client.check(path, offset, ENV)).action == "no action"
            assert len(connections) == 2
        finally:
            await client.close()
            server.close()

    asyncio.run(go())


def test_stopped_rspamd_is_unavailable(tmp_path: Path) -> None:
    path, offset = spool(tmp_path, "hello")
    client = RspamdClient(f"http://127.0.0.1:{free_port()}", timeout=5)
    with pytest.raises(RspamdUnavailable):
        asyncio.run(scan(client, path, offset))


def test_silent_server_times_out(tmp_path: Path) -> None:
    path, offset = spool(tmp_path, "hello")

    async def go() -> None:
        server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            with pytest.raises(RspamdUnavailable):
                await RspamdClient(f"http://127.0.0.1:{port}", timeout=1).check(path, offset, ENV)
        finally:
            server.close()

    asyncio.run(go())


def test_large_message_streams_with_flat_memory(rspamd: Rspamd, tmp_path: Path) -> None:
    """20 MB goes to rspamd piece by piece: our peak RSS grows far less than the message."""
    line = b"x" * 76 + b"\n"
    path, offset = spool(tmp_path, "big", body=line * (20 * 1024 * 1024 // len(line)))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    verdict = asyncio.run(scan(RspamdClient(rspamd.url, timeout=120), path, offset))
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert verdict.action in ("no action", "add header", "greylist", "soft reject", "reject")
    assert grown_kib < 8 * 1024


def test_verdict_parsing_is_defensive() -> None:
    v = RspamdVerdict.from_json(
        {
            "action": "add header",
            "score": 7.5,
            "required_score": 15,
            "milter": {
                "add_headers": {
                    "X-Spam-Status": {"value": "Yes, score=7.5", "order": 1},
                    "X-Bad\nName": "x",
                    "X-Evil": "a\r\nInjected: yes",
                },
                "remove_headers": {"X-Spam": 0},
            },
        }
    )
    assert v.add_headers == (("X-Spam-Status", "Yes, score=7.5"),)
    assert v.remove_headers == ("X-Spam",)
    for bad in (None, [], {"score": 1}, {"action": 3}):
        with pytest.raises(ValueError):
            RspamdVerdict.from_json(bad)
