"""The metrics endpoint's life: bound by the parent, served by one worker, fed by all.

The parent binds the listening socket before the fork and before dropping privileges (a port
in use is a configuration error: exit 2 naming `metrics`), makes the multiprocess directory
and sets PROMETHEUS_MULTIPROC_DIR before anything imports prometheus_client. Every worker
registers a `MetricsObserver`; worker 0 (or the only one) also answers HTTP. A scrape reads
the files of every worker, so no worker's state is missing. When a worker dies, its live
gauges are dropped (`mark_process_dead`); its counters stay, so totals never go backwards.

The HTTP side is a few lines of asyncio on purpose: it answers GET/HEAD of `/metrics` and
`/healthz`, 404 for other paths, 405 for other methods and 400 for anything malformed or too
long, and it never waits more than a few seconds for a request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import socket
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from postier import log
from postier.config import Config
from postier.errors import ConfigError
from postier.netaddr import parse_listen

if TYPE_CHECKING:
    from postier.ops.metrics import MetricsObserver

_LOG = logging.getLogger("postier.metrics")

MAX_REQUEST = 8192  # request line and headers together
REQUEST_TIMEOUT = 10.0
RECENT_REFRESH = 5.0  # seconds between updates of the recent-messages gauges
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class MetricsRuntime:
    def __init__(self, config: Config) -> None:
        from postier.net.listeners import bind_sockets

        spec = parse_listen(config.metrics, "metrics")
        try:
            groups = bind_sockets(spec, 1)
        except ConfigError as exc:
            raise ConfigError(f"metrics: {exc}") from None
        self.sockets: list[socket.socket] = [group[0] for group in groups]
        self.queue_dir = Path(config.queue_dir)
        self.directory = tempfile.mkdtemp(prefix="postier-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = self.directory
        # Imported now, with the variable set and before the privilege drop.
        import postier.ops.metrics  # noqa: F401

        self._servers: list[asyncio.AbstractServer] = []
        self._tasks: list[asyncio.Task[None]] = []

    def chown(self, uid: int, gid: int) -> None:
        """Before the privilege drop: the workers write their value files here."""
        os.chown(self.directory, uid, gid)

    async def start_worker(self, serve_http: bool) -> None:
        from postier.ops.metrics import MetricsObserver

        observer = MetricsObserver()
        log.add_observer(observer)
        self._tasks.append(asyncio.get_running_loop().create_task(_refresh(observer)))
        if not serve_http:
            return
        for sock in self.sockets:
            self._servers.append(
                await asyncio.start_server(self._handle, sock=sock, limit=MAX_REQUEST)
            )
            name = sock.getsockname()
            log.event("metrics-listening", logger=_LOG, address=f"{name[0]}:{name[1]}")

    async def stop_worker(self) -> None:
        for server in self._servers:
            server.close()
        self._servers.clear()
        for task in self._tasks:
            task.cancel()
        self._tasks.clear()

    def worker_died(self, pid: int) -> None:
        from prometheus_client import multiprocess

        with contextlib.suppress(OSError):
            multiprocess.mark_process_dead(pid, self.directory)

    def close(self) -> None:
        for sock in self.sockets:
            sock.close()
        shutil.rmtree(self.directory, ignore_errors=True)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            status, body, head_only = await asyncio.wait_for(self._answer(reader), REQUEST_TIMEOUT)
        except (TimeoutError, ConnectionError, asyncio.IncompleteReadError):
            writer.close()
            return
        except (asyncio.LimitOverrunError, ValueError):
            status, body, head_only = "400 Bad Request", b"bad request\n", False
        content_type = CONTENT_TYPE if status.startswith("200") else "text/plain"
        head = (
            f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        )
        with contextlib.suppress(ConnectionError):
            writer.write(head.encode() + (b"" if head_only else body))
            await writer.drain()
        writer.close()

    async def _answer(self, reader: asyncio.StreamReader) -> tuple[str, bytes, bool]:
        head = await _read_head(reader)
        request_line = head.split(b"\r\n", 1)[0].decode("ascii")
        parts = request_line.split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            raise ValueError(request_line)
        method, target = parts[0], parts[1].split("?", 1)[0]
        if method not in ("GET", "HEAD"):
            return "405 Method Not Allowed", b"GET or HEAD\n", False
        if target == "/healthz":
            return "200 OK", b"ok\n", method == "HEAD"
        if target != "/metrics":
            return "404 Not Found", b"try /metrics or /healthz\n", False
        from postier.ops.metrics import exposition

        loop = asyncio.get_running_loop()
        text = await loop.run_in_executor(None, exposition, self.directory, self.queue_dir)
        return "200 OK", text, method == "HEAD"


async def _refresh(observer: MetricsObserver) -> None:
    while True:
        observer.refresh_recent()
        await asyncio.sleep(RECENT_REFRESH)


async def _read_head(reader: asyncio.StreamReader) -> bytes:
    """The request line and headers; ValueError when longer than MAX_REQUEST or not text."""
    head = b""
    while not head.endswith(b"\r\n\r\n") and not head.endswith(b"\n\n"):
        line = await reader.readline()
        if not line:
            raise asyncio.IncompleteReadError(head, None)
        head += line
        if len(head) > MAX_REQUEST:
            raise ValueError("request too long")
        if head in (b"\r\n", b"\n"):
            head = b""  # RFC 9112 §2.2: ignore empty lines before the request line
    return head.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
