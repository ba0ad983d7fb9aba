"""Interoperability through the daemon: `postier serve` stores mail, Dovecot reads it over IMAP.

Everything goes through a real `python -m postier serve` (tests/server.py) and real SMTP
(smtplib on its mx port), never through the backend classes:

- `-F maildir` and `-F mbox` write into a mail root that a private Dovecot (tests/dovecot.py)
  serves over IMAP: count, \\Recent/unseen state and exact bytes, read with imaplib; and no
  error in Dovecot's log (it checks the `,S=<size>` in Maildir names: see the control test);
- `-F lmtp` hands mail to Dovecot's LMTP server; the mail is read back over IMAP;
- 50 concurrent SMTP clients to one mailbox with `-F mbox` and `-F spool` leave 50 intact,
  distinct messages (read with Python's `mailbox` module and a small numbered-spool reader).

Two Dovecots for the module (one Maildir with LMTP, one mbox): Dovecot has one
mail_location, and its shutdown takes seconds, so each starts once. Every test uses its own
user, so the tests do not depend on each other's mail.
"""

from __future__ import annotations

import concurrent.futures
import imaplib
import mailbox
import re
import smtplib
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests import dovecot
from tests.server import PostierServer, make_server, wait_until

pytestmark = pytest.mark.skipif(dovecot.available() is not None, reason=str(dovecot.available()))

SENDER = "sender@example.net"
# Dovecot users (name -> password); every test has its own.
DC_USERS = {name: f"{name}-pw" for name in ("alice", "mia", "dave", "erin", "frank", "control")}

# (message as sent on the wire, CRLF; needs BODY=8BITMIME)
MESSAGES = [
    (
        b"Subject: first\r\nFrom: Bob <bob@example.net>\r\nTo: <user@example.org>\r\n\r\n"
        b"Hello,\r\n\r\n  two spaces\tand a tab\r\nbye\r\n",
        False,
    ),
    # smtplib dot-stuffs these lines on the wire; postier must store them unstuffed.
    (
        b"Subject: dots\r\nFrom: bob@example.net\r\n\r\n"
        b".a line starting with a dot\r\n..two dots\r\n.\r\nafter a lone dot\r\n.\r\n",
        False,
    ),
    (
        "Subject: utf8\r\nFrom: bob@example.net\r\nMIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
        "Grüße aus Köln, 日本語のテキスト\r\n\xa0non-breaking\r\n".encode(),
        True,
    ),
]


def split(message: bytes) -> tuple[bytes, bytes]:
    """(header block including the empty line, body) of a CRLF message."""
    head, body = message.split(b"\r\n\r\n", 1)
    return head + b"\r\n\r\n", body


def subject(message: bytes) -> str:
    match = re.search(rb"^Subject: (\S+)\r?$", message, re.MULTILINE)
    assert match, message[:300]
    return match.group(1).decode()


def send(srv: PostierServer, to: list[str], message: bytes, eightbit: bool = False) -> None:
    with smtplib.SMTP("127.0.0.1", srv.mx_port, timeout=60) as s:
        refused = s.sendmail(
            SENDER, to, message, mail_options=["BODY=8BITMIME"] if eightbit else []
        )
        assert refused == {}


# ---- Dovecot peers ---------------------------------------------------------------------------


@dataclass
class Peer:
    dc: dovecot.Dovecot
    root: Path  # the mail root Dovecot serves (and postier writes, for maildir/mbox)


@pytest.fixture(scope="module")
def maildir_peer() -> Iterator[Peer]:
    """Dovecot with `mail_location = maildir:ROOT/%n`, IMAP and LMTP."""
    with dovecot.dovecot_workdir() as wd:
        root = wd / "mail"
        root.mkdir()
        dovecot.chown_tree(root)  # LMTP creates users' Maildirs here as nobody
        with dovecot.running_dovecot(
            wd, f"maildir:{root}/%n", DC_USERS, protocols=("imap", "lmtp")
        ) as dc:
            yield Peer(dc, root)


