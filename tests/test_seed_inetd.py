"""`postier serve --inetd ROLE`: one SMTP session on stdin/stdout, as inetd, `nc -l -e`,
socat and systemd `Accept=yes` run it. Real spawners, real sockets, all on loopback."""

from __future__ import annotations

import os
import shlex
import shutil
import smtplib
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.server import free_port
from tests.test_tls_integration import write_pair

SAFETY_TIMEOUT = 30.0  # a bound on a hung process, never a measurement
ROOT = Path(__file__).resolve().parent.parent


def serve_args(tmp: Path, role: str, *extra: str) -> list[str]:
    (tmp / "users").write_text("alice@example.org\nbob@example.org\n")
    return [
        sys.executable, "-m", "postier", "serve", "--inetd", role,
        "-H", "mx.test", "-s", "example.org",
        "-R", str(tmp / "mail"), "-Q", str(tmp / "queue"), "-u", str(tmp / "users"),
        *extra,
    ]  # fmt: skip


def child_env(**peer: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("TCPREMOTEIP", "REMOTE_HOST")}
    env["PYTHONPATH"] = str(ROOT)
    env.update(peer)
    return env


def delivered(tmp: Path, mailbox: str = "alice") -> list[bytes]:
    new = tmp / "mail" / mailbox / "new"
    return [p.read_bytes() for p in sorted(new.iterdir())] if new.is_dir() else []


