"""The load generator's engine: S concurrent SMTP sessions sharing N messages.

Each session opens a connection, says EHLO, then takes messages from a shared counter and
sends them back to back (or one per connection), optionally pipelined, over plaintext,
STARTTLS or implicit TLS, with AUTH PLAIN when asked. The measurements (latency per message,
errors with their first texts, TLS handshakes and resumptions) go into one ``LoadResult``.
bench/loadgen.py is its command line and synchronous wrapper; see its docstring for the
rules of the load.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ssl
import time
from dataclasses import asdict, dataclass, field

MAX_ERROR_SAMPLES = 20


@dataclass(frozen=True)
class LoadConfig:
    host: str = "127.0.0.1"
    port: int = 25
    messages: int = 1000
    size: int = 2048
    sessions: int = 1
    recipients: tuple[str, ...] = ("postmaster@example.org",)
    sender: str = "loadgen@bench.example"
    helo: str = "loadgen.bench.example"
    pipelining: bool = False
    per_connection: bool = False
    deadline: float = 120.0
    connect_timeout: float = 10.0
    starttls: bool = False  # STARTTLS after EHLO, then EHLO again
    tls: bool = False  # implicit TLS from the first byte (port 465 style)
    tls_resume: bool = False  # offer the last session ticket on each new connection
    auth: str | None = None  # "user:password": AUTH PLAIN once per connection
    connect_only: bool = False  # no mail: each unit is one connection's opening and QUIT
    message_file: str | None = None  # send this file's message instead of a generated one


@dataclass
class LoadResult:
    config: dict
    ok: int = 0
    failed: int = 0  # a transaction that got a reply other than the expected one
    io_errors: int = 0  # connection refused / reset / closed mid-transaction
    unsent: int = 0  # never attempted: the deadline came first
    connections: int = 0
    elapsed: float = 0.0
    timed_out: bool = False
    tls_handshakes: int = 0
    tls_resumed: int = 0  # handshakes that resumed an earlier session (abbreviated)
    tls_version: str | None = None  # of the first handshake, e.g. "TLSv1.3 TLS_AES_256_GCM_SHA384"
    latencies: list[float] = field(default_factory=list, repr=False)
    error_samples: list[str] = field(default_factory=list)

    @property
    def errors(self) -> int:
        return self.failed + self.io_errors + self.unsent

    @property
    def rate(self) -> float:
        return self.ok / self.elapsed if self.elapsed > 0 else 0.0

    def p(self, q: float) -> float | None:
        return percentile(self.latencies, q)

    def summary(self) -> dict:
        """A JSON-friendly digest (latencies in milliseconds, without the raw list)."""
        d = {k: v for k, v in asdict(self).items() if k != "latencies"}
        p50, p99 = self.p(50), self.p(99)
        d.update(
            errors=self.errors,
            msgs_per_s=round(self.rate, 1),
            p50_ms=None if p50 is None else round(p50 * 1000, 3),
            p99_ms=None if p99 is None else round(p99 * 1000, 3),
            max_ms=round(max(self.latencies) * 1000, 3) if self.latencies else None,
        )
        return d

    def note_error(self, text: str) -> None:
        if len(self.error_samples) < MAX_ERROR_SAMPLES:
            self.error_samples.append(text)

    def count_error(self, exc: BaseException) -> None:
        """A refused reply counts as failed, anything else as an I/O error."""
        if isinstance(exc, _ReplyError):
            self.failed += 1
            self.note_error(str(exc))
        else:
            self.io_errors += 1
            self.note_error(f"{type(exc).__name__}: {exc}")


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100) of ``values``; None when empty."""
    if not values:
        return None
    s = sorted(values)
    k = max(0, min(len(s) - 1, round(q / 100.0 * len(s) + 0.5) - 1))
    return s[k]


def build_message(size: int, sender: str, rcpt: str) -> tuple[bytes, bytes]:
    """Return (head, tail) of a message; the sequence number goes between them.

    ``size`` is the payload (body) length in bytes, headers excluded, as smtp-source's
    ``-l``. The body is lines of 'X' of at most 78 characters plus CRLF, so no line needs
    dot-stuffing. ``tail`` ends with the terminating ``.`` line.
    """
    head = (
        f"From: <{sender}>\r\nTo: <{rcpt}>\r\nSubject: loadgen\r\n"
        "Date: Thu, 01 Jan 2026 00:00:00 +0000\r\nMessage-ID: <"
    ).encode()
    full, rest = divmod(max(size, 0), 80)
    body = (b"X" * 78 + b"\r\n") * full
    if rest:
        body += b"X" * max(rest - 2, 0) + b"\r\n"
    tail = b"@loadgen.bench.example>\r\n\r\n" + body + b".\r\n"
    return head, tail


def fixed_message(message: bytes) -> tuple[bytes, bytes]:
    """(head, tail) for sending `message` as it is, e.g. one carrying a DKIM signature.

    The sequence number goes into an `X-Loadgen-Seq:` field above it, which no signature
    covers; lines starting with "." are dot-stuffed and line ends made CRLF.
    """
    lines = message.replace(b"\r\n", b"\n").split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    data = b"".join((b"." + ln if ln.startswith(b".") else ln) + b"\r\n" for ln in lines)
    return b"X-Loadgen-Seq: ", b"\r\n" + data + b".\r\n"


