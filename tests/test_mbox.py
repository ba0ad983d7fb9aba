"""MboxBackend: format (read back with Python's `mailbox`), mboxrd quoting, locking against
threads, processes and other programs, and all-or-nothing failure. Also the mailbox path rules
(postier.delivery.paths) that every file backend relies on.
"""

from __future__ import annotations

import errno
import mailbox
import multiprocessing
import os
import re
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from postier.delivery import mbox as mbox_mod
from postier.delivery.base import Recipient, Status, StoredMessage
from postier.delivery.mbox import MboxBackend, from_line
from postier.delivery.paths import mailbox_path, owner_for, validate_mailbox_name

RECEIVED = b"Received: from client.example (client.example [192.0.2.1]) by mx.test; id Q\n"


def make_message(spool: Path, body: bytes, sender: str = "bob@example.net", qid: str = "Q1"):
    """A spool file as postier.spool writes it (see postier/delivery/base.py)."""
    return_path = f"Return-Path: <{sender}>\n".encode()
    data = return_path + RECEIVED + body
    path = spool / f"spool-{qid}"
    path.write_bytes(data)
    return StoredMessage(path, len(data), len(return_path), sender, qid, 1_700_000_000.0)


def body(n: int | str, extra: bytes = b"") -> bytes:
    return (
        f"From: bob@example.net\nSubject: message {n}\nMessage-ID: <{n}@test>\n\n".encode()
        + f"body of message {n}\nFrom here on the text needs quoting\n".encode()
        + extra
    )


def rcpt(name: str = "alice", user: str = "") -> Recipient:
    return Recipient(f"{name}@example.org", name, user)


def unquote(data: bytes) -> bytes:
    """Undo mboxrd quoting exactly."""
    return b"".join(
        line[1:] if re.match(rb">+From ", line) else line for line in data.splitlines(True)
    )


def read_mbox(path: Path) -> list[tuple[str, bytes]]:
    box = mailbox.mbox(path, create=False)
    try:
        return [(box[key].get_from(), unquote(box.get_bytes(key))) for key in box.iterkeys()]
    finally:
        box.close()


@pytest.fixture
def spool(tmp_path: Path) -> Path:
    d = tmp_path / "spool"
    d.mkdir()
    return d


@pytest.fixture
def root(tmp_path: Path) -> Path:
    d = tmp_path / "mail"
    d.mkdir()
    return d


# ---------------------------------------------------------------- format


def test_delivers_one_message_readable_by_python_mailbox(spool: Path, root: Path) -> None:
    msg = make_message(spool, body(1))
    [result] = MboxBackend(root).deliver(msg, [rcpt()])
    assert result.status is Status.DELIVERED and result.reply_line.startswith("250 2.0.0")
    path = root / "alice"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert not (root / "alice.lock").exists()
    [(from_, content)] = read_mbox(path)
    assert re.fullmatch(r"bob@example\.net \w{3} \w{3} [ \d]\d \d\d:\d\d:\d\d \d{4}", from_)
    assert content == msg.path.read_bytes()  # Return-Path kept as the first header
    assert path.read_bytes().endswith(b"\n\n")


def test_appends_and_separates_messages(spool: Path, root: Path) -> None:
    backend = MboxBackend(root)
    msgs = [make_message(spool, body(i), qid=f"Q{i}") for i in range(3)]
    for m in msgs:
        assert backend.deliver(m, [rcpt()])[0].status is Status.DELIVERED
    assert [c for _f, c in read_mbox(root / "alice")] == [m.path.read_bytes() for m in msgs]


def test_null_sender_is_mailer_daemon_and_spaces_cannot_split_the_separator() -> None:
    assert from_line("", 0).startswith(b"From MAILER-DAEMON ")
    line = from_line('"john doe"@example.org', 0)
    assert line.split(b" ")[1] == b'"john_doe"@example.org'


def test_mboxrd_quoting_round_trips(spool: Path, root: Path) -> None:
    tricky = (
        b"From the start\n>From once\n>>From twice\n From indented\nFromage\n"
        b">>>>From deep\nFrom\n>From\n"
    )
    msg = make_message(spool, body("q", tricky))
    MboxBackend(root).deliver(msg, [rcpt()])
    raw = (root / "alice").read_bytes()
    assert b"\n>From the start\n>>From once\n>>>From twice\n From indented\nFromage\n" in raw
    assert b"\n>>>>>From deep\nFrom\n>From\n" in raw  # "From" without a space is no separator
    [(_f, content)] = read_mbox(root / "alice")
    assert content == msg.path.read_bytes()


