"""`ServerConnection`: the SMTP server state machine, sans I/O (the h11 model).

Use:
    conn = ServerConnection(config, peer_name="[192.0.2.1]")
    out = conn.greeting()                      # bytes to write
    conn.receive_data(bytes_from_socket)
    while (event := conn.next_event()) is not NEED_DATA:
        ...decide... conn.accept() / conn.reject(reply) / conn.challenge(b64)
    write(conn.data_to_send())

Replies are queued in order and only flushed by the caller when `next_event()` says NEED_DATA
(or before closing), so pipelined commands get all their replies in one write (RFC 2920).
An event that carries a command blocks further parsing until the application decides, which
keeps replies in command order even when a decision is slow (disk, DNS, password hashing).

Two rules keep the state easy to follow: the phase changes only in `_enter()`; the envelope
is reset only in `_end_transaction()`, which tells the application (`TransactionEnded`).
"""

from __future__ import annotations

from postier.protocol import replies as R
from postier.protocol.buffer import LineBuffer, LineTooLong
from postier.protocol.chunk import BdatCommand, ChunkReader, parse_bdat, skip
from postier.protocol.dot import DataReader
from postier.protocol.events import (
    NEED_DATA,
    Auth,
    AuthResponse,
    ConnectionClosed,
    Data,
    DataChunk,
    DataRejected,
    EndOfData,
    EndReason,
    Event,
    Expn,
    Hello,
    Mail,
    NeedData,
    ProtocolViolation,
    Rcpt,
    StartTLS,
    TransactionEnded,
    Vrfy,
)
from postier.protocol.handlers import (
    CROSS_PROTOCOL,
    GROUP_ENDERS,
    HANDLERS,
    NOT_IMPLEMENTED,
    hello_accepted,
    mail_accepted,
    rcpt_accepted,
)
from postier.protocol.replies import Reply
from postier.protocol.state import Envelope, Phase, ServerConfig, Session


class ProtocolUsageError(RuntimeError):
    """The application used the state machine wrongly (a bug in postier, not in the peer)."""