@pytest.fixture(scope="module")
def mbox_peer() -> Iterator[Peer]:
    """Dovecot with `mail_location = mbox:~/mail:INBOX=ROOT/%n`, IMAP."""
    with dovecot.dovecot_workdir() as wd:
        root = wd / "mail"
        root.mkdir()
        with dovecot.running_dovecot(wd, f"mbox:~/mail:INBOX={root}/%n", DC_USERS) as dc:
            yield Peer(dc, root)


@pytest.fixture
def started() -> Iterator[list[PostierServer]]:
    """Servers a test starts are stopped however it ends."""
    servers: list[PostierServer] = []
    yield servers
    for srv in servers:
        srv.stop()


def status(imap: imaplib.IMAP4) -> dict[str, int]:
    typ, data = imap.status("INBOX", "(MESSAGES RECENT UNSEEN)")
    assert typ == "OK", data
    return {k.decode(): int(v) for k, v in re.findall(rb"(\w+) (\d+)", data[0])}


def fetch(imap: imaplib.IMAP4, num: int, item: str) -> bytes:
    typ, data = imap.fetch(str(num), f"({item})")
    assert typ == "OK" and isinstance(data[0], tuple), data
    return data[0][1]


def fetch_meta(imap: imaplib.IMAP4, num: int) -> tuple[set[str], int]:
    """(flags, RFC822.SIZE) of message `num`."""
    typ, data = imap.fetch(str(num), "(FLAGS RFC822.SIZE)")
    assert typ == "OK", data
    flags = re.search(rb"FLAGS \(([^)]*)\)", data[0])
    size = re.search(rb"RFC822\.SIZE (\d+)", data[0])
    assert flags and size, data
    return set(flags.group(1).decode().split()), int(size.group(1))


def logout_and_check_log(peer: Peer, imap: imaplib.IMAP4, user: str) -> str:
    """Log out, wait (bounded) until Dovecot logged the logout, and return this user's log
    lines; there must be no error, warning or panic among them."""
    imap.logout()
    mine: list[str] = []
    for _ in range(300):
        mine = [line for line in peer.dc.log_text().splitlines() if f"imap({user})" in line]
        if any("Logged out" in line for line in mine):
            break
        time.sleep(0.05)
    else:
        pytest.fail(f"Dovecot never logged {user}'s logout:\n{peer.dc.log_text()}")
    bad = [line for line in mine if re.search(r"\b(Error|Warning|Panic|Fatal):", line)]
    assert bad == [], "\n".join(bad)
    return "\n".join(mine)


# ---- (a) Maildir through the daemon --------------------------------------------------------


def test_maildir_written_by_daemon_read_by_dovecot_imap(
    maildir_peer: Peer, tmp_path: Path, started: list[PostierServer]
) -> None:
    root = maildir_peer.root
    srv = make_server(
        tmp_path / "srv", users="alice@example.org\n", extra=["-F", "maildir", "-R", str(root)]
    )
    started.append(srv.start())
    for message, eightbit in MESSAGES:
        send(srv, ["alice@example.org"], message, eightbit)
    new = root / "alice" / "new"
    files = sorted(new.iterdir())
    assert len(files) == len(MESSAGES)
    stored: dict[str, bytes] = {}
    for path in files:
        data = path.read_bytes()
        size = re.search(r",S=(\d+)$", path.name)
        assert size and int(size.group(1)) == len(data), path.name  # what Dovecot checks
        assert b"\r" not in data  # stored with LF line ends: Dovecot adds the CRs
        stored[subject(data)] = data
    for message, _ in MESSAGES:
        data = stored[subject(message)]
        assert data.startswith(f"Return-Path: <{SENDER}>\nReceived: from ".encode())
        assert data.endswith(message.replace(b"\r\n", b"\n"))
    dovecot.chown_tree(root / "alice")  # postier runs as root here; Dovecot opens as nobody

    imap = maildir_peer.dc.login("alice")
    assert status(imap) == {"MESSAGES": 3, "RECENT": 3, "UNSEEN": 3}
    assert imap.select("INBOX") == ("OK", [b"3"])
    seen: set[str] = set()
    for num in (1, 2, 3):
        whole = fetch(imap, num, "BODY.PEEK[]")
        name = subject(whole)
        seen.add(name)
        expected = stored[name].replace(b"\n", b"\r\n")
        assert whole == expected  # every byte, CRLF as IMAP gives them
        flags, size = fetch_meta(imap, num)
        assert flags == {"\\Recent"}  # new and unseen (PEEK did not set \Seen)
        assert size == len(expected)
        sent = next(m for m, _ in MESSAGES if subject(m) == name)
        assert fetch(imap, num, "BODY.PEEK[TEXT]") == split(sent)[1]
    assert seen == {"first", "dots", "utf8"}
    log = logout_and_check_log(maildir_peer, imap, "alice")
    assert "physical size" not in log and "Cached message size" not in log