def test_quoting_is_exact_across_read_boundaries(spool: Path, root: Path) -> None:
    # a line of 70,000 '>' then "From ": longer than one 64 KiB read
    long_run = b">" * 70_000 + b"From far\n"
    no_newline_end = b"last line without newline"
    msg = make_message(spool, body("big", long_run + no_newline_end))
    MboxBackend(root).deliver(msg, [rcpt()])
    raw = (root / "alice").read_bytes()
    assert b"\n>" + long_run in raw
    assert raw.endswith(no_newline_end + b"\n\n")
    [(_f, content)] = read_mbox(root / "alice")
    assert content == msg.path.read_bytes() + b"\n"


def test_repairs_a_missing_blank_line_left_by_another_writer(spool: Path, root: Path) -> None:
    (root / "alice").write_bytes(b"From x Thu Jan  1 00:00:00 1970\nSubject: old\n\nold body")
    MboxBackend(root).deliver(make_message(spool, body(2)), [rcpt()])
    contents = [c for _f, c in read_mbox(root / "alice")]
    assert len(contents) == 2 and contents[0].endswith(b"old body\n")


def test_one_copy_per_mailbox(spool: Path, root: Path) -> None:
    msg = make_message(spool, body(1))
    recipients = [
        Recipient("alice@example.org", "alice"),
        Recipient("a.smith@example.org", "alice"),  # an alias of the same mailbox
        Recipient("carol@example.org", ""),  # no users-map name: the local part
    ]
    results = MboxBackend(root).deliver(msg, recipients)
    assert [r.recipient for r in results] == recipients
    assert all(r.status is Status.DELIVERED for r in results)
    assert len(read_mbox(root / "alice")) == 1 and len(read_mbox(root / "carol")) == 1


def test_bad_mailbox_name_is_a_temporary_failure_and_touches_nothing(
    spool: Path, root: Path
) -> None:
    msg = make_message(spool, body(1))
    results = MboxBackend(root).deliver(msg, [Recipient("x@example.org", "../etc"), rcpt()])
    assert results[0].reply_line.startswith("451 4.3.0")
    assert results[1].status is Status.DELIVERED
    assert sorted(p.name for p in root.parent.iterdir()) == ["mail", "spool"]


def test_path_template(spool: Path, tmp_path: Path) -> None:
    home = tmp_path / "home"
    backend = MboxBackend(tmp_path, template=f"{home}/{{user}}/mail/inbox")
    msg = make_message(spool, body(1))
    [r] = backend.deliver(msg, [Recipient("dave@example.org", "dave-box", "dave@example.org")])
    assert r.status is Status.DELIVERED
    assert len(read_mbox(home / "dave" / "mail" / "inbox")) == 1


# ---------------------------------------------------------------- paths


@pytest.mark.parametrize(
    "name",
    [
        "",
        "a/b",
        "a\\b",
        ".hidden",
        ".",
        "..",
        "a..b",
        "nul\0",
        "tab\t",
        "del\x7f",
        "c1\x85",
        "x" * 256,
        "é" * 128,
        "\udcff",
    ],
)
def test_unsafe_mailbox_names_are_rejected(name: str) -> None:
    with pytest.raises(ValueError):
        validate_mailbox_name(name)


@pytest.mark.parametrize("name", ["alice", "a.smith", "bob+tag", "x" * 255, "josé", "用户"])
def test_safe_mailbox_names_pass(name: str) -> None:
    assert validate_mailbox_name(name) == name


def test_mailbox_path_templates(tmp_path: Path) -> None:
    root = tmp_path
    assert mailbox_path(root, "alice") == root / "alice"
    assert mailbox_path(root, "a", "/home/{user}/Maildir", "Al@Ex.org") == Path("/home/Al/Maildir")
    assert mailbox_path(root, "a", "{root}/{domain}/{mailbox}", "x@Ex.ORG") == root / "ex.org/a"
    assert mailbox_path(root, "a", "{domain}/{user}", "x@ex.org") == root / "ex.org/x"
    assert mailbox_path(root, "a", "/var/{user}") == Path("/var/a")  # no user: the mailbox
    for bad_user in ("../x@ex.org", ".ssh@ex.org", "a/b@ex.org", "x@../y"):
        with pytest.raises(ValueError):
            mailbox_path(root, "a", "/home/{user}/{domain}", bad_user)
    for bad_template in ("/home/{uid}", "/home/{user.__class__}", "/home/{user!r}", "/h/{"):
        with pytest.raises(ValueError):
            mailbox_path(root, "a", bad_template, "x@ex.org")
    with pytest.raises(ValueError):
        mailbox_path(root, "a", "/m/{domain}")  # needs a domain we do not have