class ServerConnection:
    __slots__ = (
        "_chunk_failure", "_chunks", "_closed_reported", "_events", "_first_bdat", "_greeted",
        "_lines", "_out", "_pending", "_reader", "_received", "_skip_ends_transaction",
        "_skip_left", "_skip_reply", "close_reason", "config", "discarded_after_starttls",
        "peer_name", "phase", "session",
    )  # fmt: skip

    def __init__(self, config: ServerConfig, peer_name: str = "unknown") -> None:
        self.config = config
        self.peer_name = peer_name
        self.session = Session(tls=config.implicit_tls)
        self.phase = Phase.COMMAND
        # One receive buffer; the line reader and, in DATA, the content reader eat its front.
        self._received = bytearray()
        self._lines = LineBuffer(config.max_auth_line, self._received)
        self._reader: DataReader | None = None
        # BDAT (chunk.py): the chunk reader, the first BDAT while storage is prepared, a refused
        # chunk to skip, the failure every later chunk of the transaction gets (RFC 3030 §2).
        self._chunks: ChunkReader | None = None
        self._first_bdat: BdatCommand | None = None
        self._skip_left = 0
        self._skip_reply: Reply | None = None
        self._skip_ends_transaction = False
        self._chunk_failure: Reply | None = None
        self._out = bytearray()
        self._events: list[Event] = []  # 0 to 3 at a time: a deque costs 760 bytes
        self._pending: Event | None = None
        self._greeted = False
        self._closed_reported = False
        self.close_reason = ""
        self.discarded_after_starttls = 0

    @property
    def input_backlog(self) -> int:
        return len(self._received)  # not yet read as commands or content (back-pressure)

    # ---- output ------------------------------------------------------------------------
    def data_to_send(self) -> bytes:
        out = bytes(self._out)
        self._out.clear()
        return out

    def _send(self, reply: Reply) -> None:
        self._out += reply.to_bytes()
        if reply.code >= 500:
            self.session.errors += 1

    def greeting(self) -> bytes:
        """The 220 banner. Bytes received before it was produced are a protocol violation."""
        self._greeted = True
        self._send(R.greeting(self.config.hostname))
        return self.data_to_send()

    def refuse(self, reply: Reply, reason: str) -> bytes:
        """Answer a connection we will not serve (limits, shutdown) with one reply and close."""
        self._greeted = True
        self._send(reply)
        self._close(reason)
        return self.data_to_send()

    def _close(self, reason: str) -> None:
        self.close_reason = reason
        self._enter(Phase.CLOSED)

    # ---- the two state-transition points ----------------------------------------------
    def _enter(self, phase: Phase) -> None:
        """Change the phase, with what entering each phase implies; nowhere else changes it."""
        leaving = self.phase
        self.phase = phase
        if phase is Phase.DATA:
            self._reader = DataReader(self.config.max_message_size, self._received)
            if self._received:  # content pipelined behind DATA (when sync is not enforced)
                self._read_data()
        elif phase is Phase.CHUNK:
            self._read_chunk()  # also when nothing is buffered: a chunk may be empty
        elif phase is Phase.TLS_PENDING:
            # RFC 3207 §4 / CVE-2011-0411: plaintext behind STARTTLS never becomes commands.
            self.discarded_after_starttls = self._lines.clear()
        elif phase is Phase.COMMAND and leaving is Phase.TLS_PENDING:
            # RFC 3207 §4.2: forget everything but the error count; EHLO is needed again.
            self._end_transaction(EndReason.STARTTLS)
            self.session = Session(tls=True, errors=self.session.errors)
            self._lines.clear()
        elif phase is Phase.CLOSED:
            self._reader = None
            self._pending = None
            self._end_transaction(EndReason.CLOSED, self.close_reason)
            self._events.append(ConnectionClosed(self.close_reason))

    def _end_transaction(self, reason: EndReason, detail: str = "") -> None:
        """The one place the envelope is reset; says so when a transaction was open."""
        session = self.session
        self._chunks = None
        self._chunk_failure = None
        if not session.envelope.mail_given:
            return
        session.envelope = Envelope()
        if reason is EndReason.ACCEPTED:
            session.transactions += 1
        if self.config.report_transaction_end:
            self._events.append(TransactionEnded(reason, detail))

    # ---- input -------------------------------------------------------------------------
    def receive_data(self, data: bytes) -> None:
        if self.phase is Phase.CLOSED:
            return
        if self.phase is Phase.TLS_PENDING:
            # RFC 3207 §4 / CVE-2011-0411: nothing sent in plaintext after STARTTLS survives.
            self.discarded_after_starttls += len(data)
            return
        if not self._greeted and data:
            self._violation(R.PREGREET, "client talked before the greeting")
            return
        self._received += data
        if self._reader is not None:
            self._read_data()
        elif self.phase is Phase.CHUNK:
            self._read_chunk()

    def _read_data(self) -> None:
        reader = self._reader
        assert reader is not None
        chunk = reader.read()
        if chunk:
            self._events.append(DataChunk(chunk))
        if reader.done:
            self._reader = None
            self._enter(Phase.COMMAND)  # what follows the end stays in the buffer
            if reader.bad_line_endings:
                self._finish_rejected(R.BAD_LINE_ENDINGS)
            elif reader.overflow:
                self._finish_rejected(R.MESSAGE_TOO_BIG)
            else:
                self._events.append(EndOfData(size=reader.size))

    # ---- BDAT (RFC 3030) ----------------------------------------------------------------
    def _bdat_line(self, arg: str) -> Event | None:
        """Every BDAT with a known size has its octets read: stored, or skipped and refused."""
        command = parse_bdat(arg)
        if isinstance(command, Reply):
            self._violation(command, "BDAT without a chunk size")
            return None
        refusal = self._bdat_out_of_sequence()
        if refusal is None and command.error is not None:
            refusal = self._chunk_failure = command.error
        if refusal is None and self._chunk_failure is not None:
            self._skip_chunk(command.size, self._chunk_failure, ends=command.last)
            return None
        if refusal is not None:
            self._skip_chunk(command.size, refusal)
            return None
        if self._chunks is None:  # the first chunk: the application prepares the spool
            self._first_bdat = command
            return Data(chunking=True)
        self._chunks.start(command.size, command.last)
        self._enter(Phase.CHUNK)
        return None

    def _bdat_out_of_sequence(self) -> Reply | None:
        session = self.session
        if session.helo is None:
            return R.HELO_FIRST
        if not session.envelope.mail_given:
            return R.MAIL_FIRST
        if not session.envelope.recipients:
            return R.NO_VALID_RECIPIENTS
        return None

    def _skip_chunk(self, size: int, reply: Reply, *, ends: bool = False) -> None:
        self._skip_left = size
        self._skip_reply = reply
        self._skip_ends_transaction = ends
        self._enter(Phase.CHUNK)

    def _read_chunk(self) -> None:
        if self._skip_reply is not None:
            self._skip_left = skip(self._received, self._skip_left)
            if self._skip_left:
                return
            reply, self._skip_reply = self._skip_reply, None
            self._enter(Phase.COMMAND)
            if self._skip_ends_transaction:
                self._finish_rejected(reply)
            else:
                self._send(reply)
            return
        reader = self._chunks
        assert reader is not None
        data = reader.read()
        if data:
            self._events.append(DataChunk(data))
        if not reader.chunk_complete:
            return
        self._enter(Phase.COMMAND)
        if reader.overflow:
            self._chunk_failure = R.MESSAGE_TOO_BIG
        if self._chunk_failure is not None:
            if reader.last:
                self._finish_rejected(self._chunk_failure)
            else:
                self._send(self._chunk_failure)
        elif reader.last:
            self._events.append(EndOfData(size=reader.size))
        else:
            self._send(R.chunk_received(reader.chunk_size))

    def _finish_rejected(self, reply: Reply) -> None:
        self._send(reply)
        self._events.append(DataRejected(reply))
        self._end_transaction(EndReason.REJECTED)

    def next_event(self) -> Event | NeedData:
        if self._pending is not None:
            raise ProtocolUsageError(f"decide on {self._pending!r} before asking for more")
        while True:
            if self._events:
                event = self._events.pop(0)
                if isinstance(event, ConnectionClosed):
                    if self._closed_reported:
                        return NEED_DATA
                    self._closed_reported = True
                    return event
                if isinstance(
                    event, (DataChunk, DataRejected, ProtocolViolation, TransactionEnded)
                ):
                    return event
                self._pending = event
                return event
            if self.phase is not Phase.COMMAND and self.phase is not Phase.AUTH:
                return NEED_DATA
            # Before each line: errors also come from decisions (RCPT harvesting) and refusals.
            if self.session.errors >= self.config.max_errors:
                self._send(R.TOO_MANY_ERRORS)
                self._close("too many errors")
                continue
            line = self._lines.next_line()
            if line is None:
                return NEED_DATA
            if self.phase is Phase.AUTH:
                result = self._auth_line(line)
            else:
                result = self._command_line(line)
            if result is not None:
                self._pending = result
                return result

    # ---- command lines -----------------------------------------------------------------
    def _command_line(self, line: bytes | LineTooLong) -> Event | None:
        if isinstance(line, LineTooLong):
            self._send(R.LINE_TOO_LONG)
            return None
        verb_end = line.find(b" ")
        raw_verb = line if verb_end < 0 else line[:verb_end]
        verb = raw_verb.decode("ascii", "replace").upper()
        limit = self.config.max_command_line - 2  # without CRLF
        if verb in ("MAIL", "RCPT"):
            limit = self.config.max_mail_rcpt_line - 2
        elif verb == "AUTH":
            limit = self.config.max_auth_line - 2
        if len(line) > limit:
            self._send(R.LINE_TOO_LONG)
            return None
        if verb == "BDAT":
            return self._bdat_line(line[verb_end + 1 :].decode("ascii", "replace"))
        handler = HANDLERS.get(verb)
        if handler is None:
            if verb in NOT_IMPLEMENTED:
                self._send(R.NOT_IMPLEMENTED)
            elif verb == "QUIT":
                self._send(R.closing(self.config.hostname))
                self._close("quit")
            elif verb in CROSS_PROTOCOL:
                self._violation(
                    Reply(554, "5.7.0", "This is an SMTP server, not an HTTP proxy"),
                    f"cross-protocol command {verb}",
                )
            else:
                self._send(R.UNKNOWN_COMMAND)
            return None
        try:
            arg = line[verb_end + 1 :].decode("utf-8") if verb_end >= 0 else ""
        except UnicodeDecodeError:
            self._send(R.Reply(501, "5.5.4", "Invalid UTF-8 in command"))
            return None
        if "\n" in arg or "\r" in arg or "\x00" in arg:
            self._send(R.Reply(501, "5.5.4", "Bare CR, LF or NUL in command"))
            return None
        result = handler(self.session, self.config, arg)
        if (
            verb in GROUP_ENDERS
            and self.config.enforce_pipelining_sync
            and len(self._lines)
            # STARTTLS: what follows it in plaintext is discarded when the 220 goes out
            # (RFC 3207 §4.2), never answered, so there is nothing to refuse here.
            and not isinstance(result, StartTLS)
        ):
            # Also when the command itself is refused (DATA without recipients): the bytes
            # behind it may be message content that must never be read as commands.
            self._violation(R.SYNC_ERROR, f"pipelined input after {verb}")
            return None
        if isinstance(result, Reply):
            self._send(result)
            if verb == "RSET" and result.is_positive:
                self._end_transaction(EndReason.RSET)
            return None
        return result

    def _auth_line(self, line: bytes | LineTooLong) -> Event | None:
        if isinstance(line, LineTooLong):
            self._enter(Phase.COMMAND)
            self._send(R.LINE_TOO_LONG)
            return None
        return AuthResponse(line.decode("ascii", "replace"))

    def _violation(self, reply: Reply, reason: str) -> None:
        self._send(reply)
        self._events.append(ProtocolViolation(reply, reason))
        self._close(reason)

    # ---- decisions ---------------------------------------------------------------------
    def _take_pending(self) -> Event:
        event = self._pending
        if event is None:
            raise ProtocolUsageError("no command is waiting for a decision")
        self._pending = None
        return event

    def accept(self, reply: Reply | None = None) -> None:
        """Approve the pending command; `reply` overrides the default positive reply."""
        event = self._take_pending()
        session = self.session
        match event:
            case Hello():
                self._end_transaction(EndReason.HELLO)  # RFC 5321 §4.1.4
                default = hello_accepted(session, self.config, event, self.peer_name)
            case Mail():
                default = mail_accepted(session, event)
            case Rcpt():
                default = rcpt_accepted(session, event)
            case Data(chunking=True):
                command, self._first_bdat = self._first_bdat, None
                assert command is not None
                session.envelope.chunking = True
                self._chunks = ChunkReader(self.config.max_message_size, self._received)
                self._chunks.start(command.size, command.last)
                self._enter(Phase.CHUNK)
                return
            case Vrfy() | Expn():
                default = R.VRFY_CANNOT  # the application gives the answer in `reply`
            case Data():
                self._send(reply or R.START_DATA)
                if self.config.enforce_pipelining_sync and len(self._lines):
                    # Message content before our 354: the client did not wait (RFC 2920 §3.1).
                    self._violation(R.SYNC_ERROR, "message data sent before the 354 reply")
                else:
                    self._enter(Phase.DATA)
                return
            case EndOfData():
                self._send(reply or R.OK)
                self._end_transaction(EndReason.ACCEPTED)
                return
            case StartTLS():
                self._send(reply or R.READY_TLS)
                self._enter(Phase.TLS_PENDING)
                return
            case Auth() | AuthResponse():
                raise ProtocolUsageError("use auth_succeeded() or reject() for AUTH")
            case _:  # pragma: no cover - every event type above is handled
                raise ProtocolUsageError(f"cannot accept {event!r}")
        self._send(reply or default)

    def reject(self, reply: Reply) -> None:
        """Refuse the pending command with `reply`; the state stays as it was."""
        event = self._take_pending()
        if isinstance(event, (Auth, AuthResponse)):
            self._enter(Phase.COMMAND)
        if isinstance(event, Data) and event.chunking and reply.code != 421:
            command, self._first_bdat = self._first_bdat, None
            assert command is not None
            self._skip_chunk(command.size, reply)  # the reply goes out after the octets
            return
        self._send(reply)
        if isinstance(event, EndOfData):
            self._end_transaction(EndReason.REJECTED)
        if reply.code == 421:
            self._close(f"421 after {type(event).__name__}")

    def decide(self, reply: Reply | None) -> None:
        """accept() when `reply` is None or positive, else reject(reply)."""
        if reply is None or reply.is_positive:
            self.accept(reply)
        else:
            self.reject(reply)

    def challenge(self, b64_text: str) -> None:
        """Continue a SASL exchange: send `334 <text>` and read the client's next line raw."""
        event = self._take_pending()
        if not isinstance(event, (Auth, AuthResponse)):
            raise ProtocolUsageError("challenge() outside AUTH")
        self._out += f"334 {b64_text}\r\n".encode("ascii")
        self._enter(Phase.AUTH)

    def auth_succeeded(self, user: str) -> None:
        event = self._take_pending()
        if not isinstance(event, (Auth, AuthResponse)):
            raise ProtocolUsageError("auth_succeeded() outside AUTH")
        self.session.auth_user = user
        self._enter(Phase.COMMAND)
        self._send(R.AUTH_OK)

    def tls_started(self) -> None:
        """The handshake finished: forget everything (RFC 3207 §4.2); EHLO is needed again."""
        if self.phase is not Phase.TLS_PENDING:
            raise ProtocolUsageError("tls_started() without STARTTLS")
        self._enter(Phase.COMMAND)

    def close(self, reply: Reply, reason: str) -> None:
        """Send a final reply (421 timeout, shutdown) and close."""
        if self.phase is Phase.CLOSED:
            return
        self._pending = None
        self._send(reply)
        self._close(reason)

    def connection_lost(self, reason: str = "peer closed") -> None:
        """The transport is gone (EOF, reset, failure): close without a reply. What was open
        ends here like anywhere else (`TransactionEnded`, `ConnectionClosed`); events still
        queued from earlier bytes are dropped, nobody is left to answer them."""
        if self.phase is Phase.CLOSED:
            return
        self._events.clear()
        self._close(reason)

    @property
    def pending(self) -> Event | None:
        return self._pending
