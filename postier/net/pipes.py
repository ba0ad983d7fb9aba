"""One duplex transport over two pipes (stdin, stdout): what `--inetd` gets from a pipeline.

inetd, `nc -l -e` and systemd `Accept=yes` hand a socket on fd 0/1 and need none of this;
a program that starts `postier serve --inetd` behind two pipes (socat's `EXEC:...,pipes`, a
test harness, a script) does. The session wants one `asyncio.Transport`; asyncio offers a read
pipe and a write pipe, so this class joins them and forwards the callbacks.

What it cannot do, it says: there is no `ssl_object`, and STARTTLS is never offered on pipes
(`loop.start_tls` needs a socket transport), so the session stays honest about TLS.
"""

from __future__ import annotations

import asyncio
from typing import Any


class _ReadSide(asyncio.Protocol):
    def __init__(self, owner: PipePairTransport) -> None:
        self.owner = owner

    def data_received(self, data: bytes) -> None:
        self.owner.protocol.data_received(data)

    def eof_received(self) -> bool | None:
        return self.owner.protocol.eof_received()  # type: ignore[attr-defined, no-any-return]

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is not None:  # a read error ends the connection; EOF alone does not
            self.owner.finished(exc)


class _WriteSide(asyncio.BaseProtocol):
    def __init__(self, owner: PipePairTransport) -> None:
        self.owner = owner

    def pause_writing(self) -> None:
        self.owner.protocol.pause_writing()

    def resume_writing(self) -> None:
        self.owner.protocol.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self.owner.finished(exc)  # after close() flushed everything, or on a write error


class PipePairTransport(asyncio.Transport):
    """Reads from one pipe, writes to another; the protocol sees a single connection."""

    def __init__(self, protocol: asyncio.Protocol, extra: dict[str, Any]) -> None:
        super().__init__(extra)
        self.protocol = protocol
        self._reader: asyncio.ReadTransport | None = None
        self._writer: asyncio.WriteTransport | None = None
        self._closing = False
        self._lost = False
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    @classmethod
    async def open(
        cls, protocol: asyncio.Protocol, read_fd: int, write_fd: int, extra: dict[str, Any]
    ) -> PipePairTransport:
        """Connect both pipes; the protocol's connection_made runs before any byte arrives."""
        loop = asyncio.get_running_loop()
        self = cls(protocol, extra)
        # The transports own these file objects; closefd=False keeps fd 0/1 themselves open
        # until the process exits, which is at most moments after the session ends.
        self._writer, _ = await loop.connect_write_pipe(
            lambda: _WriteSide(self),
            open(write_fd, "wb", buffering=0, closefd=False),  # noqa: SIM115
        )
        protocol.connection_made(self)
        self._reader, _ = await loop.connect_read_pipe(
            lambda: _ReadSide(self),
            open(read_fd, "rb", buffering=0, closefd=False),  # noqa: SIM115
        )
        if self._closing:  # the protocol refused at connection_made
            self._reader.close()
        return self

    def finished(self, exc: Exception | None) -> None:
        """The output is flushed and closed, or a pipe failed: the connection is over.

        EOF on input is not the end: the protocol hears `eof_received`, answers what it
        still owes, and closes; only the write side's end says everything went out."""
        if self._lost:
            return
        self._lost = True
        self._closing = True
        if self._reader is not None:
            self._reader.close()
        if self._writer is not None and not self._writer.is_closing():
            self._writer.abort()
        self.protocol.connection_lost(exc)
        if not self.closed.done():
            self.closed.set_result(None)

    # ---- asyncio.Transport -------------------------------------------------------------
    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._writer is not None and not self._closing:
            self._writer.write(data)

    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        """Flush what is written, then close both sides (the writer's close waits)."""
        if self._closing:
            return
        self._closing = True
        if self._reader is not None:
            self._reader.close()
        if self._writer is not None:
            self._writer.close()

    def abort(self) -> None:
        self._closing = True
        if self._reader is not None:
            self._reader.close()
        if self._writer is not None:
            self._writer.abort()

    def pause_reading(self) -> None:
        if self._reader is not None and self._reader.is_reading():
            self._reader.pause_reading()

    def resume_reading(self) -> None:
        if self._reader is not None and not self._reader.is_reading() and not self._closing:
            self._reader.resume_reading()

    def is_reading(self) -> bool:
        return self._reader is not None and self._reader.is_reading()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        if self._writer is not None:
            self._writer.set_write_buffer_limits(high, low)

    def get_write_buffer_size(self) -> int:
        return self._writer.get_write_buffer_size() if self._writer is not None else 0

    def can_write_eof(self) -> bool:
        return False
