"""Start a real `postier serve` process on loopback for integration tests.

The server runs as a subprocess exactly as a user would start it (`python -m postier serve`),
on free ports, with a fresh mail root; tests talk to it over real sockets. `stop()` sends
SIGTERM and waits; `kill()` sends SIGKILL (crash tests).
"""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


_handed_out: set[int] = set()


def free_port(host: str = "127.0.0.1") -> int:
    """A port free on `host` now, chosen below the kernel's ephemeral range.

    A port the kernel gives to `bind(0)` comes from the ephemeral range, the one outgoing
    connections take their local ports from: between this choice and the server's bind, a
    test's own client (to a DNS responder, an MX, the server itself) could take it, and the
    server failed to start with "Address already in use" (seen in CI). Below that range the
    kernel never assigns a port on its own; the bind here checks nobody else holds it."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    low, _ = _ephemeral_range()
    first = 10000 if low > 12000 else 1024
    rng = random.Random(os.getpid() ^ time.monotonic_ns())
    for _ in range(200):
        port = rng.randrange(first, low)
        if port in _handed_out:
            continue
        with socket.socket(family, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    with socket.socket(family, socket.SOCK_STREAM) as s:  # a crowded machine: the old way
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_until(
    predicate: Callable[[], object], timeout: float = 30.0, interval: float = 0.02
) -> bool:
    """Poll `predicate` until it holds or `timeout` seconds pass; its last answer. A safety
    bound for something the server does after the reply a test read, never a speed test."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return bool(predicate())
        time.sleep(interval)
    return True


@dataclass
class PostierServer:
    root: Path
    args: list[str]
    mx_port: int
    local_port: int
    mail_root: Path
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    extra_ports: dict[str, int] = field(default_factory=dict)

    def start(self, timeout: float = 20.0) -> PostierServer:
        logf = open(self.log_path, "ab")  # noqa: SIM115 - closed with the process
        start_offset = logf.tell()  # a restart appends: only a new "ready" counts
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "postier", "serve", *self.args],
            stdout=logf,
            stderr=logf,
            stdin=subprocess.DEVNULL,
            cwd=self.root,
        )
        logf.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"postier exited {self.proc.returncode}:\n{self.log()}")
            if "event=ready" in self.log()[start_offset:]:
                return self
            time.sleep(0.05)
        raise RuntimeError(f"postier did not become ready:\n{self.log()}")

    def log(self) -> str:
        try:
            return self.log_path.read_bytes().decode("utf-8", "replace")
        except FileNotFoundError:
            return ""

    def logged(self, *texts: str, timeout: float = 15.0) -> bool:
        """Whether the log comes to hold every one of `texts` within `timeout` seconds.

        The server writes the lines of one loop iteration together after it
        (postier.log_writer), so a line can land just after the reply the client already
        read: a test that expects a line asks with this, not with `text in log()`."""
        return wait_until(lambda: all(t in self.log() for t in texts), timeout)

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def maildir_files(self, mailbox: str) -> list[Path]:
        new = self.mail_root / mailbox / "new"
        return sorted(new.iterdir()) if new.is_dir() else []


def make_server(
    tmp: Path,
    *,
    users: str = "alice@example.org\nbob@example.org\ncarol@example.org carol-box\n",
    aliases: str | None = None,
    domains: tuple[str, ...] = ("example.org",),
    extra: list[str] | None = None,
    mx_host: str = "127.0.0.1",
) -> PostierServer:
    """A configured (not yet started) server with users alice, bob, carol (mailbox carol-box)."""
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "users").write_text(users)
    mx_port = free_port(mx_host)
    local_port = free_port()
    mx_addr = f"[{mx_host}]:{mx_port}" if ":" in mx_host else f"{mx_host}:{mx_port}"
    args = [
        "-H", "mx.test",
        "-R", str(tmp / "mail"),
        "-Q", str(tmp / "queue"),
        "-u", str(tmp / "users"),
        "--mx", mx_addr,
        "--local", f"127.0.0.1:{local_port}",
    ]  # fmt: skip
    for d in domains:
        args += ["-s", d]
    if aliases is not None:
        (tmp / "aliases").write_text(aliases)
        args += ["-a", str(tmp / "aliases")]
    if "--workers" not in (extra or []):
        # One worker unless a test asks: the per-IP and total caps are split among workers,
        # so tests of those caps need one, and the suite shares its cores with other work.
        args += ["--workers", "1"]
    args += extra or []
    env_root = os.environ.get("POSTIER_TEST_LOG_DIR")
    log_path = Path(env_root) / f"{tmp.name}.log" if env_root else tmp / "postier.log"
    return PostierServer(
        root=tmp,
        args=args,
        mx_port=mx_port,
        local_port=local_port,
        mail_root=tmp / "mail",
        log_path=log_path,
    )
