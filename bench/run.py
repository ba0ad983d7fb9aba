"""Benchmark postier (and, side by side, the baselines) on loopback.

For each server and each session count: start the server on free loopback ports with a fresh
mail root in a temporary directory (users alice, bob, carol, dave, erin at example.org), send a
short unrecorded warm-up, then ``--repeat`` runs of ``--messages`` messages of ``--size``
bytes over that many sessions, with our asyncio load generator (bench/loadgen.py) or Postfix's
smtp-source. During each run a sampler reads the resident memory of the server's whole
process tree from /proc every 50 ms. After each run the messages that landed in the mailboxes
are counted: they must equal the messages accepted. Prints a table (median msgs/s of the
repeats, p50/p99 latency, peak RSS and PSS) and writes every figure as JSON under bench/results/.

    python3 bench/run.py --sessions 1,20,100 --messages 5000 --size 2048 --repeat 5
    python3 bench/run.py --servers postier,aiosmtpd,postfix,sink     # side by side
    python3 bench/run.py --scenario tls      # or basic, relay, formats (bench/scenarios.py)

Everything started here is stopped here, by pid, also on Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

if __name__ == "__main__":
    # baselines.py and scenarios.py import this file as `run`: let them find this copy
    sys.modules.setdefault("run", sys.modules["__main__"])

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
TOOLS = HERE / ".tools"
RESULTS = HERE / "results"
LOADGEN = HERE / "loadgen.py"

DOMAIN = "example.org"
USERS = ("alice", "bob", "carol", "dave", "erin")
RECIPIENTS = tuple(f"{u}@{DOMAIN}" for u in USERS)
SENDER = "bench@sender.example"
AUTH_USER = RECIPIENTS[0]  # the account submission rows log in as (and send from)
BENCH_PASSWORD = "bench-secret"  # a throw-away account on a loopback server
PAGE = os.sysconf("SC_PAGE_SIZE")


# --------------------------------------------------------------------------- helpers


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_smtp(port: int, timeout: float, alive=lambda: True, host: str = "127.0.0.1") -> None:
    """Wait until something on host:port answers with a 220 greeting."""
    end = time.monotonic() + timeout
    last = "nothing"
    while time.monotonic() < end:
        if not alive():
            raise RuntimeError(f"server exited before listening on {host}:{port}")
        try:
            with socket.create_connection((host, port), timeout=2) as s:
                s.settimeout(5)
                greeting = s.recv(512)
                with contextlib.suppress(OSError):
                    s.sendall(b"QUIT\r\n")
                    s.recv(512)
                if greeting.startswith(b"220"):
                    return
                last = repr(greeting[:80])
        except OSError as e:
            last = str(e)
        time.sleep(0.05)
    raise RuntimeError(f"no SMTP greeting on {host}:{port} after {timeout:.0f} s ({last})")


def tail(path: Path, n: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def _ppid_map() -> dict[int, int]:
    out = {}
    for e in os.scandir("/proc"):
        if not e.name.isdigit():
            continue
        try:
            with open(f"/proc/{e.name}/stat", "rb") as f:
                data = f.read()
        except OSError:
            continue
        # the command name is in parentheses and may contain spaces: split after it
        fields = data[data.rfind(b")") + 2 :].split()
        out[int(e.name)] = int(fields[1])
    return out


def process_tree(root: int) -> list[int]:
    """``root`` and all of its descendants that are alive now."""
    children: dict[int, list[int]] = {}
    for pid, ppid in _ppid_map().items():
        children.setdefault(ppid, []).append(pid)
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, ()))
    return tree


CLK_TCK = os.sysconf("SC_CLK_TCK")


def tree_cpu_seconds(root: int) -> float:
    """CPU time (user + system) used so far by ``root``'s process tree.

    Each process's own time plus that of its children it has reaped: a child that ran and
    exited between two readings (a Postfix smtpd, say) is still counted, in its parent.
    """
    ticks = 0
    for pid in process_tree(root):
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                data = f.read()
        except OSError:
            continue
        fields = data[data.rfind(b")") + 2 :].split()
        ticks += sum(int(x) for x in fields[11:15])  # utime stime cutime cstime
    return ticks / CLK_TCK


def rss_bytes(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/statm", "rb") as f:
                total += int(f.read().split()[1]) * PAGE
        except (OSError, IndexError, ValueError):
            pass
    return total


def pss_bytes(pids: list[int]) -> int:
    """Proportional set size: shared pages divided among the processes that share them."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/smaps_rollup", "rb") as f:
                for line in f:
                    if line.startswith(b"Pss:"):
                        total += int(line.split()[1]) * 1024
                        break
        except (OSError, IndexError, ValueError):
            pass
    return total


