"""LMTP delivery (RFC 2033) against a private Dovecot LMTP server and smtp-sink in LMTP mode.

Dovecot is the real target: per-recipient replies, Maildir files we read back, TCP and UNIX
socket listeners. smtp-sink (-L) supplies the 4xx/5xx classes on demand. Dovecot runs in the
foreground as our child (`dovecot -F`) and is stopped by its pid.
"""

from __future__ import annotations

import asyncio
import mailbox
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from postier.delivery.base import Recipient, RecipientResult, Status, StoredMessage
from postier.delivery.client import Timeouts, parse_hostport
from postier.delivery.lmtp import LmtpBackend
from tests.sinks import SmtpSink, free_port, public_tmpdir, wait_for_port

DOVECOT = shutil.which("dovecot") or shutil.which("dovecot", path="/usr/sbin")

CONFIG = """\
base_dir = {dir}/run
state_dir = {dir}/state
log_path = {dir}/dovecot.log
protocols = lmtp
listen = 127.0.0.1
ssl = no
mail_location = maildir:{dir}/mail/%n
mail_uid = nobody
mail_gid = nogroup
auth_username_format = %Ln
service lmtp {{
  inet_listener lmtp {{
    address = 127.0.0.1
    port = {port}
  }}
  unix_listener lmtp {{
    mode = 0666
  }}
}}
passdb {{
  driver = passwd-file
  args = {dir}/users
}}
userdb {{
  driver = passwd-file
  args = {dir}/users
}}
"""

TIMEOUTS = Timeouts.uniform(20.0)


class Dovecot:
    def __init__(self, root: Path, users: list[str]) -> None:
        self.root = root
        self.users = users
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def socket_path(self) -> Path:
        return self.root / "run" / "lmtp"

    def start(self) -> Dovecot:
        self.port = free_port()
        (self.root / "state").mkdir()
        (self.root / "mail").mkdir()
        os.chown(self.root / "mail", 65534, 65534)
        users = self.root / "users"
        users.write_text(
            "".join(
                f"{u}:{{PLAIN}}unused:65534:65534::{self.root}/mail/{u}::\n" for u in self.users
            )
        )
        users.chmod(0o644)  # Dovecot's auth process reads it as the dovecot user
        config = self.root / "dovecot.conf"
        config.write_text(CONFIG.format(dir=self.root, port=self.port))
        with open(self.root / "dovecot.out", "wb") as out:  # a file, never a pipe
            self.proc = subprocess.Popen(
                [DOVECOT, "-F", "-c", str(config)],  # type: ignore[list-item]
                stdout=out,
                stderr=out,
            )
        if not wait_for_port("127.0.0.1", self.port):
            self.stop()
            pytest.fail(f"Dovecot did not start:\n{self.log()}")
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def log(self) -> str:
        parts = [self.root / "dovecot.out", self.root / "dovecot.log"]
        return "".join(p.read_text(errors="replace") for p in parts if p.exists())

    def messages(self, user: str) -> list[mailbox.MaildirMessage]:
        box = mailbox.Maildir(self.root / "mail" / user, create=False)
        return [box[key] for key in sorted(box.keys())]


@pytest.fixture(scope="module")
def dovecot() -> Iterator[Dovecot]:
    if DOVECOT is None:
        pytest.skip("Dovecot is not installed")
    with public_tmpdir() as root:
        server = Dovecot(root, ["alice", "bob", "carol"]).start()
        try:
            yield server
        finally:
            server.stop()


_n = iter(range(1_000_000))


def stored(directory: Path, body: bytes, sender: str = "sender@origin.test") -> StoredMessage:
    head = f"Return-Path: <{sender}>\n".encode()
    path = directory / f"spool-{next(_n)}"
    path.write_bytes(head + body)
    return StoredMessage(path, len(head) + len(body), len(head), sender, "L1D", time.time())


def summary(results: list[RecipientResult]) -> list[tuple[str, Status, int, str]]:
    return [(r.recipient.address, r.status, r.code, r.enhanced) for r in results]


BODY = b"Subject: lmtp test\nFrom: sender@origin.test\n\n.a line starting with a dot\nbye\n"


def test_parse_target() -> None:
    assert parse_hostport("127.0.0.1:2424", 24) == ("127.0.0.1", 2424)
    assert parse_hostport("[::1]:2424", 24) == ("::1", 2424)
    assert parse_hostport("mail.example", 24) == ("mail.example", 24)
    assert LmtpBackend("unix:/run/dovecot/lmtp").unix_path == "/run/dovecot/lmtp"
    assert LmtpBackend("/run/dovecot/lmtp").unix_path == "/run/dovecot/lmtp"
    with pytest.raises(ValueError):
        LmtpBackend("host:port")


