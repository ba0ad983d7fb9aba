"""The SMTP core end to end: a real `postier serve`, real clients (smtplib, swaks, raw sockets).

Each test checks what a user would: the replies on the wire and the files in the Maildir.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import smtplib
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.rawsmtp import RawReplies
from tests.server import PostierServer, make_server

SAFETY_TIMEOUT = 20.0  # seconds; bounds a hung server, never a measurement


# ---- helpers ---------------------------------------------------------------------------------
class Raw(RawReplies):
    """A raw SMTP client socket that reads whole replies (for pipelining and odd input)."""

    def __init__(self, host: str, port: int) -> None:
        self.sock = socket.create_connection((host, port), timeout=SAFETY_TIMEOUT)
        self.buf = b""

    def replies(self, n: int) -> list[int]:
        return [self.reply()[0] for _ in range(n)]

    def closed(self) -> bool:
        """True once the server has closed (after anything it still had to say)."""
        try:
            data = self.sock.recv(65536)
        except ConnectionResetError:
            return True
        self.buf += data
        return not data

    def close(self) -> None:
        self.sock.close()


def split_stored(data: bytes) -> tuple[list[bytes], bytes]:
    """A stored file -> (trace header lines with continuations, the rest)."""
    lines = data.split(b"\n")
    assert lines[0].startswith(b"Return-Path: <"), data[:200]
    headers = [lines[0]]
    i = 1
    assert lines[i].startswith(b"Received: from "), data[:300]
    headers.append(lines[i])
    i += 1
    while lines[i].startswith((b"\t", b" ")):
        headers[-1] += b"\n" + lines[i]
        i += 1
    return headers, b"\n".join(lines[i:])


def lf(message: bytes) -> bytes:
    return message.replace(b"\r\n", b"\n")


def all_files(server: PostierServer) -> dict[str, list[Path]]:
    root = server.mail_root
    out: dict[str, list[Path]] = {}
    if root.is_dir():
        for box in sorted(root.iterdir()):
            if box.name.startswith("."):
                continue
            out[box.name] = server.maildir_files(box.name)
    return out


MESSAGE = (
    b"From: Sender <sender@remote.test>\r\n"
    b"To: alice@example.org, bob@example.org, carol@example.org\r\n"
    b"Subject: multi-recipient test\r\n"
    b"Message-ID: <multi.1@remote.test>\r\n"
    b"\r\n"
    b"First line.\r\n"
    b"\tindented with a tab, trailing spaces   \r\n"
    b"\r\n"
    b"8-bit: caf\xc3\xa9\r\n"
    b"Last line.\r\n"
)


# ---- delivery --------------------------------------------------------------------------------
def test_multi_recipient_delivery_one_linked_file_per_mailbox(server: PostierServer) -> None:
    with smtplib.SMTP("127.0.0.1", server.mx_port, timeout=SAFETY_TIMEOUT) as c:
        refused = c.sendmail(
            "sender@remote.test",
            ["alice@example.org", "bob@example.org", "carol@example.org"],
            MESSAGE,
        )
    assert refused == {}
    files = {box: server.maildir_files(box) for box in ("alice", "bob", "carol-box")}
    assert all(len(f) == 1 for f in files.values()), files
    paths = [f[0] for f in files.values()]
    # One copy per mailbox, hard links to one inode.
    assert len({p.stat().st_ino for p in paths}) == 1
    assert all(p.stat().st_nlink >= 3 for p in paths)
    for p in paths:
        data = p.read_bytes()
        headers, content = split_stored(data)
        assert headers[0] == b"Return-Path: <sender@remote.test>"
        assert b"by mx.test" in headers[1]
        assert b"[127.0.0.1]" in headers[1]
        assert b"for <" not in headers[1]  # several recipients: none is named
        assert content == lf(MESSAGE)  # byte-exact, LF line endings
        assert b"\r" not in data
        # Dovecot checks ,S= against the real size.
        m = re.search(r",S=(\d+)", p.name)
        assert m and int(m.group(1)) == len(data)
        assert p.stat().st_mode & 0o777 == 0o600
    # Nothing left behind in tmp/ or in the spool.
    for box in files:
        assert list((server.mail_root / box / "tmp").iterdir()) == []
    assert list((server.mail_root / ".postier-tmp").iterdir()) == []


def test_single_recipient_received_names_the_recipient(server: PostierServer) -> None:
    with smtplib.SMTP("127.0.0.1", server.mx_port, timeout=SAFETY_TIMEOUT) as c:
        c.ehlo("client.test")
        c.sendmail("", ["carol@example.org"], b"Subject: one\r\n\r\nbody\r\n")
    [path] = server.maildir_files("carol-box")
    headers, content = split_stored(path.read_bytes())
    assert headers[0] == b"Return-Path: <>"
    assert headers[1].startswith(b"Received: from client.test (")
    assert b"for <carol@example.org>;" in headers[1]
    assert b"with ESMTP id " in headers[1]
    assert content == b"Subject: one\n\nbody\n"
    assert server.maildir_files("alice") == []


def test_dot_stuffed_lines_round_trip(server: PostierServer) -> None:
    body = (
        b"Subject: dots\r\n\r\n"
        b".\r\n"
        b"..\r\n"
        b".leading\r\n"
        b"..two leading\r\n"
        b". \r\n"
        b"middle . dot\r\n"
        b"last.\r\n"
    )
    with smtplib.SMTP("127.0.0.1", server.mx_port, timeout=SAFETY_TIMEOUT) as c:
        c.sendmail("sender@remote.test", ["alice@example.org"], body)  # smtplib dot-stuffs
    [path] = server.maildir_files("alice")
    assert split_stored(path.read_bytes())[1] == lf(body)


def test_dot_stuffing_by_hand_is_undone(server: PostierServer) -> None:
    c = Raw("127.0.0.1", server.mx_port)
    assert c.reply()[0] == 220
    c.send(b"EHLO raw.test\r\n")
    assert c.reply()[0] == 250
    c.send(b"MAIL FROM:<s@remote.test>\r\nRCPT TO:<bob@example.org>\r\nDATA\r\n")
    assert c.replies(3) == [250, 250, 354]
    c.send(b"Subject: x\r\n\r\n...\r\n..x\r\n.\r\n")
    assert c.reply()[0] == 250
    c.close()
    [path] = server.maildir_files("bob")
    assert split_stored(path.read_bytes())[1] == b"Subject: x\n\n..\n.x\n"


def test_rejected_messages_store_nothing(server: PostierServer) -> None:
    c = Raw("127.0.0.1", server.mx_port)
    assert c.reply()[0] == 220
    c.send(b"EHLO raw.test\r\n")
    assert c.reply()[0] == 250
    c.send(b"MAIL FROM:<s@remote.test>\r\nRCPT TO:<alice@example.org>\r\nDATA\r\n")
    assert c.replies(3) == [250, 250, 354]
    # Bare LF, then a smuggled second message aimed at bob.
    c.send(
        b"Subject: x\r\n\r\nhello\n.\nMAIL FROM:<s@remote.test>\r\nRCPT TO:<bob@example.org>\r\n"
        b"DATA\r\nsmuggled\r\n.\r\n"
    )
    code, text = c.reply()
    assert code == 550 and "5.5.2" in text
    c.send(b"QUIT\r\n")
    assert c.reply()[0] == 221
    c.close()
    assert not any(all_files(server).values())
    assert list((server.mail_root / ".postier-tmp").iterdir()) == []


# ---- listeners -------------------------------------------------------------------------------
def _ipv6_loopback() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback on this machine")
def test_ipv6_listener(tmp_path: Path) -> None:
    srv = make_server(tmp_path / "srv6", mx_host="::1").start()
    try:
        with smtplib.SMTP("::1", srv.mx_port, timeout=SAFETY_TIMEOUT) as c:
            c.sendmail("sender@remote.test", ["alice@example.org"], b"Subject: v6\r\n\r\nhi\r\n")
        [path] = srv.maildir_files("alice")
        headers, _ = split_stored(path.read_bytes())
        assert b"[IPv6:::1]" in headers[1]
        # Bound to ::1 only: nothing listens on IPv4 at that port.
        with pytest.raises(OSError), socket.create_connection(("127.0.0.1", srv.mx_port), 5):
            pass
    finally:
        assert srv.stop() == 0


def test_local_listener_accepts_local_recipients(server: PostierServer) -> None:
    with smtplib.SMTP("127.0.0.1", server.local_port, timeout=SAFETY_TIMEOUT) as c:
        c.sendmail("cron@example.org", ["bob@example.org"], b"Subject: local\r\n\r\nhi\r\n")
        assert c.mail("cron@example.org")[0] == 250
        assert c.rcpt("nobody@example.org")[0] == 550
    [path] = server.maildir_files("bob")
    assert split_stored(path.read_bytes())[1] == b"Subject: local\n\nhi\n"
    assert server.logged("listener=local")


# ---- pipelining ------------------------------------------------------------------------------
def test_pipelined_transactions_replies_in_order(server: PostierServer) -> None:
    c = Raw("127.0.0.1", server.mx_port)
    assert c.reply()[0] == 220
    c.send(b"EHLO pipe.test\r\n")
    code, text = c.reply()
    assert code == 250 and "PIPELINING" in text
    c.send(
        b"MAIL FROM:<s@remote.test>\r\n"
        b"RCPT TO:<alice@example.org>\r\n"
        b"RCPT TO:<stranger@foreign.test>\r\n"
        b"RCPT TO:<bob@example.org>\r\n"
        b"DATA\r\n"
    )
    assert c.replies(5) == [250, 250, 554, 250, 354]
    # The body, its end, and the whole second transaction up to DATA, in one write.
    c.send(
        b"Subject: first\r\n\r\none\r\n.\r\n"
        b"MAIL FROM:<s@remote.test>\r\n"
        b"RCPT TO:<nobody@example.org>\r\n"
        b"RCPT TO:<carol@example.org>\r\n"
        b"DATA\r\n"
    )
    assert c.replies(5) == [250, 250, 550, 250, 354]
    c.send(b"Subject: second\r\n\r\ntwo\r\n.\r\nRSET\r\nQUIT\r\n")
    assert c.replies(3) == [250, 250, 221]
    assert c.closed()
    c.close()
    assert len(server.maildir_files("alice")) == len(server.maildir_files("bob")) == 1
    [second] = server.maildir_files("carol-box")
    assert split_stored(second.read_bytes())[1] == b"Subject: second\n\ntwo\n"


def test_commands_before_354_are_a_sync_error(server: PostierServer) -> None:
    """RFC 2920 §3.1: DATA ends a group; content sent before 354 -> 554 5.5.0 and close."""
    c = Raw("127.0.0.1", server.mx_port)
    assert c.reply()[0] == 220
    c.send(b"EHLO pipe.test\r\n")
    assert c.reply()[0] == 250
    c.send(
        b"MAIL FROM:<s@remote.test>\r\nRCPT TO:<alice@example.org>\r\nDATA\r\n"
        b"Subject: too early\r\n\r\nx\r\n.\r\n"
    )
    replies = []
    while True:
        try:
            replies.append(c.reply())
        except ConnectionError:
            break
    assert [code for code, _ in replies[:2]] == [250, 250]
    assert replies[-1][0] == 554 and "5.5.0" in replies[-1][1], replies
    assert all(code != 250 for code, _ in replies[2:]), replies
    c.close()
    assert server.maildir_files("alice") == []


@pytest.mark.parametrize("tail", [b"QUIT\r\n", b""], ids=["quit", "no-quit"])
def test_half_close_after_the_message_still_gets_every_reply(
    server: PostierServer, tail: bytes
) -> None:
    """`printf ... | nc`: the client shuts its side right after the last command; the 250
    must still reach it (a lost 250 means a retry and a duplicate)."""
    c = _open_data_to(server, "bob@example.org")
    c.send(b"Subject: half\r\n\r\nbody\r\n.\r\n" + tail)
    c.sock.shutdown(socket.SHUT_WR)
    code, text = c.reply()
    assert code == 250, text
    if tail:
        assert c.reply()[0] == 221
    assert c.closed()
    c.close()
    [path] = server.maildir_files("bob")
    assert split_stored(path.read_bytes())[1] == b"Subject: half\n\nbody\n"


def _open_data_to(server: PostierServer, rcpt: str) -> Raw:
    """A raw session that has just received its 354."""
    c = Raw("127.0.0.1", server.mx_port)
    assert c.reply()[0] == 220
    c.send(b"EHLO raw.test\r\n")
    assert c.reply()[0] == 250
    c.send(f"MAIL FROM:<s@remote.test>\r\nRCPT TO:<{rcpt}>\r\nDATA\r\n".encode())
    assert c.replies(3) == [250, 250, 354]
    return c


# ---- concurrency -----------------------------------------------------------------------------
@pytest.mark.parametrize("workers", ["1", "2"], ids=["1-worker", "2-workers"])
def test_100_concurrent_clients(tmp_path: Path, workers: str) -> None:
    # 100 simultaneous connections from one address: lift the per-IP cap (default 50).
    extra = ["--max-connections-per-ip", "200", "--workers", workers]
    srv = make_server(tmp_path / "srv", extra=extra).start()
    n = 100
    barrier = threading.Barrier(n, timeout=SAFETY_TIMEOUT)

    def send(i: int) -> str:
        with smtplib.SMTP("127.0.0.1", srv.mx_port, timeout=SAFETY_TIMEOUT) as c:
            c.ehlo(f"client{i}.test")
            barrier.wait()  # every client is connected before anyone sends
            body = f"Subject: message {i}\r\nX-Seq: {i}\r\n\r\n" + f"line {i}\r\n" * 50
            c.sendmail(f"s{i}@remote.test", ["alice@example.org"], body.encode())
            return body

    try:
        with ThreadPoolExecutor(n) as pool:
            futures = [pool.submit(send, i) for i in range(n)]
        errors = [f.exception() for f in futures if f.exception() is not None]
        problems = [x for x in srv.log().splitlines() if " INFO " not in x]
        assert not errors, f"{len(errors)} clients failed: {errors[:3]}\n" + "\n".join(problems)
        bodies = [f.result() for f in futures]
        # A failed delivery would now be queued for a retry (and still get its 250).
        assert "event=delivery-failed" not in srv.log(), "\n".join(problems)
        files = srv.maildir_files("alice")
        assert len(files) == n
        assert len({f.name for f in files}) == n
        contents = sorted(split_stored(f.read_bytes())[1] for f in files)
        assert contents == sorted(lf(b.encode()) for b in bodies)
        assert list((srv.mail_root / "alice" / "tmp").iterdir()) == []
        assert list((srv.mail_root / ".postier-tmp").iterdir()) == []
    finally:
        assert srv.stop() == 0


# ---- swaks -----------------------------------------------------------------------------------
SWAKS = shutil.which("swaks")


@pytest.mark.skipif(SWAKS is None, reason="swaks is not installed")
@pytest.mark.parametrize("extra", [[], ["--pipeline"]], ids=["plain", "pipeline"])
def test_swaks(server: PostierServer, extra: list[str]) -> None:
    assert SWAKS is not None
    proc = subprocess.run(
        [
            SWAKS,
            "--server", "127.0.0.1", "--port", str(server.mx_port),
            "--to", "alice@example.org", "--from", "x@y.org",
            "--helo", "swaks.test",
            "--header", "Subject: from swaks",
            "--body", "Hello from swaks.",
            *extra,
        ],
        capture_output=True,
        text=True,
        timeout=SAFETY_TIMEOUT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    if extra:  # MAIL, RCPT and DATA went out before the first reply came back
        assert proc.stdout.index(" -> DATA") < proc.stdout.index("<-  250 2.1.0"), proc.stdout
    [path] = server.maildir_files("alice")
    headers, content = split_stored(path.read_bytes())
    assert headers[0] == b"Return-Path: <x@y.org>"
    assert b"from swaks.test" in headers[1]
    assert b"Subject: from swaks\n" in content
    assert b"\n\nHello from swaks.\n" in content
    assert b"\r" not in content


@pytest.mark.skipif(SWAKS is None, reason="swaks is not installed")
def test_swaks_relay_attempt_is_refused(server: PostierServer) -> None:
    assert SWAKS is not None
    proc = subprocess.run(
        [SWAKS, "--server", "127.0.0.1", "--port", str(server.mx_port),
         "--to", "victim@foreign.test", "--from", "x@y.org"],
        capture_output=True,
        text=True,
        timeout=SAFETY_TIMEOUT,
    )  # fmt: skip
    assert proc.returncode != 0
    assert "554 5.7.1" in proc.stdout
    assert not any(all_files(server).values())


# ---- aliases ---------------------------------------------------------------------------------
def test_aliases(tmp_path: Path) -> None:
    aliases = (
        "# team goes to two people\n"
        "team: alice@example.org, bob@example.org\n"
        "postmaster: carol@example.org\n"
        "info@example.org: team\n"
    )
    srv = make_server(tmp_path / "srv", aliases=aliases).start()
    try:
        with smtplib.SMTP("127.0.0.1", srv.mx_port, timeout=SAFETY_TIMEOUT) as c:
            c.sendmail("s@remote.test", ["team@example.org"], b"Subject: team\r\n\r\n1\r\n")
            c.sendmail("s@remote.test", ["postmaster"], b"Subject: pm bare\r\n\r\n2\r\n")
            c.sendmail("s@remote.test", ["POSTMASTER@example.org"], b"Subject: pm\r\n\r\n3\r\n")
            c.sendmail("s@remote.test", ["info@example.org"], b"Subject: info\r\n\r\n4\r\n")
            # The alias and a member of it: alice still gets one copy.
            c.sendmail(
                "s@remote.test",
                ["team@example.org", "alice@example.org"],
                b"Subject: dup\r\n\r\n5\r\n",
            )

        def subjects(box: str) -> list[bytes]:
            out = []
            for f in srv.maildir_files(box):
                content = split_stored(f.read_bytes())[1]
                out.append(content.split(b"\n", 1)[0])
            return sorted(out)

        assert subjects("alice") == [b"Subject: dup", b"Subject: info", b"Subject: team"]
        assert subjects("bob") == [b"Subject: dup", b"Subject: info", b"Subject: team"]
        assert subjects("carol-box") == [b"Subject: pm", b"Subject: pm bare"]
        assert "no postmaster alias" not in srv.log()
    finally:
        assert srv.stop() == 0


def test_postmaster_without_alias_goes_to_first_user_with_a_warning(server: PostierServer) -> None:
    assert server.logged("no postmaster alias")
    with smtplib.SMTP("127.0.0.1", server.mx_port, timeout=SAFETY_TIMEOUT) as c:
        c.sendmail("", ["postmaster"], b"Subject: bounce\r\n\r\nx\r\n")
    assert len(server.maildir_files("alice")) == 1


# ---- shutdown --------------------------------------------------------------------------------
def _open_data(server: PostierServer) -> Raw:
    return _open_data_to(server, "alice@example.org")


def test_sigterm_finishes_the_transaction_in_flight(tmp_path: Path) -> None:
    srv = make_server(tmp_path / "srv").start()
    try:
        c = _open_data(srv)
        first_half = b"Subject: in flight\r\n\r\n" + b"first half\r\n" * 100
        second_half = b"second half\r\n" * 100
        c.send(first_half)
        idle = Raw("127.0.0.1", srv.mx_port)
        assert idle.reply()[0] == 220
        assert srv.proc is not None
        srv.proc.send_signal(signal.SIGTERM)
        assert srv.logged("event=shutdown", timeout=SAFETY_TIMEOUT), srv.log()
        # The idle session is told at once.
        code, text = idle.reply()
        assert code == 421 and "4.3.2" in text
        assert idle.closed()
        # New connections are no longer accepted.
        with pytest.raises(OSError), socket.create_connection(("127.0.0.1", srv.mx_port), 5):
            pass
        # The transaction in flight completes.
        c.send(second_half + b".\r\n")
        code, text = c.reply()
        assert code == 250, text
        code, text = c.reply()
        assert code == 421, text
        assert c.closed()
        assert srv.proc.wait(SAFETY_TIMEOUT) == 0
        [path] = srv.maildir_files("alice")
        assert split_stored(path.read_bytes())[1] == lf(first_half + second_half)
        assert srv.logged("event=stopped")
    finally:
        srv.kill()


def test_idle_session_gets_421_on_shutdown(tmp_path: Path) -> None:
    srv = make_server(tmp_path / "srv").start()
    try:
        c = Raw("127.0.0.1", srv.mx_port)
        assert c.reply()[0] == 220
        c.send(b"EHLO idle.test\r\n")
        assert c.reply()[0] == 250
        stopper = ThreadPoolExecutor(1)
        exit_code = stopper.submit(srv.stop)
        code, text = c.reply()
        assert code == 421 and "4.3.2" in text
        assert c.closed()
        assert exit_code.result(SAFETY_TIMEOUT) == 0
        stopper.shutdown()
    finally:
        srv.kill()


def test_sigint_also_stops_cleanly(tmp_path: Path) -> None:
    srv = make_server(tmp_path / "srv").start()
    try:
        assert srv.proc is not None
        os.kill(srv.proc.pid, signal.SIGINT)
        assert srv.proc.wait(SAFETY_TIMEOUT) == 0
    finally:
        srv.kill()


# ---- storage faults and relay tricks ---------------------------------------------------------
def test_storage_failure_is_queued_then_delivered_once(server: PostierServer) -> None:
    """A mailbox that cannot be written: no 451 loop for the client; the message waits in the
    queue (250 only once it is durable there) and is delivered, once, after the repair."""
    # alice's mailbox cannot be created: a plain file stands where the directory should be.
    server.mail_root.mkdir(exist_ok=True)
    (server.mail_root / "alice").write_bytes(b"not a maildir\n")
    body = b"Subject: fault\r\n\r\nx\r\n"
    with smtplib.SMTP("127.0.0.1", server.mx_port, timeout=SAFETY_TIMEOUT) as c:
        c.ehlo("fault.test")
        c.mail("s@remote.test")
        assert c.rcpt("bob@example.org")[0] == 250
        assert c.rcpt("alice@example.org")[0] == 250
        code, text = c.data(body)
        assert code == 250, text
        # The session goes on.
        c.sendmail("s@remote.test", ["bob@example.org"], b"Subject: ok\r\n\r\ny\r\n")
    assert server.logged("event=delivery-failed")
    assert (server.mail_root / "alice").read_bytes() == b"not a maildir\n"
    assert list((server.mail_root / ".postier-tmp").iterdir()) == []
    # Repair, ask for a retry, and both recipients have the message exactly once.
    (server.mail_root / "alice").unlink()
    flush = subprocess.run(
        [sys.executable, "-m", "postier", "queue", "flush", "-Q", str(server.root / "queue")],
        capture_output=True,
        text=True,
        timeout=SAFETY_TIMEOUT,
    )
    assert flush.returncode == 0, flush.stderr

    def subjects(box: str) -> list[bytes]:
        return sorted(
            split_stored(p.read_bytes())[1].split(b"\n")[0] for p in server.maildir_files(box)
        )

    deadline = time.monotonic() + SAFETY_TIMEOUT
    while subjects("alice") != [b"Subject: fault"]:
        assert time.monotonic() < deadline, f"never retried:\n{server.log()[-3000:]}"
        time.sleep(0.05)
    while subjects("bob") != [b"Subject: fault", b"Subject: ok"]:
        assert time.monotonic() < deadline, subjects("bob")
        time.sleep(0.05)
    [copy] = server.maildir_files("alice")
    assert split_stored(copy.read_bytes())[1] == lf(body)


RELAY_TRICKS = [
    "victim%foreign.test@example.org",
    "foreign.test!victim@example.org",
    "@example.org:victim@foreign.test",
    '"victim@foreign.test"@example.org',
    "victim@[127.0.0.1]",
    "victim@[IPv6:::1]",
    "victim@foreign.test",
    "postmaster@foreign.test",
]


def test_relay_tricks_queue_nothing(server: PostierServer) -> None:
    with smtplib.SMTP("127.0.0.1", server.mx_port, timeout=SAFETY_TIMEOUT) as c:
        c.ehlo("relay.test")
        c.mail("s@remote.test")
        for rcpt in RELAY_TRICKS:
            code, text = c.docmd(f"RCPT TO:<{rcpt}>")  # raw: smtplib would rewrite some
            assert code in (550, 554), (rcpt, code, text)
        assert c.docmd("RCPT TO:<victim@foreign.test@example.org>")[0] == 501
    queue = server.root / "queue"
    for sub in ("env", "body"):
        assert not (queue / sub).exists() or list((queue / sub).iterdir()) == []
    assert not any(all_files(server).values())
    # Nothing was created outside the mailboxes we know either.
    assert {p.name for p in server.mail_root.iterdir()} <= {".postier-tmp"}
