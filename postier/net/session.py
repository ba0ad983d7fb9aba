"""One SMTP connection: an asyncio Protocol that drives the sans-I/O `ServerConnection`.

Why a Protocol and not streams: STARTTLS must discard every plaintext byte received after the
`220 Ready to start TLS` (CVE-2011-0411). With asyncio streams, bytes already sitting in the
StreamReader's buffer survive `start_tls()` and would be read as if they came through TLS; here
`data_received` hands every byte to the state machine at once, which drops them in its
TLS-pending phase, and `loop.start_tls()` (public API) swaps the transport under us.

Flow: `data_received` feeds the state machine and pauses reading (for command lines, only once
COMMAND_BACKLOG bytes wait); the session task processes every complete event, writes the
queued replies in one write (so pipelined commands get their replies together, RFC 2920) and
resumes reading when it needs more input. That is back-pressure: a client can never make us
buffer more than one read ahead, or COMMAND_BACKLOG bytes of commands.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import os
import ssl
import time

from postier.inbound.handler import InboundHandler
from postier.inbound.peer import Peer
from postier.inbound.verify import answer_expn, answer_vrfy
from postier.net.auth_exchange import AuthExchange
from postier.net.context import ServerContext
from postier.net.roles import Role
from postier.protocol import events as ev
from postier.protocol import replies as R
from postier.protocol.replies import Reply
from postier.protocol.server import ServerConnection
from postier.protocol.state import Phase, ServerConfig
from postier.tls import describe, front_tls_context, sends_tickets

_LOG = logging.getLogger("postier.session")

MAX_WRITE_BUFFER = 256 * 1024
# Unprocessed command bytes a client may have in our buffer before reading pauses.
COMMAND_BACKLOG = 64 * 1024


class SmtpSession(asyncio.Protocol):
    """The transport side of one connection: bytes, back-pressure, timeouts, TLS, shutdown.

    What the mail means is the inbound handler's business (`postier.inbound.handler`) and
    AUTH is `AuthExchange`'s; this class hands them the protocol's events and applies their
    decisions.
    """

    # Ten thousand idle connections hold ten thousand of these (bench/idle.py).
    __slots__ = (
        "_admitted", "_bytes_in", "_data_started", "_eof", "_loop", "_lost", "_paused",
        "_rdns", "_task", "_waiter", "_write_paused", "auth", "conn", "ctx", "inbound",
        "peer", "protocol_config", "role", "sid", "transport",
    )  # fmt: skip

    def __init__(self, ctx: ServerContext, role: Role, protocol_config: ServerConfig) -> None:
        self.ctx = ctx
        self.role = role
        self.protocol_config = protocol_config
        self.sid = next_session_id()
        self.transport: asyncio.Transport | None = None
        self.conn: ServerConnection | None = None
        self.peer = Peer(session_id=self.sid, ip="?", port=0, listener=role.name)
        self.inbound: InboundHandler | None = None
        self.auth: AuthExchange | None = None
        self._waiter: asyncio.Future[bool] | None = None
        self._paused = False
        self._lost = False
        self._eof = False
        self._admitted = False
        self._write_paused: asyncio.Future[None] | None = None
        self._rdns: asyncio.Task[None] | None = None
        self._data_started = 0.0
        self._bytes_in = 0
        self._task: asyncio.Task[None] | None = None
        # asyncio.get_running_loop() costs a getpid() system call (fork detection) at each
        # call; the session keeps the loop it was made on.
        self._loop: asyncio.AbstractEventLoop | None = None

    # ---- asyncio.Protocol --------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.set_write_buffer_limits(high=MAX_WRITE_BUFFER)
        ip, port = self.peer_address(transport)
        if ip.startswith("::ffff:"):
            ip = ip[7:]
        self.peer.ip, self.peer.port = ip, port
        name = f"[{'IPv6:' if ':' in ip else ''}{ip}]"
        ctx = self.ctx
        self.conn = conn = ServerConnection(self.protocol_config, peer_name=name)
        self.inbound = ctx.inbound_handler(self.role, self.peer, conn)
        ctx.sessions.add(self)
        self._loop = loop = asyncio.get_running_loop()
        if ctx.config.reverse_dns:
            self.peer.rdns = ctx.reverse_names.cached(ip)
            if self.peer.rdns is None:
                self._rdns = loop.create_task(self._look_up_rdns())
        self._task = loop.create_task(self._run())

    def peer_address(self, transport: asyncio.BaseTransport) -> tuple[str, int]:
        """The client's (ip, port); one session on stdin learns it elsewhere (net/inetd.py)."""
        peername = transport.get_extra_info("peername") or ("?", 0)
        return str(peername[0]), int(peername[1])

    def data_received(self, data: bytes) -> None:
        conn = self.conn
        assert conn is not None
        self._bytes_in += len(data)
        conn.receive_data(data)
        # Reading pauses while the session works on what came in, so that a client can
        # never make us buffer more than one read ahead; but not for command lines below
        # COMMAND_BACKLOG bytes: pausing and resuming for every command cost two epoll
        # changes each (the whole dialogue of a message is six commands). STARTTLS pauses
        # on its own (_dispatch) before its 220 goes out.
        # Under TLS reading always pauses: a TLS transport closes itself at the client's EOF
        # whatever eof_received answers, and the replies still owed would be lost.
        if not self._paused and (
            conn.phase is not Phase.COMMAND
            or conn.input_backlog > COMMAND_BACKLOG
            or conn.session.tls
        ):
            self._pause()
        self.wake()

    def _pause(self) -> None:
        if not self._paused and self.transport is not None:
            self.transport.pause_reading()
            self._paused = True

    def eof_received(self) -> bool:
        self._eof = True
        self.wake()
        # Keep the transport: the replies to what came before the EOF still go out (a client
        # that half-closes after QUIT, `printf ... | nc`); the session closes it when done.
        # (A TLS transport ignores the answer: data_received keeps reading paused there.)
        return not (self.conn is not None and self.conn.session.tls)

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        self.wake()
        if self._write_paused is not None and not self._write_paused.done():
            self._write_paused.set_result(None)

    def pause_writing(self) -> None:
        assert self._loop is not None
        self._write_paused = self._loop.create_future()

    def resume_writing(self) -> None:
        if self._write_paused is not None and not self._write_paused.done():
            self._write_paused.set_result(None)
        self._write_paused = None

    def wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(False)

    # ---- helpers -----------------------------------------------------------------------
    async def _look_up_rdns(self) -> None:
        self.peer.rdns = await self.ctx.reverse_names.look_up(self.peer.ip)

    async def _flush(self) -> None:
        assert self.conn is not None and self.transport is not None
        out = self.conn.data_to_send()
        if out and not self.transport.is_closing():
            self.transport.write(out)
        if self._write_paused is not None:
            await self._write_paused

    def _timeout_for_phase(self) -> float:
        cfg = self.ctx.config
        assert self.conn is not None
        reading_content = self.conn.phase in (Phase.DATA, Phase.CHUNK)
        return cfg.data_timeout if reading_content else cfg.command_timeout

    async def _wait_input(self, deadline: float) -> Reply | None:
        """Wait for bytes; return a closing reply on timeout, None when woken."""
        assert self.transport is not None
        if self._lost or self._eof:
            return None
        if self._paused:
            self._paused = False
            self.transport.resume_reading()
        loop = self._loop
        assert loop is not None
        waiter: asyncio.Future[bool] = loop.create_future()
        self._waiter = waiter
        timeout = min(self._timeout_for_phase(), deadline - loop.time())
        expiry = _expiry(loop)
        second = expiry.add(loop.time() + max(timeout, 0.0), waiter)
        try:
            timed_out = await waiter
        finally:
            expiry.discard(second, waiter)
            self._waiter = None
        if timed_out:
            if loop.time() >= deadline:
                return R.SESSION_TOO_LONG
            return R.TIMEOUT
        return self._check_data_rate()

    def _check_data_rate(self) -> Reply | None:
        cfg = self.ctx.config
        if not cfg.min_data_rate or self.conn is None or self.conn.phase is not Phase.DATA:
            return None
        elapsed = time.monotonic() - self._data_started
        grace = max(cfg.data_timeout / 10, 1.0)
        if elapsed > grace and self._bytes_in / elapsed < cfg.min_data_rate:
            return R.TOO_SLOW
        return None

    def _idle(self) -> bool:
        c = self.conn
        return c is not None and c.phase is Phase.COMMAND and not c.session.envelope.mail_given

    # ---- the session -------------------------------------------------------------------
    async def _run(self) -> None:
        conn = self.conn
        transport = self.transport
        loop = self._loop
        assert conn is not None and transport is not None and loop is not None
        cfg = self.ctx.config
        peer = self.peer
        started = loop.time()
        deadline = started + cfg.session_timeout
        refusal = self.ctx.connections.admit(peer.ip)
        self._admitted = refusal is None
        peer.log("connect", peer=f"{peer.ip}:{peer.port}", listener=self.role.name)
        reason = "closed"
        try:
            if refusal is not None or self.ctx.shutting_down:
                refusal = refusal or R.SHUTTING_DOWN
                transport.write(conn.refuse(refusal, "refused"))
                peer.log("refused", logging.WARNING, ip=peer.ip, reply=refusal)
                reason = "refused"
                return
            if self.role.implicit_tls and not await self._start_tls(implicit=True):
                reason = "tls handshake failed"
                return
            if cfg.greet_pause > 0:
                await asyncio.sleep(cfg.greet_pause)
            if conn.phase is not Phase.CLOSED:
                refusal = await self.inbound.on_connect()  # type: ignore[union-attr]
                greeting = conn.greeting() if refusal is None else conn.refuse(refusal, "refused")
                self.transport.write(greeting)  # type: ignore[union-attr]
            while True:
                event = conn.next_event()
                if event is ev.NEED_DATA:
                    await self._flush()
                    if conn.phase is Phase.CLOSED:
                        reason = conn.close_reason or reason
                        break
                    if self.ctx.shutting_down and self._idle():
                        conn.close(R.SHUTTING_DOWN, "shutdown")
                    elif self._lost or self._eof:
                        conn.connection_lost("peer closed")
                    else:
                        closing = await self._wait_input(deadline)
                        if closing is not None:
                            peer.log("timeout", logging.WARNING, ip=peer.ip, reply=closing)
                            conn.close(closing, "timeout")
                    continue
                await self._dispatch(event)
        except (ConnectionError, ssl.SSLError) as exc:
            reason = f"connection error: {exc}"
        except Exception:
            _LOG.exception("event=session-crash session=%s", self.sid)
            reason = "internal error"
            if conn.phase is not Phase.CLOSED and self.transport is not None:
                conn.close(Reply(421, "4.3.0", "Internal error, closing connection"), reason)
                self.transport.write(conn.data_to_send())
        finally:
            await self._cleanup(reason, loop.time() - started)

    async def _cleanup(self, reason: str, duration: float) -> None:
        conn = self.conn
        if conn is not None and self.inbound is not None:
            # After an exception the loop could not hear the end: let the protocol say it.
            conn.connection_lost(reason)
            while (event := conn.next_event()) is not ev.NEED_DATA:
                if isinstance(event, ev.TransactionEnded):
                    await self.inbound.on_transaction_ended(event)
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()
        if self._rdns is not None and not self._rdns.done():
            self._rdns.cancel()
        if self._admitted:
            self.ctx.connections.release(self.peer.ip)
        self.ctx.sessions.discard(self)
        self.peer.log(
            "disconnect",
            ip=self.peer.ip,
            reason=reason,
            transactions=conn.session.transactions if conn else 0,
            seconds=f"{duration:.3f}",
        )

    async def _dispatch(self, event: ev.Event) -> None:
        """Hand one event to whoever decides it, and apply the decision."""
        conn, inbound = self.conn, self.inbound
        assert conn is not None and inbound is not None
        match event:
            case ev.DataChunk():
                await inbound.on_chunk(event)
            case ev.Rcpt():
                conn.decide(await inbound.on_rcpt(event))
            case ev.Mail():
                conn.decide(await inbound.on_mail(event))
            case ev.Data():
                self._data_started = time.monotonic()
                self._bytes_in = 0
                conn.decide(inbound.on_data())
            case ev.EndOfData():
                conn.decide(await inbound.on_end_of_data(event))
            case ev.TransactionEnded():
                await inbound.on_transaction_ended(event)
            case ev.Hello():
                conn.decide(inbound.on_hello(event))
            case ev.Vrfy() | ev.Expn():
                answer = answer_vrfy if isinstance(event, ev.Vrfy) else answer_expn
                reply = answer(inbound.policy, event.query)
                self.peer.log(type(event).__name__.lower(), query=event.query, reply=reply)
                conn.decide(reply)
            case ev.DataRejected():
                inbound.on_data_rejected(event)
            case ev.StartTLS():
                # From the 220 on, the socket's bytes are the client's TLS handshake: they
                # stay in the kernel until start_tls() takes over the transport.
                self._pause()
                conn.accept()
                await self._flush()
                await self._start_tls(implicit=False)
            case ev.Auth() | ev.AuthResponse():
                if self.auth is None:  # made on first use: most sessions never AUTH
                    self.auth = AuthExchange(conn, self.peer, self.ctx)
                await self.auth.handle(event)
            case ev.ProtocolViolation():
                self.peer.log(
                    "protocol-violation", logging.WARNING, ip=self.peer.ip, reason=event.reason
                )
            case ev.ConnectionClosed():
                pass

    # ---- TLS ---------------------------------------------------------------------------
    async def _start_tls(self, *, implicit: bool) -> bool:
        conn = self.conn
        peer = self.peer
        assert conn is not None and self.transport is not None and self.ctx.tls is not None
        if implicit and self.transport.get_extra_info("ssl_object") is not None:
            # The listener did the handshake, with front_tls_context (see the daemon).
            peer.tls_info = describe(self.transport.get_extra_info("ssl_object"))
            peer.log("tls", ip=peer.ip, tls=peer.tls_info, implicit=True)
            return True
        loop = asyncio.get_running_loop()
        if not implicit:
            # Plaintext sent after STARTTLS was dropped when the 220 was queued, and reading
            # has been paused since; from the start_tls() call on, every byte reaches
            # data_received decrypted. Leave the TLS-pending phase now, not after the
            # handshake: plain asyncio delivers application data that came with the client's
            # Finished before this task resumes, and that EHLO is no injection.
            conn.tls_started()
        plain_transport = self.transport
        try:
            new_transport = await loop.start_tls(
                self.transport,
                self,
                front_tls_context(self.ctx.tls, tickets=sends_tickets(self.role.name)),
                server_side=True,
                ssl_handshake_timeout=min(60.0, self.ctx.config.command_timeout),
            )
        except (OSError, ssl.SSLError, TimeoutError, ConnectionError) as exc:
            peer.log(
                "tls-failed", logging.WARNING, ip=peer.ip, error=str(exc) or type(exc).__name__
            )
            if not implicit:
                conn.close(Reply(421, "4.7.0", "TLS handshake failed"), "tls handshake failed")
            self._lost = True
            return False
        if new_transport is None:
            self._lost = True
            return False
        self.transport = new_transport  # type: ignore[assignment]
        if self._paused:
            # data_received ran before we got here and paused the socket transport under
            # the TLS layer; pause the TLS transport instead, which _wait_input resumes.
            plain_transport.resume_reading()
            new_transport.pause_reading()
        ssl_object = new_transport.get_extra_info("ssl_object")
        peer.tls_info = describe(ssl_object) if ssl_object is not None else ""
        if not implicit and conn.discarded_after_starttls:
            peer.log(
                "starttls-injection",
                logging.WARNING,
                ip=peer.ip,
                discarded=conn.discarded_after_starttls,
            )
        peer.log("tls", ip=peer.ip, tls=peer.tls_info, implicit=implicit)
        return True