class PipeClient:
    """SMTP over the child's stdin/stdout, one command and one reply at a time."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdin is not None and proc.stdout is not None
        self.w, self.r = proc.stdin, proc.stdout

    def reply(self) -> tuple[int, str]:
        lines = []
        while True:
            line = self.r.readline().decode()
            assert line, f"closed after {lines}"
            lines.append(line.rstrip("\r\n"))
            if line[3:4] != "-":
                return int(line[:3]), "\n".join(lines)

    def cmd(self, line: str) -> tuple[int, str]:
        self.w.write(line.encode() + b"\r\n")
        self.w.flush()
        return self.reply()


@pytest.fixture
def spawned() -> Iterator[list[subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait()


def test_pipes_deliver_a_whole_transaction_without_starttls(
    tmp_path: Path, spawned: list[subprocess.Popen[bytes]]
) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    write_pair(cert, key, "mx.test")
    args = serve_args(tmp_path, "mx", "--tls-cert", str(cert), "--tls-key", str(key))
    with open(tmp_path / "log", "wb") as log:
        proc = subprocess.Popen(
            args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log,
            env=child_env(TCPREMOTEIP="127.0.0.1", TCPREMOTEPORT="4567"),
        )  # fmt: skip
    spawned.append(proc)
    c = PipeClient(proc)
    assert c.reply()[0] == 220
    code, text = c.cmd("EHLO client.test")
    assert code == 250 and "STARTTLS" not in text  # pipes cannot carry TLS: not offered
    assert c.cmd("MAIL FROM:<someone@remote.test>")[0] == 250
    assert c.cmd("RCPT TO:<alice@example.org>")[0] == 250
    assert c.cmd("RCPT TO:<stranger@example.org>")[0] == 550  # the daemon's policy
    assert c.cmd("DATA")[0] == 354
    assert c.cmd("Subject: over pipes\r\n\r\nhello\r\n.")[0] == 250
    assert c.cmd("QUIT")[0] == 221
    assert proc.wait(SAFETY_TIMEOUT) == 0
    (msg,) = delivered(tmp_path)
    assert b"Subject: over pipes" in msg
    assert b"127.0.0.1" in msg  # the peer named by TCPREMOTEIP is in our Received header
    log_text = (tmp_path / "log").read_text()
    assert "event=inetd-session role=mx ip=127.0.0.1 source=TCPREMOTEIP" in log_text


def _inetd_accept_once(listener: socket.socket, args: list[str], log: Path) -> threading.Thread:
    """What inetd does: accept one connection, start the server with it as fd 0 and 1."""
    procs: list[subprocess.Popen[bytes]] = []

    def run() -> None:
        conn, _ = listener.accept()
        with conn, open(log, "wb") as err:
            p = subprocess.Popen(args, stdin=conn, stdout=conn, stderr=err, env=child_env())
            procs.append(p)
        p.wait(SAFETY_TIMEOUT)

    t = threading.Thread(target=run, daemon=True)
    t.procs = procs  # type: ignore[attr-defined]
    t.start()
    return t


def test_tcp_socket_on_stdin_with_starttls(tmp_path: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    write_pair(cert, key, "mx.test")
    args = serve_args(tmp_path, "mx", "--tls-cert", str(cert), "--tls-key", str(key))
    with socket.create_server(("127.0.0.1", 0)) as listener:
        t = _inetd_accept_once(listener, args, tmp_path / "log")
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        with smtplib.SMTP("127.0.0.1", listener.getsockname()[1], timeout=SAFETY_TIMEOUT) as s:
            s.ehlo("client.test")
            assert s.has_extn("starttls")
            s.starttls(context=ctx)
            s.ehlo("client.test")
            s.sendmail("a@remote.test", ["alice@example.org"], b"Subject: inetd tls\r\n\r\nhi\r\n")
        t.join(SAFETY_TIMEOUT)
    assert t.procs[0].returncode == 0  # type: ignore[attr-defined]
    (msg,) = delivered(tmp_path)
    assert b"Subject: inetd tls" in msg and b"TLS" in msg
    assert "source=socket" in (tmp_path / "log").read_text()


def _connect_when_listening(port: int, proc: subprocess.Popen[bytes]) -> smtplib.SMTP:
    """Retry until the spawner listens; the first connection that succeeds is the session."""
    deadline = time.monotonic() + SAFETY_TIMEOUT
    while True:
        try:
            return smtplib.SMTP("127.0.0.1", port, timeout=SAFETY_TIMEOUT)
        except ConnectionRefusedError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def _send_one(s: smtplib.SMTP, subject: str) -> None:
    s.ehlo("client.test")
    s.sendmail("a@remote.test", ["alice@example.org"], f"Subject: {subject}\r\n\r\nhi\r\n")
    s.quit()


@pytest.mark.skipif(shutil.which("socat") is None, reason="socat is not installed")
def test_socat_exec_runs_one_session(
    tmp_path: Path, spawned: list[subprocess.Popen[bytes]]
) -> None:
    port = free_port()
    command = shlex.join(serve_args(tmp_path, "mx"))
    # EXEC talks to the child over a UNIX socketpair and names the peer in SOCAT_PEERADDR.
    with open(tmp_path / "log", "wb") as log:
        proc = subprocess.Popen(
            ["socat", f"TCP-LISTEN:{port},bind=127.0.0.1,reuseaddr", f"EXEC:{command}"],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=child_env(),
        )  # fmt: skip
    spawned.append(proc)
    _send_one(_connect_when_listening(port, proc), "via socat")
    assert proc.wait(SAFETY_TIMEOUT) == 0
    (msg,) = delivered(tmp_path)
    assert b"Subject: via socat" in msg
    assert "source=SOCAT_PEERADDR" in (tmp_path / "log").read_text()


@pytest.mark.skipif(shutil.which("nc.traditional") is None, reason="netcat-traditional missing")
def test_nc_traditional_listen_exec(tmp_path: Path, spawned: list[subprocess.Popen[bytes]]) -> None:
    port = free_port()
    # nc.traditional -e takes a program without arguments: a wrapper script, as users write.
    script = tmp_path / "postier-inetd.sh"
    command = shlex.join(serve_args(tmp_path, "mx"))
    script.write_text(f"#!/bin/sh\nexec {command} 2>>{shlex.quote(str(tmp_path / 'log'))}\n")
    script.chmod(0o755)
    proc = subprocess.Popen(
        ["nc.traditional", "-l", "-s", "127.0.0.1", "-p", str(port), "-e", str(script)],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env=child_env(),
    )  # fmt: skip
    spawned.append(proc)
    _send_one(_connect_when_listening(port, proc), "via nc")
    proc.wait(SAFETY_TIMEOUT)
    (msg,) = delivered(tmp_path)
    assert b"Subject: via nc" in msg
    assert "source=socket" in (tmp_path / "log").read_text()


def _refused(tmp: Path, role: str, **peer: str) -> tuple[int, bytes]:
    proc = subprocess.run(
        serve_args(tmp, role), input=b"EHLO client.test\r\nQUIT\r\n", capture_output=True,
        env=child_env(**peer), timeout=SAFETY_TIMEOUT,
    )  # fmt: skip
    return proc.returncode, proc.stdout


def test_local_role_refuses_a_peer_that_is_not_loopback(tmp_path: Path) -> None:
    code, out = _refused(tmp_path, "local", TCPREMOTEIP="192.0.2.7")
    assert code == 1 and out.startswith(b"554 5.7.1 ")
    assert not (tmp_path / "mail" / "alice").exists()


def test_local_role_serves_a_loopback_peer_as_the_local_listener(
    tmp_path: Path, spawned: list[subprocess.Popen[bytes]]
) -> None:
    proc = subprocess.Popen(
        serve_args(tmp_path, "local"), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL, env=child_env(NCAT_REMOTE_ADDR="::1"),
    )  # fmt: skip
    spawned.append(proc)
    c = PipeClient(proc)
    assert c.reply()[0] == 220
    assert c.cmd("EHLO client.test")[0] == 250
    assert c.cmd("VRFY alice")[1].endswith("<alice@example.org>")  # local tells the truth
    assert c.cmd("MAIL FROM:<x@example.org>")[0] == 250
    assert c.cmd("RCPT TO:<y@remote.test>")[0] == 250  # local relays, as the listener does
    assert c.cmd("QUIT")[0] == 221
    assert proc.wait(SAFETY_TIMEOUT) == 0


def test_unknown_peer_is_refused(tmp_path: Path) -> None:
    code, out = _refused(tmp_path, "mx")
    assert code == 1 and out.startswith(b"421 4.3.0 ")
