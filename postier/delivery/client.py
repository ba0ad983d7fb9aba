"""The client side of one SMTP or LMTP connection, shared by the relay and the LMTP backend.

An LMTP transaction is the general case of an SMTP one (one reply per accepted recipient after
the end of data instead of one for all), so `run_transaction` does both and `ClientStream`
carries both; postier.delivery.smtp adds routing, the TLS policy, AUTH and per-domain
connection reuse on top, and postier.delivery.lmtp a small pool of connections to a local
LMTP server. The wire format itself (commands, replies, capabilities) is the sans-I/O
postier.protocol.client.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import ssl
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from typing import IO

from postier.delivery.base import (
    Recipient,
    RecipientResult,
    Status,
    StoredMessage,
    result_from_error,
)
from postier.delivery.binarymime import AS_USUAL, BodyPlan, plan_body
from postier.delivery.content import WHOLE
from postier.delivery.dsn_relay import dsn_mail_params, dsn_rcpt_params, mark_passed
from postier.errors import DeliveryError
from postier.protocol import client as proto
from postier.protocol.client import Capabilities, ClientProtocolError
from postier.protocol.replies import Reply

log = logging.getLogger("postier.delivery.client")

CHUNK = 64 * 1024  # body bytes read from the spool per step: memory stays flat for any size


@dataclass(frozen=True, slots=True)
class Timeouts:
    """Client timeouts in seconds; the defaults are RFC 5321 §4.5.3.2's minimums."""

    connect: float = 30.0
    greeting: float = 300.0  # the 220 banner
    command: float = 300.0  # EHLO/HELO/LHLO, STARTTLS and its handshake, AUTH, RSET, QUIT
    mail: float = 300.0
    rcpt: float = 300.0
    data_init: float = 120.0  # the 354 after DATA
    data_block: float = 180.0  # each write of the body
    data_end: float = 600.0  # the reply (LMTP: each reply) after the final dot

    @classmethod
    def uniform(cls, seconds: float) -> Timeouts:
        """Every timeout the same (tests, and operators who want one knob)."""
        return cls(**{f.name: seconds for f in fields(cls)})


class ConnectionLost(ConnectionError):
    """The server closed the connection while we waited for a reply."""


class StaleConnection(Exception):
    """A reused connection failed the RSET sent in front of MAIL (`run_transaction`'s
    `reset`): nothing of the transaction was accepted; the caller opens a new connection.
    Not an OSError, so that it passes through the handling of network trouble."""