class RssSampler(threading.Thread):
    """Peak resident memory of a process tree: the sum of its processes' RSS, sampled every
    ``interval`` from /proc/PID/statm, and (more costly, so every ``pss_interval``) their
    PSS, which counts a page shared by forked processes once instead of once per process.

    The tree is re-read from /proc every ``rescan`` seconds (a full /proc scan costs about a
    millisecond).
    """

    def __init__(
        self, root: int, interval: float = 0.05, rescan: float = 0.25, pss_interval: float = 0.5
    ) -> None:
        super().__init__(daemon=True)
        self.root, self.interval, self.rescan = root, interval, rescan
        self.pss_interval = pss_interval
        self.peak = 0
        self.peak_pss = 0
        self.peak_procs = 0
        self._stop_event = threading.Event()

    def sample(self, pids: list[int], pss: bool) -> None:
        self.peak = max(self.peak, rss_bytes(pids))
        if pss:
            self.peak_pss = max(self.peak_pss, pss_bytes(pids))
        self.peak_procs = max(self.peak_procs, len(pids))

    def run(self) -> None:
        now = time.monotonic()
        pids, scanned, pss_at = process_tree(self.root), now, now
        self.sample(pids, True)
        while not self._stop_event.wait(self.interval):
            now = time.monotonic()
            if now - scanned >= self.rescan:
                pids, scanned = process_tree(self.root), now
            do_pss = now - pss_at >= self.pss_interval
            if do_pss:
                pss_at = now
            self.sample(pids, do_pss)
        self.sample(process_tree(self.root), True)

    def stop(self) -> int:
        self._stop_event.set()
        self.join(timeout=5)
        return self.peak


def stop_process(proc: subprocess.Popen, timeout: float = 15.0) -> int | None:
    """SIGTERM the process group we created for ``proc``, then SIGKILL it if it lingers."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
    # workers that outlived their parent are still in the group
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    return proc.returncode


def write_users(path: Path) -> None:
    path.write_text("".join(f"{r} {u}\n" for r, u in zip(RECIPIENTS, USERS, strict=True)))


# --------------------------------------------------------------------------- mailboxes


def count_maildir(root: Path, mailboxes=USERS) -> int:
    n = 0
    for mb in mailboxes:
        for sub in ("new", "cur"):
            with contextlib.suppress(FileNotFoundError):
                n += sum(1 for e in os.scandir(root / mb / sub) if not e.name.startswith("."))
    return n


def clear_maildir(root: Path, mailboxes=USERS) -> None:
    for mb in mailboxes:
        for sub in ("new", "cur"):
            with contextlib.suppress(FileNotFoundError):
                for e in os.scandir(root / mb / sub):
                    os.unlink(e.path)


def count_mbox(root: Path, mailboxes=USERS) -> int:
    n = 0
    for mb in mailboxes:
        with contextlib.suppress(FileNotFoundError), open(root / mb, "rb") as f:
            # our bodies never contain a line starting "From ", so each one is a message
            n += sum(1 for line in f if line.startswith(b"From "))
    return n


def clear_mbox(root: Path, mailboxes=USERS) -> None:
    for mb in mailboxes:
        with contextlib.suppress(FileNotFoundError), open(root / mb, "r+b") as f:
            f.truncate(0)


def count_spool(root: Path, mailboxes=USERS) -> int:
    n = 0
    for mb in mailboxes:
        with contextlib.suppress(FileNotFoundError):
            n += sum(1 for e in os.scandir(root / mb) if e.name.isdigit())
    return n


COUNTERS = {"maildir": count_maildir, "mbox": count_mbox, "spool": count_spool}
# spool numbering belongs to the server: its files are left in place and counted by difference
CLEARERS = {"maildir": clear_maildir, "mbox": clear_mbox, "spool": lambda root: None}


# --------------------------------------------------------------------------- targets


class Target:
    """A server under test. Subclasses start it in ``start`` and set ``port`` and ``proc``."""

    name = "?"
    stores = True  # False for a sink: nothing to count
    unit = "msg"  # "conn" when the load is connections (loadgen --connect-only), not mail
    loadgen_args: tuple[str, ...] = ()  # more flags for bench/loadgen.py (TLS, AUTH, ...)
    recipients: tuple[str, ...] = RECIPIENTS
    messages: int | None = None  # per run, when not --messages (e.g. costly AUTH handshakes)

    def __init__(self, workdir: Path, opts: argparse.Namespace) -> None:
        self.workdir = workdir
        self.opts = opts
        self.port = 0
        self.proc: subprocess.Popen | None = None
        self.log = workdir / f"{self.name}.log"

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)
            self.proc = None

    def root_pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def delivered(self) -> int:
        return 0

    def clear(self) -> None:
        pass

    def settled(self) -> str | None:
        """None when nothing is left in flight after a run, else what is (a non-empty queue)."""
        return None

    def peer_pids(self) -> list[int]:
        """Processes outside the server's tree doing the far end's work (smtp-sink, Dovecot):
        their CPU is reported apart, as peer CPU."""
        return []

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def describe(self) -> str:
        return self.name

    def _spawn(self, argv: list[str], env: dict | None = None) -> None:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env=env,
                cwd=self.workdir,
                start_new_session=True,
            )

    def _wait_ready(self, timeout: float = 30.0) -> None:
        try:
            wait_smtp(self.port, timeout, self.alive)
        except RuntimeError as e:
            self.stop()
            raise RuntimeError(f"{self.name}: {e}\n--- {self.log}:\n{tail(self.log)}") from None


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


def wait_port(port: int, timeout: float, alive=lambda: True) -> None:
    """Wait until 127.0.0.1:port accepts a connection (a TLS listener says nothing first)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if not alive():
            raise RuntimeError(f"server exited before listening on 127.0.0.1:{port}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 2):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout:.0f} s")


