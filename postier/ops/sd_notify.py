"""systemd's notify protocol and socket activation, written here because both are tiny.

Notify (sd_notify(3)): newline-separated `KEY=VALUE` lines in one datagram to the AF_UNIX
socket named by `$NOTIFY_SOCKET`; a name starting with `@` is in the abstract namespace.
postier sends READY=1 once every listener is bound, RELOADING=1 with MONOTONIC_USEC on SIGHUP
(then READY=1 again), STOPPING=1 on shutdown, and WATCHDOG=1 every half `$WATCHDOG_USEC`.
Without `$NOTIFY_SOCKET` (not under systemd) every call does nothing.

Socket activation (sd_listen_fds(3)): `$LISTEN_FDS` sockets start at fd 3, named by
`$LISTEN_FDNAMES` (colon-separated; the unit's `FileDescriptorName=`). The name is the
listener's role. They are ours only when `$LISTEN_PID` is our pid: a variable inherited from
some other process is ignored.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import signal
import socket
import time
from collections.abc import Mapping

from postier import log
from postier.errors import ConfigError

_LOG = logging.getLogger("postier.systemd")

SD_LISTEN_FDS_START = 3
ROLE_NAMES = ("mx", "local", "submission", "submissions")


class Notifier:
    """Sends state changes to systemd; a no-op when not started by systemd."""

    def __init__(self, address: str | None) -> None:
        self.address: str | None = None
        if address:
            # "@name" is Linux's abstract namespace: a leading NUL byte on the wire.
            self.address = "\0" + address[1:] if address.startswith("@") else address
        self._sock: socket.socket | None = None

    @classmethod
    def from_environ(cls, env: Mapping[str, str] = os.environ) -> Notifier:
        return cls(env.get("NOTIFY_SOCKET"))

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, *lines: str) -> bool:
        """Send one datagram; False (and a log line) when systemd is not listening."""
        if self.address is None:
            return False
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.sendto("\n".join(lines).encode(), self.address)
        except OSError as exc:
            log.event("sd-notify-failed", logging.WARNING, _LOG, error=exc.strerror or exc)
            return False
        return True

    def ready(self, status: str = "") -> bool:
        return self.send("READY=1", *([f"STATUS={status}"] if status else []))

    def reloading(self) -> bool:
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.send("RELOADING=1", f"MONOTONIC_USEC={usec}")

    def stopping(self) -> bool:
        return self.send("STOPPING=1")

    def watchdog(self) -> bool:
        return self.send("WATCHDOG=1")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def watchdog_interval(env: Mapping[str, str] = os.environ) -> float | None:
    """Seconds between WATCHDOG=1 pings (half the timeout), or None when none is asked."""
    usec = env.get("WATCHDOG_USEC", "")
    pid = env.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0 or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 2e6


def start_watchdog_timer(notifier: Notifier, env: Mapping[str, str] = os.environ) -> bool:
    """Ping from a SIGALRM interval timer: the supervisor sits in os.wait() and has no loop.

    Forked children do not inherit interval timers, so only this process pings."""
    interval = watchdog_interval(env)
    if interval is None or not notifier.enabled:
        return False
    signal.signal(signal.SIGALRM, lambda _signum, _frame: notifier.watchdog())
    signal.setitimer(signal.ITIMER_REAL, interval, interval)
    return True


def stop_watchdog_timer() -> None:
    signal.setitimer(signal.ITIMER_REAL, 0)


def listen_fds(env: dict[str, str] | None = None) -> list[tuple[str, socket.socket]]:
    """The sockets systemd passed us, as (role, socket); [] when there are none for us.

    The variables are removed afterwards so that no child takes the sockets for its own."""
    env = os.environ if env is None else env  # type: ignore[assignment]
    assert env is not None
    pid, count = env.get("LISTEN_PID", ""), env.get("LISTEN_FDS", "")
    names = env.get("LISTEN_FDNAMES", "")
    for key in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        env.pop(key, None)
    if not count:
        return []
    if pid != str(os.getpid()):
        if pid:
            log.event("listen-fds-ignored", logging.WARNING, _LOG, listen_pid=pid, pid=os.getpid())
        return []
    if not count.isdigit() or int(count) < 1:
        raise ConfigError(f"LISTEN_FDS: {count!r} is not a positive number of sockets")
    roles = names.split(":") if names else []
    out: list[tuple[str, socket.socket]] = []
    for i in range(int(count)):
        role = roles[i] if i < len(roles) else ""
        if role not in ROLE_NAMES:
            raise ConfigError(
                f"LISTEN_FDNAMES: socket {i + 1} is named {role!r}; name each socket in the "
                f"unit (FileDescriptorName=) after its role: {', '.join(ROLE_NAMES)}"
            )
        sock = socket.socket(fileno=SD_LISTEN_FDS_START + i)
        sock.set_inheritable(False)
        sock.setblocking(False)
        if role == "local" and not _is_loopback_socket(sock):
            raise ConfigError(
                f"LISTEN_FDNAMES: the 'local' socket is bound to {sock.getsockname()[0]}; "
                "the local listener relays without authentication: loopback only"
            )
        out.append((role, sock))
    return out


def _is_loopback_socket(sock: socket.socket) -> bool:
    with contextlib.suppress(OSError, ValueError, IndexError, TypeError):
        if sock.family == socket.AF_UNIX:
            return True
        return ipaddress.ip_address(sock.getsockname()[0]).is_loopback
    return False
