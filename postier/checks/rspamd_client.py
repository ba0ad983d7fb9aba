"""A client for rspamd's HTTP protocol (`POST /checkv2`), streaming the spooled message.

Why our own small client and not an HTTP library: the exchange is one request shape on a
keep-alive connection to a loopback daemon, and what matters is that the message body goes
from the spool file to the socket in pieces (a 35 MB message never sits in memory) and that
every failure — refused connection, time-out, a broken or odd answer — becomes one
`RspamdUnavailable`, which the caller turns into 451 (fail closed) or an accepted message
with a header (fail open). The envelope travels as rspamd expects it: request headers
`From`, `Rcpt` (once per recipient), `IP`, `Helo`, `Hostname`, `User`, `Queue-Id`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

# rspamd's answer for a 35 MB message is a few KiB; anything far larger is not rspamd.
MAX_RESPONSE = 1024 * 1024
CHUNK = 256 * 1024


class RspamdUnavailable(Exception):
    """rspamd could not give a verdict (down, slow, or an answer we cannot read)."""


@dataclass(frozen=True, slots=True)
class ScanEnvelope:
    """What rspamd is told about the message besides its bytes."""

    ip: str
    helo: str
    sender: str  # "" for <>
    recipients: Sequence[str]
    hostname: str
    queue_id: str
    user: str = ""  # the AUTH user for submission scans


@dataclass(frozen=True, slots=True)
class RspamdVerdict:
    action: str  # "no action", "add header", "rewrite subject", "soft reject", "greylist", "reject"
    score: float
    required_score: float
    message: str = ""  # messages.smtp_message, for the SMTP reply
    subject: str = ""  # the rewritten subject for "rewrite subject"
    symbols: tuple[str, ...] = ()
    add_headers: tuple[tuple[str, str], ...] = ()  # milter.add_headers, in order
    remove_headers: tuple[str, ...] = ()  # milter.remove_headers
    extra: dict[str, object] = field(default_factory=dict)

    @classmethod
    def from_json(cls, data: object) -> RspamdVerdict:
        """Read the parts of a /checkv2 answer we act on; raise ValueError on nonsense."""
        if not isinstance(data, dict) or not isinstance(data.get("action"), str):
            raise ValueError("answer without an action")
        messages = data.get("messages")
        message = ""
        if isinstance(messages, dict) and isinstance(messages.get("smtp_message"), str):
            message = messages["smtp_message"]
        symbols = data.get("symbols")
        milter = data.get("milter") if isinstance(data.get("milter"), dict) else {}
        assert isinstance(milter, dict)
        return cls(
            action=data["action"],
            score=_number(data.get("score")),
            required_score=_number(data.get("required_score")),
            message=message,
            subject=data["subject"] if isinstance(data.get("subject"), str) else "",
            symbols=tuple(sorted(symbols)) if isinstance(symbols, dict) else (),
            add_headers=_milter_add(milter.get("add_headers")),
            remove_headers=_milter_remove(milter.get("remove_headers")),
        )


def _number(value: object) -> float:
    return float(value) if isinstance(value, int | float) else 0.0


def _milter_add(value: object) -> tuple[tuple[str, str], ...]:
    """milter.add_headers: {name: "value"} or {name: {"value": v, "order": n}} or a list."""
    if not isinstance(value, dict):
        return ()
    out: list[tuple[int, str, str]] = []
    for name, spec in value.items():
        items = spec if isinstance(spec, list) else [spec]
        for item in items:
            if isinstance(item, str):
                out.append((0, name, item))
            elif isinstance(item, dict) and isinstance(item.get("value"), str):
                order = item.get("order")
                out.append((order if isinstance(order, int) else 0, name, item["value"]))
    out.sort(key=lambda t: t[0])
    return tuple((name, text) for _, name, text in out if _header_safe(name, text))


def _milter_remove(value: object) -> tuple[str, ...]:
    if not isinstance(value, dict):
        return ()
    return tuple(name for name in value if _header_safe(name, ""))


def _header_safe(name: str, value: str) -> bool:
    """A header from rspamd goes into stored mail: no line breaks, a plain field name."""
    return (
        bool(name)
        and all(33 <= ord(c) <= 126 and c != ":" for c in name)
        and "\n" not in value
        and "\r" not in value
    )


class RspamdClient:
    """One rspamd endpoint with a small pool of kept-alive connections."""

    def __init__(self, url: str, timeout: float = 30.0, pool_size: int = 4) -> None:
        parts = urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"rspamd URL must be http://HOST:PORT, not {url!r}")
        self.host = parts.hostname
        self.port = parts.port or 11333
        self.path = (parts.path.rstrip("/") or "") + "/checkv2"
        self.timeout = timeout
        self._idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        self._pool_size = pool_size

    async def check(self, path: Path, offset: int, envelope: ScanEnvelope) -> RspamdVerdict:
        """Scan the spool file from `offset` (after Return-Path); RspamdUnavailable on failure."""
        try:
            return await asyncio.wait_for(self._check(path, offset, envelope), self.timeout)
        except RspamdUnavailable:
            raise
        except (OSError, TimeoutError, asyncio.IncompleteReadError, ValueError) as exc:
            raise RspamdUnavailable(str(exc) or type(exc).__name__) from None

    async def _check(self, path: Path, offset: int, envelope: ScanEnvelope) -> RspamdVerdict:
        size = os.stat(path).st_size - offset
        head = self._request_head(size, envelope)
        # A kept-alive connection may have been closed by rspamd meanwhile: one retry on a
        # fresh connection, only when the failure came before any answer byte.
        for attempt in (0, 1):
            reader, writer, reused = await self._connection(fresh=attempt == 1)
            try:
                writer.write(head)
                await _send_file(writer, path, offset, size)
                status, headers, body = await _read_response(reader)
            except (OSError, asyncio.IncompleteReadError) as exc:
                writer.close()
                if reused and attempt == 0:
                    continue
                raise RspamdUnavailable(f"connection to rspamd failed: {exc}") from None
            if headers.get("connection", "").lower() == "close":
                writer.close()
            else:
                self._release(reader, writer)
            if status != 200:
                raise RspamdUnavailable(f"rspamd answered HTTP {status}")
            return RspamdVerdict.from_json(json.loads(body))
        raise RspamdUnavailable("no connection to rspamd")  # pragma: no cover

    def _request_head(self, size: int, env: ScanEnvelope) -> bytes:
        lines = [
            f"POST {self.path} HTTP/1.1",
            f"Host: {self.host}:{self.port}",
            f"Content-Length: {size}",
            "Connection: keep-alive",
            f"IP: {env.ip}",
            f"Helo: {env.helo}",
            f"From: <{env.sender}>",
            f"Hostname: {env.hostname}",
            f"Queue-Id: {env.queue_id}",
        ]
        lines += [f"Rcpt: <{r}>" for r in env.recipients]
        if env.user:
            lines.append(f"User: {env.user}")
        text = "\r\n".join(lines) + "\r\n\r\n"
        # Envelope values are already validated SMTP syntax; still, never let one split a line.
        if any(c in text[:-4].replace("\r\n", "") for c in "\r\n"):
            raise ValueError("line break in an rspamd request header")
        return text.encode("utf-8")

    async def _connection(
        self, *, fresh: bool
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, bool]:
        while self._idle and not fresh:
            reader, writer = self._idle.pop()
            if not writer.is_closing() and not reader.at_eof():
                return reader, writer, True
            writer.close()
        reader, writer = await asyncio.open_connection(self.host, self.port)
        return reader, writer, False

    def _release(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(self._idle) < self._pool_size and not writer.is_closing():
            self._idle.append((reader, writer))
        else:
            writer.close()

    async def close(self) -> None:
        while self._idle:
            _, writer = self._idle.pop()
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()


async def _send_file(writer: asyncio.StreamWriter, path: Path, offset: int, size: int) -> None:
    """Copy the message to the socket piece by piece, reading off the event loop."""
    loop = asyncio.get_running_loop()
    with open(path, "rb") as f:
        f.seek(offset)
        left = size
        while left > 0:
            piece = await loop.run_in_executor(None, f.read, min(CHUNK, left))
            if not piece:
                raise OSError("spool file shorter than expected")
            writer.write(piece)
            left -= len(piece)
            await writer.drain()


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    status_line = await reader.readline()
    parts = status_line.split(None, 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
        raise ValueError(f"not an HTTP answer: {status_line[:80]!r}")
    headers: dict[str, str] = {}
    while True:
        line = await reader.readline()
        if line in (b"\r\n", b"\n", b""):
            break
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
        if len(headers) > 100:
            raise ValueError("too many response headers")
    if "content-length" in headers:
        length = int(headers["content-length"])
        if not 0 <= length <= MAX_RESPONSE:
            raise ValueError(f"response of {length} bytes")
        body = await reader.readexactly(length)
    elif headers.get("transfer-encoding", "").lower() == "chunked":
        body = await _read_chunked(reader)
    else:
        body = await reader.read(MAX_RESPONSE + 1)
        if len(body) > MAX_RESPONSE:
            raise ValueError("response too large")
        headers["connection"] = "close"
    return int(parts[1]), headers, body


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    body = bytearray()
    while True:
        size_line = await reader.readline()
        size = int(size_line.split(b";")[0].strip() or b"0", 16)
        if size == 0:
            await reader.readline()
            return bytes(body)
        if len(body) + size > MAX_RESPONSE:
            raise ValueError("response too large")
        body += await reader.readexactly(size)
        await reader.readline()
