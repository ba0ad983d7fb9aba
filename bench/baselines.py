"""The baselines postier is measured by, as targets of the same load.

- ``aiosmtpd``: aiosmtpd (installed into bench/.tools/pylib only, never a project
  dependency) with a Maildir handler that writes each copy to tmp/, fsyncs it and renames it
  into new/, the usual way to write an aiosmtpd Maildir server (bench/aiosmtpd_maildir.py).
- ``postfix``: a private Postfix instance (its own config, queue and data directories under
  a temporary directory, loopback only, a high port) delivering to Maildir with the
  ``virtual`` agent. Postfix answers 250 once the message is in its queue and delivers
  afterwards; the figures are end to end: until the last message is in its Maildir.
- ``sink``: Postfix's smtp-sink, which stores nothing: the ceiling of the load generator and
  the loopback.
- ``floor``: bench/floor_server.py, canned replies and postier's durable Maildir write on
  uvloop and nothing else: the least a Python server spends per durable message here.

    python3 bench/baselines.py --sessions 1,20,100 --messages 5000 --repeat 5

is ``bench/run.py --servers aiosmtpd,postfix,sink`` (a later ``--servers`` wins; add
``postier`` to see it side by side in the same run).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pwd
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: python3 bench/baselines.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.drivers import find_postfix_tool
from bench.harness import (
    DOMAIN,
    HERE,
    RECIPIENTS,
    TOOLS,
    USERS,
    Target,
    free_port,
    process_tree,
    tail,
    wait_smtp,
)
from bench.mailboxes import clear_maildir, count_maildir

PYLIB = TOOLS / "pylib"
POSTFIX_CONF = Path("/etc/postfix")


# --------------------------------------------------------------------------- aiosmtpd


def ensure_aiosmtpd() -> None:
    """pip install aiosmtpd into bench/.tools/pylib (once)."""
    if (PYLIB / "aiosmtpd").is_dir():
        return
    PYLIB.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    argv += ["--no-input", "--target", str(PYLIB), "aiosmtpd"]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
    if r.returncode:
        raise RuntimeError(f"pip install aiosmtpd failed: {r.stderr.strip()[-1500:]}")


class AiosmtpdTarget(Target):
    name = "aiosmtpd"

    def start(self) -> None:
        ensure_aiosmtpd()
        self.root = self.workdir / "mail"
        self.root.mkdir()
        self.port = free_port()
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PYLIB), env.get("PYTHONPATH")) if p)
        argv = [sys.executable, str(HERE / "aiosmtpd_maildir.py"), "--port", str(self.port)]
        argv += ["--root", str(self.root), "--domain", DOMAIN, "--users", ",".join(USERS)]
        if self.opts.aiosmtpd_uvloop:
            argv.append("--uvloop")
        self._spawn(argv, env)
        self._wait_ready()

    def delivered(self) -> int:
        return count_maildir(self.root)

    def clear(self) -> None:
        clear_maildir(self.root)

    def describe(self) -> str:
        return "aiosmtpd (maildir, fsync" + (", uvloop)" if self.opts.aiosmtpd_uvloop else ")")


# --------------------------------------------------------------------------- Postfix


def _master_cf(port: int) -> str:
    """The system's master.cf, with chroot off everywhere and smtpd on 127.0.0.1:port."""
    src = POSTFIX_CONF / "master.cf"
    if not src.exists():
        src = Path("/usr/share/postfix/master.cf.dist")
    out = []
    for line in src.read_text().splitlines():
        f = line.split()
        if line[:1] in ("", "#", " ", "\t") or len(f) < 8:
            out.append(line)
            continue
        if f[1] == "inet":  # only our smtpd listens on the network
            if f[0] != "smtp":
                out.append("#" + line)
                continue
            f[0] = f"127.0.0.1:{port}"
        f[4] = "n"  # no chroot: nothing to populate
        out.append("  ".join(f[:8]) + ("  " + " ".join(f[8:]) if f[8:] else ""))
    return "\n".join(out) + "\n"


