"""The postier servers under test, and the registry that turns ``--servers`` names into them.

``PostierTarget`` runs ``python -m postier serve`` from a postier tree: this checkout, or with
``--servers postier@PATH`` another checkout (the same interpreter, that tree first on
PYTHONPATH), so that one interleaved run measures a change before and after. ``LmtpTarget``
puts a private Dovecot behind it, ``RelayTarget`` a DNS responder and smtp-sink. The
baselines (aiosmtpd, Postfix, smtp-sink) are in baselines.py.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from bench import baselines
from bench.drivers import find_postfix_tool
from bench.harness import (
    DOMAIN,
    RECIPIENTS,
    REPO,
    USERS,
    Target,
    free_port,
    stop_process,
    tail,
    wait_port,
    wait_smtp,
)
from bench.mailboxes import CLEARERS, COUNTERS, count_maildir

AUTH_USER = RECIPIENTS[0]  # the account submission rows log in as (and send from)
BENCH_PASSWORD = "bench-secret"  # a throw-away account on a loopback server
FORMATS = (*sorted(COUNTERS), "lmtp")


# --------------------------------------------------------------------------- postier trees


def parse_tree(name: str) -> Path | None:
    """The postier tree a ``--servers`` name asks for: ``postier`` is this checkout,
    ``postier@PATH`` the checkout at PATH; None for any other server."""
    if name == "postier":
        return REPO
    if not name.startswith("postier@"):
        return None
    tree = Path(name.removeprefix("postier@")).expanduser().resolve()
    if not (tree / "postier" / "__main__.py").is_file():
        raise ValueError(f"{name}: no postier/__main__.py under {tree}")
    return tree


@dataclass(frozen=True)
class Tree:
    """A postier checkout a row runs. ``index`` is its place in ``--servers``: it tells the
    same checkout named twice apart (an A/A run, to see the noise of a before/after)."""

    path: Path
    index: int = 0

    def label(self) -> str:
        return f"#{self.index + 1} {tree_label(self.path)}"


@functools.cache
def tree_label(tree: Path) -> str:
    """The directory's name and its git commit (``+`` when it has uncommitted changes)."""

    def git(*args: str) -> str:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            r = subprocess.run(
                ["git", "-C", str(tree), *args], capture_output=True, text=True, timeout=10
            )
            if r.returncode == 0:
                return r.stdout.strip()
        return ""

    commit = git("rev-parse", "--short", "HEAD")
    dirty = "+" if commit and git("status", "--porcelain", "--untracked-files=no") else ""
    return f"{tree.name} {commit}{dirty}".strip()


@functools.cache
def bench_password_hash() -> str:
    """The ARGON2ID hash of BENCH_PASSWORD, made once per process (it takes a while)."""
    sys.path.insert(0, str(REPO))
    from postier.auth.passwd import hash_password

    return hash_password(BENCH_PASSWORD)


def write_cert(directory: Path) -> tuple[Path, Path]:
    sys.path.insert(0, str(REPO))
    from postier.gencert import write_pair

    cert, key = directory / "cert.pem", directory / "key.pem"
    write_pair(cert, key, "bench.postier.test")
    return cert, key


def write_users(path: Path) -> None:
    path.write_text("".join(f"{r} {u}\n" for r, u in zip(RECIPIENTS, USERS, strict=True)))


# --------------------------------------------------------------------------- postier


