"""Durability and locking helpers, written once for every file backend.

docs/architecture.md: "a 250 means the message is on disk and fsync'd". A message is only ours to
acknowledge once its bytes *and* the directory entry that names it are on stable storage, so
every backend (Maildir, mbox, the numbered spool, the queue) goes through the same few steps:
write to a temporary name in the target directory, flush, fsync, rename, fsync the directory.
Keeping them here means one place to get right (short writes, EINTR, partial temp files).

Locking has a trap that every backend must avoid: POSIX record locks (`fcntl.lockf`) belong to
the *process*, not the thread. Two threads of one process both "get" the same lockf lock, and
closing any descriptor of the file drops the process's lock. `path_lock` gives threads of this
process a lock of their own, taken *before* the file lock, so the file lock only has to
arbitrate between processes.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import secrets
import stat
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

BLOCK = 64 * 1024  # copy and write granularity: large enough for throughput, small for memory

# Striped locks: bounded memory however many mailboxes exist; two mailboxes rarely share a
# stripe, and when they do they merely take turns.
_STRIPES = tuple(threading.Lock() for _ in range(64))


def path_lock(path: str | os.PathLike[str]) -> threading.Lock:
    """Return the in-process lock that guards `path` (see the module docstring for why)."""
    key = os.path.abspath(os.fspath(path)).encode("utf-8", "surrogateescape")
    return _STRIPES[zlib.crc32(key) % len(_STRIPES)]


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """fsync a directory, making the creation, rename or removal of its entries durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_all(fd: int, data: bytes | bytearray | memoryview) -> None:
    """Write every byte: os.write may write less than asked (signals, pipes, near-full disks)."""
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def read_small(path: str) -> bytes:
    """A whole small file (an envelope) in four system calls, where pathlib's read_bytes
    makes a buffered file object and asks for its size first."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        chunks = []
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def ensure_dir(
    path: str | os.PathLike[str], mode: int = 0o700, owner: tuple[int, int] | None = None
) -> Path:
    """Create `path` and missing parents with `mode`; fsync each parent that gained an entry.

    Without the parent fsync a crash could forget a freshly created mailbox directory together
    with the message we had already acknowledged inside it. `owner` (uid, gid) is applied to the
    directories created here, so a mailbox under /home/<user> belongs to that user.
    """
    target = Path(path)
    missing: list[Path] = []
    probe = target
    while True:
        try:
            # one stat, not is_dir() then exists(): a peer may create it between the two
            if not stat.S_ISDIR(os.stat(probe).st_mode):
                raise NotADirectoryError(errno.ENOTDIR, "not a directory", str(probe))
            break
        except FileNotFoundError:
            missing.append(probe)
            if probe.parent == probe:
                break
            probe = probe.parent
    for directory in reversed(missing):
        try:
            os.mkdir(directory, mode)
        except FileExistsError:
            if not directory.is_dir():
                raise
            continue  # another worker created it first; it fsyncs its own parent
        os.chmod(directory, mode)  # mkdir applies the umask; we want exactly `mode`
        if owner is not None:
            os.chown(directory, *owner)
        fsync_dir(directory.parent)
    return target


def atomic_write(
    path: str | os.PathLike[str],
    data: bytes,
    mode: int = 0o600,
    owner: tuple[int, int] | None = None,
) -> None:
    """Replace `path` with `data` so that readers and crashes see the old or the new file only.

    The temporary file lives in the same directory (rename is only atomic within a file
    system) and starts with a dot, so mailbox readers that skip dot files never see it.
    """
    target = Path(path)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    try:
        try:
            os.fchmod(fd, mode)
            if owner is not None:
                os.fchown(fd, *owner)
            write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(target.parent)


def copy_from(src_file: BinaryIO | int, dst_fd: int, offset: int = 0) -> int:
    """Copy `src_file` from `offset` to its end onto `dst_fd`; return the number of bytes.

    Uses the kernel (copy_file_range, then sendfile) when it can, so a large message never
    passes through Python memory; falls back to 64 KiB pread/write blocks where a file system
    refuses. Errors such as ENOSPC propagate: the caller decides what "undo" means.
    """
    src_fd = src_file if isinstance(src_file, int) else src_file.fileno()
    total = os.fstat(src_fd).st_size - offset
    done = 0
    kernel_copy = True
    while done < total:
        count = min(total - done, 16 * BLOCK)
        n = 0
        if kernel_copy:
            try:
                n = os.sendfile(dst_fd, src_fd, offset + done, count)
            except OSError as exc:
                if exc.errno not in (errno.EINVAL, errno.ENOSYS, errno.EXDEV, errno.EOPNOTSUPP):
                    raise
                kernel_copy = False
        if not kernel_copy:
            chunk = os.pread(src_fd, min(count, BLOCK), offset + done)
            if chunk:
                write_all(dst_fd, chunk)
            n = len(chunk)
        if n == 0:  # the source shrank under us: stop rather than spin
            break
        done += n
    return done


def lockf_exclusive(fd: int, timeout: float) -> None:
    """Take an exclusive POSIX lock on `fd` (open for writing), waiting at most `timeout` s.

    Polls with LOCK_NB and a growing pause instead of blocking, because a blocking lockf
    cannot be interrupted from another thread and a stuck peer must not hang a worker forever.
    Raises TimeoutError when the peer keeps the lock.
    """
    deadline = time.monotonic() + timeout
    pause = 0.001
    while True:
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except OSError as exc:
            if exc.errno not in (errno.EACCES, errno.EAGAIN):
                raise
        if time.monotonic() >= deadline:
            raise TimeoutError(errno.ETIMEDOUT, "file is locked by another process")
        time.sleep(pause)
        pause = min(pause * 2, 0.05)


@contextlib.contextmanager
def open_locked(
    path: str | os.PathLike[str],
    flags: int,
    timeout: float,
    mode: int = 0o600,
) -> Iterator[int]:
    """Open `path` (never through a symlink) and hold a lockf lock on it for the block.

    The in-process lock for the path is taken first (threads), then lockf (processes). Closing
    the descriptor at the end releases the lockf lock.
    """
    guard = path_lock(path)
    if not guard.acquire(timeout=timeout):
        raise TimeoutError(errno.ETIMEDOUT, "file is busy in this process", os.fspath(path))
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
        try:
            lockf_exclusive(fd, timeout)
            yield fd
        finally:
            os.close(fd)
    finally:
        guard.release()


def describe_error(exc: BaseException) -> str:
    """One line for an SMTP reply: the kind of failure, never a path or a CR/LF."""
    if isinstance(exc, TimeoutError):
        return "mailbox is locked by another program"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.replace("\r", " ").replace("\n", " ")
    return type(exc).__name__