class PostfixTarget(Target):
    name = "postfix"

    def start(self) -> None:
        if not shutil.which("postfix") and not os.access("/usr/sbin/postfix", os.X_OK):
            raise RuntimeError("postfix is not installed (apt-get install postfix)")
        if os.geteuid() != 0:
            raise RuntimeError("a private Postfix instance needs root (it drops to 'postfix')")
        # the postfix and nobody users must reach the queue and the mailboxes
        for d in (self.workdir.parent, self.workdir):
            os.chmod(d, 0o755)
        pf = self.workdir / "postfix"
        self.etc, self.queue, data = pf / "etc", pf / "queue", pf / "data"
        for d in (self.etc, self.queue, data):
            d.mkdir(parents=True)
        self.mailbase = self.workdir / "mail"
        self.root = self.mailbase / DOMAIN
        self.root.mkdir(parents=True)
        nobody = pwd.getpwnam("nobody")
        for d in (self.mailbase, self.root):
            os.chown(d, nobody.pw_uid, nobody.pw_gid)
        pw = pwd.getpwnam("postfix")
        os.chown(data, pw.pw_uid, pw.pw_gid)
        for extra in ("dynamicmaps.cf", "postfix-files"):
            if (POSTFIX_CONF / extra).exists():
                shutil.copy(POSTFIX_CONF / extra, self.etc / extra)
        for extra in ("dynamicmaps.cf.d", "postfix-files.d"):
            if (POSTFIX_CONF / extra).is_dir():
                shutil.copytree(POSTFIX_CONF / extra, self.etc / extra)
        (self.etc / "vmailbox").write_text(
            "".join(f"{r} {DOMAIN}/{u}/\n" for r, u in zip(RECIPIENTS, USERS, strict=True))
        )
        self.port = free_port()
        self.maillog = pf / "maillog"
        (self.etc / "main.cf").write_text(f"""\
compatibility_level = 3.6
config_directory = {self.etc}
queue_directory = {self.queue}
data_directory = {data}
meta_directory = {self.etc}
maillog_file = {self.maillog}
maillog_file_prefixes = {pf}
mail_owner = postfix
setgid_group = postdrop
myhostname = bench.postfix.test
mydomain = postfix.test
myorigin = $myhostname
mydestination =
inet_interfaces = loopback-only
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
alias_maps =
alias_database =
biff = no
smtpd_banner = $myhostname ESMTP
smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination
virtual_mailbox_domains = {DOMAIN}
virtual_mailbox_base = {self.mailbase}
virtual_mailbox_maps = texthash:{self.etc}/vmailbox
virtual_uid_maps = static:{nobody.pw_uid}
virtual_gid_maps = static:{nobody.pw_gid}
default_process_limit = 300
""")
        (self.etc / "master.cf").write_text(_master_cf(self.port))
        self.log = pf / "postfix-cmd.log"
        for cmd in (["check"], ["start"]):
            r = self._postfix(*cmd)
            if r.returncode:
                raise RuntimeError(
                    f"postfix {cmd[0]} failed ({r.returncode}): {r.stdout}{r.stderr}\n"
                    f"--- {self.maillog}:\n{tail(self.maillog)}"
                )
        self.master = 0
        end = time.monotonic() + 15
        while time.monotonic() < end and not self.master:
            with contextlib.suppress(OSError, ValueError):
                self.master = int((self.queue / "pid/master.pid").read_text().split()[0])
            time.sleep(0.05)
        if not self.master:
            self.stop()
            raise RuntimeError(f"postfix master did not start:\n{tail(self.maillog)}")
        try:
            wait_smtp(self.port, 30, self.alive)
        except RuntimeError as e:
            self.stop()
            raise RuntimeError(f"postfix: {e}\n--- {self.maillog}:\n{tail(self.maillog)}") from None

    def _postfix(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["postfix", "-c", str(self.etc), *args],
            capture_output=True,
            text=True,
            timeout=60,
            stdin=subprocess.DEVNULL,
        )

    def root_pid(self) -> int:
        return self.master

    def alive(self) -> bool:
        return bool(getattr(self, "master", 0)) and os.path.exists(f"/proc/{self.master}")

    def stop(self) -> None:
        if not getattr(self, "etc", None):
            return
        tree = process_tree(self.master) if getattr(self, "master", 0) else []
        with contextlib.suppress(subprocess.SubprocessError, OSError):
            self._postfix("stop")
        end = time.monotonic() + 15
        while time.monotonic() < end and any(os.path.exists(f"/proc/{p}") for p in tree):
            time.sleep(0.1)
        for pid in tree:  # only the processes of the instance we started
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.etc = None

    def delivered(self) -> int:
        return count_maildir(self.root)

    def clear(self) -> None:
        clear_maildir(self.root)

    def describe(self) -> str:
        return "postfix (virtual maildir)"


# --------------------------------------------------------------------------- the floor


class FloorTarget(Target):
    """bench/floor_server.py: canned replies and postier's durable write, nothing else.

    The least a Python server on uvloop spends per durable message (see that file): the
    room between this row and postier's is postier's own layers. ``--workers`` as postier's
    (0, the default, is one process per CPU, like postier's auto)."""

    name = "floor"

    def start(self) -> None:
        self.root = self.workdir / "mail"
        self.root.mkdir()
        self.port = free_port()
        argv = [sys.executable, str(HERE / "floor_server.py"), "--port", str(self.port)]
        argv += ["--root", str(self.root), "--workers", str(self.processes)]
        self._spawn(argv)
        self._wait_ready()

    @property
    def processes(self) -> int:
        return self.opts.workers or os.cpu_count() or 1

    def delivered(self) -> int:
        return count_maildir(self.root)

    def clear(self) -> None:
        clear_maildir(self.root)

    def describe(self) -> str:
        return f"floor (canned replies, durable Maildir write, {self.processes} processes)"


# --------------------------------------------------------------------------- smtp-sink


class SinkTarget(Target):
    name = "sink"
    stores = False

    def start(self) -> None:
        exe, env = find_postfix_tool("smtp-sink")
        self.port = free_port()
        argv = [exe]
        if os.geteuid() == 0:
            argv += ["-u", "nobody"]
        self._spawn([*argv, f"127.0.0.1:{self.port}", "1024"], env)
        self._wait_ready()

    def describe(self) -> str:
        return "smtp-sink (stores nothing)"


TARGETS = {
    "aiosmtpd": AiosmtpdTarget,
    "postfix": PostfixTarget,
    "sink": SinkTarget,
    "floor": FloorTarget,
}


def make_target(name: str, workdir: Path, opts: argparse.Namespace) -> Target:
    """The baseline ``--servers`` calls ``name``."""
    try:
        cls = TARGETS[name]
    except KeyError:
        raise RuntimeError(f"unknown server {name!r}: postier, {', '.join(TARGETS)}") from None
    return cls(workdir, opts)


if __name__ == "__main__":
    # the baselines alone: run.py's command line with other default servers (run.py is
    # executed, not imported, so that this module never imports the command line)
    os.execv(
        sys.executable,
        [sys.executable, str(HERE / "run.py"), "--servers", "aiosmtpd,postfix,sink", *sys.argv[1:]],
    )