class PostierTarget(Target):
    """``postier serve`` on loopback with a fresh mail root and queue.

    The load goes to ``listener``: ``mx`` (plaintext, STARTTLS offered when ``tls``),
    ``local`` (relays without AUTH), ``submission`` (STARTTLS + AUTH) or ``submissions``
    (implicit TLS + AUTH); the last two imply ``tls`` and a password file with
    AUTH_USER, and the load logs in (``auth``, default: for those two listeners) and sends
    from that address. ``loadgen_args`` go to bench/loadgen.py (``--starttls``,
    ``--connect-only``...). ``fmt`` and ``workers`` default to the first of ``-F`` and
    ``--workers``; ``messages`` replaces ``--messages`` for this row.
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
        argv = [
            sys.executable,
            "-m",
            "postier",
            "serve",
            "-H",
            "bench.postier.test",
            "-s",
            DOMAIN,
            "-R",
            str(self.root),
            "-u",
            str(users),
            "-Q",
            str(self.workdir / "queue"),  # its own: two servers never share a queue's lock
            "--mx",
            f"127.0.0.1:{self.mx_port}",
            "--local",
            f"127.0.0.1:{ports['local']}",
            "-F",
            self.fmt,
        ]
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
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
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
            return f"postier ({self.label})"
        w = f", --workers {self.workers}" if self.workers else ""
        return f"postier ({self.fmt}{w})"


def make_target(name: str, workdir: Path, opts: argparse.Namespace) -> Target:
    if name == "postier":
        return PostierTarget(workdir, opts)
    try:
        from bench import baselines
    except ImportError:
        import baselines
    return baselines.make_target(name, workdir, opts)


# --------------------------------------------------------------------------- drivers


def find_postfix_tool(tool: str) -> tuple[str, dict]:
    """Path and environment for smtp-source / smtp-sink.

    The installed one if there is one; else Debian's postfix package unpacked (not
    installed) under bench/.tools/postfix with ``apt-get download`` and ``dpkg-deb -x``.
    """
    env = dict(os.environ)
    for d in ("/usr/sbin", "/usr/bin"):
        if os.access(f"{d}/{tool}", os.X_OK):
            return f"{d}/{tool}", env
    unpacked = TOOLS / "postfix"
    exe = unpacked / "usr/sbin" / tool
    if not exe.exists():
        TOOLS.mkdir(parents=True, exist_ok=True)
        dl = TOOLS / "download"
        dl.mkdir(exist_ok=True)
        debs = sorted(dl.glob("postfix_*.deb"))
        if not debs:
            r = subprocess.run(
                ["apt-get", "download", "postfix"],
                cwd=dl,
                capture_output=True,
                text=True,
                timeout=300,
            )
            debs = sorted(dl.glob("postfix_*.deb"))
            if r.returncode or not debs:
                raise RuntimeError(f"apt-get download postfix failed: {r.stderr.strip()}")
        subprocess.run(["dpkg-deb", "-x", str(debs[-1]), str(unpacked)], check=True, timeout=300)
    env["LD_LIBRARY_PATH"] = os.pathsep.join(
        p for p in (str(unpacked / "usr/lib/postfix"), env.get("LD_LIBRARY_PATH", "")) if p
    )
    return str(exe), env


@dataclass
class RunResult:
    sessions: int
    accepted: int
    errors: int
    elapsed: float  # load start to the last message accepted
    e2e: float  # load start to the last message in its mailbox
    delivered: int | None
    msgs_per_s: float
    p50_ms: float | None
    p99_ms: float | None
    peak_rss: int
    peak_pss: int
    peak_procs: int
    loadavg: float  # the machine's 1-minute load average as the run began
    cpu_s: float  # CPU seconds the server's process tree used during the run
    cpu_ms_per_msg: float | None
    error_samples: list[str] = field(default_factory=list)
    peer_cpu_ms_per_msg: float | None = None  # the far end's (smtp-sink, Dovecot), if any
    tls_handshakes: int = 0
    tls_resumed: int = 0
    tls_version: str | None = None


def drive_loadgen(target: Target, sessions: int, opts) -> dict:
    argv = [
        sys.executable,
        str(LOADGEN),
        "--port",
        str(target.port),
        "-n",
        str(opts.messages),
        "-l",
        str(opts.size),
        "-s",
        str(sessions),
        "-f",
        SENDER,
        "--deadline",
        str(opts.deadline),
        "--json",
        "-r",
        ",".join(target.recipients),
    ]
    if opts.pipelining:
        argv.append("-P")
    if opts.mode == "per-connection":
        argv.append("-1")
    argv += target.loadgen_args
    r = subprocess.run(
        argv, capture_output=True, text=True, timeout=opts.deadline + 60, stdin=subprocess.DEVNULL
    )
    try:
        d = json.loads(r.stdout)
    except ValueError:
        raise RuntimeError(f"loadgen failed ({r.returncode}): {r.stderr[-2000:]}") from None
    return {
        "accepted": d["ok"],
        "errors": d["errors"],
        "elapsed": d["elapsed"],
        "p50_ms": d["p50_ms"],
        "p99_ms": d["p99_ms"],
        "error_samples": d["error_samples"],
        "tls_handshakes": d.get("tls_handshakes", 0),
        "tls_resumed": d.get("tls_resumed", 0),
        "tls_version": d.get("tls_version"),
    }


def drive_smtp_source(target: Target, sessions: int, opts) -> dict:
    if target.loadgen_args or target.recipients != RECIPIENTS:
        raise RuntimeError(f"{target.describe()}: needs bench/loadgen.py (--driver loadgen)")
    port = target.port
    exe, env = find_postfix_tool("smtp-source")
    argv = [
        exe,
        "-s",
        str(sessions),
        "-m",
        str(opts.messages),
        "-l",
        str(opts.size),
        "-f",
        SENDER,
        "-t",
        RECIPIENTS[0],
        "-M",
        "source.bench.example",
    ]
    if opts.mode == "persistent":
        argv.append("-d")
    argv.append(f"127.0.0.1:{port}")
    t0 = time.perf_counter()
    try:
        r = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            timeout=opts.deadline,
            env=env,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired:
        return {
            "accepted": 0,
            "errors": opts.messages,
            "elapsed": opts.deadline,
            "p50_ms": None,
            "p99_ms": None,
            "error_samples": ["deadline reached"],
        }
    elapsed = time.perf_counter() - t0
    ok = r.returncode == 0
    # smtp-source stops at the first error and does not say how far it got
    return {
        "accepted": opts.messages if ok else 0,
        "errors": 0 if ok else opts.messages,
        "elapsed": elapsed,
        "p50_ms": None,
        "p99_ms": None,
        "error_samples": [] if ok else [(r.stderr or r.stdout).strip()[-500:]],
    }


DRIVERS = {"loadgen": drive_loadgen, "smtp-source": drive_smtp_source}


def one_run(target: Target, sessions: int, opts, messages: int | None = None) -> RunResult:
    """One measured run (or, with ``messages``, a warm-up: same load, fewer messages)."""
    if messages is None:
        messages = target.messages or opts.messages
    if messages != opts.messages:
        opts = argparse.Namespace(**{**vars(opts), "messages": messages})
    before = target.delivered() if target.stores else 0
    loadavg = os.getloadavg()[0]
    peers = target.peer_pids()
    cpu0 = tree_cpu_seconds(target.root_pid())
    peer0 = sum(tree_cpu_seconds(p) for p in peers)
    sampler = RssSampler(target.root_pid())
    sampler.start()
    try:
        d = DRIVERS[opts.driver](target, sessions, opts)
        done = time.perf_counter()
        delivered = None
        e2e = d["elapsed"]
        if target.stores:
            delivered = target.delivered() - before
            if delivered < d["accepted"]:
                # Postfix answers 250 once queued and delivers later: wait for the mailboxes
                end = done + opts.drain_timeout
                while delivered < d["accepted"] and time.perf_counter() < end:
                    time.sleep(0.02)
                    delivered = target.delivered() - before
                e2e += time.perf_counter() - done
            # a relay's queue entry goes after the far end's 250: wait (bounded) for it
            end = time.perf_counter() + opts.drain_timeout
            while (left := target.settled()) and time.perf_counter() < end:
                time.sleep(0.02)
            if left:
                d["error_samples"] = [f"after the run: {left}", *d["error_samples"]]
                d["errors"] += 1
    finally:
        peak = sampler.stop()
    cpu = tree_cpu_seconds(target.root_pid()) - cpu0
    peer_cpu = sum(tree_cpu_seconds(p) for p in peers) - peer0
    handled = delivered if target.stores else d["accepted"]
    if target.stores:
        target.clear()
    return RunResult(
        sessions=sessions,
        accepted=d["accepted"],
        errors=d["errors"],
        elapsed=round(d["elapsed"], 4),
        e2e=round(e2e, 4),
        delivered=delivered,
        msgs_per_s=round(handled / e2e, 1) if e2e > 0 else 0.0,
        p50_ms=d["p50_ms"],
        p99_ms=d["p99_ms"],
        peak_rss=peak,
        peak_pss=sampler.peak_pss,
        peak_procs=sampler.peak_procs,
        loadavg=round(loadavg, 2),
        cpu_s=round(cpu, 2),
        cpu_ms_per_msg=round(cpu * 1000 / handled, 3) if handled else None,
        error_samples=d["error_samples"][:5],
        peer_cpu_ms_per_msg=round(peer_cpu * 1000 / handled, 3) if peers and handled else None,
        tls_handshakes=d.get("tls_handshakes", 0),
        tls_resumed=d.get("tls_resumed", 0),
        tls_version=d.get("tls_version"),
    )


def _median(xs):
    xs = [x for x in xs if x is not None]
    return round(statistics.median(xs), 3) if xs else None


def _report(t: Target, i: int, r: RunResult, opts) -> None:
    lost = "" if r.delivered in (None, r.accepted) else f" DELIVERED {r.delivered}"
    u = t.unit
    more = ""
    if r.peer_cpu_ms_per_msg is not None:
        more += f", peer cpu {r.peer_cpu_ms_per_msg} ms/{u}"
    if r.tls_handshakes:
        more += f", {r.tls_version}, {r.tls_resumed}/{r.tls_handshakes} resumed"
    print(
        f"#   {t.describe()}, run {i + 1}/{opts.repeat}: {r.msgs_per_s} {u}s/s, "
        f"p50 {r.p50_ms} ms, p99 {r.p99_ms} ms, cpu {r.cpu_ms_per_msg} ms/{u}, "
        f"rss {r.peak_rss / 2**20:.1f} MiB, pss {r.peak_pss / 2**20:.1f} MiB, "
        f"errors {r.errors}{lost}, load {r.loadavg}{more}",
        file=sys.stderr,
        flush=True,
    )
    for e in r.error_samples[:3]:
        print(f"#     error: {e}", file=sys.stderr)


def _row(t: Target, sessions: int, runs: list[RunResult], opts) -> dict:
    return {
        "server": t.describe(),
        "part": getattr(opts, "part", ""),
        "unit": t.unit,
        "sessions": sessions,
        "msgs_per_s": _median([r.msgs_per_s for r in runs]),
        "p50_ms": _median([r.p50_ms for r in runs]),
        "p99_ms": _median([r.p99_ms for r in runs]),
        "cpu_ms_per_msg": _median([r.cpu_ms_per_msg for r in runs]),
        "peer_cpu_ms_per_msg": _median([r.peer_cpu_ms_per_msg for r in runs]),
        "tls_handshakes": sum(r.tls_handshakes for r in runs),
        "tls_resumed": sum(r.tls_resumed for r in runs),
        "peak_rss_mib": round(max(r.peak_rss for r in runs) / 2**20, 1),
        "peak_pss_mib": round(max(r.peak_pss for r in runs) / 2**20, 1),
        "sent": (t.messages or opts.messages) * len(runs),
        "accepted": sum(r.accepted for r in runs),
        "delivered": sum(r.delivered for r in runs) if t.stores else None,
        "errors": sum(r.errors for r in runs),
        "runs": [vars(r) for r in runs],
    }


_FAILS = (RuntimeError, OSError, subprocess.SubprocessError, ValueError, KeyError)


@dataclass(frozen=True)
class Spec:
    """One row of a table: a name (for directories and failures) and how to make its target."""

    name: str
    make: Callable[[Path, argparse.Namespace], Target]


@dataclass
class Part:
    """A table of a scenario: its rows, session counts (None: --sessions) and option changes."""

    title: str
    specs: list[Spec] | None = None  # None: --servers, -F and --workers
    sessions: list[int] | None = None
    overrides: dict = field(default_factory=dict)


def default_specs(opts: argparse.Namespace) -> list[Spec]:
    """``--servers``, with one postier row per ``-F`` format and ``--workers`` value."""
    specs = []
    for name in opts.servers:
        if name != "postier":
            specs.append(Spec(name, functools.partial(make_target, name)))
            continue
        for fmt in opts.formats:
            for w in opts.workers_list:
                specs.append(
                    Spec(
                        f"postier-{fmt}-w{w}",
                        functools.partial(postier_target, fmt=fmt, workers=w),
                    )
                )
    return specs


def postier_target(workdir: Path, opts: argparse.Namespace, **kw) -> Target:
    if kw.get("fmt") == "lmtp":  # a private Dovecot behind it
        try:
            import scenarios  # run as a script: bench/ is on sys.path
        except ImportError:
            from bench import scenarios
        return scenarios.LmtpTarget(workdir, opts, **kw)
    return PostierTarget(workdir, opts, **kw)


def bench_level(
    sessions: int,
    opts,
    base: Path,
    failures: list[str],
    rows: list[dict],
    specs: list[Spec] | None = None,
) -> None:
    """All servers at one session count, each started afresh on its own mail root.

    The repeats are interleaved (server A, B, C, then A, B, C again...) so that whatever
    else the machine is doing weighs on every server alike. A server that fails is dropped
    from the level; the others go on. The rows go to ``rows``, also when interrupted.
    """
    targets: list[Target] = []
    runs: dict[Target, list[RunResult]] = {}
    try:
        for spec in default_specs(opts) if specs is None else specs:
            name = spec.name
            workdir = Path(tempfile.mkdtemp(prefix=f"{name}-s{sessions}-", dir=base))
            try:
                t = spec.make(workdir, opts)
                print(
                    f"# {t.describe()}, {sessions} sessions: starting", file=sys.stderr, flush=True
                )
                targets.append(t)
                t.start()
                if opts.warmup:
                    w = one_run(t, sessions, opts, messages=min(opts.warmup, t.messages or 1e9))
                    if w.errors or w.delivered not in (None, w.accepted):
                        # not in the figures, but a fresh mail root is where races show
                        failures.append(
                            f"{name} at {sessions} sessions, warm-up: {w.errors} errors, "
                            f"{w.delivered} of {w.accepted} accepted landed {w.error_samples}"
                        )
                runs[t] = []
            except _FAILS as e:
                failures.append(f"{name} at {sessions} sessions: {e}")
                print(f"# {name}: FAILED: {e}", file=sys.stderr, flush=True)
        for i in range(opts.repeat):
            for t in [t for t in targets if t in runs]:
                try:
                    r = one_run(t, sessions, opts)
                    if not t.alive():
                        raise RuntimeError(f"the server died:\n{tail(t.log)}")
                except _FAILS as e:
                    failures.append(f"{t.describe()} at {sessions} sessions: {e}")
                    print(f"# {t.describe()}: FAILED: {e}", file=sys.stderr, flush=True)
                    del runs[t]
                    t.stop()
                    continue
                runs[t].append(r)
                _report(t, i, r, opts)
    finally:
        for t in targets:
            t.stop()
            if not opts.keep:
                shutil.rmtree(t.workdir, ignore_errors=True)
        rows.extend(_row(t, sessions, runs[t], opts) for t in targets if runs.get(t))


# --------------------------------------------------------------------------- output


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def format_table(rows: list[dict]) -> str:
    """One table; ``rows`` share a unit (messages, or connections for handshake rows)."""
    u = rows[0].get("unit", "msg") if rows else "msg"
    peer = any(r.get("peer_cpu_ms_per_msg") is not None for r in rows)
    tls = any(r.get("tls_handshakes") for r in rows)
    head = [
        "server",
        "sessions",
        f"{u}s/s",
        "p50 ms",
        "p99 ms",
        f"CPU ms/{u}",
        *([f"peer CPU ms/{u}"] if peer else []),
        "peak RSS MiB",
        "peak PSS MiB",
        *(["TLS resumed"] if tls else []),
        "delivered/sent" if u == "msg" else "done/sent",
        "errors",
    ]
    lines = []
    for r in rows:
        if r["delivered"] is None:
            landed = f"{r['accepted']}/{r['sent']}" if u != "msg" else "n/a (sink)"
        else:
            landed = f"{r['delivered']}/{r['sent']}"
        hs = r.get("tls_handshakes", 0)
        lines.append(
            (
                r["server"],
                str(r["sessions"]),
                f"{r['msgs_per_s']:.0f}",
                _fmt(r["p50_ms"]),
                _fmt(r["p99_ms"]),
                _fmt(r["cpu_ms_per_msg"]),
                *([_fmt(r.get("peer_cpu_ms_per_msg"))] if peer else []),
                f"{r['peak_rss_mib']:.1f}",
                f"{r['peak_pss_mib']:.1f}",
                *([f"{r.get('tls_resumed', 0)}/{hs}" if hs else "-"] if tls else []),
                landed,
                str(r["errors"]),
            )
        )
    widths = [max(len(x) for x in col) for col in zip(head, *lines, strict=True)]
    out = ["  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)).rstrip()]
    out.append("  ".join("-" * w for w in widths))
    out += [
        "  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in lines
    ]
    return "\n".join(out)


def format_tables(rows: list[dict]) -> str:
    """One table per part of a scenario (and per unit), in the order they ran."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r.get("part", ""), r.get("unit", "msg")), []).append(r)
    out = []
    for (part, _), group in groups.items():
        out.append((f"## {part}\n" if part else "") + format_table(group))
    return "\n\n".join(out)