def test_owner_for_names_a_system_user_only_through_user() -> None:
    if os.geteuid() != 0:
        assert owner_for("/home/{user}", "nobody@x") is None
        return
    import pwd

    nobody = pwd.getpwnam("nobody")
    assert owner_for("/home/{user}", "nobody@example.org") == (nobody.pw_uid, nobody.pw_gid)
    assert owner_for("/var/mail/{mailbox}", "nobody@example.org", "nobody") is None
    assert owner_for(None, "nobody@example.org") is None
    assert owner_for("/home/{user}", "no-such-user-here@example.org") is None


# ---------------------------------------------------------------- concurrency


def _check_fifty(path: Path, spool: Path, n: int = 50) -> None:
    got = read_mbox(path)
    assert len(got) == n
    expected = {(spool / f"spool-Q{i}").read_bytes() for i in range(n)}
    assert {c for _f, c in got} == expected  # all intact, all distinct


def test_fifty_threads_one_mailbox(spool: Path, root: Path) -> None:
    backend = MboxBackend(root)
    msgs = [make_message(spool, body(i, b"x" * (i * 997) + b"\n"), qid=f"Q{i}") for i in range(50)]
    with ThreadPoolExecutor(max_workers=50) as pool:
        results = list(pool.map(lambda m: backend.deliver(m, [rcpt()])[0], msgs))
    assert all(r.status is Status.DELIVERED for r in results)
    _check_fifty(root / "alice", spool)


def _deliver_batch(root: str, spool: str, indexes: list[int]) -> list[str]:
    """Runs in a child process: 10 threads of its own, so processes AND threads contend."""
    backend = MboxBackend(Path(root))

    def one(i: int) -> str:
        data = (Path(spool) / f"spool-Q{i}").read_bytes()
        rp_len = data.index(b"\n") + 1
        msg = StoredMessage(
            Path(spool) / f"spool-Q{i}", len(data), rp_len, "bob@example.net", f"Q{i}", time.time()
        )
        return backend.deliver(msg, [rcpt()])[0].reply_line

    with ThreadPoolExecutor(max_workers=len(indexes)) as pool:
        return list(pool.map(one, indexes))


def test_fifty_deliveries_from_five_processes(spool: Path, root: Path) -> None:
    for i in range(50):
        make_message(spool, body(i, b"y" * (i * 1013) + b"\n"), qid=f"Q{i}")
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(5) as pool:
        batches = [list(range(k, 50, 5)) for k in range(5)]
        replies = pool.starmap(_deliver_batch, [(str(root), str(spool), b) for b in batches])
    assert all(r.startswith("250 ") for batch in replies for r in batch)
    _check_fifty(root / "alice", spool)


# ---------------------------------------------------------------- locks held by others


def test_waits_for_a_live_dotlock_then_gives_up_with_451(spool: Path, root: Path) -> None:
    MboxBackend(root).deliver(make_message(spool, body(0), qid="Q0"), [rcpt()])
    before = (root / "alice").read_bytes()
    holder = subprocess.Popen(["sleep", "600"])
    try:
        (root / "alice.lock").write_text(f"{holder.pid}\n")
        backend = MboxBackend(root, lock_timeout=0.2)
        [r] = backend.deliver(make_message(spool, body(1)), [rcpt()])
        assert r.reply_line.startswith("451 4.3.0") and "locked" in r.text
        assert (root / "alice").read_bytes() == before
        assert (root / "alice.lock").exists()  # not ours: left alone
    finally:
        holder.kill()
        holder.wait()
    # its owner is gone now: the lock is stale and delivery goes through
    [r] = MboxBackend(root, lock_timeout=5).deliver(make_message(spool, body(1)), [rcpt()])
    assert r.status is Status.DELIVERED and not (root / "alice.lock").exists()
    assert len(read_mbox(root / "alice")) == 2


def test_an_old_anonymous_dotlock_is_stale(spool: Path, root: Path) -> None:
    lock = root / "alice.lock"
    lock.write_bytes(b"")
    os.utime(lock, (1_000_000, 1_000_000))
    [r] = MboxBackend(root).deliver(make_message(spool, body(1)), [rcpt()])
    assert r.status is Status.DELIVERED and not lock.exists()


