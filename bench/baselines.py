"""The same load as bench/run.py against the baselines postier is measured by.

- ``aiosmtpd``: aiosmtpd (installed into bench/.tools/pylib only, never a project
  dependency) with a Maildir handler that writes each copy to tmp/, fsyncs it and renames it
  into new/, the usual way to write an aiosmtpd Maildir server.
- ``postfix``: a private Postfix instance (its own config, queue and data directories under
  a temporary directory, loopback only, a high port) delivering to Maildir with the
  ``virtual`` agent. Postfix answers 250 once the message is in its queue and delivers
  afterwards; the figures are end to end: until the last message is in its Maildir.
- ``sink``: Postfix's smtp-sink, which stores nothing: the ceiling of the load generator and
  the loopback.

    python3 bench/baselines.py --sessions 1,20,100 --messages 5000 --repeat 5
    python3 bench/baselines.py --servers aiosmtpd --sessions 20 --repeat 3

Options are those of bench/run.py (``--servers`` defaults to aiosmtpd,postfix,sink; add
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

try:
    from bench import run as core
except ImportError:
    import run as core

PYLIB = core.TOOLS / "pylib"
POSTFIX_CONF = Path("/etc/postfix")


# --------------------------------------------------------------------------- aiosmtpd


def ensure_aiosmtpd() -> None:
    """pip install aiosmtpd into bench/.tools/pylib (once)."""
    if (PYLIB / "aiosmtpd").is_dir():
        return
    PYLIB.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "--no-input",
            "--target",
            str(PYLIB),
            "aiosmtpd",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        stdin=subprocess.DEVNULL,
    )
    if r.returncode:
        raise RuntimeError(f"pip install aiosmtpd failed: {r.stderr.strip()[-1500:]}")


class AiosmtpdTarget(core.Target):
    name = "aiosmtpd"

    def start(self) -> None:
        ensure_aiosmtpd()
        self.root = self.workdir / "mail"
        self.root.mkdir()
        self.port = core.free_port()
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PYLIB), env.get("PYTHONPATH")) if p)
        argv = [
            sys.executable,
            str(Path(__file__).resolve()),
            "serve-aiosmtpd",
            "--port",
            str(self.port),
            "--root",
            str(self.root),
        ]
        if self.opts.aiosmtpd_uvloop:
            argv.append("--uvloop")
        self._spawn(argv, env)
        self._wait_ready()

    def delivered(self) -> int:
        return core.count_maildir(self.root)

    def clear(self) -> None:
        core.clear_maildir(self.root)

    def describe(self) -> str:
        return "aiosmtpd (maildir, fsync" + (", uvloop)" if self.opts.aiosmtpd_uvloop else ")")


def serve_aiosmtpd(argv: list[str]) -> int:
    """The aiosmtpd server (run in a child process with bench/.tools/pylib on the path)."""
    import asyncio
    import socket

    from aiosmtpd.smtp import SMTP

    p = argparse.ArgumentParser(prog="baselines.py serve-aiosmtpd")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--root", required=True)
    p.add_argument("--uvloop", action="store_true")
    a = p.parse_args(argv)
    users = set(core.USERS)
    hostname = "bench.aiosmtpd.test"

    class MaildirHandler:
        """Each recipient's copy: write to tmp/, fsync, rename into new/."""

        def __init__(self, root: str) -> None:
            self.root = root
            self.pid = os.getpid()
            self.counter = 0
            self.host = socket.gethostname()

        async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
            local, _, domain = address.rpartition("@")
            if domain.lower() != core.DOMAIN or local.lower() not in users:
                return "550 5.1.1 No such user here"
            envelope.rcpt_tos.append(address)
            return "250 OK"

        async def handle_DATA(self, server, session, envelope):
            data = (
                f"Return-Path: <{envelope.mail_from}>\n".encode()
                + envelope.original_content.replace(b"\r\n", b"\n")
            )
            for rcpt in envelope.rcpt_tos:
                mailbox = os.path.join(self.root, rcpt.rpartition("@")[0].lower())
                if not os.path.isdir(mailbox):
                    for sub in ("tmp", "new", "cur"):
                        os.makedirs(os.path.join(mailbox, sub), mode=0o700, exist_ok=True)
                self.counter += 1
                now = time.time()
                name = f"{int(now)}.M{int(now % 1 * 1e6)}P{self.pid}Q{self.counter}.{self.host}"
                tmp = os.path.join(mailbox, "tmp", name)
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                try:
                    os.write(fd, data)
                    os.fsync(fd)
                finally:
                    os.close(fd)
                os.rename(tmp, os.path.join(mailbox, "new", name))
            return "250 2.0.0 OK"

    if a.uvloop:
        import uvloop

        loop = uvloop.new_event_loop()
    else:
        loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    handler = MaildirHandler(a.root)
    server = loop.run_until_complete(
        loop.create_server(
            lambda: SMTP(handler, hostname=hostname), "127.0.0.1", a.port, backlog=1024
        )
    )
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, loop.stop)
    try:
        loop.run_forever()
    finally:
        server.close()
        loop.close()
    return 0


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


class PostfixTarget(core.Target):
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
        self.root = self.mailbase / core.DOMAIN
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
            "".join(
                f"{r} {core.DOMAIN}/{u}/\n"
                for r, u in zip(core.RECIPIENTS, core.USERS, strict=True)
            )
        )
        self.port = core.free_port()
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
virtual_mailbox_domains = {core.DOMAIN}
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
                    f"--- {self.maillog}:\n{core.tail(self.maillog)}"
                )
        self.master = 0
        end = time.monotonic() + 15
        while time.monotonic() < end and not self.master:
            with contextlib.suppress(OSError, ValueError):
                self.master = int((self.queue / "pid/master.pid").read_text().split()[0])
            time.sleep(0.05)
        if not self.master:
            self.stop()
            raise RuntimeError(f"postfix master did not start:\n{core.tail(self.maillog)}")
        try:
            core.wait_smtp(self.port, 30, self.alive)
        except RuntimeError as e:
            self.stop()
            raise RuntimeError(
                f"postfix: {e}\n--- {self.maillog}:\n{core.tail(self.maillog)}"
            ) from None

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
        tree = core.process_tree(self.master) if getattr(self, "master", 0) else []
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
        return core.count_maildir(self.root)

    def clear(self) -> None:
        core.clear_maildir(self.root)

    def describe(self) -> str:
        return "postfix (virtual maildir)"


# --------------------------------------------------------------------------- smtp-sink


class SinkTarget(core.Target):
    name = "sink"
    stores = False

    def start(self) -> None:
        exe, env = core.find_postfix_tool("smtp-sink")
        self.port = core.free_port()
        argv = [exe]
        if os.geteuid() == 0:
            argv += ["-u", "nobody"]
        self._spawn([*argv, f"127.0.0.1:{self.port}", "1024"], env)
        self._wait_ready()

    def describe(self) -> str:
        return "smtp-sink (stores nothing)"


TARGETS = {"aiosmtpd": AiosmtpdTarget, "postfix": PostfixTarget, "sink": SinkTarget}


def make_target(name: str, workdir: Path, opts: argparse.Namespace) -> core.Target:
    try:
        cls = TARGETS[name]
    except KeyError:
        raise RuntimeError(f"unknown server {name!r}: postier, {', '.join(TARGETS)}") from None
    return cls(workdir, opts)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["serve-aiosmtpd"]:
        return serve_aiosmtpd(argv[1:])
    return core.main(argv, servers_default="aiosmtpd,postfix,sink")


if __name__ == "__main__":
    raise SystemExit(main())
