"""One SMTP connection: an asyncio Protocol that drives the sans-I/O `ServerConnection`.

Why a Protocol and not streams: STARTTLS must discard every plaintext byte received after the
`220 Ready to start TLS` (CVE-2011-0411). With asyncio streams, bytes already sitting in the
StreamReader's buffer survive `start_tls()` and would be read as if they came through TLS; here
`data_received` hands every byte to the state machine at once, which drops them in its
TLS-pending phase, and `loop.start_tls()` (public API) swaps the transport under us.

Flow: `data_received` feeds the state machine and pauses reading; the session task processes
every complete event, writes the queued replies in one write (so pipelined commands get their
replies together, RFC 2920) and resumes reading only when it needs more input. That is
back-pressure for free: a client can never make us buffer more than one read ahead.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import socket
import ssl
import time
from email.utils import formatdate
from typing import TYPE_CHECKING

from postier import log
from postier.net.auth_exchange import AuthExchange
from postier.net.context import ServerContext
from postier.net.received import trace_headers, with_protocol
from postier.net.roles import Role
from postier.policy import LocalTarget, Rejection
from postier.protocol import replies as R
from postier.protocol.events import (
    NEED_DATA,
    Auth,
    AuthResponse,
    ConnectionClosed,
    Data,
    DataChunk,
    DataRejected,
    EndOfData,
    Hello,
    Mail,
    ProtocolViolation,
    Rcpt,
    StartTLS,
)
from postier.protocol.replies import Reply
from postier.protocol.server import ServerConnection
from postier.protocol.state import Phase, ServerConfig
from postier.queue.ids import new_queue_id
from postier.router import Transaction
from postier.spool import SpoolWriter
from postier.tls import front_tls_context, sends_tickets

if TYPE_CHECKING:
    pass

_LOG = logging.getLogger("postier.session")

MAX_WRITE_BUFFER = 256 * 1024


def server_config(ctx: ServerContext, role: Role) -> ServerConfig:
    cfg = ctx.config
    return ServerConfig(
        hostname=cfg.hostname,
        max_message_size=cfg.max_message_size,
        max_recipients=cfg.max_recipients,
        max_errors=cfg.max_errors,
        starttls_available=ctx.tls is not None and not role.implicit_tls,
        implicit_tls=role.implicit_tls,
        auth_mechanisms=("PLAIN", "LOGIN") if role.offers_auth and ctx.passwords else (),
        auth_requires_tls=True,
        auth_required_for_mail=role.requires_auth,
    )


class SmtpSession(asyncio.Protocol):
    def __init__(self, ctx: ServerContext, role: Role, protocol_config: ServerConfig) -> None:
        self.ctx = ctx
        self.role = role
        self.protocol_config = protocol_config
        self.sid = next_session_id()
        self.transport: asyncio.Transport | None = None
        self.conn: ServerConnection | None = None
        self.ip = "?"
        self.port = 0
        self._waiter: asyncio.Future[bool] | None = None
        self._paused = False
        self._lost = False
        self._eof = False
        self._admitted = False
        self._write_paused: asyncio.Future[None] | None = None
        self._rdns: asyncio.Task[None] | None = None
        self.rdns_name: str | None = None
        self.txn: Transaction | None = None
        self.tls_info = ""
        self.auth = AuthExchange(self)
        self._data_started = 0.0
        self._bytes_in = 0
        self._task: asyncio.Task[None] | None = None

    # ---- asyncio.Protocol --------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.set_write_buffer_limits(high=MAX_WRITE_BUFFER)
        peer = transport.get_extra_info("peername") or ("?", 0)
        self.ip, self.port = str(peer[0]), int(peer[1])
        if self.ip.startswith("::ffff:"):
            self.ip = self.ip[7:]
        name = f"[{'IPv6:' if ':' in self.ip else ''}{self.ip}]"
        self.conn = ServerConnection(self.protocol_config, peer_name=name)
        self.ctx.sessions.add(self)
        loop = asyncio.get_running_loop()
        if self.ctx.config.reverse_dns:
            self.rdns_name = self.ctx.cached_rdns(self.ip)
            if self.rdns_name is None:
                self._rdns = loop.create_task(self._look_up_rdns())
        self._task = loop.create_task(self._run())

    def data_received(self, data: bytes) -> None:
        assert self.conn is not None
        self._bytes_in += len(data)
        self.conn.receive_data(data)
        if not self._paused and self.transport is not None:
            self.transport.pause_reading()
            self._paused = True
        self.wake()

    def eof_received(self) -> bool:
        self._eof = True
        self.wake()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        self.wake()
        if self._write_paused is not None and not self._write_paused.done():
            self._write_paused.set_result(None)

    def pause_writing(self) -> None:
        loop = asyncio.get_running_loop()
        self._write_paused = loop.create_future()

    def resume_writing(self) -> None:
        if self._write_paused is not None and not self._write_paused.done():
            self._write_paused.set_result(None)
        self._write_paused = None

    def wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(False)

    # ---- helpers -----------------------------------------------------------------------
    def _log(self, name: str, level: int = logging.INFO, **kv: object) -> None:
        log.event(name, level, _LOG, session=self.sid, **kv)

    async def _look_up_rdns(self) -> None:
        """Fill `rdns_name` (cache misses only); a message sent before it is known says
        "unknown" in its Received header rather than waiting."""
        loop = asyncio.get_running_loop()
        name = "unknown"
        try:
            host, _ = await asyncio.wait_for(
                loop.getnameinfo((self.ip, 0), socket.NI_NAMEREQD), timeout=3.0
            )
            # The name goes into a header: only hostname characters are allowed through.
            if host and all(c.isalnum() or c in "-._" for c in host):
                name = host
        except (OSError, TimeoutError, UnicodeError):
            pass
        self.ctx.remember_rdns(self.ip, name)
        self.rdns_name = name

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
        return cfg.data_timeout if self.conn.phase is Phase.DATA else cfg.command_timeout

    async def _wait_input(self, deadline: float) -> Reply | None:
        """Wait for bytes; return a closing reply on timeout, None when woken."""
        assert self.transport is not None
        if self._lost or self._eof:
            return None
        if self._paused:
            self._paused = False
            self.transport.resume_reading()
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[bool] = loop.create_future()
        self._waiter = waiter
        timeout = min(self._timeout_for_phase(), deadline - loop.time())
        # A timer handle rather than asyncio.wait_for: this runs for every command, and
        # wait_for costs an extra task and future each time.
        timer = loop.call_later(max(timeout, 0.0), _expire, waiter)
        try:
            timed_out = await waiter
        finally:
            timer.cancel()
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
        assert conn is not None and transport is not None
        loop = asyncio.get_running_loop()
        cfg = self.ctx.config
        started = loop.time()
        deadline = started + cfg.session_timeout
        refusal = self.ctx.connections.admit(self.ip)
        self._admitted = refusal is None
        self._log("connect", peer=f"{self.ip}:{self.port}", listener=self.role.name)
        reason = "closed"
        try:
            if refusal is not None or self.ctx.shutting_down:
                refusal = refusal or R.SHUTTING_DOWN
                transport.write(conn.refuse(refusal, "refused"))
                self._log("refused", logging.WARNING, ip=self.ip, reply=refusal)
                reason = "refused"
                return
            if self.role.implicit_tls and not await self._start_tls(implicit=True):
                reason = "tls handshake failed"
                return
            if cfg.greet_pause > 0:
                await asyncio.sleep(cfg.greet_pause)
            if conn.phase is not Phase.CLOSED:
                self.transport.write(conn.greeting())  # type: ignore[union-attr]
            while True:
                event = conn.next_event()
                if event is NEED_DATA:
                    await self._flush()
                    if conn.phase is Phase.CLOSED:
                        reason = conn.close_reason or reason
                        break
                    if self.ctx.shutting_down and self._idle():
                        conn.close(R.SHUTTING_DOWN, "shutdown")
                        continue
                    if self._lost or self._eof:
                        reason = "peer closed" if not self.txn else "peer closed mid-transaction"
                        break
                    closing = await self._wait_input(deadline)
                    if closing is not None:
                        self._log("timeout", logging.WARNING, ip=self.ip, reply=closing)
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
        if self.txn is not None and self.txn.writer is not None:
            writer = self.txn.writer
            await asyncio.get_running_loop().run_in_executor(self.ctx.executor, writer.discard)
            self.txn = None
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()
        if self._rdns is not None and not self._rdns.done():
            self._rdns.cancel()
        if self._admitted:
            self.ctx.connections.release(self.ip)
        self.ctx.sessions.discard(self)
        conn = self.conn
        self._log(
            "disconnect",
            ip=self.ip,
            reason=reason,
            transactions=conn.session.transactions if conn else 0,
            seconds=f"{duration:.3f}",
        )

    async def _dispatch(self, event: object) -> None:
        conn = self.conn
        assert conn is not None
        if isinstance(event, DataChunk):
            await self._on_chunk(event)
        elif isinstance(event, Rcpt):
            self._on_rcpt(event)
        elif isinstance(event, Mail):
            self._on_mail(event)
        elif isinstance(event, Data):
            self._on_data()
        elif isinstance(event, EndOfData):
            await self._on_end_of_data(event)
        elif isinstance(event, Hello):
            self._log("helo", helo=event.name, esmtp=event.extended)
            conn.accept()
        elif isinstance(event, DataRejected):
            await self._on_data_rejected(event)
        elif isinstance(event, StartTLS):
            conn.accept()
            await self._flush()
            await self._start_tls(implicit=False)
        elif isinstance(event, Auth | AuthResponse):
            await self.auth.handle(event)
        elif isinstance(event, ProtocolViolation):
            self._log("protocol-violation", logging.WARNING, ip=self.ip, reason=event.reason)
        elif isinstance(event, ConnectionClosed):
            pass

    # ---- MAIL / RCPT / DATA ------------------------------------------------------------
    def _on_mail(self, event: Mail) -> None:
        conn = self.conn
        assert conn is not None
        session = conn.session
        sender = event.sender
        if session.auth_user is not None:
            if sender is None:
                conn.reject(Reply(553, "5.7.1", "Null sender not allowed for submission"))
                self._log("mail-rejected", sender="<>", reason="null sender on submission")
                return
            owner_local, at, owner_domain = session.auth_user.lower().rpartition("@")
            if not at:  # a seed-style bare login owns login@<any local domain>
                owner_local, owner_domain = owner_domain, ""
            owned = sender.local.lower() == owner_local and (
                sender.domain == owner_domain
                if at
                else self.ctx.policy.local_domain_of(sender) is not None
            )
            if not owned:
                conn.reject(Reply(553, "5.7.1", f"Sender address not owned by {session.auth_user}"))
                self._log("mail-rejected", sender=str(sender), user=session.auth_user)
                return
        if self.ctx.low_on_disk(event.size or 0):
            conn.reject(R.LOW_DISK)
            self._log("mail-rejected", logging.WARNING, reason="low disk space")
            return
        self.txn = Transaction(
            queue_id=new_queue_id(),
            sender=sender,
            smtputf8=event.smtputf8,
            body_8bit=event.body == "8BITMIME",
        )
        conn.accept()
        self._log("mail", qid=self.txn.queue_id, sender=f"<{sender or ''}>", size=event.size)

    def _on_rcpt(self, event: Rcpt) -> None:
        conn = self.conn
        txn = self.txn
        assert conn is not None and txn is not None
        may_relay = self.role.relay_without_auth or conn.session.auth_user is not None
        decision = self.ctx.policy.check_recipient(event.recipient, may_relay=may_relay)
        rcpt = str(event.recipient)
        if isinstance(decision, Rejection):
            conn.reject(decision.reply)
            self._log("rcpt-rejected", qid=txn.queue_id, to=f"<{rcpt}>", reply=decision.reply)
            return
        for target in decision:
            if isinstance(target, LocalTarget):
                if all(t.user.mailbox != target.user.mailbox for t in txn.local):
                    txn.local.append(target)
            elif all(t.address != target.address for t in txn.remote):
                txn.remote.append(target)
        txn.accepted.append(rcpt)
        conn.accept()
        self._log("rcpt", qid=txn.queue_id, to=f"<{rcpt}>")

    def _on_data(self) -> None:
        conn = self.conn
        txn = self.txn
        assert conn is not None and txn is not None
        session = conn.session
        header = trace_headers(
            sender=txn.sender_text,
            helo=session.helo or "unknown",
            rdns=self.rdns_name or "unknown",
            ip=self.ip,
            hostname=self.ctx.config.hostname,
            protocol=with_protocol(
                esmtp=session.esmtp,
                tls=session.tls,
                auth=session.auth_user is not None,
                smtputf8=txn.smtputf8,
            ),
            queue_id=txn.queue_id,
            recipients=txn.accepted,
            tls_info=self.tls_info,
            auth_user=(session.auth_user or "") if self.ctx.config.received_auth_user else "",
        )
        txn.writer = SpoolWriter(self.ctx.spool_dir, txn.queue_id, header)
        if session.auth_user is not None:
            txn.writer.watch_headers((b"message-id", b"date"))
        self._data_started = time.monotonic()
        self._bytes_in = 0
        conn.accept()

    async def _on_chunk(self, event: DataChunk) -> None:
        txn = self.txn
        if txn is None or txn.writer is None or txn.writer.failed:
            return  # after a failed write the rest is read and dropped; the end answers 451
        if txn.writer.add(event.data):
            loop = asyncio.get_running_loop()
            try:
                await loop.run_in_executor(self.ctx.executor, txn.writer.flush)
            except OSError as exc:
                # Keep reading to the end of data; the failure is reported there.
                self._log("spool-write-failed", logging.ERROR, qid=txn.queue_id, error=exc)
                txn.writer.failed = True

    async def _on_end_of_data(self, event: EndOfData) -> None:
        conn = self.conn
        txn = self.txn
        assert conn is not None and txn is not None and txn.writer is not None
        self.txn = None
        if conn.session.auth_user is not None:
            self._complete_submission_headers(txn)
        if txn.writer.failed:
            await asyncio.get_running_loop().run_in_executor(self.ctx.executor, txn.writer.discard)
            reply = R.STORAGE_FAILED
        else:
            reply = await self.ctx.router.finish(txn)
        self._log(
            "message",
            qid=txn.queue_id,
            sender=f"<{txn.sender_text}>",
            nrcpt=len(txn.accepted),
            size=event.size,
            result=reply.code,
            reply=reply,
        )
        if reply.is_positive:
            conn.accept(reply)
        else:
            conn.reject(reply)

    def _complete_submission_headers(self, txn: Transaction) -> None:
        """RFC 6409 §8.2/8.3: a submission server adds Message-ID and Date when missing."""
        writer = txn.writer
        assert writer is not None
        missing = b""
        if b"message-id" not in writer.headers_seen:
            missing += f"Message-ID: <{txn.queue_id}@{self.ctx.config.hostname}>\n".encode()
        if b"date" not in writer.headers_seen:
            missing += f"Date: {formatdate(localtime=True)}\n".encode()
        if missing and writer.add_headers(missing):
            self._log("headers-added", qid=txn.queue_id, added=missing.decode().count("\n"))

    async def _on_data_rejected(self, event: DataRejected) -> None:
        txn = self.txn
        self.txn = None
        if txn is not None and txn.writer is not None:
            await asyncio.get_running_loop().run_in_executor(self.ctx.executor, txn.writer.discard)
        self._log(
            "message-rejected",
            logging.WARNING,
            qid=txn.queue_id if txn else None,
            ip=self.ip,
            reply=event.reply,
        )

    # ---- TLS ---------------------------------------------------------------------------
    async def _start_tls(self, *, implicit: bool) -> bool:
        conn = self.conn
        assert conn is not None and self.transport is not None and self.ctx.tls is not None
        if implicit and self.transport.get_extra_info("ssl_object") is not None:
            # The listener did the handshake, with front_tls_context (see the daemon).
            from postier.tls import describe

            self.tls_info = describe(self.transport.get_extra_info("ssl_object"))
            self._log("tls", ip=self.ip, tls=self.tls_info, implicit=True)
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
            self._log(
                "tls-failed", logging.WARNING, ip=self.ip, error=str(exc) or type(exc).__name__
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
        from postier.tls import describe

        self.tls_info = describe(ssl_object) if ssl_object is not None else ""
        if not implicit and conn.discarded_after_starttls:
            self._log(
                "starttls-injection",
                logging.WARNING,
                ip=self.ip,
                discarded=conn.discarded_after_starttls,
            )
        self._log("tls", ip=self.ip, tls=self.tls_info, implicit=implicit)
        return True

    # ---- AUTH --------------------------------------------------------------------------


def _expire(waiter: asyncio.Future[bool]) -> None:
    """The wait for input timed out: wake the session with True."""
    if not waiter.done():
        waiter.set_result(True)


_session_counter = itertools.count(1)


def next_session_id() -> str:
    """Unique across workers (the pid) and cheap (no random bytes per connection)."""
    return f"{os.getpid():x}{next(_session_counter):05x}"
