"""`postier queue list | show | flush | delete`: output, exit codes, and safety."""

from __future__ import annotations

import argparse
import io
import re
import subprocess
import sys
from pathlib import Path

import pytest

from postier.delivery.base import StoredMessage
from postier.queue import cli
from postier.queue.ids import new_queue_id
from postier.queue.store import DELIVERED, QueueStore

NOW = 2_000_000_000.0
REPO = Path(__file__).resolve().parents[1]


def queue(
    store: QueueStore,
    tmp: Path,
    sender: str,
    rcpts: list[str],
    age: float,
    subject: bytes = b"hello",
) -> str:
    qid = new_queue_id()
    head = f"Return-Path: <{sender}>\n".encode()
    data = head + b"From: x\nSubject: " + subject + b"\n\nbody\n"
    path = tmp / qid
    path.write_bytes(data)
    store.commit(StoredMessage(path, len(data), len(head), sender, qid, NOW - age), sender, rcpts)
    return qid


def call(qdir: Path, *argv: str) -> tuple[int, str, str]:
    parser = argparse.ArgumentParser(prog="postier queue")
    cli.add_arguments(parser)
    out, err = io.StringIO(), io.StringIO()
    code = cli.run(parser.parse_args(["-Q", str(qdir), *argv]), out=out, err=err, clock=lambda: NOW)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture
def populated(tmp_path: Path) -> tuple[QueueStore, list[str]]:
    store = QueueStore(tmp_path / "q")
    a = queue(
        store,
        tmp_path,
        "alice@example.org",
        ["bob@example.net", "carol@example.com"],
        age=2 * 3600 + 5 * 60,
    )
    entry = store.load(a)
    bob, carol = entry.recipients
    bob.attempts, bob.code, bob.enhanced, bob.reply = 3, 451, "4.7.1", "greylisted"
    bob.next_attempt, bob.last_attempt, bob.remote_mta = NOW + 14 * 60, NOW - 60, "mx.example.net"
    carol.state, carol.attempts, carol.code, carol.enhanced, carol.reply = (
        DELIVERED,
        1,
        250,
        "2.0.0",
        "ok",
    )
    store.update(entry)
    b = queue(store, tmp_path, "", ["postmaster@example.com"], age=30)
    return store, [a, b]


def test_list_like_mailq(populated: tuple[QueueStore, list[str]]) -> None:
    store, (a, b) = populated
    code, out, err = call(store.directory, "list")
    assert code == 0 and err == ""
    lines = out.splitlines()
    assert lines[0].split() == ["ID", "AGE", "SIZE", "SENDER"]
    assert re.fullmatch(rf"{a}\s+2h05m\s+\d+\s+<alice@example.org>", lines[1])
    assert lines[2] == (
        "    bob@example.net: pending, 3 attempts, next in 14m: 451 4.7.1 greylisted"
    )
    assert lines[3] == "    carol@example.com: delivered, 1 attempt: 250 2.0.0 ok"
    assert re.fullmatch(rf"{b}\s+30s\s+\d+\s+<>", lines[4])
    assert lines[5] == "    postmaster@example.com: pending"
    assert re.fullmatch(r"-- 2 messages, \d+ bytes", lines[6])


def test_list_empty(tmp_path: Path) -> None:
    QueueStore(tmp_path / "q")
    assert call(tmp_path / "q", "list") == (0, "Mail queue is empty\n", "")


def test_show(populated: tuple[QueueStore, list[str]]) -> None:
    store, (a, _) = populated
    code, out, _ = call(store.directory, "show", a)
    assert code == 0
    assert f"id: {a}\n" in out and "sender: <alice@example.org>\n" in out
    assert "recipient: bob@example.net\n  state: pending\n  attempts: 3\n" in out
    assert "  remote MTA: mx.example.net\n  last reply: 451 4.7.1 greylisted\n" in out
    assert out.endswith("\nFrom: x\nSubject: hello\n")


def test_show_escapes_control_characters(tmp_path: Path) -> None:
    store = QueueStore(tmp_path / "q")
    qid = queue(store, tmp_path, "a@example.org", ["b@example.net"], 0, subject=b"\x1b[2Jgotcha")
    code, out, _ = call(store.directory, "show", qid)
    assert code == 0 and "\x1b" not in out and "Subject: \\x1b[2Jgotcha" in out


def test_flush_writes_request_for_daemon(populated: tuple[QueueStore, list[str]]) -> None:
    store, (a, _) = populated
    assert call(store.directory, "flush", a)[0] == 0
    assert call(store.directory, "flush")[0] == 0
    assert store.take_flush_requests() == (True, {a})


def test_delete(populated: tuple[QueueStore, list[str]]) -> None:
    store, (a, b) = populated
    code, out, _ = call(store.directory, "delete", a)
    assert (code, out) == (0, f"{a}: deleted\n")
    assert [e.queue_id for e in store.list()] == [b]
    code, _, err = call(store.directory, "delete", a)
    assert code == 1 and "no such entry" in err


def test_errors_and_exit_codes(tmp_path: Path) -> None:
    store = QueueStore(tmp_path / "q")
    missing = new_queue_id()
    for argv in (("show", missing), ("flush", missing), ("delete", missing)):
        code, _, err = call(store.directory, *argv)
        assert code == 1 and missing in err, argv
    code, _, err = call(store.directory, "show", "../../etc/passwd")
    assert code == 2 and "not a queue id" in err
    code, _, err = call(tmp_path / "nowhere", "list")
    assert code == 2 and "-Q" in err and "nowhere" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "nowhere").exists()  # never created by a typo


def test_postier_queue_command_end_to_end(populated: tuple[QueueStore, list[str]]) -> None:
    store, (a, _) = populated
    proc = subprocess.run(
        [sys.executable, "-m", "postier", "queue", "-Q", str(store.directory), "list"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert a in proc.stdout and "bob@example.net: pending" in proc.stdout
