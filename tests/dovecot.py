"""A private Dovecot for interoperability tests, reusable by any format.

    from tests.dovecot import chown_tree, dovecot_workdir, running_dovecot

    with dovecot_workdir() as wd:
        root = wd / "mail"          # deliver here, then chown_tree(root): Dovecot opens as nobody
        with running_dovecot(wd, f"mbox:~/mail:INBOX={root}/%n", {"alice": "secret"}) as dc:
            imap = dc.login("alice")  # an imaplib.IMAP4 on 127.0.0.1:<free port>

For Maildir: `running_dovecot(wd, f"maildir:{root}/%n", users)`. For LMTP pass
`protocols=("imap", "lmtp")` and use `dc.lmtp_port`.

Facts this encodes (each cost a failed start):
- the work directory lives in /tmp with mode 0755, not under pytest's tmp_path: pytest's base
  directory is 0700 and Dovecot's unprivileged processes (login, auth, mail as `nobody`) must
  traverse it;
- Dovecot refuses to open mail as root, so mail runs as `nobody`/`nogroup` (`mail_uid`), and
  the mailboxes it opens must belong to that user;
- its auth process runs as `dovecot`: the passwd-file must be readable by it (0644 here;
  production: group-readable by `dovecot`);
- it daemonizes and keeps the stdout it inherited, so its output goes to files, never a pipe;
- it is stopped with `doveadm -c FILE stop`, and by the master pid if that fails.
"""

from __future__ import annotations

import contextlib
import imaplib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tests.sinks import free_port, public_tmpdir

MAIL_USER = "nobody"
MAIL_GROUP = "nogroup"

CONFIG = """\
base_dir = {wd}/run
state_dir = {wd}/state
log_path = {wd}/dovecot.log
info_log_path = {wd}/dovecot.log
protocols = {protocols}
listen = 127.0.0.1
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain
mail_location = {mail_location}
mail_uid = {mail_user}
mail_gid = {mail_group}
first_valid_uid = 1
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%n {wd}/passwd
}}
userdb {{
  driver = static
  args = uid={mail_user} gid={mail_group} home={wd}/home/%n
}}
service imap-login {{
  inet_listener imap {{
    address = 127.0.0.1
    port = {imap_port}
  }}
  inet_listener imaps {{
    port = 0
  }}
}}
service lmtp {{
  inet_listener lmtp {{
    address = 127.0.0.1
    port = {lmtp_port}
  }}
}}
{extra}
"""


def available() -> str | None:
    """None when a private Dovecot can run here, else the reason to skip."""
    if shutil.which("dovecot") is None or shutil.which("doveadm") is None:
        return "dovecot is not installed (apt-get install dovecot-imapd dovecot-lmtpd)"
    if os.geteuid() != 0:
        return "a private Dovecot needs root (it switches to the mail user itself)"
    try:
        pwd.getpwnam(MAIL_USER)
    except KeyError:
        return f"no {MAIL_USER} user to run mail processes as"
    return None


def mail_owner() -> tuple[int, int]:
    entry = pwd.getpwnam(MAIL_USER)
    return entry.pw_uid, entry.pw_gid


def chown_tree(path: Path) -> None:
    """Give `path` and everything under it to the mail user, as a real MDA running as root
    with a home template would (postier.delivery.paths.owner_for)."""
    uid, gid = mail_owner()
    os.chown(path, uid, gid)
    for dirpath, dirnames, filenames in os.walk(path):
        for name in dirnames + filenames:
            os.chown(os.path.join(dirpath, name), uid, gid, follow_symlinks=False)


# A temporary directory every Dovecot process can traverse (0755 in /tmp); removed afterwards.
dovecot_workdir = public_tmpdir


@dataclass
class Dovecot:
    workdir: Path
    config: Path
    imap_port: int
    lmtp_port: int
    log: Path
    passwords: dict[str, str] = field(default_factory=dict)

    def login(self, user: str, password: str | None = None) -> imaplib.IMAP4:
        imap = imaplib.IMAP4("127.0.0.1", self.imap_port, timeout=30)
        imap.login(user, password if password is not None else self.passwords[user])
        return imap

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else "(no log)"


def _wait_listening(port: int, dc: Dovecot, master: subprocess.Popen[bytes]) -> None:
    """Wait until the IMAP port accepts; an early exit of the master means a bad config."""
    for _ in range(600):  # polls, not a timing assertion: 60 s at most on a slow machine
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
            return
        if master.poll() is not None and master.returncode != 0:
            raise RuntimeError(f"dovecot failed to start:\n{dc.log_text()}")
        time.sleep(0.1)
    raise RuntimeError(f"dovecot did not listen on {port}:\n{dc.log_text()}")


@contextlib.contextmanager
def running_dovecot(
    workdir: Path,
    mail_location: str,
    users: Mapping[str, str],
    *,
    protocols: Sequence[str] = ("imap",),
    extra_config: str = "",
) -> Iterator[Dovecot]:
    """Start a private Dovecot serving `users` (name -> plain password) from `mail_location`;
    stop it however the block ends."""
    imap_port, lmtp_port = free_port(), free_port()
    config = workdir / "dovecot.conf"
    config.write_text(
        CONFIG.format(
            wd=workdir,
            protocols=" ".join(protocols),
            mail_location=mail_location,
            mail_user=MAIL_USER,
            mail_group=MAIL_GROUP,
            imap_port=imap_port,
            lmtp_port=lmtp_port,
            extra=extra_config,
        )
    )
    passwd = workdir / "passwd"
    passwd.write_text("".join(f"{u}:{{PLAIN}}{p}::::::\n" for u, p in users.items()))
    passwd.chmod(0o644)  # read by the auth process, which runs as `dovecot`
    uid, gid = mail_owner()
    for user in users:
        home = workdir / "home" / user
        home.mkdir(parents=True, exist_ok=True)
        os.chown(home, uid, gid)
    dc = Dovecot(workdir, config, imap_port, lmtp_port, workdir / "dovecot.log", dict(users))
    out = open(workdir / "dovecot.out", "wb")  # noqa: SIM115 - closed in finally
    master = subprocess.Popen(
        ["dovecot", "-c", str(config)], stdout=out, stderr=out, stdin=subprocess.DEVNULL
    )
    try:
        master.wait(timeout=60)  # forks the daemon and exits
        _wait_listening(imap_port, dc, master)
        yield dc
    finally:
        _stop(config, workdir)
        out.close()


def _stop(config: Path, workdir: Path) -> None:
    """`doveadm stop`, then the master pid from base_dir if it is still there."""
    pid_file = workdir / "run" / "master.pid"
    pid = None
    with contextlib.suppress(OSError, ValueError):
        pid = int(pid_file.read_text().strip())
    subprocess.run(["doveadm", "-c", str(config), "stop"], capture_output=True, timeout=60)
    if pid is None:
        return
    for _ in range(300):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