class _ClientContext(ssl.SSLContext):
    """An unverified client context that can offer a saved session on every new connection.

    asyncio (and uvloop) make each connection's SSLObject through ``wrap_bio`` and have no
    way to pass a session: this override adds the one in ``self.resume`` (None: a full
    handshake).
    """

    resume: ssl.SSLSession | None = None

    def wrap_bio(self, incoming, outgoing, server_side=False, server_hostname=None, session=None):
        return super().wrap_bio(
            incoming, outgoing, server_side, server_hostname, session=session or self.resume
        )


def client_context() -> _ClientContext:
    ctx = _ClientContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


class _Shared:
    """The counter the sessions take message numbers from, and the result they fill."""

    def __init__(self, cfg: LoadConfig, result: LoadResult) -> None:
        self.cfg = cfg
        self.result = result
        self.next = 0
        self.tls_ctx = client_context() if cfg.tls or cfg.starttls else None
        self.auth = None
        if cfg.auth is not None:
            user, _, password = cfg.auth.partition(":")
            token = base64.b64encode(f"\0{user}\0{password}".encode()).decode()
            self.auth = f"AUTH PLAIN {token}\r\n".encode()
        if cfg.message_file is not None:
            with open(cfg.message_file, "rb") as f:
                fixed = fixed_message(f.read())
            self.bodies = [fixed for _ in cfg.recipients]
        else:
            self.bodies = [build_message(cfg.size, cfg.sender, r) for r in cfg.recipients]
        self.mail = f"MAIL FROM:<{cfg.sender}>\r\n".encode()
        self.rcpts = [f"RCPT TO:<{r}>\r\n".encode() for r in cfg.recipients]
        self.ehlo = f"EHLO {cfg.helo}\r\n".encode()

    def take(self) -> int | None:
        if self.next >= self.cfg.messages:
            return None
        self.next += 1
        return self.next - 1


class _ReplyError(Exception):
    pass


async def _reply(reader: asyncio.StreamReader) -> tuple[int, list[bytes]]:
    """Read one (possibly multi-line) reply; return its code and its lines."""
    lines = []
    while True:
        line = await reader.readline()
        if not line.endswith(b"\n"):
            raise ConnectionError("connection closed by the server")
        lines.append(line)
        if len(line) < 4 or line[3:4] != b"-":
            try:
                return int(line[:3]), lines
            except ValueError:
                raise _ReplyError(f"malformed reply {line[:80]!r}") from None


async def _expect(reader: asyncio.StreamReader, code: int, what: str) -> list[bytes]:
    got, lines = await _reply(reader)
    if got != code:
        raise _ReplyError(f"{what}: {b''.join(lines).decode(errors='replace').strip()}")
    return lines


def _offers(lines: list[bytes], keyword: bytes) -> bool:
    return any(line[4:].strip().upper().split(b" ")[0] == keyword for line in lines)


def _note_tls(sh: _Shared, writer: asyncio.StreamWriter) -> None:
    obj = writer.get_extra_info("ssl_object")
    if obj is None:
        return
    res = sh.result
    res.tls_handshakes += 1
    if obj.session_reused:
        res.tls_resumed += 1
    if res.tls_version is None:
        res.tls_version = f"{obj.version()} {(obj.cipher() or ('?',))[0]}"
    if sh.cfg.tls_resume:
        # read after a reply came over TLS, so that a TLS 1.3 ticket has arrived by now
        session = obj.session
        if session is not None and session.has_ticket:
            sh.tls_ctx.resume = session


async def _open(sh: _Shared) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, bool]:
    """Connect and say EHLO; with STARTTLS, TLS and AUTH configured, through them too."""
    cfg = sh.cfg
    tls = sh.tls_ctx if cfg.tls else None
    async with asyncio.timeout(cfg.connect_timeout):
        reader, writer = await asyncio.open_connection(
            cfg.host, cfg.port, limit=1 << 16, ssl=tls, server_hostname=None if tls is None else ""
        )
    sh.result.connections += 1
    try:
        await _expect(reader, 220, "greeting")
        writer.write(sh.ehlo)
        lines = await _expect(reader, 250, "EHLO")
        if cfg.starttls:
            if not _offers(lines, b"STARTTLS"):
                raise _ReplyError("STARTTLS not offered")
            writer.write(b"STARTTLS\r\n")
            await _expect(reader, 220, "STARTTLS")
            async with asyncio.timeout(cfg.connect_timeout):
                await writer.start_tls(sh.tls_ctx, server_hostname="")
            writer.write(sh.ehlo)
            lines = await _expect(reader, 250, "EHLO after STARTTLS")
        if cfg.tls or cfg.starttls:
            _note_tls(sh, writer)
        if sh.auth is not None:
            writer.write(sh.auth)
            await _expect(reader, 235, "AUTH PLAIN")
    except BaseException:
        writer.close()
        raise
    return reader, writer, _offers(lines, b"PIPELINING")


