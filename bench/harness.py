"""What every benchmark run stands on: the servers' processes and what they cost.

A ``Target`` is a server under test, started in its own process group on free loopback
ports and stopped by pid, also on failure. ``RssSampler`` and ``tree_cpu_seconds`` read the
memory and CPU time of a server's whole process tree (postier's workers, Postfix's master and
its children) from /proc, so that a multi-process server pays for all of its processes.

Nothing here knows which servers exist (targets.py, baselines.py), how the load is made
(drivers.py) or how what landed is counted (mailboxes.py).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
TOOLS = HERE / ".tools"  # aiosmtpd, an unpacked Postfix package (git-ignored)

DOMAIN = "example.org"
USERS = ("alice", "bob", "carol", "dave", "erin")
RECIPIENTS = tuple(f"{u}@{DOMAIN}" for u in USERS)
SENDER = "bench@sender.example"

PAGE = os.sysconf("SC_PAGE_SIZE")
CLK_TCK = os.sysconf("SC_CLK_TCK")


# --------------------------------------------------------------------------- waiting


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_smtp(
    port: int, timeout: float, alive: Callable[[], bool] = lambda: True, host: str = "127.0.0.1"
) -> None:
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


def wait_port(port: int, timeout: float, alive: Callable[[], bool] = lambda: True) -> None:
    """Wait until 127.0.0.1:port accepts a connection (a TLS listener says nothing first)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if not alive():
            raise RuntimeError(f"server exited before listening on 127.0.0.1:{port}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 2):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout:.0f} s")


def tail(path: Path, n: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


# --------------------------------------------------------------------------- /proc


def _stat_fields(pid: int | str) -> list[bytes] | None:
    """The fields of /proc/PID/stat after the command name (which may contain spaces)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    return data[data.rfind(b")") + 2 :].split()


def process_tree(root: int) -> list[int]:
    """``root`` and all of its descendants that are alive now."""
    children: dict[int, list[int]] = {}
    for e in os.scandir("/proc"):
        if e.name.isdigit() and (fields := _stat_fields(e.name)) is not None:
            children.setdefault(int(fields[1]), []).append(int(e.name))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, ()))
    return tree


def tree_cpu_seconds(root: int) -> float:
    """CPU time (user + system) used so far by ``root``'s process tree.

    Each process's own time plus that of its children it has reaped: a child that ran and
    exited between two readings (a Postfix smtpd, say) is still counted, in its parent.
    """
    ticks = 0
    for pid in process_tree(root):
        if (fields := _stat_fields(pid)) is not None:
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


# --------------------------------------------------------------------------- processes


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
