"""`postier passwd FILE ADDRESS [--delete] [--scheme ARGON2ID|BLF-CRYPT]`.

Sets, changes or deletes one user's password in the passwd-file, keeping every other line and
comment as it was. The password is asked twice on a terminal, or read from the first line of
stdin so scripts can pipe it in (never from the command line, where `ps` would show it).

The file is replaced atomically (temporary file in the same directory, fsync, rename, fsync
of the directory) so a crash leaves the old file or the new one, never half of one. A new file
is created 0600. An existing file keeps its group and its owner/group permission bits (world
bits are always dropped): administrators make it group-readable by `dovecot` so one file
serves both programs, and a password change must not quietly undo that.

Concurrent runs are serialised with lockf on the current file, re-checked after the lock is
taken in case another run replaced it meanwhile.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import getpass
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from postier.auth.passwd import Entry, hash_password, parse_text
from postier.errors import ConfigError

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the subcommand's arguments on `parser` (the lead's cli.py calls this)."""
    parser.add_argument("file", metavar="FILE", help="passwd-file (Dovecot format)")
    parser.add_argument("address", metavar="ADDRESS", help="the user's address (login name)")
    parser.add_argument("--delete", action="store_true", help="remove ADDRESS from FILE")
    parser.add_argument(
        "--scheme",
        choices=("ARGON2ID", "BLF-CRYPT"),
        default="ARGON2ID",
        type=str.upper,
        help="hash scheme (default ARGON2ID; both are understood by Dovecot)",
    )


def run(args: argparse.Namespace) -> int:
    """Do it; returns the exit code (0 ok, 2 usage or bad file, 1 anything else)."""
    path = Path(args.file)
    address: str = args.address
    if not _valid_address(address):
        return _fail(EXIT_USAGE, f"invalid address {address!r}: no spaces, ':', controls, or #...")
    try:
        if args.delete:
            return _update(path, address, None)
        if path.exists():  # a bad file is reported before anyone types a password
            parse_text(path.read_bytes(), str(path))
        password = _read_password()
        if password is None:
            return EXIT_FAIL
        try:
            hashed = hash_password(password, args.scheme)
        except ValueError as e:
            return _fail(EXIT_FAIL, str(e))
        return _update(path, address, hashed)
    except ConfigError as e:
        return _fail(EXIT_USAGE, str(e))
    except OSError as e:
        return _fail(EXIT_FAIL, f"{e.filename or path}: {e.strerror}")


def _valid_address(address: str) -> bool:
    """What a passwd-file line can hold as its first field, and not look like a comment."""
    return (
        bool(address)
        and not address.startswith("#")
        and ":" not in address
        and not any(c.isspace() or ord(c) < 0x20 or ord(c) == 0x7F for c in address)
    )


def _fail(code: int, message: str) -> int:
    print(f"postier passwd: {message}", file=sys.stderr)
    return code


def _read_password() -> str | None:
    """Twice from the terminal, or the first line of stdin; None (after a message) if unusable."""
    if sys.stdin.isatty():
        try:
            first = getpass.getpass("New password: ")
            if first and getpass.getpass("Retype new password: ") != first:
                _fail(EXIT_FAIL, "passwords do not match")
                return None
        except (EOFError, KeyboardInterrupt):
            _fail(EXIT_FAIL, "no password given")
            return None
        password = first
    else:
        try:
            password = sys.stdin.readline().rstrip("\r\n")
        except UnicodeDecodeError:
            _fail(EXIT_FAIL, "password on stdin is not valid text")
            return None
    if not password:
        _fail(EXIT_FAIL, "empty password refused")
        return None
    return password


def _update(path: Path, address: str, hashed: str | None) -> int:
    """Replace, append (hashed given) or delete (hashed None) the address's line."""
    with _locked(path) as (data, mode, gid):
        lines = parse_text(data, str(path)) if data is not None else []
        key = address.lower()
        index = next((i for i, (_, e) in enumerate(lines) if e and e.user.lower() == key), None)
        out = [text for text, _ in lines]
        if hashed is None:
            if index is None:
                return _fail(EXIT_FAIL, f"{path}: no entry for {address}")
            del out[index]
        else:
            scheme, _, secret = hashed[1:].partition("}")
            if index is None:
                out.append(Entry(address, scheme, secret, 0).render())
            else:
                old = lines[index][1]
                assert old is not None
                # Keep the spelling and the extra Dovecot fields of the existing entry.
                out[index] = Entry(old.user, scheme, secret, 0, extra=old.extra).render()
        new_mode = 0o600 if mode is None else (mode & 0o770) | 0o600
        _write_atomically(path, "".join(f"{line}\n" for line in out), new_mode, gid)
    return EXIT_OK


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[tuple[bytes | None, int | None, int | None]]:
    """Hold lockf on the file's current inode; yield (contents, mode, gid), Nones if absent.

    A missing file has nothing to lock: two first-ever runs at the same instant can lose one
    line, which is acceptable for an administrator's command.
    """
    while True:
        try:
            fd = os.open(path, os.O_RDWR)
        except FileNotFoundError:
            break
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX)
            st = os.fstat(fd)
            try:
                current = os.stat(path).st_ino == st.st_ino
            except FileNotFoundError:
                current = False
            if current:  # else another run replaced the file while we waited: retry
                with os.fdopen(os.dup(fd), "rb") as f:
                    data = f.read()
                yield data, st.st_mode & 0o777, st.st_gid
                return
        finally:
            os.close(fd)
    yield None, None, None


def _write_atomically(path: Path, text: str, mode: int, gid: int | None) -> None:
    """Temp file in the same directory, fsync, rename over `path`, fsync the directory."""
    directory = path.parent
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            os.fchmod(f.fileno(), mode)
            if gid is not None and gid != os.getegid():
                with contextlib.suppress(PermissionError):
                    os.fchown(f.fileno(), -1, gid)
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