def test_control_dovecot_reports_a_wrong_maildir_size(maildir_peer: Peer) -> None:
    """The log check above can see a size problem: a `,S=` that lies is an error to Dovecot."""
    maildir = maildir_peer.root / "control"
    for sub in ("new", "cur", "tmp"):
        (maildir / sub).mkdir(parents=True, exist_ok=True)
    data = b"Return-Path: <a@example.net>\nSubject: liar\n\nthe name says 5 bytes\n"
    (maildir / "new" / "1700000000.M1P1Q1.mx.test,S=5").write_bytes(data)
    dovecot.chown_tree(maildir)
    imap = maildir_peer.dc.login("control")
    try:
        imap.select("INBOX")
        with pytest.raises(imaplib.IMAP4.error):
            imap.fetch("1", "(BODY.PEEK[])")
    finally:
        try:
            imap.logout()
        except (imaplib.IMAP4.error, OSError):
            pass
    for _ in range(300):
        if "Broken physical size" in maildir_peer.dc.log_text():
            break
        time.sleep(0.05)
    assert re.search(r"imap\(control\).*Error: .*Broken physical size", maildir_peer.dc.log_text())


# ---- (b) mbox through the daemon -----------------------------------------------------------


def test_mbox_written_by_daemon_read_by_dovecot_imap(
    mbox_peer: Peer, tmp_path: Path, started: list[PostierServer]
) -> None:
    root = mbox_peer.root
    srv = make_server(
        tmp_path / "srv", users="mia@example.org\n", extra=["-F", "mbox", "-R", str(root)]
    )
    started.append(srv.start())
    for message, eightbit in MESSAGES:
        send(srv, ["mia@example.org"], message, eightbit)
    raw = (root / "mia").read_bytes()
    assert raw.startswith(f"From {SENDER} ".encode())
    assert raw.count(b"\nFrom ") == 2 and not (root / "mia.lock").exists()
    # Dovecot takes its dotlock in the mail root and opens the mbox as nobody.
    dovecot.chown_tree(root)

    imap = mbox_peer.dc.login("mia")
    assert status(imap) == {"MESSAGES": 3, "RECENT": 3, "UNSEEN": 3}
    assert imap.select("INBOX") == ("OK", [b"3"])
    for num, (message, _) in enumerate(MESSAGES, start=1):  # an mbox keeps arrival order
        head, body = split(message)
        assert fetch(imap, num, "BODY.PEEK[TEXT]") == body
        header = fetch(imap, num, "BODY.PEEK[HEADER]")
        assert header.startswith(f"Return-Path: <{SENDER}>\r\nReceived: from ".encode())
        assert header.endswith(b"\r\n" + head)
        flags, _size = fetch_meta(imap, num)
        assert flags == {"\\Recent"}
    logout_and_check_log(mbox_peer, imap, "mia")


# ---- (c) LMTP to Dovecot -------------------------------------------------------------------


def lmtp_server(peer: Peer, tmp_path: Path, users: str) -> PostierServer:
    return make_server(
        tmp_path / "srv",
        users=users,
        extra=[
            "-F",
            "lmtp",
            "--lmtp",
            f"127.0.0.1:{peer.dc.lmtp_port}",
            "-R",
            str(tmp_path / "mail"),
        ],
    )


