"""The maildrop: how `postier sendmail` hands mail to the daemon, running or not.

`postier sendmail` (any local user) writes `DIR/maildrop/<id>.tmp` and renames it to
`DIR/maildrop/<id>` when complete (`drop()`), so a file without `.tmp` is always whole. The
daemon's `Maildrop.pickup()` turns each one into a spool-format file (adding `Return-Path`
and a `Received:` header naming the submitting uid, taken from the file's owner, not from
anything the user wrote) and passes it to a callback that queues or delivers it; only when
the callback returns is the maildrop file removed. A crash in between means the message is
picked up again: the queue id is the maildrop file's name, so a second `QueueStore.commit`
raises `EntryExists`, which the callback should treat as done.

File format: one JSON line `{"sender": ..., "recipients": [...], "time": ...}`, then the
message with LF line endings.

Permissions (the Postfix `postdrop` idea without a setgid helper): the directory belongs to
the daemon's user with mode 3733 (others may create files but not list or read them; setgid
makes new files belong to the daemon's group; sticky stops users deleting others' files);
files are created 0640, so the daemon can read them whatever user submitted them. The
pickup refuses anything that is not a plain file with one link (a user could hard-link a
file they cannot read into the maildrop and have the daemon mail it to them).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import stat
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from email.utils import formatdate
from pathlib import Path
from typing import IO

from postier.delivery.base import StoredMessage
from postier.delivery.fsutil import fsync_dir
from postier.queue.ids import is_queue_id, new_queue_id

log = logging.getLogger("postier.queue")

MAILDROP = "maildrop"
PICKUP = "pickup"
DIR_MODE = 0o3733
FILE_MODE = 0o640
STALE_TMP = 86400.0  # a .tmp older than this was left by a killed sendmail
CHUNK = 1 << 16

Deliver = Callable[[StoredMessage, list[str]], Awaitable[None]]


class MaildropError(Exception):
    """A maildrop file that can never be delivered (malformed, or a planted link)."""


def valid_address(address: str) -> bool:
    """Loose mailbox syntax: something@domain, no spaces, brackets or control characters."""
    if not address or len(address) > 512 or any(c in address for c in ' <>\t,"\\'):
        return False
    if not address.isprintable():
        return False
    local, at, domain = address.rpartition("@")
    return bool(at and local and domain and "." not in (domain[0], domain[-1]))


def maildrop_dir(queue_dir: str | os.PathLike[str]) -> Path:
    return Path(queue_dir) / MAILDROP


def ensure_maildrop_dir(queue_dir: str | os.PathLike[str], *, uid: int = -1, gid: int = -1) -> Path:
    """Create DIR/maildrop with its mode (and owner, when the daemon drops privileges)."""
    path = maildrop_dir(queue_dir)
    path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    with contextlib.suppress(FileExistsError):
        path.mkdir()
    if uid != -1 or gid != -1:
        os.chown(path, uid, gid)
    if stat.S_IMODE(path.stat().st_mode) != DIR_MODE:
        os.chmod(path, DIR_MODE)  # explicit: mkdir's mode is cut by the umask
    return path


def drop(
    queue_dir: str | os.PathLike[str],
    sender: str,
    recipients: list[str],
    write_body: Callable[[IO[bytes]], None],
    *,
    now: float | None = None,
) -> str:
    """Write one maildrop file atomically; `write_body(f)` writes the message (LF endings).

    Returns the queue id. Raises OSError (caller maps it to a sysexits code).
    """
    directory = maildrop_dir(queue_dir)
    queue_id = new_queue_id()
    tmp = directory / f"{queue_id}.tmp"
    envelope = {
        "sender": sender,
        "recipients": recipients,
        "time": time.time() if now is None else now,
    }
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, FILE_MODE)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(json.dumps(envelope, ensure_ascii=False).encode("utf-8") + b"\n")
            write_body(f)
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, directory / queue_id)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    with contextlib.suppress(OSError):  # durability of the name; best effort for users
        fsync_dir(directory)
    return queue_id


@dataclass(frozen=True, slots=True)
class Picked:
    message: StoredMessage
    recipients: list[str]
    lock_fd: int  # the maildrop file, flock'ed until `finish`/`release`


class Maildrop:
    """The daemon's side: `pickup()` periodically (`run()` does), on the event loop.

    Blocking file work goes through `executor` (None: the loop's default pool).
    """

    def __init__(
        self,
        queue_dir: str | os.PathLike[str],
        *,
        hostname: str,
        max_size: int = 35 * 1024 * 1024,
        executor: Executor | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.directory = ensure_maildrop_dir(queue_dir)
        self.work = Path(queue_dir) / PICKUP  # spool copies; same fs as the queue: links
        self.work.mkdir(mode=0o700, exist_ok=True)
        self.corrupt = Path(queue_dir) / "corrupt"
        self.corrupt.mkdir(mode=0o700, exist_ok=True)
        self.hostname = hostname
        self.max_size = max_size
        self.executor = executor
        self.clock = clock

    def ready(self) -> list[str]:
        """Names of complete maildrop files, oldest first; removes stale temporaries."""
        names = []
        now = self.clock()
        for name in os.listdir(self.directory):
            if is_queue_id(name):
                names.append(name)
            elif name.endswith(".tmp"):
                with contextlib.suppress(OSError):
                    if now - os.lstat(self.directory / name).st_mtime > STALE_TMP:
                        log.warning("maildrop: removing stale %s", name)
                        os.unlink(self.directory / name)
        return sorted(names)

    def prepare(self, name: str) -> Picked | None:
        """Blocking: read maildrop file `name`, write the spool copy. None: not ours now."""
        path = self.directory / name
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except FileNotFoundError:
            return None
        except OSError as exc:  # a symlink (ELOOP) or unreadable: never deliverable
            raise MaildropError(f"cannot open: {exc}") from None
        # The lock is held until the message is queued (`finish`), so two pickups (two
        # worker processes) never hand the same file on twice.
        lock_fd = os.dup(fd)
        try:
            with os.fdopen(fd, "rb") as f:
                try:
                    fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    os.close(lock_fd)
                    return None  # another pickup has it
                st = os.fstat(f.fileno())
                if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
                    raise MaildropError("not a plain file with a single link")
                if st.st_size > self.max_size + 65536:
                    raise MaildropError(f"too large ({st.st_size} bytes)")
                envelope = self._envelope(f.readline(65536))
                # Arrival is the file's ctime, set by the rename into place: unlike the
                # envelope's "time" or the mtime, the submitting user cannot forge it.
                return self._spool_copy(name, f, envelope, st.st_uid, st.st_ctime, lock_fd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.close(lock_fd)
            raise

    def _envelope(self, line: bytes) -> dict[str, object]:
        try:
            env = json.loads(line)
        except ValueError:
            raise MaildropError("malformed envelope line") from None
        sender, rcpts = env.get("sender"), env.get("recipients")
        if not isinstance(sender, str) or (sender and not valid_address(sender)):
            raise MaildropError(f"bad sender {sender!r}")
        if (
            not isinstance(rcpts, list)
            or not rcpts
            or not all(isinstance(r, str) and valid_address(r) for r in rcpts)
        ):
            raise MaildropError(f"bad recipients {rcpts!r}")
        if not isinstance(env.get("time"), int | float):
            raise MaildropError("bad time")
        return env

    def _spool_copy(
        self,
        name: str,
        f: IO[bytes],
        env: dict[str, object],
        uid: int,
        received_at: float,
        lock_fd: int,
    ) -> Picked:
        sender = str(env["sender"])
        recipients = [str(r) for r in env["recipients"]]  # type: ignore[attr-defined]
        head = f"Return-Path: <{sender}>\n".encode()
        received = (
            f"Received: by {self.hostname} (postier, from userid {uid})\n"
            f"\tid {name}; {formatdate(self.clock())}\n"
        ).encode()
        target = self.work / name
        eight_bit = False
        with open(target, "wb") as out:
            out.write(head + received)
            while chunk := f.read(CHUNK):
                eight_bit = eight_bit or not chunk.isascii()
                out.write(chunk)
            size = out.tell()
            out.flush()
            os.fsync(out.fileno())  # QueueStore.commit links this inode and relies on it
        utf8 = not (sender.isascii() and all(r.isascii() for r in recipients))
        message = StoredMessage(
            path=target,
            size=size,
            content_offset=len(head),
            sender=sender,
            queue_id=name,
            received_at=received_at,
            smtputf8=utf8,
            body_8bit=eight_bit,
        )
        return Picked(message, recipients, lock_fd)

    def finish(self, picked: Picked) -> None:
        """Blocking: the message is queued or delivered; forget the maildrop file."""
        name = picked.message.queue_id
        (self.directory / name).unlink(missing_ok=True)
        self.release(picked)

    def release(self, picked: Picked) -> None:
        """Drop the spool copy and the lock (the maildrop file stays unless finished)."""
        (self.work / picked.message.queue_id).unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            os.close(picked.lock_fd)

    def quarantine(self, name: str, reason: str) -> None:
        log.error("maildrop %s: %s; moved to corrupt/", name, reason)
        with contextlib.suppress(OSError):
            os.replace(self.directory / name, self.corrupt / f"maildrop-{name}")
        (self.work / name).unlink(missing_ok=True)

    async def pickup(self, deliver: Deliver, *, limit: int = 100) -> int:
        """Hand up to `limit` waiting messages to `deliver`; returns how many succeeded.

        `deliver(message, recipients)` must make the message durable (queue commit or local
        delivery) before returning; if it raises, the file stays and is tried next time.
        """
        loop = asyncio.get_running_loop()
        names = (await loop.run_in_executor(self.executor, self.ready))[:limit]
        done = 0
        for name in names:
            try:
                picked = await loop.run_in_executor(self.executor, self.prepare, name)
            except MaildropError as exc:
                await loop.run_in_executor(self.executor, self.quarantine, name, str(exc))
                continue
            except OSError as exc:
                log.error("maildrop %s: %s", name, exc)
                continue
            if picked is None:
                continue
            delivered = False
            try:
                await deliver(picked.message, picked.recipients)
                delivered = True
            except Exception:
                log.exception("maildrop %s: delivery callback failed; will retry", name)
                continue
            finally:
                if not delivered:  # also on cancellation; an unlink and a close: quick
                    self.release(picked)
            await loop.run_in_executor(self.executor, self.finish, picked)
            log.info(
                "event=pickup qid=%s from=<%s> nrcpt=%d",
                name,
                picked.message.sender,
                len(picked.recipients),
            )
            done += 1
        return done

    async def run(
        self, deliver: Deliver, *, interval: float = 1.0, stop: asyncio.Event | None = None
    ) -> None:
        """Poll the maildrop every `interval` seconds until `stop` is set."""
        stop = stop or asyncio.Event()
        while not stop.is_set():
            try:
                await self.pickup(deliver)
            except OSError as exc:
                log.error("maildrop: pickup failed: %s", exc)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(interval):
                    await stop.wait()