class _Expiry:
    """The time-outs of waiting sessions: one timer per second, shared by every wait that
    expires within it. A timer handle per wait (call_later, then cancel) cost a handle and a
    libuv timer for every command and ~600 bytes for every idle connection; a time-out now
    fires up to one second late, which SMTP's minutes-long time-outs do not notice."""

    __slots__ = ("buckets", "loop")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.buckets: dict[int, set[asyncio.Future[bool]]] = {}

    def add(self, when: float, waiter: asyncio.Future[bool]) -> int:
        """Wake `waiter` with True at `when` (rounded up to the second); returns that second."""
        second = math.ceil(when)
        bucket = self.buckets.get(second)
        if bucket is None:
            bucket = self.buckets[second] = set()
            self.loop.call_at(second, self._fire, second)
        bucket.add(waiter)
        return second

    def discard(self, second: int, waiter: asyncio.Future[bool]) -> None:
        bucket = self.buckets.get(second)
        if bucket is not None:
            bucket.discard(waiter)

    def _fire(self, second: int) -> None:
        for waiter in self.buckets.pop(second, ()):
            _expire(waiter)


_current_expiry: _Expiry | None = None


def _expiry(loop: asyncio.AbstractEventLoop) -> _Expiry:
    """The worker's `_Expiry` (a new one for a new loop: tests run several in turn)."""
    global _current_expiry
    expiry = _current_expiry
    if expiry is None or expiry.loop is not loop:
        expiry = _current_expiry = _Expiry(loop)
    return expiry


def _expire(waiter: asyncio.Future[bool]) -> None:
    """The wait for input timed out: wake the session with True."""
    if not waiter.done():
        waiter.set_result(True)


_session_counter = itertools.count(1)


def next_session_id() -> str:
    """Unique across workers (the pid) and cheap (no random bytes per connection)."""
    return f"{os.getpid():x}{next(_session_counter):05x}"