class PostierTarget(Target):
    """``postier serve`` on loopback with a fresh mail root and queue.

    The load goes to ``listener``: ``mx`` (plaintext, STARTTLS offered when ``tls``),
    ``local`` (relays without AUTH), ``submission`` (STARTTLS + AUTH) or ``submissions``
    (implicit TLS + AUTH); the last two imply ``tls`` and a password file with
    AUTH_USER, and the load logs in (``auth``, default: for those two listeners) and sends
    from that address. ``loadgen_args`` go to bench/loadgen.py (``--starttls``,
    ``--connect-only``...). ``fmt`` and ``workers`` default to the first of ``-F`` and
    ``--workers``; ``messages`` replaces ``--messages`` for this row. ``tree`` is the postier
    checkout to run (default: this one); rows from different trees name it.
    """

    name = "postier"

    def __init__(
        self,
        workdir: Path,
        opts: argparse.Namespace,
        *,
        fmt: str | None = None,
        workers: int | None = None,
        listener: str = "mx",
        tls: bool = False,
        auth: bool | None = None,
        loadgen_args: tuple[str, ...] = (),
        extra_args: tuple[str, ...] = (),
        label: str | None = None,
        messages: int | None = None,
        tree: Tree | None = None,
    ) -> None:
        super().__init__(workdir, opts)
        self.fmt = fmt or opts.format
        self.workers = opts.workers if workers is None else workers
        self.listener = listener
        self.tls = tls or listener in ("submission", "submissions")
        self.loadgen_args = tuple(loadgen_args)
        if auth is None:
            auth = listener in ("submission", "submissions")
        if auth:
            self.loadgen_args += ("--auth", f"{AUTH_USER}:{BENCH_PASSWORD}", "-f", AUTH_USER)
        self.messages = messages
        if "--connect-only" in self.loadgen_args:
            self.unit, self.stores = "conn", False
        self.extra_args = tuple(extra_args)
        self.label = label
        self.tree = tree or Tree(REPO)

    def serve_args(self) -> list[str]:
        """Arguments a subclass adds (-F lmtp's target, relay's DNS and remote port)."""
        return []

    def start(self) -> None:
        self.root = self.workdir / "mail"
        self.root.mkdir()
        users = self.workdir / "users"
        write_users(users)
        self.mx_port = free_port()
        ports = {"mx": self.mx_port, "local": free_port()}
        argv = [sys.executable, "-m", "postier", "serve", "-H", "bench.postier.test"]
        argv += ["-s", DOMAIN, "-R", str(self.root), "-u", str(users)]
        # its own queue: two servers never share a queue's lock
        argv += ["-Q", str(self.workdir / "queue")]
        argv += ["--mx", f"127.0.0.1:{self.mx_port}", "--local", f"127.0.0.1:{ports['local']}"]
        argv += ["-F", self.fmt]
        if self.listener in ("submission", "submissions"):
            ports[self.listener] = free_port()
            argv += [f"--{self.listener}", f"127.0.0.1:{ports[self.listener]}"]
            passwords = self.workdir / "passwords"
            passwords.write_text(f"{AUTH_USER}:{bench_password_hash()}\n")
            passwords.chmod(0o600)
            argv += ["-P", str(passwords)]
        if self.tls:
            cert, key = write_cert(self.workdir)
            argv += ["--tls-cert", str(cert), "--tls-key", str(key)]
        if self.workers:
            argv += ["--workers", str(self.workers)]
        # every session comes from 127.0.0.1: lift the per-address cap above the load
        cap = str(max(1000, 2 * max(self.opts.sessions)))
        argv += ["--max-connections", cap, "--max-connections-per-ip", cap]
        argv += self.serve_args()
        argv += list(self.extra_args) + list(self.opts.postier_arg)
        env = dict(os.environ)
        # the tree first: it wins over an installed (or editable) postier
        path = (str(self.tree.path), env.get("PYTHONPATH", ""))
        env["PYTHONPATH"] = os.pathsep.join(p for p in path if p)
        self._spawn(argv, env)
        self.port = self.mx_port  # plaintext: it greets first
        self._wait_ready()
        self.port = ports[self.listener]
        if self.port != self.mx_port:
            try:
                wait_port(self.port, 30, self.alive)
            except RuntimeError as e:
                self.stop()
                raise RuntimeError(f"{self.name}: {e}\n--- {self.log}:\n{tail(self.log)}") from None

    def delivered(self) -> int:
        return COUNTERS[self.fmt](self.root)

    def clear(self) -> None:
        CLEARERS[self.fmt](self.root)

    def settled(self) -> str | None:
        env = self.workdir / "queue" / "env"
        with contextlib.suppress(FileNotFoundError):
            left = sum(1 for e in os.scandir(env) if not e.name.startswith("."))
            if left:
                return f"{left} messages still in the queue"
        return None

    def describe(self) -> str:
        if self.label:
            what = self.label
        else:
            what = self.fmt + (f", --workers {self.workers}" if self.workers else "")
        if len(getattr(self.opts, "trees", ())) > 1:
            return f"postier [{self.tree.label()}] ({what})"
        return f"postier ({what})"


def _public_dir(opts: argparse.Namespace, prefix: str) -> Path:
    """A temporary directory other users (Dovecot's, smtp-sink's) can traverse."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=opts.tmpdir))
    os.chmod(path, 0o755)
    return path


def _repo_on_path() -> None:
    """tests/ (DNS responder, Dovecot) is imported from the repository root."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))


