"""Wake the scheduler from another worker process: one datagram per committed entry.

The scheduler runs in one worker (the one holding the queue's lock); sessions in the other
workers commit to the same queue and must tell it. A flush request file (DIR/flush/<id>,
`QueueStore.request_flush`) reaches it at its next poll, up to a second later, and costs the
creation and removal of a file. A datagram on a Unix socket in DIR/flush/ reaches it at once,
for one `sendto`. The file stays the fallback whenever the datagram cannot go (no scheduler
listening yet, or its socket's queue is full): nothing can be lost either way, since the
entry is committed before the scheduler is told, and a restart schedules every committed
entry anyway.

A datagram may also carry the entry as committed (its envelope JSON) and a small message's
content, which the committing worker has in memory anyway: the scheduler's first attempt
then reads neither file back (as for the commits of its own process). Its form:
`<queue id> <envelope length> <content length, -1: none>\n<envelope><content>`; one whose
lengths do not add up counts as the bare queue id.

DIR/flush/ is private to the daemon's user (0700), so only the daemon's own processes can
reach the socket; the queue id is checked on receipt, the envelope parsed like a file's.
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
MAX_CARRIED = 60 * 1024  # envelope and content together; a larger message goes as its id
_MAX_DATAGRAM = MAX_CARRIED + 128  # with the header line
_PER_WAKE = 256  # datagrams read per readiness callback, so one burst cannot hog the loop

# What the scheduler is told: the queue id, and the envelope and content when carried.
OnWakeup = Callable[[str, bytes | None, bytes | None], None]


def encode(queue_id: str, envelope: bytes | None = None, content: bytes | None = None) -> bytes:
    """The datagram for `queue_id`; envelope and content only when both fit in it."""
    if envelope is None or len(envelope) + len(content or b"") > MAX_CARRIED:
        return queue_id.encode("ascii")
    size = -1 if content is None else len(content)
    head = f"{queue_id} {len(envelope)} {size}\n".encode("ascii")
    return b"".join((head, envelope, content or b""))


def decode(data: bytes) -> tuple[str, bytes | None, bytes | None] | None:
    """(queue id, envelope, content) from a datagram; None when not even the id is valid."""
    head, nl, rest = data.partition(b"\n")
    words = head.decode("ascii", "replace").split(" ")
    queue_id = words[0]
    if not is_queue_id(queue_id):
        return None
    if not nl or len(words) != 3:
        return queue_id, None, None
    try:
        env_len, content_len = int(words[1]), int(words[2])
    except ValueError:
        return queue_id, None, None
    if env_len < 0 or len(rest) != env_len + max(content_len, 0):
        return queue_id, None, None
    content = rest[env_len:] if content_len >= 0 else None
    return queue_id, rest[:env_len], content


class WakeupListener:
    """The scheduler's end: each valid datagram goes to `on_wakeup` (on the loop)."""

    def __init__(self, flush_dir: Path, on_wakeup: OnWakeup) -> None:
        self.path = flush_dir / SOCKET_NAME
        self.on_wakeup = on_wakeup
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
                data = self._sock.recv(_MAX_DATAGRAM)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.error("event=wakeup_failed error=%r", str(exc))
                return
            told = decode(data)
            if told is not None:
                self.on_wakeup(*told)

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

    def send(
        self, queue_id: str, envelope: bytes | None = None, content: bytes | None = None
    ) -> bool:
        """Never blocks: False (and the caller writes a flush request) on any failure."""
        try:
            if self._sock is None:  # made lazily: in the worker process that uses it
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                sock.setblocking(False)
                self._sock = sock
            self._sock.sendto(encode(queue_id, envelope, content), self.path)
        except OSError:  # no listener (yet), a full queue, a stale socket file
            return False
        return True

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
