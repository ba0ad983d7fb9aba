"""Wake the scheduler from another worker process: one datagram per committed entry.

The scheduler runs in one worker (the one holding the queue's lock); sessions in the other
workers commit to the same queue and must tell it. A flush request file (DIR/flush/<id>,
`QueueStore.request_flush`) reaches it at its next poll, up to a second later, and costs the
creation and removal of a file. A datagram on a Unix socket in DIR/flush/ reaches it at once,
for one `sendto`. The file stays the fallback whenever the datagram cannot go (no scheduler
listening yet, or its socket's queue is full): nothing can be lost either way, since the
entry is committed before the scheduler is told, and a restart schedules every committed
entry anyway.

DIR/flush/ is private to the daemon's user (0700), so only the daemon's own processes can
reach the socket; a datagram carries a queue id and nothing else, checked on receipt.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Callable
from pathlib import Path

from postier.queue.ids import is_queue_id

log = logging.getLogger("postier.queue")

SOCKET_NAME = ".wakeup"  # in DIR/flush/; a dot name, so flush requests never take it for one
_MAX_ID = 64  # bytes; a queue id is far shorter
_PER_WAKE = 256  # datagrams read per readiness callback, so one burst cannot hog the loop


class WakeupListener:
    """The scheduler's end: each valid queue id received goes to `on_id` (on the loop)."""

    def __init__(self, flush_dir: Path, on_id: Callable[[str], None]) -> None:
        self.path = flush_dir / SOCKET_NAME
        self.on_id = on_id
        self._sock: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> None:
        """Bind the socket (replacing one a previous daemon left: we hold the queue's lock,
        so no other scheduler uses it) and read it from the running loop."""
        loop = asyncio.get_running_loop()
        self.path.unlink(missing_ok=True)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            sock.bind(str(self.path))
            loop.add_reader(sock.fileno(), self._readable)
        except BaseException:
            sock.close()
            raise
        self._sock, self._loop = sock, loop

    def _readable(self) -> None:
        assert self._sock is not None
        for _ in range(_PER_WAKE):
            try:
                data = self._sock.recv(_MAX_ID)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.error("event=wakeup_failed error=%r", str(exc))
                return
            queue_id = data.decode("ascii", "replace")
            if is_queue_id(queue_id):
                self.on_id(queue_id)

    def close(self) -> None:
        if self._sock is None:
            return
        sock, self._sock = self._sock, None
        if self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(sock.fileno())
        sock.close()
        with contextlib.suppress(OSError):
            self.path.unlink()


class WakeupSender:
    """A worker's end: `send(id)` is True when the scheduler's socket took the datagram."""

    def __init__(self, flush_dir: Path) -> None:
        self.path = str(flush_dir / SOCKET_NAME)
        self._sock: socket.socket | None = None

    def send(self, queue_id: str) -> bool:
        """Never blocks: False (and the caller writes a flush request) on any failure."""
        try:
            if self._sock is None:  # made lazily: in the worker process that uses it
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                sock.setblocking(False)
                self._sock = sock
            self._sock.sendto(queue_id.encode("ascii"), self.path)
        except OSError:  # no listener (yet), a full queue, a stale socket file
            return False
        return True

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