class LmtpTarget(PostierTarget):
    """postier -F lmtp, delivering to a private Dovecot's LMTP listener, which stores Maildir.

    Dovecot's files are counted by difference and never removed between runs (its index
    knows them). Its CPU is the peer CPU column.
    """

    def start(self) -> None:
        _repo_on_path()
        from tests.dovecot import available, chown_tree, running_dovecot

        why = available()
        if why:
            raise RuntimeError(f"lmtp: {why}")
        self._stack = contextlib.ExitStack()
        self.dc_dir = _public_dir(self.opts, "postier-bench-dovecot-")
        self.boxes = self.dc_dir / "mail"
        self.boxes.mkdir()
        chown_tree(self.boxes)  # Dovecot writes as nobody
        self.dovecot = self._stack.enter_context(
            running_dovecot(
                self.dc_dir,
                f"maildir:{self.boxes}/%n",
                {u: "unused" for u in USERS},
                protocols=("imap", "lmtp"),
            )
        )
        super().start()

    def serve_args(self) -> list[str]:
        return ["--lmtp", f"127.0.0.1:{self.dovecot.lmtp_port}"]

    def delivered(self) -> int:
        return count_maildir(self.boxes)

    def clear(self) -> None:
        pass

    def peer_pids(self) -> list[int]:
        with contextlib.suppress(OSError, ValueError):
            return [int((self.dc_dir / "run" / "master.pid").read_text().strip())]
        return []

    def stop(self) -> None:
        super().stop()
        stack = getattr(self, "_stack", None)
        if stack is not None:
            self._stack = None
            stack.close()
            if not self.opts.keep:
                shutil.rmtree(self.dc_dir, ignore_errors=True)


RELAY_DOMAIN = "relay.test"
RELAY_ZONE = {
    RELAY_DOMAIN: {"MX": [(10, f"mx.{RELAY_DOMAIN}")]},
    f"mx.{RELAY_DOMAIN}": {"A": ["127.0.0.1"]},
}
_MESG = re.compile(rb"mesg=(\d+)\r")


class RelayTarget(PostierTarget):
    """postier relaying to ``RELAY_DOMAIN``: DNS responder, smtp-sink, then the server.

    smtp-sink runs with ``-c``: after each "." it writes ``sess=N quit=N mesg=N`` and a CR
    to its stdout (a file here), and ``delivered`` reads the last complete count. The run
    ends when that count reaches the messages accepted and the queue's env/ is empty.
    """

    recipients = tuple(f"{u}@{RELAY_DOMAIN}" for u in USERS)

    def start(self) -> None:
        _repo_on_path()
        from tests.dnsserver import DnsServer

        self.dns = DnsServer(RELAY_ZONE).start()
        exe, env = find_postfix_tool("smtp-sink")
        self.sink_port = free_port()
        self.sink_out = self.workdir / "smtp-sink.counts"
        listen = f"127.0.0.1:{self.sink_port}"
        with (
            open(self.sink_out, "wb") as out,
            open(self.workdir / "smtp-sink.log", "wb") as err,
        ):
            self.sink = subprocess.Popen(
                [exe, "-c", "-u", "nobody", "-h", "sink.relay.test", listen, "256"],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                env=env,
                start_new_session=True,
            )
        wait_smtp(self.sink_port, 30, lambda: self.sink.poll() is None)
        super().start()

    def serve_args(self) -> list[str]:
        args = ["--dns-server", f"127.0.0.1:{self.dns.port}", "--remote-port", str(self.sink_port)]
        if self.listener in ("submission", "submissions"):
            # Every message comes from one account: lift its hourly sending limits (1000
            # messages by default) above the load, or the later runs only measure 450s.
            config = self.workdir / "relay-bench.toml"
            config.write_text("max_messages_per_hour = 100000000\n"
                              "max_recipients_per_hour = 100000000\n")  # fmt: skip
            args += ["-c", str(config)]
        return args

    def delivered(self) -> int:
        try:
            with open(self.sink_out, "rb") as f:
                f.seek(max(0, f.seek(0, os.SEEK_END) - 256))
                counts = _MESG.findall(f.read())
        except OSError:
            return 0
        return int(counts[-1]) if counts else 0

    def clear(self) -> None:
        pass

    def peer_pids(self) -> list[int]:
        return [self.sink.pid] if getattr(self, "sink", None) else []

    def stop(self) -> None:
        super().stop()
        if getattr(self, "sink", None) is not None:
            stop_process(self.sink)
            self.sink = None
        if getattr(self, "dns", None) is not None:
            self.dns.stop()
            self.dns = None


# --------------------------------------------------------------------------- registry


def postier_target(workdir: Path, opts: argparse.Namespace, **kw) -> Target:
    """A postier row: behind it a private Dovecot when the format is lmtp."""
    cls = LmtpTarget if kw.get("fmt", opts.format) == "lmtp" else PostierTarget
    return cls(workdir, opts, **kw)


def make_target(name: str, workdir: Path, opts: argparse.Namespace) -> Target:
    """The server ``--servers`` calls ``name``: postier, postier@PATH or a baseline."""
    path = parse_tree(name)
    if path is not None:
        index = opts.servers.index(name) if name in getattr(opts, "servers", ()) else 0
        return postier_target(workdir, opts, tree=Tree(path, index))
    return baselines.make_target(name, workdir, opts)