class ClientStream:
    """One client connection: commands out, `Reply` objects in, each wait under a deadline."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.parser = proto.ReplyParser()
        self._ready: list[Reply] = []
        self.tls = False
        self.broken = False  # set when a transaction failed mid-way: never reuse

    @classmethod
    async def open(
        cls,
        host: str,
        port: int,
        timeout: float,
        *,
        tls: ssl.SSLContext | None = None,
        server_hostname: str | None = None,
        local_addr: tuple[str, int] | None = None,
    ) -> ClientStream:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(
                host,
                port,
                ssl=tls,
                server_hostname=server_hostname if tls else None,
                local_addr=local_addr,
            )
        stream = cls(reader, writer)
        stream.tls = tls is not None
        return stream

    @classmethod
    async def open_unix(cls, path: str, timeout: float) -> ClientStream:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_unix_connection(path)
        return cls(reader, writer)

    async def read_reply(self, timeout: float) -> Reply:
        if not self._ready:  # (pipelined replies often came in one read: no timer for them)
            async with asyncio.timeout(timeout):
                while not self._ready:
                    data = await self.reader.read(CHUNK)
                    if not data:
                        raise ConnectionLost("connection closed by the server")
                    self._ready.extend(self.parser.feed(data))
        return self._ready.pop(0)

    def write(self, data: bytes) -> None:
        self.writer.write(data)

    async def drain(self, timeout: float) -> None:
        if not self.writer.transport.get_write_buffer_size():
            # Nothing buffered: drain cannot wait (it only raises for a lost connection), so
            # it needs no timer. The usual case on a fast link: the kernel took every byte.
            await self.writer.drain()
            return
        async with asyncio.timeout(timeout):
            await self.writer.drain()

    async def command(self, line: bytes, timeout: float) -> Reply:
        self.write(line)
        await self.drain(timeout)
        return await self.read_reply(timeout)

    async def starttls(
        self, context: ssl.SSLContext, server_hostname: str | None, timeout: float
    ) -> None:
        # Anything the server sent after its 220 arrived in plaintext and would be taken as
        # coming over TLS (the STARTTLS injection bug class): refuse rather than use it.
        if self._ready or self.parser.pending:
            raise ClientProtocolError("data after the STARTTLS reply (plaintext injection)")
        async with asyncio.timeout(timeout):
            await self.writer.start_tls(context, server_hostname=server_hostname)
        self.tls = True

    def usable(self) -> bool:
        return not (self.broken or self.writer.is_closing() or self.reader.at_eof())

    async def close(self, quit_timeout: float | None = None) -> None:
        """QUIT politely when asked (and possible), then close; never raises."""
        if quit_timeout is not None and self.usable():
            with contextlib.suppress(OSError, ClientProtocolError):
                await self.command(proto.QUIT, quit_timeout)
        self.writer.close()
        try:
            async with asyncio.timeout(5):
                await self.writer.wait_closed()
        except (OSError, ssl.SSLError):
            pass


def reply_ok(reply: Reply) -> bool:
    return 200 <= reply.code < 300


def result_from_reply(r: Recipient, reply: Reply, where: str) -> RecipientResult:
    """Map a server reply to this recipient's result; `where` says who said it, and when."""
    text = f"{' '.join(reply.lines)} ({where})"
    if reply_ok(reply):
        return RecipientResult(r, Status.DELIVERED, reply.code, reply.enhanced or "2.0.0", text)
    if reply.code < 400:  # a 3xx where none belongs: the server is confused; try again later
        return RecipientResult(r, Status.TEMPORARY, 451, "4.5.0", f"unexpected reply {text}")
    if reply.is_transient:
        return RecipientResult(r, Status.TEMPORARY, reply.code, reply.enhanced or "4.0.0", text)
    return RecipientResult(r, Status.PERMANENT, reply.code, reply.enhanced or "5.0.0", text)


def outcome_fields(results: Sequence[RecipientResult]) -> dict[str, object]:
    """Log fields for one attempt: counts per class and each recipient's reply."""
    count = {s: sum(r.status is s for r in results) for s in Status}
    return {
        "delivered": count[Status.DELIVERED],
        "deferred": count[Status.TEMPORARY],
        "bounced": count[Status.PERMANENT],
        "replies": "; ".join(f"<{r.recipient.address}> {r.reply_line}" for r in results),
    }


def needs_smtputf8(message: StoredMessage, addresses: Sequence[str]) -> bool:
    return (
        message.smtputf8 or not message.sender.isascii() or not all(a.isascii() for a in addresses)
    )


async def _read_chunk(f: IO[bytes]) -> bytes:
    if isinstance(f, io.BytesIO):  # already in memory: no thread-pool hop
        return f.read(CHUNK)
    return await asyncio.to_thread(f.read, CHUNK)


