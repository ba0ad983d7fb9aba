"""`postier sendmail` (-t, -i, -f, sysexits) and the daemon's maildrop pickup."""

from __future__ import annotations

import argparse
import asyncio
import errno
import io
import json
import os
import shutil
import stat
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from postier import sendmail
from postier.delivery.base import StoredMessage
from postier.queue import maildrop as md
from postier.queue.store import EntryExists, QueueStore

REPO = Path(__file__).resolve().parents[1]


def submit(qdir: Path, argv: Sequence[str], data: bytes, **extra: object) -> tuple[int, str]:
    parser = argparse.ArgumentParser(prog="postier sendmail")
    sendmail.add_arguments(parser)
    args = parser.parse_args(["-Q", str(qdir), "--hostname", "host.example.org", *argv])
    for k, v in extra.items():
        setattr(args, k, v)
    err = io.StringIO()
    code = sendmail.run(args, stdin=io.BytesIO(data), err=err)
    return code, err.getvalue()


def dropped(qdir: Path) -> list[tuple[dict[str, object], bytes]]:
    """The maildrop files: (envelope, message)."""
    out = []
    for path in sorted(md.maildrop_dir(qdir).iterdir()):
        assert not path.name.endswith(".tmp")
        env, _, msg = path.read_bytes().partition(b"\n")
        out.append((json.loads(env), msg))
    return out


def headers(msg: bytes) -> list[str]:
    return msg.split(b"\n\n", 1)[0].decode().split("\n")


def test_t_takes_recipients_from_headers_and_removes_bcc(tmp_path: Path) -> None:
    data = (
        b"To: Bob <bob@example.net>, carol@example.com\r\nCc: dave\r\n"
        b"Bcc: secret@example.net,\r\n  hidden@example.net\r\nSubject: hi\r\n\r\nbody\r\n"
    )
    assert submit(tmp_path, ["-t", "extra@example.org"], data) == (0, "")
    [(env, msg)] = dropped(tmp_path)
    assert env["recipients"] == [
        "extra@example.org",
        "bob@example.net",
        "carol@example.com",
        "dave@host.example.org",
        "secret@example.net",
        "hidden@example.net",
    ]
    assert b"Bcc" not in msg and b"secret" not in msg and b"hidden" not in msg
    assert b"\r" not in msg
    names = [h.split(":")[0] for h in headers(msg)]
    assert names == ["To", "Cc", "Subject", "From", "Date", "Message-ID"]
    assert msg.endswith(b"\n\nbody\n")


def test_lone_dot_ends_input_unless_i(tmp_path: Path) -> None:
    data = b"Subject: dots\n\nline\n.\nafter the dot\n"
    assert submit(tmp_path / "a", ["bob@example.net"], data)[0] == 0
    assert submit(tmp_path / "b", ["-i", "bob@example.net"], data)[0] == 0
    assert submit(tmp_path / "c", ["-oi", "bob@example.net"], data)[0] == 0
    assert dropped(tmp_path / "a")[0][1].endswith(b"\nline\n")
    for d in ("b", "c"):
        assert dropped(tmp_path / d)[0][1].endswith(b"\nline\n.\nafter the dot\n")
    # ".." is not unstuffed (this is not SMTP), and a dot inside a line ends nothing.
    assert submit(tmp_path / "d", ["bob@example.net"], b"\n..\n.x\n. \n")[0] == 0
    assert dropped(tmp_path / "d")[0][1].endswith(b"\n\n..\n.x\n. \n")


def test_sender_options(tmp_path: Path) -> None:
    assert (
        submit(
            tmp_path / "a",
            ["-f", "robot@example.org", "-F", "Cron Daemon", "b@x.org"],
            b"Subject: x\n\n",
        )[0]
        == 0
    )
    [(env, msg)] = dropped(tmp_path / "a")
    assert env["sender"] == "robot@example.org"
    assert "From: Cron Daemon <robot@example.org>" in headers(msg)
    assert submit(tmp_path / "b", ["-f", "<>", "b@x.org"], b"From: me@x.org\n\n")[0] == 0
    [(env, msg)] = dropped(tmp_path / "b")
    assert env["sender"] == "" and headers(msg).count("From: me@x.org") == 1
    assert submit(tmp_path / "c", ["-fops", "b@x.org"], b"")[0] == 0
    assert dropped(tmp_path / "c")[0][0]["sender"] == "ops@host.example.org"


def test_existing_headers_are_kept_and_missing_ones_added(tmp_path: Path) -> None:
    data = (
        b"From mbox-line Mon Jan  1 00:00:00 2024\nDate: Mon, 1 Jan 2024 00:00:00 +0000\n"
        b"Message-ID: <given@example.org>\nFrom: a@example.org\n\nbody\n"
    )
    assert submit(tmp_path / "a", ["b@x.org"], data)[0] == 0
    [(_, msg)] = dropped(tmp_path / "a")
    assert headers(msg) == [
        "Date: Mon, 1 Jan 2024 00:00:00 +0000",
        "Message-ID: <given@example.org>",
        "From: a@example.org",
    ]
    assert submit(tmp_path / "b", ["b@x.org"], b"no header here\njust text\n")[0] == 0
    [(_, msg)] = dropped(tmp_path / "b")
    assert [h.split(":")[0] for h in headers(msg)] == ["From", "Date", "Message-ID"]
    assert msg.endswith(b"\n\nno header here\njust text\n")


