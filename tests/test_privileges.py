"""Privilege drop (issue 7 item 9): started as root with `--user nobody`, the daemon becomes
nobody before it serves, owns its mail root and queue, and writes mail 0600 in 0700 dirs.

The servers run from a public_tmpdir (pytest's tmp_path is 0700 root: nobody could not
enter it). Each test starts a real `postier serve`.

The interpreter here may live where nobody cannot read (pyenv under /root, 0700): then every
module the daemon imports after the drop must have been imported before it. The first test
runs the daemon exactly as a user would (`python -m postier serve`) and checks that it serves;
the other tests start it with the modules it is known to import late already imported (see
PRELOAD), so that they check ownership, modes and log order whatever that first test finds.
"""

from __future__ import annotations

import contextlib
import email
import os
import pwd
import re
import smtplib
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.server import PostierServer, make_server

USER = "nobody"

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="dropping privileges needs root")


def _account() -> pwd.struct_passwd | None:
    try:
        return pwd.getpwnam(USER)
    except KeyError:
        return None


ACCOUNT = _account()
if ACCOUNT is None:  # pragma: no cover - every Debian has nobody
    pytestmark = pytest.mark.skip(reason=f"no {USER!r} account to drop to")


def readable_by_nobody(path: Path) -> bool:
    """Can `nobody` read `path` (every directory above it traversable)?"""
    if ACCOUNT is None:
        return False
    result = subprocess.run(
        ["/bin/sh", "-c", 'test -r "$1"', "sh", str(path)],
        user=ACCOUNT.pw_uid,
        group=ACCOUNT.pw_gid,
        extra_groups=[],
        check=False,
    )
    return result.returncode == 0


# A standard-library module postier imports only after the drop (postier/queue/bounce.py,
# reached from Outbound.start through postier.queue.scheduler).
STDLIB_HIDDEN = not readable_by_nobody(Path(email.__file__).parent / "policy.py")

# What the launcher imports before handing over to postier's own main(): the modules the
# daemon imports after the drop that are not in postier.net.daemon._preload_modules().
PRELOAD = (
    "import sys, postier.queue.scheduler, postier.queue.maildrop\n"
    "from postier.cli import main\n"
    "sys.argv[0] = 'postier'\n"
    "sys.exit(main())\n"
)


@pytest.fixture
def started() -> Iterator[list[PostierServer]]:
    servers: list[PostierServer] = []
    yield servers
    for srv in servers:
        srv.stop()


def server(pub: Path, *extra: str) -> PostierServer:
    srv = make_server(pub / "srv", extra=["--user", USER, *extra])
    srv.root.chmod(0o755)
    return srv


def start_preloaded(srv: PostierServer) -> PostierServer:
    """Like PostierServer.start, with PRELOAD as the command (`python -c PRELOAD serve ...`)."""
    with open(srv.log_path, "ab") as logf:
        srv.proc = subprocess.Popen(
            [sys.executable, "-c", PRELOAD, "serve", *srv.args],
            stdout=logf,
            stderr=logf,
            stdin=subprocess.DEVNULL,
            cwd=srv.root,
        )
    for _ in range(400):  # bounded poll, not a timing assertion
        if srv.proc.poll() is not None:
            raise RuntimeError(f"postier exited {srv.proc.returncode}:\n{srv.log()}")
        if "event=ready" in srv.log():
            return srv
        time.sleep(0.05)
    raise RuntimeError(f"postier did not become ready:\n{srv.log()}")


def uids(pid: int) -> list[int]:
    """Real, effective, saved and filesystem uid of a process."""
    status = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"^Uid:\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)$", status, re.MULTILINE)
    assert match, status
    return [int(x) for x in match.groups()]


def gids(pid: int) -> list[int]:
    status = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"^Gid:\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)$", status, re.MULTILINE)
    groups = re.search(r"^Groups:[ \t]*([^\n]*)$", status, re.MULTILINE)
    assert match and groups, status
    return [int(x) for x in match.groups()] + [int(g) for g in groups.group(1).split()]