async def run_transaction(
    stream: ClientStream,
    caps: Capabilities,
    message: StoredMessage,
    recipients: Sequence[Recipient],
    t: Timeouts,
    *,
    peer: str,
    lmtp: bool = False,
    address_of: Callable[[Recipient], str] = lambda r: r.address,
    content: bytes | None = None,
    reset: bool = False,
) -> list[RecipientResult]:
    """MAIL, RCPT..., DATA, the body, the final reply (LMTP: one per accepted recipient).

    Pipelined when the server offers PIPELINING. Returns one result per recipient, in order,
    and never raises for network trouble: when the connection breaks or times out, whatever
    is not settled yet is temporary and `stream.broken` is set (the caller drops it).
    `content` is the message's content when the caller has it (`postier.delivery.content`):
    it is then sent from memory, with no file opened here. `reset` (with PIPELINING) puts
    an RSET in front of MAIL, probing a reused connection; `StaleConnection` when it fails.
    """
    addresses = [address_of(r) for r in recipients]
    utf8 = needs_smtputf8(message, addresses)
    size = message.size - message.content_offset
    early: DeliveryError | None = None
    if utf8 and "SMTPUTF8" not in caps:
        early = DeliveryError(
            f"{peer} does not support SMTPUTF8, which this message needs",
            permanent=True,
            code=553,
            enhanced="5.6.7",
        )
    elif caps.size and size > caps.size:
        early = DeliveryError(
            f"message size {size} exceeds the limit {caps.size} of {peer}",
            permanent=True,
            code=552,
            enhanced="5.3.4",
        )
    plan = AS_USUAL
    if early is None:
        try:
            plan = await plan_body(message, caps, peer)
        except DeliveryError as exc:
            early = exc
        except OSError as exc:
            early = DeliveryError(
                f"cannot read the queued message: {exc}",
                permanent=False,
                code=451,
                enhanced="4.3.0",
            )
    if early is not None:
        return [result_from_error(r, early) for r in recipients]
    params: dict[str, str | None] = {}
    if caps.size is not None:
        params["SIZE"] = str(size)  # LF count: an estimate, as RFC 1870 allows
    if message.body_8bit and "8BITMIME" in caps:
        params["BODY"] = "8BITMIME"  # without 8BITMIME we send as is, like most MTAs do
    if plan.chunking:
        params["BODY"] = "BINARYMIME"
    if utf8:
        params["SMTPUTF8"] = None
    # DSN parameters go on to an SMTP next hop that speaks DSN (LMTP is our own final hop).
    dsn = not lmtp and "DSN" in caps
    rcpt_params = dsn_rcpt_params(message, recipients) if dsn else [{} for _ in recipients]
    if dsn:
        params.update(dsn_mail_params(message))
    if message.requiretls and "REQUIRETLS" in caps:  # the relay refuses a hop without it
        params["REQUIRETLS"] = None
    try:
        body: IO[bytes]
        if plan.replacement is not None:
            body, start = io.BytesIO(plan.replacement), 0
        elif content is not None:
            body, start = io.BytesIO(content), 0
        else:
            body = open(message.path, "rb")  # noqa: SIM115 - closed in the finally below
            start = message.content_offset
    except OSError as exc:
        return [
            RecipientResult(
                r, Status.TEMPORARY, 451, "4.3.0", f"cannot read the queued message: {exc}"
            )
            for r in recipients
        ]
    lost = f"lost connection with {peer} before its reply"
    results = [RecipientResult(r, Status.TEMPORARY, 451, "4.4.2", lost) for r in recipients]
    try:
        await _transaction(
            stream,
            caps,
            message,
            recipients,
            addresses,
            params,
            body,
            start,
            t,
            results,
            peer=peer,
            lmtp=lmtp,
            rcpt_params=rcpt_params,
            plan=plan,
            reset=reset and "PIPELINING" in caps,
        )
    except (OSError, ClientProtocolError) as exc:
        stream.broken = True
        stream.writer.close()
        what = "timeout" if isinstance(exc, TimeoutError) else (str(exc) or type(exc).__name__)
        for i, res in enumerate(results):
            if res.text == lost:
                results[i] = RecipientResult(
                    res.recipient, Status.TEMPORARY, 451, "4.4.2", f"{lost} ({what})"
                )
    finally:
        body.close()
    return mark_passed(results) if dsn else results