def machine() -> dict:
    cpu = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
    return {
        "cpus": os.cpu_count(),
        "cpu": cpu,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "host": platform.node(),
        "loadavg": os.getloadavg(),
    }


DEFAULTS = {"sessions": "1,20,100", "messages": 5000, "repeat": 5}
FORMATS = (*sorted(COUNTERS), "lmtp")


def _scenarios():
    try:
        import scenarios  # run as a script: bench/ is on sys.path
    except ImportError:
        from bench import scenarios
    return scenarios


def parse_args(argv=None, servers_default="postier") -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--scenario",
        choices=("basic", "tls", "relay", "formats"),
        help="a prepared comparison (bench/scenarios.py): basic (maildir at 1/20/100 sessions, "
        "--workers 1 and 2), tls (handshakes/s; msgs/s plain vs STARTTLS vs AUTH), relay "
        "(submission/local to smtp-sink through the queue), formats (maildir, mbox, spool, "
        "lmtp); its defaults for --sessions, --messages and --repeat yield to the flags",
    )
    p.add_argument(
        "--servers",
        default=servers_default,
        help="comma-separated: postier, aiosmtpd, postfix, sink",
    )
    p.add_argument(
        "--sessions", help=f"comma-separated session counts (default {DEFAULTS['sessions']})"
    )
    p.add_argument(
        "-n",
        "--messages",
        type=int,
        help=f"messages per run (default {DEFAULTS['messages']})",
    )
    p.add_argument("-l", "--size", type=int, default=2048, help="body bytes per message")
    p.add_argument(
        "--repeat",
        type=int,
        help=f"runs per session count, the table shows the median (default {DEFAULTS['repeat']})",
    )
    p.add_argument(
        "--warmup",
        type=int,
        default=200,
        help="unrecorded messages sent first at each session count (0: none)",
    )
    p.add_argument(
        "-F",
        "--format",
        default="maildir",
        help=f"postier's mailbox format, comma-separated for one row each: {', '.join(FORMATS)}",
    )
    p.add_argument(
        "--workers",
        default="0",
        help="postier --workers N, comma-separated for one row each (0: do not pass the flag)",
    )
    p.add_argument(
        "--handshakes",
        type=int,
        default=2000,
        help="--scenario tls: connections per handshake run",
    )
    p.add_argument(
        "--postier-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="one more argument for postier serve (repeatable: --postier-arg=--flag "
        "--postier-arg=value)",
    )
    p.add_argument("--driver", default="loadgen", choices=sorted(DRIVERS))
    p.add_argument(
        "--mode",
        default="persistent",
        choices=("persistent", "per-connection"),
        help="messages back to back on one connection per session, or one "
        "message per connection (smtp-source's default)",
    )
    p.add_argument(
        "-P", "--pipelining", action="store_true", help="loadgen: pipeline MAIL, RCPT and DATA"
    )
    p.add_argument("--deadline", type=float, default=300.0, help="seconds per run, at most")
    p.add_argument(
        "--drain-timeout",
        type=float,
        default=120.0,
        help="seconds to wait for accepted mail to land in the mailboxes",
    )
    p.add_argument(
        "--aiosmtpd-uvloop",
        action="store_true",
        help="run the aiosmtpd baseline on uvloop instead of asyncio's loop",
    )
    p.add_argument("--tmpdir", help="where the mail roots go (default: the system's)")
    p.add_argument("--keep", action="store_true", help="keep the temporary directories")
    p.add_argument("--label", default="", help="a name for the results file")
    opts = p.parse_args(argv)
    preset = _scenarios().PRESETS[opts.scenario] if opts.scenario else {}
    for key, value in DEFAULTS.items():
        if getattr(opts, key) is None:
            setattr(opts, key, preset.get(key, value))
    try:
        opts.sessions = [int(x) for x in str(opts.sessions).split(",") if x.strip()]
        opts.workers_list = [int(x) for x in str(opts.workers).split(",") if x.strip()] or [0]
    except ValueError:
        p.error("--sessions and --workers: comma-separated integers expected")
    opts.workers = opts.workers_list[0]
    opts.formats = [x.strip() for x in opts.format.split(",") if x.strip()]
    if not opts.formats or any(f not in FORMATS for f in opts.formats):
        p.error(f"-F: comma-separated, among {', '.join(FORMATS)}")
    opts.format = opts.formats[0]
    opts.servers = [x.strip() for x in opts.servers.split(",") if x.strip()]
    if opts.messages < 1 or opts.repeat < 1 or not opts.sessions:
        p.error("--messages, --repeat and --sessions must be positive")
    return opts


def main(argv=None, servers_default="postier") -> int:
    opts = parse_args(argv, servers_default)
    base = Path(tempfile.mkdtemp(prefix="postier-bench-", dir=opts.tmpdir))
    rows: list[dict] = []
    failures: list[str] = []
    started = time.time()
    info = machine()  # before the load, so that its load average is the machine's own
    parts = _scenarios().parts(opts) if opts.scenario else [Part("")]
    try:
        for part in parts:
            popts = argparse.Namespace(**{**vars(opts), "part": part.title, **part.overrides})
            for sessions in part.sessions or opts.sessions:
                bench_level(sessions, popts, base, failures, rows, part.specs)
    except KeyboardInterrupt:
        failures.append("interrupted")
    finally:
        if not opts.keep:
            shutil.rmtree(base, ignore_errors=True)
    mode = f"{opts.driver}, {opts.mode}{', pipelined' if opts.pipelining else ''}"
    print(
        f"\n{opts.messages} messages x {opts.size} B per run, median of {opts.repeat}, "
        f"{mode}, {os.cpu_count()} CPUs, load average before the run "
        f"{info['loadavg'][0]:.2f}"
    )
    if rows:
        print(format_tables(rows))
    for f in failures:
        print(f"FAILED {f}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(started))
    label = opts.label or opts.scenario or "-".join(opts.servers)
    out = RESULTS / f"{label}-{stamp}.json"
    out.write_text(
        json.dumps(
            {
                "started": stamp,
                "machine": info,
                "argv": sys.argv[1:],
                "options": {k: v for k, v in vars(opts).items()},
                "rows": rows,
                "failures": failures,
            },
            indent=1,
        )
        + "\n"
    )
    print(f"results: {out.relative_to(REPO) if out.is_relative_to(REPO) else out}")
    bad = failures or any(r["errors"] or (r["delivered"] not in (None, r["sent"])) for r in rows)
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