def send(srv: PostierServer, marker: str) -> None:
    message = f"Subject: {marker}\r\n\r\n{marker}\r\n".encode()
    with smtplib.SMTP("127.0.0.1", srv.mx_port, timeout=60) as s:
        assert s.sendmail("x@example.net", ["alice@example.org"], message) == {}


def owner_mode(path: Path) -> tuple[int, int, int]:
    st = path.lstat()
    return st.st_uid, st.st_gid, st.st_mode & 0o7777


def test_daemon_started_as_a_user_would_serves_after_the_drop(
    pub: Path, started: list[PostierServer]
) -> None:
    srv = server(pub)
    started.append(srv)
    srv.start()
    assert uids(srv.proc.pid) == [ACCOUNT.pw_uid] * 4  # type: ignore[union-attr]
    send(srv, "plain-start")
    assert len(srv.maildir_files("alice")) == 1


@pytest.mark.parametrize("fmt", ["maildir", "mbox", "spool"])
def test_drop_to_nobody_owns_files_and_modes(
    pub: Path, started: list[PostierServer], fmt: str
) -> None:
    assert ACCOUNT is not None
    uid, gid = ACCOUNT.pw_uid, ACCOUNT.pw_gid
    srv = server(pub, "-F", fmt)
    started.append(srv)
    start_preloaded(srv)
    pid = srv.proc.pid  # type: ignore[union-attr]
    assert uids(pid) == [uid] * 4
    assert gids(pid) == [gid] * 4  # and no supplementary groups (root's are gone)

    # directories it must write were handed over before the drop
    root, queue = srv.mail_root, srv.root / "queue"
    assert owner_mode(root) == (uid, gid, 0o700)
    assert owner_mode(root / ".postier-tmp") == (uid, gid, 0o700)
    assert (queue.stat().st_uid, queue.stat().st_gid) == (uid, gid)
    for dirpath, dirnames, filenames in os.walk(queue):
        for name in [*dirnames, *filenames]:
            st = os.lstat(os.path.join(dirpath, name))
            assert (st.st_uid, st.st_gid) == (uid, gid), os.path.join(dirpath, name)

    send(srv, "first-message")
    send(srv, "second-message")
    if fmt == "maildir":
        box = root / "alice"
        files = srv.maildir_files("alice")
        dirs = [box, box / "new", box / "cur", box / "tmp"]
    elif fmt == "mbox":
        files = [root / "alice"]
        dirs = []
    else:
        box = root / "alice"
        files = [box / "1", box / "1.status", box / "2", box / "2.status", box / ".lock"]
        dirs = [box]
    if fmt == "maildir":
        assert len(files) == 2
    for path in files:
        assert owner_mode(path) == (uid, gid, 0o600), path
    for path in dirs:
        assert owner_mode(path) == (uid, gid, 0o700), path
    content = b"".join(p.read_bytes() for p in files)
    assert b"first-message" in content and b"second-message" in content

    log = srv.log()
    dropped = log.index("event=privileges-dropped")
    assert f"user={USER}" in log[dropped:].splitlines()[0]
    assert dropped < log.index("event=ready")
    assert dropped < log.index("event=listening")
    assert "security-warning" not in log
    assert srv.stop() == 0


def test_unknown_user_exits_2_naming_it(pub: Path) -> None:
    srv = make_server(pub / "srv", extra=["--user", "no-such-user"])
    result = subprocess.run(
        [sys.executable, "-m", "postier", "serve", *srv.args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=srv.root,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 2, result
    assert "no-such-user" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (srv.mail_root / "alice").exists()


def test_staying_root_is_announced(pub: Path, started: list[PostierServer]) -> None:
    """Without --user and without a `postier` account, it keeps running as root and says so."""
    with contextlib.suppress(KeyError):
        pwd.getpwnam("postier")
        pytest.skip("a 'postier' account exists: the default would drop to it")
    srv = make_server(pub / "srv")
    started.append(srv.start())
    assert uids(srv.proc.pid)[1] == 0  # type: ignore[union-attr]
    log = srv.log()
    assert re.search(r"WARNING .*event=security-warning .*RUNNING AS ROOT", log), log
    assert "privileges-dropped" not in log