HOLD_FCNTL = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDWR)
fcntl.lockf(fd, fcntl.LOCK_EX)
print("locked", flush=True)
sys.stdin.read()
"""


def test_respects_an_fcntl_lock_held_by_another_process(spool: Path, root: Path) -> None:
    MboxBackend(root).deliver(make_message(spool, body(0), qid="Q0"), [rcpt()])
    before = (root / "alice").read_bytes()
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_FCNTL, str(root / "alice")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "locked\n"
        [r] = MboxBackend(root, lock_timeout=0.2).deliver(make_message(spool, body(1)), [rcpt()])
        assert r.reply_line.startswith("451 4.3.0")
        assert (root / "alice").read_bytes() == before
        assert not (root / "alice.lock").exists()  # our dotlock released on the way out
    finally:
        holder.communicate("")
    [r] = MboxBackend(root).deliver(make_message(spool, body(1)), [rcpt()])
    assert r.status is Status.DELIVERED


# ---------------------------------------------------------------- failure injection


@pytest.fixture
def seeded(spool: Path, root: Path) -> Iterator[tuple[Path, bytes]]:
    MboxBackend(root).deliver(make_message(spool, body(0), qid="Q0"), [rcpt()])
    path = root / "alice"
    yield path, path.read_bytes()


def _assert_451_and_unchanged(results, path: Path, before: bytes) -> None:
    [r] = results
    assert r.status is Status.TEMPORARY and r.reply_line.startswith("451 4.3.0 ")
    assert path.read_bytes() == before
    assert not path.with_name(path.name + ".lock").exists()


def test_file_where_the_mail_root_should_be(spool: Path, tmp_path: Path) -> None:
    not_a_dir = tmp_path / "file"
    not_a_dir.write_bytes(b"precious")
    [r] = MboxBackend(not_a_dir / "sub").deliver(make_message(spool, body(1)), [rcpt()])
    assert r.reply_line.startswith("451 4.3.0") and not_a_dir.read_bytes() == b"precious"


def test_symlink_in_place_of_the_mbox_is_refused(spool: Path, root: Path, tmp_path: Path) -> None:
    target = tmp_path / "target"
    target.write_bytes(b"precious")
    (root / "alice").symlink_to(target)
    [r] = MboxBackend(root).deliver(make_message(spool, body(1)), [rcpt()])
    assert r.reply_line.startswith("451 4.3.0") and target.read_bytes() == b"precious"


def test_enospc_in_the_middle_of_a_write_is_undone(
    seeded: tuple[Path, bytes], spool: Path, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path, before = seeded
    real_write = os.write
    mbox_fd = os.open(path, os.O_RDONLY)
    wrote_part = []

    def failing_write(fd: int, data) -> int:
        if os.path.sameopenfile(fd, mbox_fd):
            if wrote_part:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            wrote_part.append(real_write(fd, bytes(data)[: len(data) // 2]))  # a short write
            return wrote_part[0]
        return real_write(fd, data)

    monkeypatch.setattr(mbox_mod.os, "write", failing_write)
    try:
        results = MboxBackend(root).deliver(make_message(spool, body(1, b"z" * 200_000)), [rcpt()])
    finally:
        os.close(mbox_fd)
    assert wrote_part and wrote_part[0] > 0  # something partial really reached the file
    _assert_451_and_unchanged(results, path, before)
    assert "No space left on device" in results[0].text


def test_fsync_failure_is_undone(
    seeded: tuple[Path, bytes], spool: Path, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path, before = seeded
    real_fsync = os.fsync
    calls = []

    def failing_fsync(fd: int) -> None:
        calls.append(fd)
        if len(calls) == 1:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        real_fsync(fd)

    monkeypatch.setattr(mbox_mod.os, "fsync", failing_fsync)
    _assert_451_and_unchanged(
        MboxBackend(root).deliver(make_message(spool, body(1)), [rcpt()]), path, before
    )


def test_a_new_mbox_that_fails_is_removed(
    spool: Path, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def failing_fsync(fd: int) -> None:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(mbox_mod.os, "fsync", failing_fsync)
    [r] = MboxBackend(root).deliver(make_message(spool, body(1)), [rcpt()])
    assert r.reply_line.startswith("451 4.3.0") and list(root.iterdir()) == []


@pytest.fixture
def tiny_fs(tmp_path: Path) -> Iterator[Path]:
    """A 64 KiB tmpfs: a really full disk, not a simulated one."""
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k,mode=0755", "tmpfs", str(mnt)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        pytest.skip(
            f"cannot mount a tmpfs here ({done.stderr.strip()}); ENOSPC is simulated "
            "by test_enospc_in_the_middle_of_a_write_is_undone instead"
        )
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_full_disk_leaves_the_mbox_as_it_was(spool: Path, tiny_fs: Path) -> None:
    backend = MboxBackend(tiny_fs)
    assert backend.deliver(make_message(spool, body(0), qid="Q0"), [rcpt()])[0].code == 250
    path = tiny_fs / "alice"
    before = path.read_bytes()
    big = make_message(spool, body(1, b"w" * 200_000), qid="Q1")
    _assert_451_and_unchanged(backend.deliver(big, [rcpt()]), path, before)
    # the space came back: a small message fits again
    assert backend.deliver(make_message(spool, body(2), qid="Q2"), [rcpt()])[0].code == 250
    assert len(read_mbox(path)) == 2