def test_dovecot_per_recipient_results_and_content(dovecot: Dovecot, pub: Path) -> None:
    backend = LmtpBackend(f"127.0.0.1:{dovecot.port}", timeouts=TIMEOUTS)

    async def go() -> tuple[list[RecipientResult], list[RecipientResult]]:
        first = await backend.deliver(
            stored(pub, BODY),
            [
                Recipient("alice@example.test", user="alice@example.test"),
                Recipient("ghost@example.test"),
                Recipient("alias@example.test", user="bob@example.test"),  # an alias of bob's
            ],
        )
        second = await backend.deliver(
            stored(pub, b"Subject: again\n\nsecond\n"), [Recipient("carol@example.test")]
        )
        await backend.close()
        return first, second

    first, second = asyncio.run(go())
    assert summary(first) == [
        ("alice@example.test", Status.DELIVERED, 250, "2.0.0"),
        ("ghost@example.test", Status.PERMANENT, 550, "5.1.1"),
        ("alias@example.test", Status.DELIVERED, 250, "2.0.0"),
    ]
    # Replies stay aligned on the reused connection: one per recipient after each dot.
    assert summary(second) == [("carol@example.test", Status.DELIVERED, 250, "2.0.0")]
    for user in ("alice", "bob"):
        (msg,) = dovecot.messages(user)
        assert msg["Return-Path"] == "<sender@origin.test>"
        assert msg["Subject"] == "lmtp test"
        assert msg.get_payload() == ".a line starting with a dot\nbye\n"
    assert dovecot.messages("carol")[0]["Subject"] == "again"


def test_connection_reuse_and_reconnect(dovecot: Dovecot, pub: Path) -> None:
    backend = LmtpBackend(str(dovecot.socket_path), timeouts=TIMEOUTS)  # the UNIX socket
    carol = [Recipient("carol@example.test")]

    async def go() -> None:
        assert (await backend.deliver(stored(pub, BODY), carol))[0].status is Status.DELIVERED
        ((stream, _),) = backend._idle
        assert (await backend.deliver(stored(pub, BODY), carol))[0].status is Status.DELIVERED
        assert backend._idle[0][0] is stream  # the same connection, after an RSET
        stream.writer.close()  # as if the server had closed it while idle
        await stream.writer.wait_closed()
        assert (await backend.deliver(stored(pub, BODY), carol))[0].status is Status.DELIVERED
        assert backend._idle[0][0] is not stream
        await backend.close()

    before = len(dovecot.messages("carol"))
    asyncio.run(go())
    assert len(dovecot.messages("carol")) == before + 3


def test_concurrent_deliveries_share_few_connections(dovecot: Dovecot, pub: Path) -> None:
    backend = LmtpBackend(f"127.0.0.1:{dovecot.port}", timeouts=TIMEOUTS, max_connections=3)
    alice = [Recipient("alice@example.test")]

    async def go() -> list[list[RecipientResult]]:
        results = await asyncio.gather(
            *(backend.deliver(stored(pub, b"Subject: %d\n\nx\n" % i), alice) for i in range(12))
        )
        assert len(backend._idle) <= 3
        await backend.close()
        return results

    before = len(dovecot.messages("alice"))
    results = asyncio.run(go())
    assert all(r[0].status is Status.DELIVERED for r in results)
    assert len(dovecot.messages("alice")) == before + 12


# --- failure classes, from smtp-sink in LMTP mode -----------------------------------------


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        (("-r", "RCPT"), (Status.TEMPORARY, 450)),
        (("-f", "RCPT"), (Status.PERMANENT, 500)),
        (("-r", "."), (Status.TEMPORARY, 450)),
        (("-f", "MAIL"), (Status.PERMANENT, 500)),
    ],
)
def test_sink_reply_classes(
    pub: Path, options: tuple[str, ...], expected: tuple[Status, int]
) -> None:
    with SmtpSink(pub / "sink", options=("-L", *options)) as sink:
        backend = LmtpBackend(f"127.0.0.1:{sink.port}", timeouts=TIMEOUTS)

        async def go() -> list[RecipientResult]:
            res = await backend.deliver(
                stored(pub, BODY), [Recipient("a@x.test"), Recipient("b@x.test")]
            )
            await backend.close()
            return res

        results = asyncio.run(go())
    assert [(r.status, r.code) for r in results] == [expected, expected]


def test_sink_lmtp_delivers_and_refused_is_temporary(pub: Path) -> None:
    with SmtpSink(pub / "sink", options=("-L",)) as sink:
        backend = LmtpBackend(f"127.0.0.1:{sink.port}", timeouts=TIMEOUTS)
        res = asyncio.run(backend.deliver(stored(pub, BODY), [Recipient("a@x.test")]))
        assert res[0].status is Status.DELIVERED
        assert b"X-Client-Proto: LMTP" in sink.messages()[0]
    res = asyncio.run(
        LmtpBackend(f"127.0.0.1:{free_port()}", timeouts=TIMEOUTS).deliver(
            stored(pub, BODY), [Recipient("a@x.test")]
        )
    )
    assert (res[0].status, res[0].code, res[0].enhanced) == (Status.TEMPORARY, 451, "4.4.1")