def test_lmtp_delivery_read_back_over_imap(
    maildir_peer: Peer, tmp_path: Path, started: list[PostierServer]
) -> None:
    srv = lmtp_server(maildir_peer, tmp_path, "dave@example.org\n")
    started.append(srv.start())
    for message, eightbit in MESSAGES:
        send(srv, ["dave@example.org"], message, eightbit)
    imap = maildir_peer.dc.login("dave")
    assert status(imap) == {"MESSAGES": 3, "RECENT": 3, "UNSEEN": 3}
    imap.select("INBOX")
    for num, (message, _) in enumerate(MESSAGES, start=1):  # one LMTP session at a time
        head, body = split(message)
        assert fetch(imap, num, "BODY.PEEK[TEXT]") == body
        header = fetch(imap, num, "BODY.PEEK[HEADER]")
        # Dovecot writes its own Return-Path (from our MAIL FROM); our Received follows
        assert header.startswith(f"Return-Path: <{SENDER}>\r\n".encode())
        assert b"by mx.test" in header and header.endswith(b"\r\n" + head)
        assert fetch_meta(imap, num)[0] == {"\\Recent"}
    logout_and_check_log(maildir_peer, imap, "dave")
    assert srv.logged("event=delivery ", "backend=lmtp")
    assert srv.logged("Saved")  # Dovecot's per-recipient 250 after the final dot


def copies_for(peer: Peer, user: str, marker: bytes) -> int:
    imap = peer.dc.login(user)
    try:
        imap.select("INBOX", readonly=True)
        typ, data = imap.search(None, "BODY", marker.decode())
        assert typ == "OK"
        return len(data[0].split())
    finally:
        imap.logout()


def lmtp_attempt(srv: PostierServer, known: str, marker: bytes) -> tuple[int, bytes]:
    """One SMTP transaction for a user Dovecot knows and one it does not (ghost);
    returns postier's reply to the end of data."""
    message = b"Subject: partial\r\n\r\n" + marker + b"\r\n"
    with smtplib.SMTP("127.0.0.1", srv.mx_port, timeout=60) as s:
        s.ehlo()
        assert s.mail(SENDER)[0] == 250
        assert s.rcpt(known)[0] == 250
        assert s.rcpt("ghost@example.org")[0] == 250  # postier knows ghost; Dovecot does not
        code, text = s.data(message)
    return code, text


def test_lmtp_known_user_gets_it_when_dovecot_refuses_the_other(
    maildir_peer: Peer, tmp_path: Path, started: list[PostierServer]
) -> None:
    """What happens today: Dovecot answers 550 5.1.1 for ghost at RCPT and 250 for erin after
    the dot; erin's copy is stored once, the refusal is logged as permanent."""
    srv = lmtp_server(maildir_peer, tmp_path, "erin@example.org\nghost@example.org\n")
    started.append(srv.start())
    code, _text = lmtp_attempt(srv, "erin@example.org", b"erin-marker-1")
    assert code == 250  # erin has her copy; ghost's refusal goes to the queue (bounce)
    assert copies_for(maildir_peer, "erin", b"erin-marker-1") == 1
    bounced = r"event=bounced qid=\S+ to=<ghost@example.org>"  # the last of the lines
    assert wait_until(lambda: re.search(bounced, srv.log())), srv.log()
    log = srv.log()
    assert re.search(r"to=ghost@example.org .*status=queued reply=\"550 5\.1\.1", log), log
    assert re.search(r"to=erin@example.org .*status=delivered", log), log


def test_lmtp_partial_failure_does_not_duplicate_on_retry(
    maildir_peer: Peer, tmp_path: Path, started: list[PostierServer]
) -> None:
    srv = lmtp_server(maildir_peer, tmp_path, "frank@example.org\nghost@example.org\n")
    started.append(srv.start())
    code, text = lmtp_attempt(srv, "frank@example.org", b"frank-marker-1")
    if 400 <= code < 500:  # what any SMTP client does with a 4xx: send it again later
        lmtp_attempt(srv, "frank@example.org", b"frank-marker-1")
    assert copies_for(maildir_peer, "frank", b"frank-marker-1") == 1
    # frank has it: the message is accepted, ghost's refusal is queued/bounced, not retried
    assert code == 250, (code, text)


