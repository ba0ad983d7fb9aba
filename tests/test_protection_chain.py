"""Which listener runs which defence, in the issue's order, and how end-of-data verdicts
combine; rspamd's answers as postier's verdicts; a submission scan tells rspamd the user."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from postier.checks.base import CheckChain, Verdict
from postier.checks.chain import checks_for_role
from postier.checks.disk import FreeSpace
from postier.checks.protection import Protection
from postier.checks.rspamd import RspamdCheck, _act
from postier.checks.rspamd_client import RspamdClient, RspamdVerdict
from postier.config import Config
from postier.delivery.base import StoredMessage
from postier.inbound.transaction import Transaction
from postier.net.roles import LOCAL, MX, SUBMISSION
from postier.policy import Policy
from postier.protocol.address import Address
from tests.dnsserver import DnsServer
from tests.rspamd import Rspamd, rspamd_available

POLICY = Policy(["example.org"], {})
DISK = FreeSpace(Path("."), minimum=0)


def everything(tmp_path: Path, **overrides: object) -> Protection:
    cfg = Config(
        queue_dir=tmp_path,
        rspamd="http://127.0.0.1:11333",
        dnsbl=("bl.test",),
        greylist=True,
        client_messages_per_minute=5,
        dns_server="127.0.0.1:5353",
        **overrides,  # type: ignore[arg-type]
    )
    return Protection.from_config(cfg)


def chain(role, protection: Protection) -> CheckChain:  # type: ignore[no-untyped-def]
    return checks_for_role(
        role, policy=POLICY, free_space=DISK, hostname="mx.test", protection=protection
    )


def test_mx_order_is_limits_dnsbl_greylist_then_rspamd_last(tmp_path: Path) -> None:
    names = chain(MX, everything(tmp_path)).names
    assert names == ("client-rate-limits", "dnsbl", "greylist", "low-disk", "hops", "rspamd")


def test_submission_is_scanned_but_not_limited_and_listeners_are_configurable(
    tmp_path: Path,
) -> None:
    names = chain(SUBMISSION, everything(tmp_path)).names
    assert names == ("sender-ownership", "low-disk", "submission-headers", "hops", "rspamd")
    assert "rspamd" not in chain(LOCAL, everything(tmp_path)).names
    mx_only = everything(tmp_path, rspamd_listeners=("mx",))
    assert "rspamd" not in chain(SUBMISSION, mx_only).names
    assert chain(MX, mx_only).names[-1] == "rspamd"


def test_nothing_configured_adds_nothing(tmp_path: Path) -> None:
    protection = Protection.from_config(Config(queue_dir=tmp_path))
    assert chain(MX, protection).names == ("low-disk", "hops")


class _Fixed:
    def __init__(self, name: str, verdict: Verdict) -> None:
        self.name, self.verdict = name, verdict

    async def at_end_of_data(self, txn: Transaction, message: object) -> Verdict:
        return self.verdict


def test_end_of_data_verdicts_combine_removals_and_spam() -> None:
    chain = CheckChain(
        [
            _Fixed("a", Verdict(trace_fields=b"A: 1\n", remove_fields=frozenset({b"x-a"}))),
            _Fixed("b", Verdict(fields=b"B: 2\n", remove_fields=frozenset({b"x-b"}), spam=True)),
        ]
    )
    txn = Transaction(queue_id="Q", sender=None)
    v = asyncio.run(chain.at_end_of_data(txn, None))  # type: ignore[arg-type]
    assert (v.trace_fields, v.fields, v.spam) == (b"A: 1\n", b"B: 2\n", True)
    assert v.remove_fields == {b"x-a", b"x-b"}


def verdict(action: str, **kw: object) -> RspamdVerdict:
    return RspamdVerdict(action=action, score=7.5, required_score=15.0, **kw)  # type: ignore[arg-type]


def test_rspamd_actions_become_replies_and_fields() -> None:
    reject = _act(verdict("reject", message="Go away\r\nnow"))
    assert reject.reply is not None and reject.reply.code == 550
    assert reject.reply.enhanced == "5.7.1" and reject.reply.lines == ("Go awaynow",)
    for action in ("soft reject", "greylist"):
        soft = _act(verdict(action))
        assert soft.reply is not None and (soft.reply.code, soft.reply.enhanced) == (451, "4.7.1")
    spam = _act(verdict("add header"))
    assert spam.spam and spam.fields == b"X-Spam: Yes\nX-Spam-Score: 7.50 / 15.00\n"
    assert spam.remove_fields == {b"x-spam", b"x-spam-score"}
    rewrite = _act(verdict("rewrite subject", subject="***SPAM*** hi"))
    assert b"Subject: ***SPAM*** hi\n" in rewrite.fields and b"subject" in rewrite.remove_fields
    milter = _act(
        verdict(
            "no action",
            add_headers=(("X-Rspamd-Server", "test"),),
            remove_headers=("X-Spamd-Bar",),
        )
    )
    assert not milter.spam and milter.fields == b"X-Rspamd-Server: test\n"
    assert milter.remove_fields == {b"x-spamd-bar"}
    assert _act(verdict("no action")).fields == b""


# ---- a submission scan against the real rspamd ---------------------------------------------
@pytest.fixture(scope="module")
def rspamd() -> Iterator[Rspamd]:
    if not rspamd_available():
        pytest.skip("rspamd is not installed")
    with DnsServer({}) as dns:
        server = Rspamd(dns.port).start()
        try:
            yield server
        finally:
            server.stop()


class _Spooled:
    """A finished spool file, as end of data hands it to the checks."""

    def __init__(self, path: Path, offset: int) -> None:
        self.path, self.offset = path, offset

    @property
    def header_names(self) -> frozenset[bytes]:
        return frozenset()

    async def stored(self) -> StoredMessage:
        size = self.path.stat().st_size
        return StoredMessage(self.path, size, self.offset, "carol@example.org", "QSUB1", 0.0)


def test_submission_scan_names_the_user(rspamd: Rspamd, tmp_path: Path) -> None:
    head = b"Return-Path: <carol@example.org>\n"
    spool = tmp_path / "m.spool"
    spool.write_bytes(
        head + b"From: carol@example.org\nTo: x@remote.test\nSubject: report\n\nHello.\n"
    )
    txn = Transaction(
        queue_id="QSUB1",
        sender=Address("carol", "example.org"),
        auth_user="carol@example.org",
        client_ip="127.0.0.1",
        helo="laptop",
    )
    txn.accepted.append("x@remote.test")

    async def scan() -> Verdict:
        client = RspamdClient(rspamd.url, timeout=30)
        try:
            check = RspamdCheck(client, hostname="mx.test", fail_open=False)
            return await check.at_end_of_data(txn, _Spooled(spool, len(head)))
        finally:
            await client.close()

    assert not asyncio.run(scan()).refused
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:  # rspamd writes its task log line after answering
        logs = b"".join(p.read_bytes() for p in rspamd.dir.rglob("*.log"))
        if b"user: carol@example.org" in logs:
            break
        time.sleep(0.2)
    assert b"user: carol@example.org" in logs and b"qid: <QSUB1>" in logs
