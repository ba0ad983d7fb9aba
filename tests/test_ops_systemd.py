"""systemd: the unit passes `systemd-analyze verify`; the notify protocol reaches a real
datagram socket in order (READY, RELOADING, READY, STOPPING); socket activation serves on
the sockets passed, and ignores them when LISTEN_PID is not ours."""

from __future__ import annotations

import os
import shutil
import signal
import smtplib
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from postier.ops import sd_notify
from postier.ops.systemd import unit_text
from tests.server import PostierServer, make_server

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = str(tmp_path / "notify")
    sock.bind(path)
    sock.settimeout(30)
    yield sock, path
    sock.close()


def receive(sock: socket.socket) -> dict[str, str]:
    data = sock.recv(4096).decode()
    return dict(line.split("=", 1) for line in data.split("\n") if line)


def next_state(sock: socket.socket) -> dict[str, str]:
    """The next message that is not a watchdog ping."""
    while (msg := receive(sock)) == {"WATCHDOG": "1"}:
        pass
    return msg


def test_shipped_unit_is_the_generated_one() -> None:
    assert (ROOT / "contrib" / "postier.service").read_text() == unit_text()


def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    # verify checks that ExecStart exists: point it at this interpreter.
    unit = tmp_path / "postier.service"
    unit.write_text(unit_text(command=f"{sys.executable} -m postier"))
    proc = subprocess.run(
        [analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert "postier.service" not in proc.stderr, proc.stderr
    for line in ("Type=notify", "ProtectSystem=strict", "NoNewPrivileges=yes", "PrivateTmp=yes"):
        assert line in unit.read_text()


def test_notifier_sends_datagrams_also_to_abstract_sockets(
    notify_socket: tuple[socket.socket, str],
) -> None:
    sock, path = notify_socket
    notifier = sd_notify.Notifier(path)
    assert notifier.ready() and receive(sock) == {"READY": "1"}
    assert notifier.reloading()
    msg = receive(sock)
    assert msg["RELOADING"] == "1" and int(msg["MONOTONIC_USEC"]) > 0
    notifier.close()

    abstract = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    name = f"postier-test-{os.getpid()}"
    abstract.bind("\0" + name)
    abstract.settimeout(30)
    try:
        notifier = sd_notify.Notifier("@" + name)
        assert notifier.stopping() and receive(abstract) == {"STOPPING": "1"}
        notifier.close()
    finally:
        abstract.close()
    assert not sd_notify.Notifier(None).ready()  # not under systemd: nothing to do


def test_watchdog_interval_is_half_the_timeout_and_only_for_us() -> None:
    assert sd_notify.watchdog_interval({"WATCHDOG_USEC": "10000000"}) == 5.0
    assert sd_notify.watchdog_interval({}) is None
    env = {"WATCHDOG_USEC": "10000000", "WATCHDOG_PID": str(os.getpid() + 1)}
    assert sd_notify.watchdog_interval(env) is None


@pytest.mark.parametrize("workers", ["1", "2"])
def test_daemon_notifies_ready_reloading_stopping_in_order(
    tmp_path: Path, notify_socket: tuple[socket.socket, str], workers: str
) -> None:
    sock, path = notify_socket
    srv = make_server(tmp_path / "srv", extra=["--workers", workers])
    env = {**os.environ, "NOTIFY_SOCKET": path, "WATCHDOG_USEC": "60000000"}
    srv.proc = subprocess.Popen(
        [sys.executable, "-m", "postier", "serve", *srv.args],
        stdout=subprocess.DEVNULL,
        stderr=srv.log_path.open("ab"),
        env=env,
        cwd=srv.root,
    )
    try:
        assert next_state(sock) == {"READY": "1"}
        # READY means every listener is bound: a client gets its greeting.
        with smtplib.SMTP("127.0.0.1", srv.mx_port, timeout=30) as client:
            assert client.noop()[0] == 250
        srv.proc.send_signal(signal.SIGHUP)
        states = [next_state(sock), next_state(sock)]
        srv.proc.send_signal(signal.SIGTERM)
        states.append(next_state(sock))
        assert srv.proc.wait(30) == 0
    finally:
        srv.kill()
    assert states[0]["RELOADING"] == "1" and "MONOTONIC_USEC" in states[0]
    assert states[1] == {"READY": "1"}
    assert states[2] == {"STOPPING": "1"}


# What systemd does before exec: the socket at fd 3, LISTEN_PID = the pid that runs postier.
ACTIVATE = """
import os, sys
fd = int(sys.argv[1])
if fd != 3:
    os.dup2(fd, 3)
    os.close(fd)
os.environ.setdefault("LISTEN_PID", str(os.getpid()))
os.execv(sys.executable, [sys.executable, "-m", "postier", "serve", *sys.argv[2:]])
"""


def _activated_server(tmp_path: Path, listen_pid: str) -> tuple[PostierServer, socket.socket]:
    srv = make_server(tmp_path / "srv")
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    env = {**os.environ, "LISTEN_FDS": "1", "LISTEN_FDNAMES": "mx"}
    if listen_pid:
        env["LISTEN_PID"] = listen_pid
    fd = listener.fileno()
    proc = subprocess.Popen(
        [sys.executable, "-c", ACTIVATE, str(fd), *srv.args],
        stdout=subprocess.DEVNULL,
        stderr=srv.log_path.open("ab"),
        env=env,
        cwd=srv.root,
        pass_fds=(fd,),
    )
    srv.proc = proc
    deadline = time.monotonic() + 30
    while "event=ready" not in srv.log():
        assert proc.poll() is None, srv.log()
        assert time.monotonic() < deadline, srv.log()
        time.sleep(0.05)
    return srv, listener


def test_socket_activation_serves_the_passed_socket(tmp_path: Path) -> None:
    srv, listener = _activated_server(tmp_path, "")
    try:
        port = listener.getsockname()[1]
        listener.close()  # the server holds its own copy
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
            client.sendmail("a@example.net", ["alice@example.org"], "Subject: s\r\n\r\nx\r\n")
        assert len(srv.maildir_files("alice")) == 1
        assert srv.logged(f"role=mx address=127.0.0.1:{port}")
        with pytest.raises(OSError):  # the configured --mx was replaced by the passed socket
            socket.create_connection(("127.0.0.1", srv.mx_port), timeout=5).close()
        assert srv.stop() == 0
    finally:
        srv.kill()


def test_listen_fds_for_another_pid_are_ignored(tmp_path: Path) -> None:
    srv, listener = _activated_server(tmp_path, "1")
    try:
        listener.close()
        assert srv.logged("event=listen-fds-ignored")
        with smtplib.SMTP("127.0.0.1", srv.mx_port, timeout=30) as client:
            assert client.noop()[0] == 250
        assert srv.stop() == 0
    finally:
        srv.kill()
