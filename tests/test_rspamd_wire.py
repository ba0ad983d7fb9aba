"""rspamd at end of data in a running server: Debian's rspamd on loopback, real clients.

The private rspamd of `tests/rspamd.py` picks its action by a marker in the Subject
(XREJECTX, XSOFTX, XSPAMX, XREWRITEX). It takes 10-20 s to start, so one instance serves the
module.
"""

from __future__ import annotations

import smtplib
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.dnsserver import DnsServer
from tests.rspamd import Rspamd, rspamd_available
from tests.server import PostierServer, free_port, make_server

pytestmark = pytest.mark.skipif(not rspamd_available(), reason="rspamd is not installed")


def message(subject: str, body: bytes = b"Hello.\r\n", extra: bytes = b"") -> bytes:
    return (
        b"From: Someone <someone@remote.test>\r\nTo: alice@example.org\r\n"
        b"Subject: " + subject.encode() + b"\r\nMessage-ID: <m@remote.test>\r\n"
        b"Date: Wed, 02 Dec 2026 07:00:00 +0000\r\n" + extra + b"\r\n" + body
    )


@pytest.fixture(scope="module")
def dns() -> Iterator[DnsServer]:
    with DnsServer({}) as server:
        yield server


@pytest.fixture(scope="module")
def rspamd(dns: DnsServer) -> Iterator[Rspamd]:
    server = Rspamd(dns.port).start()
    try:
        yield server
    finally:
        server.stop()


def serve(tmp: Path, dns: DnsServer, url: str, toml: str = "") -> PostierServer:
    tmp.mkdir(parents=True, exist_ok=True)
    conf = tmp / "postier.toml"
    conf.write_text(f'rspamd = "{url}"\n' + toml)
    extra = ["-c", str(conf), "--dns-server", f"127.0.0.1:{dns.port}"]
    return make_server(tmp, extra=extra).start()


@pytest.fixture(scope="module")
def srv(
    tmp_path_factory: pytest.TempPathFactory, dns: DnsServer, rspamd: Rspamd
) -> Iterator[PostierServer]:
    server = serve(tmp_path_factory.mktemp("rspamd-srv"), dns, rspamd.url)
    for sub in ("tmp", "new", "cur"):  # alice has a Maildir++ Junk folder, bob has none
        (server.mail_root / "alice" / ".Junk" / sub).mkdir(parents=True)
    try:
        yield server
    finally:
        server.stop()


def send(
    srv: PostierServer, msg: bytes, rcpts: tuple[str, ...] = ("alice@example.org",)
) -> tuple[int, bytes]:
    with smtplib.SMTP("127.0.0.1", srv.mx_port, timeout=120) as smtp:
        smtp.ehlo("client.remote.test")
        assert smtp.mail("someone@remote.test")[0] == 250
        for r in rcpts:
            assert smtp.rcpt(r)[0] == 250
        return smtp.data(msg)


def files(directory: Path) -> set[Path]:
    return set(directory.glob("*")) if directory.is_dir() else set()


def test_reject_is_550_and_nothing_is_stored(srv: PostierServer) -> None:
    inbox, junk = srv.mail_root / "alice/new", srv.mail_root / "alice/.Junk/new"
    before = files(inbox) | files(junk)
    code, text = send(srv, message("XREJECTX offer"))
    assert code == 550 and text.startswith(b"5.7.1")
    assert b"Spam message rejected by test marker" in text
    assert files(inbox) | files(junk) == before
    assert not list((srv.root / "queue").rglob("*.spool"))
    assert srv.logged("event=rspamd-scanned", "action=reject")


def test_soft_reject_is_451(srv: PostierServer) -> None:
    code, text = send(srv, message("XSOFTX later"))
    assert code == 451 and text.startswith(b"4.7.1")


def test_add_header_goes_to_junk_when_it_exists_else_inbox(srv: PostierServer) -> None:
    before_junk = files(srv.mail_root / "alice/.Junk/new")
    before_bob = files(srv.mail_root / "bob/new")
    code, _ = send(
        srv,
        message("XSPAMX cheap", extra=b"X-Spam: No\r\n"),
        ("alice@example.org", "bob@example.org"),
    )
    assert code == 250
    (junked,) = files(srv.mail_root / "alice/.Junk/new") - before_junk
    (inboxed,) = files(srv.mail_root / "bob/new") - before_bob
    for path in (junked, inboxed):
        head = path.read_bytes().split(b"\n\n", 1)[0]
        assert b"\nX-Spam: Yes\n" in head and b"\nX-Spam-Score: " in head
        assert b"X-Spam: No" not in head  # the sender's own claim is gone


def test_rewrite_subject(srv: PostierServer) -> None:
    before = files(srv.mail_root / "alice/.Junk/new")
    assert send(srv, message("XREWRITEX deal"))[0] == 250
    (path,) = files(srv.mail_root / "alice/.Junk/new") - before
    head = path.read_bytes().split(b"\n\n", 1)[0]
    subjects = [line for line in head.split(b"\n") if line.lower().startswith(b"subject:")]
    assert subjects == [b"Subject: ***SPAM*** XREWRITEX deal"]


def test_ham_is_stored_in_the_inbox_without_spam_header(srv: PostierServer) -> None:
    before = files(srv.mail_root / "alice/new")
    assert send(srv, message("lunch on friday"))[0] == 250
    (path,) = files(srv.mail_root / "alice/new") - before
    assert b"X-Spam: Yes" not in path.read_bytes()


def _tree_hwm_kib(pid: int) -> int:
    """The largest peak RSS (VmHWM) among the server process and its children."""
    pids = [pid]
    for task in Path(f"/proc/{pid}/task").iterdir():
        pids += [int(p) for p in (task / "children").read_text().split()]
    peak = 0
    for p in pids:
        for line in Path(f"/proc/{p}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                peak = max(peak, int(line.split()[1]))
    return peak


def test_20_mb_message_is_streamed_with_flat_memory(srv: PostierServer) -> None:
    assert srv.proc is not None
    assert send(srv, message("warm up"))[0] == 250
    before = _tree_hwm_kib(srv.proc.pid)
    line = b"All work and no play makes Jack a dull boy. 0123456789 abcdefghij\r\n"
    body = line * (20 * 1024 * 1024 // len(line))
    assert send(srv, message("big one", body=body))[0] == 250
    grown = _tree_hwm_kib(srv.proc.pid) - before
    assert grown < 10 * 1024, f"peak RSS grew by {grown} KiB for a 20 MB message"


def test_rspamd_down_is_451_or_accepted_with_fail_open(tmp_path: Path, dns: DnsServer) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    closed = serve(tmp_path / "closed", dns, dead)
    try:
        code, text = send(closed, message("hello"))
        assert code == 451 and text.startswith(b"4.7.1")
        assert not closed.maildir_files("alice")
        assert closed.logged("event=rspamd-unavailable")
    finally:
        closed.stop()
    open_ = serve(tmp_path / "open", dns, dead, "rspamd_fail_open = true\n")
    try:
        assert send(open_, message("hello"))[0] == 250
        (path,) = open_.maildir_files("alice")
        assert b"X-Spam-Status: Unchecked" in path.read_bytes()
        assert open_.logged("event=rspamd-unavailable")
    finally:
        open_.stop()