# ---- (d) 50 concurrent clients, one mailbox ------------------------------------------------

CLIENTS = 50


def concurrent_body(n: int) -> bytes:
    return (
        f"Subject: c{n}\r\nMessage-ID: <c{n}@example.net>\r\n\r\n".encode()
        + f"marker-{n:03d}\r\n".encode()
        + b"line of filler text\r\n" * 50
        + b"From the middle\r\n.dot\r\n"
    )


def run_concurrently(srv: PostierServer) -> None:
    barrier = threading.Barrier(CLIENTS)

    def client(n: int) -> int:
        with smtplib.SMTP("127.0.0.1", srv.mx_port, timeout=120) as s:
            s.ehlo()
            barrier.wait(timeout=120)  # all 50 sessions open, then all send at once
            assert s.sendmail(SENDER, ["alice@example.org"], concurrent_body(n)) == {}
        return n

    with concurrent.futures.ThreadPoolExecutor(CLIENTS) as pool:
        done = list(pool.map(client, range(CLIENTS)))
    assert sorted(done) == list(range(CLIENTS))


def stored_form(n: int) -> bytes:
    """What the mailbox holds for message n after the header block: LF line ends."""
    return concurrent_body(n).split(b"\r\n\r\n", 1)[1].replace(b"\r\n", b"\n")


def read_numbered_spool(box: Path) -> list[tuple[int, bytes, bytes]]:
    """The numbered spool, as postier/delivery/numbered.py documents it: names of digits only
    are messages, `<N>.status` their flags line; dot files are not messages."""
    numbers = sorted(int(p.name) for p in box.iterdir() if p.name.isascii() and p.name.isdigit())
    return [(n, (box / str(n)).read_bytes(), (box / f"{n}.status").read_bytes()) for n in numbers]


def test_concurrent_clients_mbox(tmp_path: Path, started: list[PostierServer]) -> None:
    srv = make_server(tmp_path / "srv", extra=["-F", "mbox"])
    started.append(srv.start())
    run_concurrently(srv)
    path = srv.mail_root / "alice"
    box = mailbox.mbox(path, create=False)
    messages = [box.get_bytes(key) for key in box.iterkeys()]
    assert len(messages) == CLIENTS
    found = []
    for data in messages:
        match = re.search(rb"^marker-(\d{3})$", data, re.MULTILINE)
        assert match, data[:400]
        n = int(match.group(1))
        found.append(n)
        # intact: the whole body, with mboxrd quoting of the `From ` line
        assert data.endswith(stored_form(n).replace(b"\nFrom the", b"\n>From the")), data[-300:]
        assert data.startswith(f"Return-Path: <{SENDER}>\n".encode())
    assert sorted(found) == list(range(CLIENTS))
    assert not path.with_name("alice.lock").exists()


def test_concurrent_clients_numbered_spool(tmp_path: Path, started: list[PostierServer]) -> None:
    srv = make_server(tmp_path / "srv", extra=["-F", "spool"])
    started.append(srv.start())
    run_concurrently(srv)
    box = srv.mail_root / "alice"
    entries = read_numbered_spool(box)
    assert [n for n, _, _ in entries] == list(range(1, CLIENTS + 1))  # no gap, no duplicate
    found = []
    for _n, data, flags in entries:
        assert flags == b"\\Recent\n"
        match = re.search(rb"^marker-(\d{3})$", data, re.MULTILINE)
        assert match, data[:400]
        found.append(int(match.group(1)))
        assert data.startswith(f"Return-Path: <{SENDER}>\n".encode())
        assert data.endswith(stored_form(found[-1]))  # no quoting in the spool format
    assert sorted(found) == list(range(CLIENTS))
    assert not [p.name for p in box.iterdir() if p.name.startswith(".tmp.")]
    assert sorted(p.name for p in box.iterdir() if not p.name[0].isdigit()) == [".lock"]