def test_sysexits(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert submit(tmp_path / "a", [], b"Subject: x\n\n")[0] == sendmail.EX_USAGE
    assert submit(tmp_path / "a", ["-t"], b"Subject: x\n\n")[0] == sendmail.EX_USAGE
    assert submit(tmp_path / "a", ["-bs", "b@x.org"], b"")[0] == sendmail.EX_USAGE
    assert sendmail.main(["--no-such-flag"]) == sendmail.EX_USAGE
    assert submit(tmp_path / "a", ["bad address@x.org"], b"")[0] == sendmail.EX_NOUSER
    assert submit(tmp_path / "a", ["-f", "a b@c", "b@x.org"], b"")[0] == sendmail.EX_DATAERR
    code, err = submit(tmp_path / "a", ["b@x.org"], b"\n" + b"x" * 5000, max_size=1000)
    assert code == sendmail.EX_DATAERR and "too large" in err
    (tmp_path / "file").write_text("not a directory")
    code, err = submit(tmp_path / "file" / "q", ["b@x.org"], b"")
    assert code == sendmail.EX_CANTCREAT and err.count("\n") == 1

    def full(*a: object, **k: object) -> str:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(sendmail, "drop", full)
    assert submit(tmp_path / "a", ["b@x.org"], b"")[0] == sendmail.EX_TEMPFAIL
    monkeypatch.undo()
    assert os.listdir(md.maildrop_dir(tmp_path / "a")) == []  # failures leave nothing


def test_maildrop_permissions(tmp_path: Path) -> None:
    assert submit(tmp_path, ["b@x.org"], b"")[0] == 0
    directory = md.maildrop_dir(tmp_path)
    assert stat.S_IMODE(directory.stat().st_mode) == 0o3733
    [path] = directory.iterdir()
    assert stat.S_IMODE(path.stat().st_mode) == 0o640


def test_end_to_end_command(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "postier", "sendmail", "-Q", str(tmp_path), "-t", "-i"],
        input=b"To: bob@example.net\nSubject: cron\n\n.\noutput\n",
        capture_output=True,
        cwd=REPO,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    [(env, msg)] = dropped(tmp_path)
    assert env["recipients"] == ["bob@example.net"] and msg.endswith(b"\n.\noutput\n")


@pytest.mark.skipif(
    os.geteuid() != 0 or not Path("/usr/bin/python3").exists(),
    reason="needs root to run sendmail as another user",
)
def test_unprivileged_user_can_drop_but_not_list(pub: Path) -> None:
    md.ensure_maildrop_dir(pub)
    env = {"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}
    proc = subprocess.run(
        [
            "/usr/bin/python3",
            "-m",
            "postier.sendmail",
            "-Q",
            str(pub),
            "--hostname",
            "h.test",
            "bob@example.net",
        ],
        input=b"Subject: from nobody\n\nhi\n",
        env=env,
        user=65534,
        group=65534,
        capture_output=True,
        cwd="/",
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    listing = subprocess.run(
        ["/bin/ls", str(md.maildrop_dir(pub))], user=65534, capture_output=True, timeout=60
    )
    assert listing.returncode != 0  # others cannot see what is waiting
    [(env_, msg)] = dropped(pub)
    assert msg.endswith(b"\n\nhi\n")
    assert env_["sender"] == "nobody@h.test"
    picked = md.Maildrop(pub, hostname="mx.test").prepare(dropped_names(pub)[0])
    assert picked is not None
    assert b"(postier, from userid 65534)" in picked.message.path.read_bytes()
    os.close(picked.lock_fd)


def dropped_names(qdir: Path) -> list[str]:
    return sorted(os.listdir(md.maildrop_dir(qdir)))


class Collector:
    def __init__(self, fail: int = 0) -> None:
        self.got: list[tuple[bytes, StoredMessage, list[str]]] = []
        self.fail = fail

    async def __call__(self, message: StoredMessage, recipients: list[str]) -> None:
        if self.fail:
            self.fail -= 1
            raise OSError("disk trouble")
        self.got.append((message.path.read_bytes(), message, recipients))


def pickup(box: md.Maildrop, deliver: Callable[..., object]) -> int:
    return asyncio.run(box.pickup(deliver))  # type: ignore[arg-type]


def test_pickup_hands_spool_format_and_removes(tmp_path: Path) -> None:
    assert (
        submit(
            tmp_path, ["-f", "a@example.org", "b@example.net"], b"Subject: caf\xc3\xa9\n\nbody\n"
        )[0]
        == 0
    )
    [name] = dropped_names(tmp_path)
    box = md.Maildrop(tmp_path, hostname="mx.test")
    got = Collector()
    assert pickup(box, got) == 1
    [(data, message, rcpts)] = got.got
    assert rcpts == ["b@example.net"] and message.sender == "a@example.org"
    assert message.queue_id == name and message.body_8bit and not message.smtputf8
    assert data.startswith(
        b"Return-Path: <a@example.org>\nReceived: by mx.test (postier, "
        b"from userid 0)\n\tid " + name.encode() + b"; "
    )
    assert data[message.content_offset :].startswith(b"Received:")
    assert message.size == len(data)
    assert dropped_names(tmp_path) == [] and os.listdir(tmp_path / "pickup") == []


def test_pickup_retries_after_callback_failure_and_queue_dedups(tmp_path: Path) -> None:
    assert submit(tmp_path, ["b@example.net"], b"Subject: x\n\n")[0] == 0
    box = md.Maildrop(tmp_path, hostname="mx.test")
    assert pickup(box, Collector(fail=1)) == 0
    [first] = dropped_names(tmp_path)  # still there for the next round
    store = QueueStore(tmp_path)

    async def to_queue(message: StoredMessage, recipients: list[str]) -> None:
        try:
            store.commit(message, message.sender, recipients)
        except EntryExists:  # picked up before a crash: already queued
            pass

    assert pickup(box, to_queue) == 1
    [entry] = store.list()
    assert entry.queue_id == first  # the maildrop name is the queue id
    assert store.read_headers(entry).startswith(b"Received: by mx.test")
    # A crash after the commit but before the maildrop file was removed: picked up again.
    assert submit(tmp_path, ["b@example.net"], b"")[0] == 0
    [name] = dropped_names(tmp_path)
    shutil.copy(md.maildrop_dir(tmp_path) / name, tmp_path / "copy")
    assert pickup(box, to_queue) == 1
    os.replace(tmp_path / "copy", md.maildrop_dir(tmp_path) / name)
    assert pickup(box, to_queue) == 1
    assert len(store.list()) == 2


def test_pickup_refuses_planted_files(tmp_path: Path) -> None:
    box = md.Maildrop(tmp_path, hostname="mx.test")
    directory = md.maildrop_dir(tmp_path)
    secret = tmp_path / "secret"
    secret.write_bytes(b'{"sender": "", "recipients": ["evil@x.org"], "time": 1}\nshadow\n')
    os.link(secret, directory / "1K0TSCTAR6700DWA")  # a hard link to a file the user can't read
    os.symlink(secret, directory / "1K0TSCTAR6700DWB")
    (directory / "1K0TSCTAR6700DWC").write_bytes(b"not json\n")
    (directory / "1K0TSCTAR6700DWD").write_bytes(b'{"sender": "", "recipients": ["a b"]}\n')
    (directory / "1K0TSCTAR6700DWE.tmp").write_bytes(b"being written")
    got = Collector()
    assert pickup(box, got) == 0 and got.got == []
    assert dropped_names(tmp_path) == ["1K0TSCTAR6700DWE.tmp"]
    assert len(os.listdir(tmp_path / "corrupt")) == 4
    assert secret.read_bytes().endswith(b"shadow\n")  # untouched


def test_stale_tmp_removed_and_lock_prevents_double_pickup(tmp_path: Path) -> None:
    now = [1e10]
    box = md.Maildrop(tmp_path, hostname="mx.test", clock=lambda: now[0])
    directory = md.maildrop_dir(tmp_path)
    (directory / "1K0TSCTAR6700DWE.tmp").write_bytes(b"killed sendmail")
    assert submit(tmp_path, ["b@example.net"], b"")[0] == 0
    [name] = [n for n in dropped_names(tmp_path) if not n.endswith(".tmp")]
    first = box.prepare(name)
    assert first is not None
    assert md.Maildrop(tmp_path, hostname="mx.test").prepare(name) is None  # locked
    box.finish(first)
    assert box.ready() == []
    assert dropped_names(tmp_path) == []  # the stale .tmp is gone too


def test_run_loop_picks_up_until_stopped(tmp_path: Path) -> None:
    box = md.Maildrop(tmp_path, hostname="mx.test")
    got = Collector()

    async def scenario() -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(box.run(got, interval=0.01, stop=stop))
        assert submit(tmp_path, ["b@example.net"], b"Subject: later\n\n")[0] == 0
        async with asyncio.timeout(30):
            while not got.got:
                await asyncio.sleep(0.01)
        stop.set()
        await task

    asyncio.run(scenario())
    assert len(got.got) == 1


def test_arrival_time_cannot_be_forged(tmp_path: Path) -> None:
    box = md.Maildrop(tmp_path, hostname="mx.test")
    path = md.maildrop_dir(tmp_path) / "1K0TSCTAR6700DWA"
    path.write_bytes(b'{"sender": "a@x.org", "recipients": ["b@y.org"], "time": 0}\n\nhi\n')
    os.utime(path, (0, 0))  # the user may set the mtime, not the ctime
    picked = box.prepare(path.name)
    assert picked is not None
    assert picked.message.received_at == path.stat().st_ctime > 1e9
    box.release(picked)