async def _close(writer: asyncio.StreamWriter, reader: asyncio.StreamReader | None) -> None:
    if reader is not None:
        with contextlib.suppress(Exception):
            writer.write(b"QUIT\r\n")
            await reader.readline()
    writer.close()
    with contextlib.suppress(Exception):
        await writer.wait_closed()


async def _transaction(sh, reader, writer, seq: int, pipeline: bool) -> None:
    """Send one message; raise _ReplyError or an OSError when it is not accepted."""
    i = seq % len(sh.rcpts)
    head, tail = sh.bodies[i]
    t0 = time.perf_counter()
    if pipeline:
        writer.write(sh.mail + sh.rcpts[i] + b"DATA\r\n")
        m, ml = await _reply(reader)
        r, rl = await _reply(reader)
        d, dl = await _reply(reader)
        if d == 354:
            # The server wants data although MAIL or RCPT failed: give it an empty
            # message (just the dot) so the dialogue stays in step.
            if m != 250 or r not in (250, 251):
                writer.write(b".\r\n")
                await _reply(reader)
            else:
                writer.write(head + str(seq).encode() + tail)
                await _expect(reader, 250, "end of data")
                sh.result.latencies.append(time.perf_counter() - t0)
                return
        bad = ml if m != 250 else rl if r not in (250, 251) else dl
        raise _ReplyError("pipelined: " + b"".join(bad).decode(errors="replace").strip())
    writer.write(sh.mail)
    await _expect(reader, 250, "MAIL")
    writer.write(sh.rcpts[i])
    code, lines = await _reply(reader)
    if code not in (250, 251):
        raise _ReplyError("RCPT: " + b"".join(lines).decode(errors="replace").strip())
    writer.write(b"DATA\r\n")
    await _expect(reader, 354, "DATA")
    writer.write(head + str(seq).encode() + tail)
    await _expect(reader, 250, "end of data")
    sh.result.latencies.append(time.perf_counter() - t0)


async def _session(sh: _Shared) -> None:
    res = sh.result
    cfg = sh.cfg
    reader = writer = None
    pipeline = False
    try:
        while (seq := sh.take()) is not None:
            try:
                if writer is None:
                    reader, writer, can = await _open(sh)
                    pipeline = cfg.pipelining and can
                await _transaction(sh, reader, writer, seq, pipeline)
                res.ok += 1
            except (_ReplyError, OSError, asyncio.IncompleteReadError, TimeoutError) as e:
                res.count_error(e)
                # the dialogue may be out of step: start afresh on a new connection, after
                # a pause so as not to spin against a server that refuses or a dead port
                if writer is not None:
                    writer.close()
                reader = writer = None
                await asyncio.sleep(0.01)
            if cfg.per_connection and writer is not None:
                await _close(writer, reader)
                reader = writer = None
    finally:
        if writer is not None:
            await _close(writer, reader)


async def _connect_session(sh: _Shared) -> None:
    """``connect_only``: each unit is a connection opened as configured and closed by QUIT."""
    res = sh.result
    while sh.take() is not None:
        writer = None
        t0 = time.perf_counter()
        try:
            reader, writer, _ = await _open(sh)
            writer.write(b"QUIT\r\n")
            await _expect(reader, 221, "QUIT")
            res.latencies.append(time.perf_counter() - t0)
            res.ok += 1
        except (_ReplyError, OSError, asyncio.IncompleteReadError, TimeoutError) as e:
            res.count_error(e)
            await asyncio.sleep(0.01)
        finally:
            if writer is not None:
                writer.close()
                # bounded: a TLS close waits for the peer's close_notify otherwise
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(5):
                        await writer.wait_closed()


async def run_load(cfg: LoadConfig) -> LoadResult:
    """Run the load described by ``cfg``; never longer than ``cfg.deadline`` seconds."""
    if not cfg.recipients:
        raise ValueError("at least one recipient is needed")
    if cfg.tls and cfg.starttls:
        raise ValueError("tls (implicit) and starttls exclude each other")
    if cfg.tls_resume and not (cfg.tls or cfg.starttls):
        raise ValueError("tls_resume needs tls or starttls")
    config = asdict(cfg)
    if cfg.auth is not None:
        config["auth"] = cfg.auth.partition(":")[0] + ":***"
    result = LoadResult(config=config)
    sh = _Shared(cfg, result)
    session = _connect_session if cfg.connect_only else _session
    t0 = time.perf_counter()
    tasks = [asyncio.create_task(session(sh)) for _ in range(max(1, cfg.sessions))]
    try:
        async with asyncio.timeout(cfg.deadline):
            await asyncio.gather(*tasks)
    except TimeoutError:
        result.timed_out = True
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    result.elapsed = time.perf_counter() - t0
    # A message taken but neither accepted nor failed when the deadline cut in counts as
    # unsent, as do those never taken.
    result.unsent = cfg.messages - result.ok - result.failed - result.io_errors
    return result
