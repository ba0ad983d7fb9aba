"""The SMTP client: sans-I/O helpers, then the relay against real servers on loopback.

Peers: Postfix's smtp-sink (4xx/5xx on demand), a private Postfix (STARTTLS, per-recipient
access table, Maildir delivery), a recording proxy (the exact bytes we sent) and, only for
paths no real server takes on demand (a broken TLS handshake, STARTTLS injection, a server
without EHLO, AUTH LOGIN), a small scripted server. DNS is our loopback responder.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from postier.delivery.base import Recipient, RecipientResult, Status, StoredMessage
from postier.delivery.smtp import Smarthost, SmtpRelay, Timeouts
from postier.dns import Resolver
from postier.protocol import client as proto
from postier.protocol.client import BodyEncoder, Capabilities, ClientProtocolError, ReplyParser
from postier.protocol.replies import Reply
from tests.dnsserver import DnsServer
from tests.sinks import (
    PrivatePostfix,
    RecordingProxy,
    SmtpSink,
    free_port,
    make_cert,
    public_tmpdir,
)

# --- sans-I/O: replies, capabilities, commands, body ---------------------------------------


def test_reply_parser_single_multi_and_split_feeds() -> None:
    p = ReplyParser()
    assert p.feed(b"250 2.1.0 Ok\r\n") == [Reply(250, "2.1.0", "Ok")]
    data = b"250-mx.test hello\r\n250-PIPELINING\r\n250 SIZE 1000\r\n554 5.7.1 no\r\n"
    out = [r for byte in data for r in p.feed(bytes([byte]))]  # one byte at a time
    assert out == [
        Reply(250, None, ("mx.test hello", "PIPELINING", "SIZE 1000")),
        Reply(554, "5.7.1", "no"),
    ]
    assert p.pending == 0
    assert p.feed(b"220 ready\n") == [Reply(220, None, "ready")]  # bare LF tolerated
    assert p.feed(b"550-5.1.1 first\r\n550 5.1.1 second\r\n") == [
        Reply(550, "5.1.1", ("first", "second"))
    ]
    assert p.feed(b"250 5.1.1 not enhanced: class differs\r\n")[0].enhanced is None
    assert p.feed(b"250\r\n") == [Reply(250, None, "")]


@pytest.mark.parametrize(
    "bad",
    [b"hello\r\n", b"25 x\r\n", b"250x\r\n", b"099 x\r\n", b"250-a\r\n251 b\r\n", b"2" * 3000],
)
def test_reply_parser_rejects(bad: bytes) -> None:
    with pytest.raises(ClientProtocolError):
        ReplyParser().feed(bad)


def test_reply_parser_limits_lines() -> None:
    with pytest.raises(ClientProtocolError):
        ReplyParser(max_lines=5).feed(b"250-x\r\n" * 6)


def test_capabilities() -> None:
    reply = ReplyParser().feed(
        b"250-mx hi\r\n250-pipelining\r\n250-SIZE 35882577\r\n"
        b"250-AUTH PLAIN login\r\n250-AUTH=CRAM-MD5\r\n250-STARTTLS\r\n"
        b"250 \r\n"
    )[0]
    caps = Capabilities.parse(reply)
    assert "PIPELINING" in caps and "starttls" in caps and "SMTPUTF8" not in caps
    assert caps.size == 35882577
    assert caps.auth == {"PLAIN", "LOGIN", "CRAM-MD5"}
    bare = Capabilities.parse(Reply(250, None, ("mx", "SIZE")))
    assert bare.size == 0 and Capabilities().size is None


def test_commands() -> None:
    assert proto.mail_from("") == b"MAIL FROM:<>\r\n"
    assert (
        proto.mail_from("a@b", {"SIZE": "10", "SMTPUTF8": None})
        == b"MAIL FROM:<a@b> SIZE=10 SMTPUTF8\r\n"
    )
    assert proto.rcpt_to("jos\u00e9@b") == "RCPT TO:<jos\u00e9@b>\r\n".encode()
    for evil in ("a@b>\r\nRCPT TO:<c@d", "a@b\n", "x\ry"):
        with pytest.raises(ValueError):
            proto.rcpt_to(evil)
    plain = proto.auth_plain("user", "pw").split()[2]
    assert base64.b64decode(plain) == b"\0user\0pw"
    assert proto.auth_login_steps("u", "p")[1] == base64.b64encode(b"u") + b"\r\n"


def test_body_encoder_examples() -> None:
    enc = proto.encode_body
    assert enc(b"") == b".\r\n"
    assert enc(b"a\nb\n") == b"a\r\nb\r\n.\r\n"
    assert enc(b"no newline at end") == b"no newline at end\r\n.\r\n"
    assert enc(b".\n..x\n.") == b"..\r\n...x\r\n..\r\n.\r\n"
    assert enc(b"lone\rcr\r\nboth\n\rlast\r") == b"lone\r\ncr\r\nboth\r\n\r\nlast\r\n.\r\n"
    e = BodyEncoder()  # CR and LF split over two chunks stay one line end
    assert e.feed(b"a\r") + e.feed(b"\n.b") + e.finish() == b"a\r\n..b\r\n.\r\n"


def _unstuff_and_check(wire: bytes) -> bytes:
    """Undo the encoding, asserting the wire rules on the way."""
    assert wire.endswith(b"\r\n.\r\n") or wire == b".\r\n"
    assert wire.count(b"\r") == wire.count(b"\r\n") == wire.count(b"\n")  # no bare CR or LF
    lines = wire[:-3].split(b"\r\n")[:-1] if wire != b".\r\n" else []
    for line in lines:
        assert line != b"."  # the end marker can only be the last line
    return b"".join((line[1:] if line.startswith(b".") else line) + b"\n" for line in lines)


@given(st.binary(max_size=300), st.lists(st.integers(0, 300), max_size=6))
def test_body_encoder_never_emits_bare_cr_or_lf(content: bytes, cuts: list[int]) -> None:
    points = sorted({min(c, len(content)) for c in cuts})
    enc = BodyEncoder()
    wire, start = b"", 0
    for point in [*points, len(content)]:
        wire += enc.feed(content[start:point])
        start = point
    wire += enc.finish()
    assert wire == proto.encode_body(content)  # chunking never changes the result
    assert enc.bytes_out == len(wire)
    normal = content.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
    if normal and not normal.endswith(b"\n"):
        normal += b"\n"
    assert _unstuff_and_check(wire) == normal


# --- fixtures for the relay ---------------------------------------------------------------

ZONE = {
    "pref.test": {"MX": [(20, "never.pref.test"), (5, "down.pref.test"), (10, "up.pref.test")]},
    "down.pref.test": {"A": ["127.0.0.2"]},  # nothing listens there: refused
    "up.pref.test": {"A": ["127.0.0.1"]},
    "never.pref.test": {"A": ["127.0.0.3"]},
    "busy.test": {"MX": [(10, "greet421.busy.test"), (20, "ok.busy.test")]},
    "greet421.busy.test": {"A": ["127.0.0.2"]},
    "ok.busy.test": {"A": ["127.0.0.1"]},
    "afallback.test": {"A": ["127.0.0.1"]},
    "v6.test": {"AAAA": ["::1"]},
    "example.test": {"A": ["127.0.0.1"]},
    "nullmx.test": {"MX": [(0, ".")]},
    "broken.test": "SERVFAIL",
}
TIMEOUTS = Timeouts.uniform(10.0)


@pytest.fixture(scope="module")
def dns_server() -> Iterator[DnsServer]:
    with DnsServer(ZONE) as server:
        yield server


_counter = iter(range(1_000_000))


def stored(
    directory: Path, body: bytes, sender: str = "sender@origin.test", **flags: bool
) -> StoredMessage:
    """A spool file as postier.spool writes it: Return-Path line, then the LF content."""
    head = f"Return-Path: <{sender}>\n".encode()
    path = directory / f"spool-{next(_counter)}"
    path.write_bytes(head + body)
    return StoredMessage(
        path, len(head) + len(body), len(head), sender, "Q1D", time.time(), **flags
    )


def rcpts(*addresses: str) -> list[Recipient]:
    return [Recipient(a) for a in addresses]


def relay(dns: DnsServer, port: int, **kwargs: object) -> SmtpRelay:
    kwargs.setdefault("timeouts", TIMEOUTS)
    return SmtpRelay(
        "client.test",
        resolver=Resolver("127.0.0.1", dns.port, timeout=2.0),
        remote_port=port,
        **kwargs,
    )  # type: ignore[arg-type]


def statuses(results: list[RecipientResult]) -> list[tuple[str, Status, int, str]]:
    return [(r.recipient.address, r.status, r.code, r.enhanced) for r in results]


BODY = b"Subject: test\nFrom: sender@origin.test\n\nHello.\n"


# --- routing ------------------------------------------------------------------------------


def test_mx_by_preference_skips_refusing_host(
    dns_server: DnsServer, pub: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "postier.delivery.smtp")
    with SmtpSink(pub / "sink") as sink:
        results = asyncio.run(
            relay(dns_server, sink.port).deliver(
                stored(pub, BODY), rcpts("a@pref.test", "b@pref.test")
            )
        )
        assert [r.status for r in results] == [Status.DELIVERED] * 2
        assert results[0].code == 250 and "up.pref.test[127.0.0.1]" in results[0].text
        assert len(sink.messages()) == 1
    assert ("down.pref.test", "A") in dns_server.queries
    assert ("never.pref.test", "A") not in dns_server.queries
    lines = [r.getMessage() for r in caplog.records]
    assert any(
        m.startswith("event=connect_failed qid=Q1D host=down.pref.test addr=127.0.0.2")
        and "refused" in m
        for m in lines
    )
    assert any(
        m.startswith(
            "event=delivery qid=Q1D backend=smtp domain=pref.test host=up.pref.test addr=127.0.0.1"
        )
        and "delivered=2 " in m
        for m in lines
    )


def test_a_fallback_and_aaaa_only_over_ipv6(dns_server: DnsServer, pub: Path) -> None:
    with SmtpSink(pub / "v4") as v4:
        res = asyncio.run(
            relay(dns_server, v4.port).deliver(stored(pub, BODY), rcpts("x@afallback.test"))
        )
        assert statuses(res) == [("x@afallback.test", Status.DELIVERED, 250, "2.0.0")]
        assert b"X-Rcpt-Args: <x@afallback.test>" in v4.messages()[0]
    with SmtpSink(pub / "v6", host="::1") as v6:
        res = asyncio.run(relay(dns_server, v6.port).deliver(stored(pub, BODY), rcpts("y@v6.test")))
        assert res[0].status is Status.DELIVERED
        assert b"X-Client-Addr: ipv6:::1" in v6.messages()[0]


@pytest.mark.parametrize(
    ("domain", "expected"),
    [
        ("nullmx.test", (Status.PERMANENT, 556, "5.1.10")),
        ("nxdomain.test", (Status.PERMANENT, 550, "5.1.2")),
        ("broken.test", (Status.TEMPORARY, 451, "4.4.3")),
    ],
)
def test_dns_failures_become_results(
    dns_server: DnsServer, pub: Path, domain: str, expected: tuple[Status, int, str]
) -> None:
    res = asyncio.run(
        relay(dns_server, free_port()).deliver(
            stored(pub, BODY), rcpts(f"a@{domain}", f"b@{domain}")
        )
    )
    assert [(r.status, r.code, r.enhanced) for r in res] == [expected, expected]


def test_connection_refused_is_temporary(dns_server: DnsServer, pub: Path) -> None:
    res = asyncio.run(
        relay(dns_server, free_port()).deliver(stored(pub, BODY), rcpts("a@afallback.test"))
    )
    assert res[0].status is Status.TEMPORARY and res[0].code == 451
    assert "refused" in res[0].text.lower()


def test_421_greeting_moves_to_next_mx(dns_server: DnsServer, pub: Path) -> None:
    with (
        SmtpSink(pub / "good") as good,
        SmtpSink(pub / "busy", host="127.0.0.2", port=good.port, options=("-Q", "CONNECT")),
    ):
        res = asyncio.run(
            relay(dns_server, good.port).deliver(stored(pub, BODY), rcpts("a@busy.test"))
        )
        assert res[0].status is Status.DELIVERED and "ok.busy.test" in res[0].text
        assert len(good.messages()) == 1


def test_greeting_timeout_is_temporary(dns_server: DnsServer, pub: Path) -> None:
    with SmtpSink(pub / "slow", options=("-W", "CONNECT:30")) as sink:
        res = asyncio.run(
            relay(dns_server, sink.port, timeouts=Timeouts.uniform(0.5)).deliver(
                stored(pub, BODY), rcpts("a@afallback.test")
            )
        )
    assert res[0].status is Status.TEMPORARY and "timeout" in res[0].text


# --- replies from the server --------------------------------------------------------------


def test_5xx_at_mail_fails_every_recipient(dns_server: DnsServer, pub: Path) -> None:
    with SmtpSink(pub / "s", options=("-f", "MAIL")) as sink:
        res = asyncio.run(
            relay(dns_server, sink.port).deliver(
                stored(pub, BODY), rcpts("a@afallback.test", "b@afallback.test")
            )
        )
    assert [(r.status, r.code) for r in res] == [(Status.PERMANENT, 500)] * 2
    assert "MAIL FROM" in res[0].text


def test_4xx_at_rcpt_is_temporary(dns_server: DnsServer, pub: Path) -> None:
    with SmtpSink(pub / "s", options=("-r", "RCPT")) as sink:
        res = asyncio.run(
            relay(dns_server, sink.port).deliver(
                stored(pub, BODY), rcpts("a@afallback.test", "b@afallback.test")
            )
        )
        assert sink.messages() == []
    assert [(r.status, r.code, r.enhanced) for r in res] == [(Status.TEMPORARY, 450, "4.3.0")] * 2


def test_smtputf8_needed_but_not_offered(dns_server: DnsServer, pub: Path) -> None:
    with SmtpSink(pub / "s") as sink:  # smtp-sink announces no SMTPUTF8
        msg = stored(pub, BODY, sender="jos\u00e9@origin.test")
        res = asyncio.run(relay(dns_server, sink.port).deliver(msg, rcpts("a@afallback.test")))
        assert statuses(res) == [("a@afallback.test", Status.PERMANENT, 553, "5.6.7")]
        assert sink.messages() == []


# --- the exact bytes on the wire, and connection reuse ------------------------------------


def test_dot_stuffing_and_no_bare_cr_on_the_wire(dns_server: DnsServer, pub: Path) -> None:
    body = b"Subject: dots\n\n.leading dot\n..two\nbare\rCR\n.\nlast line without LF"
    big = b"".join(b".%d\n" % i for i in range(20000))  # lines starting with "." over chunks

    async def go(sink: SmtpSink) -> tuple[bytes, list[RecipientResult]]:
        async with RecordingProxy("127.0.0.1", sink.port) as proxy:
            r = relay(dns_server, proxy.port)
            async with r.session("afallback.test") as s:
                res = await s.send(stored(pub, body), rcpts("a@afallback.test"))
                res += await s.send(stored(pub, big), rcpts("b@afallback.test"))
            assert proxy.connections == 1  # both messages over one connection
        return bytes(proxy.sent), res

    with SmtpSink(pub / "s") as sink:
        sent, res = asyncio.run(go(sink))
        assert [r.status for r in res] == [Status.DELIVERED] * 2
        dumps = sink.messages()
    expected = (
        b"Subject: dots\r\n\r\n..leading dot\r\n...two\r\nbare\r\nCR\r\n..\r\n"
        b"last line without LF\r\n.\r\n"
    )
    assert expected in sent
    assert b"\r\n" + b"".join(b"..%d\r\n" % i for i in range(20000)) + b".\r\n" in sent
    assert sent.count(b"\r") == sent.count(b"\r\n") == sent.count(b"\n")
    assert b"RSET\r\n" in sent  # the reused connection was probed first
    assert b"\n.leading dot\n" in dumps[0]  # the sink unstuffed it back


# --- a real Postfix: STARTTLS, per-recipient replies, SIZE ---------------------------------


@pytest.fixture(scope="module")
def postfix() -> Iterator[PrivatePostfix]:
    with public_tmpdir() as root:
        pf = PrivatePostfix(
            root / "pf",
            "example.test",
            ["alice", "bob"],
            access={"later@example.test": "450 4.2.0 try again later"},
            extra={"message_size_limit": "100000"},
        )
        with pf:
            yield pf


def test_postfix_starttls_and_mixed_recipients(
    dns_server: DnsServer, pub: Path, postfix: PrivatePostfix
) -> None:
    async def go() -> tuple[list[RecipientResult], bool]:
        async with relay(dns_server, postfix.port).session("example.test") as s:
            res = await s.send(
                stored(pub, BODY),
                rcpts(
                    "alice@example.test",
                    "later@example.test",
                    "nobody@example.test",
                    "bob@example.test",
                ),
            )
            return res, s.tls

    res, tls = asyncio.run(go())
    assert tls
    assert statuses(res) == [
        ("alice@example.test", Status.DELIVERED, 250, "2.0.0"),
        ("later@example.test", Status.TEMPORARY, 450, "4.2.0"),
        ("nobody@example.test", Status.PERMANENT, 550, "5.1.1"),
        ("bob@example.test", Status.DELIVERED, 250, "2.0.0"),
    ]
    assert "try again later" in res[1].text
    got = postfix.delivered("alice")
    assert len(got) == 1 and b"\nHello.\n" in got[0]
    assert b"with ESMTPS" in got[0] and b"Return-Path: <sender@origin.test>" in got[0]


def test_postfix_size_limit_is_permanent(
    dns_server: DnsServer, pub: Path, postfix: PrivatePostfix
) -> None:
    big = stored(pub, b"Subject: big\n\n" + (b"x" * 76 + b"\n") * 3000)
    res = asyncio.run(relay(dns_server, postfix.port).deliver(big, rcpts("bob@example.test")))
    assert statuses(res) == [("bob@example.test", Status.PERMANENT, 552, "5.3.4")]


def test_smarthost_starttls_verified(pub: Path, postfix: PrivatePostfix) -> None:
    cert = postfix.config_dir / "cert.pem"
    smart = Smarthost("127.0.0.1", postfix.port, ca_file=str(cert))
    r = SmtpRelay(
        "client.test",
        smarthost=smart,
        timeouts=TIMEOUTS,
        resolver=Resolver("127.0.0.1", free_port(), timeout=0.5),
    )  # never asked
    res = asyncio.run(r.deliver(stored(pub, BODY), rcpts("bob@example.test")))
    assert res[0].status is Status.DELIVERED
    wrong = Smarthost("127.0.0.1", postfix.port)  # system CAs: the self-signed cert fails
    r = SmtpRelay("client.test", smarthost=wrong, timeouts=TIMEOUTS)
    res = asyncio.run(r.deliver(stored(pub, BODY), rcpts("bob@example.test")))
    assert res[0].status is Status.TEMPORARY and res[0].enhanced == "4.7.5"


# --- paths real servers do not take on demand: a scripted server --------------------------


class ScriptedServer:
    """Just enough SMTP to reach a broken TLS handshake, STARTTLS injection, HELO-only
    servers and AUTH LOGIN. `starttls`: None (not offered), "ok", "garbage" (220, then bytes
    that are not TLS in answer to the client's hello) or "inject" (220 plus a fake reply in
    the same write: the STARTTLS injection attack). `rset_421`: RSET gets 421 and the
    connection closes; `one_message`: the connection closes after its first message."""

    def __init__(
        self,
        *,
        starttls: str | None = None,
        tls: ssl.SSLContext | None = None,
        ehlo: bool = True,
        auth: str = "",
        rset_421: bool = False,
        one_message: bool = False,
    ) -> None:
        self.starttls, self.tls, self.ehlo, self.auth = starttls, tls, ehlo, auth
        self.rset_421, self.one_message = rset_421, one_message
        self.lines: list[bytes] = []
        self.bodies: list[bytes] = []
        self.connections = 0
        self.port = 0
        self._writers: list[asyncio.StreamWriter] = []
        self._tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> ScriptedServer:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._server.close()
        for writer in self._writers:  # EOF ends each handler normally (no cancellation)
            writer.close()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=10)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.append(writer)
        self._tasks.add(asyncio.current_task())  # type: ignore[arg-type]
        in_tls = False
        writer.write(b"220 scripted ESMTP\r\n")
        try:
            while line := await reader.readline():
                self.lines.append(line)
                verb = line[:4].upper()
                if verb == b"EHLO" and self.ehlo:
                    caps = [b"scripted", b"PIPELINING", b"8BITMIME"]
                    if self.starttls and not in_tls and self.connections == 1:
                        caps.append(b"STARTTLS")
                    if self.auth:
                        caps.append(b"AUTH " + self.auth.encode())
                    writer.write(
                        b"".join(b"250-" + c + b"\r\n" for c in caps[:-1])
                        + b"250 "
                        + caps[-1]
                        + b"\r\n"
                    )
                elif verb == b"HELO":
                    writer.write(b"250 scripted\r\n")
                elif verb == b"STAR" and self.starttls == "ok":
                    writer.write(b"220 2.0.0 go ahead\r\n")
                    await writer.drain()
                    await writer.start_tls(self.tls)  # type: ignore[arg-type]
                    in_tls = True
                elif verb == b"STAR" and self.starttls == "garbage":
                    writer.write(b"220 2.0.0 go ahead\r\n")
                    await writer.drain()
                    await reader.read(1)  # the client's TLS hello has begun: answer nonsense
                    writer.write(b"this is not a TLS server hello\r\n" * 10)
                elif verb == b"STAR":
                    writer.write(b"220 2.0.0 go ahead\r\n250 2.0.0 injected\r\n")
                elif verb == b"AUTH" and b"LOGIN" in line.upper():
                    writer.write(b"334 VXNlcm5hbWU6\r\n")
                    self.lines.append(await reader.readline())
                    writer.write(b"334 UGFzc3dvcmQ6\r\n")
                    self.lines.append(await reader.readline())
                    writer.write(b"235 2.7.0 ok\r\n")
                elif verb == b"DATA":
                    writer.write(b"354 go\r\n")
                    await writer.drain()
                    body = b""
                    while (part := await reader.readline()) not in (b".\r\n", b""):
                        body += part
                    self.bodies.append(body)
                    writer.write(b"250 2.0.0 queued\r\n")
                    if self.one_message:
                        await writer.drain()
                        break
                elif verb == b"RSET" and self.rset_421:
                    writer.write(b"421 4.3.2 closing for maintenance\r\n")
                    await writer.drain()
                    break
                elif verb == b"QUIT":
                    writer.write(b"221 bye\r\n")
                    break
                elif verb in (b"MAIL", b"RCPT", b"RSET", b"NOOP"):
                    writer.write(b"250 2.0.0 ok\r\n")
                else:
                    writer.write(b"502 5.5.1 no\r\n")
                await writer.drain()
        except (OSError, ssl.SSLError):
            pass
        finally:
            writer.close()


@pytest.mark.parametrize("mode", ["garbage", "inject"])
def test_failed_starttls_retries_in_plaintext(
    dns_server: DnsServer, pub: Path, mode: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "postier.delivery.smtp")

    async def go() -> tuple[list[RecipientResult], bool, ScriptedServer]:
        async with (
            ScriptedServer(starttls=mode) as server,
            relay(dns_server, server.port).session("afallback.test") as s,
        ):
            res = await s.send(stored(pub, BODY), rcpts("a@afallback.test"))
            return res, s.tls, server

    res, tls, server = asyncio.run(go())
    assert res[0].status is Status.DELIVERED and not tls
    assert server.connections == 2 and len(server.bodies) == 1
    assert any(
        r.getMessage().startswith("event=tls_failed qid=Q1D host=afallback.test")
        and "action=plaintext" in r.getMessage()
        for r in caplog.records
        if r.levelno == logging.WARNING
    )


@pytest.mark.parametrize("how", ["rset_421", "one_message"])
def test_a_reused_connection_that_failed_meanwhile_is_replaced(
    dns_server: DnsServer, pub: Path, how: str
) -> None:
    """The RSET probing a reused connection rides in front of MAIL (PIPELINING); when it
    fails (421, or the server hung up), the message goes over a new connection at once."""

    async def go() -> tuple[list[RecipientResult], ScriptedServer]:
        async with (
            ScriptedServer(**{how: True}) as server,
            relay(dns_server, server.port).session("afallback.test") as s,
        ):
            res = await s.send(stored(pub, BODY), rcpts("a@afallback.test"))
            res += await s.send(stored(pub, BODY), rcpts("b@afallback.test"))
            return res, server

    res, server = asyncio.run(go())
    assert [r.status for r in res] == [Status.DELIVERED] * 2
    assert server.connections == 2 and len(server.bodies) == 2


def test_helo_fallback_without_pipelining(dns_server: DnsServer, pub: Path) -> None:
    async def go() -> tuple[list[RecipientResult], ScriptedServer]:
        async with ScriptedServer(ehlo=False) as server:
            res = await relay(dns_server, server.port).deliver(
                stored(pub, BODY, body_8bit=True), rcpts("a@afallback.test", "b@afallback.test")
            )
            return res, server

    res, server = asyncio.run(go())
    assert [r.status for r in res] == [Status.DELIVERED] * 2
    verbs = [line.split()[0] for line in server.lines]
    assert verbs[:5] == [b"EHLO", b"HELO", b"MAIL", b"RCPT", b"RCPT"]
    assert server.lines[2] == b"MAIL FROM:<sender@origin.test>\r\n"  # no ESMTP parameters


@pytest.fixture
def server_tls(pub: Path) -> tuple[ssl.SSLContext, Path]:
    cert, key = make_cert(pub)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    return ctx, cert


def test_smarthost_starttls_auth_login(pub: Path, server_tls: tuple[ssl.SSLContext, Path]) -> None:
    ctx, cert = server_tls

    async def go() -> tuple[list[RecipientResult], ScriptedServer]:
        async with ScriptedServer(starttls="ok", tls=ctx, auth="LOGIN") as server:
            smart = Smarthost.parse(
                f"127.0.0.1:{server.port}",
                username="me@origin.test",
                password="s3cret",
                ca_file=str(cert),
            )
            r = SmtpRelay("client.test", smarthost=smart, timeouts=TIMEOUTS)
            return await r.deliver(stored(pub, BODY), rcpts("x@anywhere.test")), server

    res, server = asyncio.run(go())
    assert res[0].status is Status.DELIVERED
    assert base64.b64encode(b"me@origin.test") + b"\r\n" in server.lines
    assert base64.b64encode(b"s3cret") + b"\r\n" in server.lines
    assert server.lines.index(b"STARTTLS\r\n") < server.lines.index(b"AUTH LOGIN\r\n")


def test_smarthost_implicit_tls_auth_plain(
    pub: Path, server_tls: tuple[ssl.SSLContext, Path]
) -> None:
    ctx, cert = server_tls

    async def go(sink: SmtpSink) -> tuple[list[RecipientResult], bytes]:
        async with RecordingProxy("127.0.0.1", sink.port, tls=ctx) as proxy:
            # Named "localhost": found through /etc/hosts, and checked against the certificate.
            smart = Smarthost(
                "localhost",
                proxy.port,
                username="u",
                password="p",
                ca_file=str(cert),
                implicit_tls=True,
            )
            r = SmtpRelay(
                "client.test",
                smarthost=smart,
                timeouts=TIMEOUTS,
                resolver=Resolver("127.0.0.1", free_port(), timeout=0.5),
            )  # unused
            return await r.deliver(stored(pub, BODY), rcpts("x@anywhere.test")), proxy.sent

    with SmtpSink(pub / "s") as sink:
        res, sent = asyncio.run(go(sink))
        assert res[0].status is Status.DELIVERED and len(sink.messages()) == 1
    assert b"AUTH PLAIN " + base64.b64encode(b"\0u\0p") + b"\r\n" in sent
    assert Smarthost.parse("relay.example:465").implicit_tls
    assert Smarthost.parse("relay.example").port == 587


def test_smarthost_without_tls_is_refused(pub: Path) -> None:
    with SmtpSink(pub / "s") as sink:
        r = SmtpRelay("client.test", smarthost=Smarthost("127.0.0.1", sink.port), timeouts=TIMEOUTS)
        res = asyncio.run(r.deliver(stored(pub, BODY), rcpts("x@anywhere.test")))
        assert sink.messages() == []
    assert (res[0].status, res[0].enhanced) == (Status.TEMPORARY, "4.7.10")


def test_lost_connection_after_dot_is_temporary_and_body_8bit(
    dns_server: DnsServer, pub: Path
) -> None:
    with SmtpSink(pub / "ok") as sink:
        msg = stored(pub, "Subject: caf\u00e9\n\n8bit\n".encode(), body_8bit=True)
        res = asyncio.run(relay(dns_server, sink.port).deliver(msg, rcpts("a@afallback.test")))
        assert res[0].status is Status.DELIVERED
        assert b"X-Mail-Args: <sender@origin.test> BODY=8BITMIME" in sink.messages()[0]
    with SmtpSink(pub / "drop", options=("-q", ".")) as sink:
        res = asyncio.run(
            relay(dns_server, sink.port).deliver(stored(pub, BODY), rcpts("a@afallback.test"))
        )
    assert (res[0].status, res[0].code, res[0].enhanced) == (Status.TEMPORARY, 451, "4.4.2")
    assert "lost connection" in res[0].text
