"""One passwd-file serves postier and Dovecot: Dovecot accepts what `postier passwd` writes.

A private Dovecot (its own config, base_dir and state_dir in a temporary directory, no mail
listeners) reads the file through `passdb passwd-file`, and `doveadm auth test` checks a
password against it. Skipped only when Dovecot is not installed.
"""

from __future__ import annotations

import grp
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from postier.auth.passwd import PasswordFile

DOVECOT = shutil.which("dovecot") or shutil.which("dovecot", path="/usr/sbin:/usr/local/sbin")
DOVEADM = shutil.which("doveadm") or shutil.which("doveadm", path="/usr/bin:/usr/sbin")

pytestmark = pytest.mark.skipif(
    DOVECOT is None or DOVEADM is None, reason="Dovecot (dovecot, doveadm) is not installed"
)

CONFIG = """\
base_dir = {dir}/run
state_dir = {dir}/state
log_path = {dir}/dovecot.log
protocols =
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain
auth_failure_delay = 0
# No growing per-client penalty between our deliberate failures (Dovecot's own throttle).
service anvil {{
  unix_listener anvil-auth-penalty {{
    mode = 0
  }}
}}
passdb {{
  driver = passwd-file
  args = {passwd}
}}
userdb {{
  driver = static
  args = uid=nobody gid=nogroup home={dir}/home/%u
}}
"""

SET_PASSWORD = (
    "import argparse, sys\n"
    "from postier.auth.passwd_cmd import add_arguments, run\n"
    "p = argparse.ArgumentParser(prog='postier passwd'); add_arguments(p)\n"
    "sys.exit(run(p.parse_args(sys.argv[1:])))\n"
)


def set_password(passwd: Path, address: str, password: str, *extra: str) -> None:
    """Run the real command, password piped on stdin as a script would."""
    done = subprocess.run(
        [sys.executable, "-c", SET_PASSWORD, str(passwd), address, *extra],
        input=f"{password}\n",
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr


@pytest.fixture
def workdir() -> Iterator[Path]:
    """A directory the `dovecot` user can traverse (pytest's tmp_path parents are 0700)."""
    path = Path(tempfile.mkdtemp(prefix="postier-dovecot-"))
    path.chmod(0o711)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def dovecot(workdir: Path) -> Iterator[tuple[Path, Path]]:
    """Yield (config file, passwd file); Dovecot runs in the foreground as our child."""
    passwd = workdir / "passwd"
    (workdir / "state").mkdir()
    config = workdir / "dovecot.conf"
    config.write_text(CONFIG.format(dir=workdir, passwd=passwd))
    yield config, passwd  # the test writes the passwd file before starting Dovecot


def start(config: Path, workdir: Path) -> subprocess.Popen[bytes]:
    """Start Dovecot (output to a file, never a pipe) and wait for its auth socket."""
    with open(workdir / "dovecot.out", "wb") as out:
        proc = subprocess.Popen([DOVECOT, "-F", "-c", str(config)], stdout=out, stderr=out)
    socket = workdir / "run" / "auth-client"
    for _ in range(300):  # a safety net for a broken install, not a timing assertion
        if socket.exists() or proc.poll() is not None:
            break
        time.sleep(0.05)
    if not socket.exists():
        stop(proc)
        log = (workdir / "dovecot.out").read_text() + _read(workdir / "dovecot.log")
        pytest.fail(f"Dovecot did not start:\n{log}")
    return proc


def stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the master we started (it stops its children), then reap it."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _read(path: Path) -> str:
    return path.read_text() if path.exists() else ""


def auth_test(config: Path, user: str, password: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [DOVEADM, "-c", str(config), "auth", "test", user, password],
        capture_output=True,
        text=True,
    )


def test_dovecot_accepts_passwords_written_by_postier_passwd(dovecot, workdir: Path):
    config, passwd = dovecot
    set_password(passwd, "alice@example.org", "Argon pass 1")
    # Production set-up: the file group-readable by the dovecot user, then more changes;
    # `postier passwd` must keep that group access when it rewrites the file.
    os.chown(passwd, -1, grp.getgrnam("dovecot").gr_gid)
    passwd.chmod(0o640)
    set_password(passwd, "bob@example.org", "Bcrypt pass 2", "--scheme", "BLF-CRYPT")
    assert passwd.stat().st_gid == grp.getgrnam("dovecot").gr_gid
    assert passwd.stat().st_mode & 0o777 == 0o640

    ours = PasswordFile.load(passwd)
    assert ours.verify("alice@example.org", "Argon pass 1")
    assert ours.verify("bob@example.org", "Bcrypt pass 2")
    text = passwd.read_text()
    assert "alice@example.org:{ARGON2ID}$argon2id$" in text
    assert "bob@example.org:{BLF-CRYPT}$2y$" in text

    proc = start(config, workdir)
    try:
        for user, password in [
            ("alice@example.org", "Argon pass 1"),
            ("bob@example.org", "Bcrypt pass 2"),
        ]:
            good = auth_test(config, user, password)
            assert good.returncode == 0, good.stdout + good.stderr + _read(workdir / "dovecot.log")
            assert "auth succeeded" in good.stdout
            bad = auth_test(config, user, password + "x")
            assert bad.returncode != 0 and "auth failed" in bad.stdout
        unknown = auth_test(config, "carol@example.org", "Argon pass 1")
        assert unknown.returncode != 0
    finally:
        stop(proc)
    assert proc.returncode is not None