async def _transaction(
    stream: ClientStream,
    caps: Capabilities,
    message: StoredMessage,
    recipients: Sequence[Recipient],
    addresses: list[str],
    params: dict[str, str | None],
    body: IO[bytes],
    start: int,
    t: Timeouts,
    results: list[RecipientResult],
    *,
    peer: str,
    lmtp: bool,
    rcpt_params: list[dict[str, str | None]],
    plan: BodyPlan = AS_USUAL,
    reset: bool = False,
) -> None:
    """Fill `results` as replies arrive, so a broken connection keeps what was settled.
    The content to send is `body` from offset `start` on."""
    mail_cmd = proto.mail_from(message.sender, params)
    rcpt_cmds = [proto.rcpt_to(a, p) for a, p in zip(addresses, rcpt_params, strict=True)]
    data_reply: Reply | None = None
    use_data = not plan.chunking  # BDAT needs no go-ahead: its chunks follow the RCPTs
    if "PIPELINING" in caps:
        first = (proto.RSET if reset else b"") + mail_cmd + b"".join(rcpt_cmds)
        stream.write(first + (proto.DATA if use_data else b""))
        if reset:
            try:
                await stream.drain(t.command)
                probe = await stream.read_reply(t.command)
            except (OSError, ClientProtocolError) as exc:
                raise StaleConnection(str(exc) or type(exc).__name__) from None
            if not reply_ok(probe):
                raise StaleConnection(str(probe))
        await stream.drain(t.mail)
        mail_reply = await stream.read_reply(t.mail)
        rcpt_replies = [await stream.read_reply(t.rcpt) for _ in rcpt_cmds]
        if use_data:
            data_reply = await stream.read_reply(t.data_init)
    else:
        mail_reply = await stream.command(mail_cmd, t.mail)
        rcpt_replies = []
        if reply_ok(mail_reply):
            rcpt_replies = [await stream.command(c, t.rcpt) for c in rcpt_cmds]
            if use_data and any(reply_ok(rr) for rr in rcpt_replies):
                data_reply = await stream.command(proto.DATA, t.data_init)
    if not reply_ok(mail_reply):
        results[:] = [
            result_from_reply(r, mail_reply, f"{peer}, in reply to MAIL FROM") for r in recipients
        ]
        await _abandon_data(stream, data_reply, t)
        return
    accepted = []
    for i, rr in enumerate(rcpt_replies):
        if reply_ok(rr):
            accepted.append(i)
        else:
            results[i] = result_from_reply(recipients[i], rr, f"{peer}, in reply to RCPT TO")
    if plan.chunking and accepted:
        await _send_chunks(
            stream,
            body,
            start,
            recipients,
            accepted,
            t,
            results,
            peer=peer,
            lmtp=lmtp,
        )
        return
    if not accepted or data_reply is None or data_reply.code != 354:
        for i in accepted:
            if data_reply is not None:
                results[i] = result_from_reply(
                    recipients[i], data_reply, f"{peer}, in reply to DATA"
                )
        await _abandon_data(stream, data_reply, t)
        return
    # A small body already in memory goes out whole, in one write and one drain.
    whole = isinstance(body, io.BytesIO) and body.seek(0, io.SEEK_END) - start <= WHOLE
    body.seek(start)
    encoder = proto.BodyEncoder()
    if whole:
        stream.write(encoder.feed(body.read()) + encoder.finish())
    else:
        while chunk := await _read_chunk(body):
            stream.write(encoder.feed(chunk))
            await stream.drain(t.data_block)
        stream.write(encoder.finish())
    await stream.drain(t.data_block)
    for i in accepted if lmtp else [None]:
        final = await stream.read_reply(t.data_end)
        for j in [i] if i is not None else accepted:
            results[j] = result_from_reply(recipients[j], final, f"{peer}, in reply to end of data")


async def _send_chunks(
    stream: ClientStream,
    body: IO[bytes],
    offset: int,
    recipients: Sequence[Recipient],
    accepted: list[int],
    t: Timeouts,
    results: list[RecipientResult],
    *,
    peer: str,
    lmtp: bool,
) -> None:
    """The body as BDAT chunks (RFC 3030), each answered before the next is sent; a refused
    chunk fails the transaction for every accepted recipient, and RSET clears it."""
    body.seek(offset)
    block = await _read_chunk(body)
    while True:
        following = await _read_chunk(body) if block else b""
        last = not following
        wire = proto.spool_to_wire(block)
        stream.write(proto.bdat(len(wire), last=last) + wire)
        await stream.drain(t.data_block)
        if last:
            break
        reply = await stream.read_reply(t.data_block)
        if not reply_ok(reply):
            for i in accepted:
                results[i] = result_from_reply(recipients[i], reply, f"{peer}, in reply to BDAT")
            await stream.command(proto.RSET, t.command)
            return
        block = following
    for i in accepted if lmtp else [None]:
        final = await stream.read_reply(t.data_end)
        for j in [i] if i is not None else accepted:
            results[j] = result_from_reply(recipients[j], final, f"{peer}, in reply to BDAT LAST")


async def _abandon_data(stream: ClientStream, data_reply: Reply | None, t: Timeouts) -> None:
    """A server that said 354 with no recipient accepted still expects a message: end it."""
    if data_reply is not None and data_reply.code == 354:
        stream.write(proto.END_OF_DATA)
        await stream.drain(t.data_block)
        await stream.read_reply(t.data_end)


def parse_hostport(text: str, default_port: int) -> tuple[str, int]:
    """`host`, `host:port`, `[v6]` or `[v6]:port` (a bare v6 address has no port)."""
    text = text.strip()
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    elif text.count(":") == 1:
        host, port = text.split(":")
    else:
        host, port = text, ""
    if not host or (port and not (port.isdigit() and 0 < int(port) < 65536)):
        raise ValueError(f"expected HOST[:PORT], got {text!r}")
    return host, int(port) if port else default_port
