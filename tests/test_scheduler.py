"""The scheduler: back-off, expiry, bounces, delay warnings, flush, destinations, sharing.

The backends here are test doubles for the *remote servers' answers* (scripted replies),
driven with a fake clock; tests/test_scheduler.py::test_relay_* at the end go through the
real SmtpRelay to Postfix's smtp-sink on loopback.
"""

from __future__ import annotations

import argparse
import asyncio
import email
import email.policy
import functools
import io
import itertools
import random
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from pathlib import Path

import pytest

from postier.delivery.base import (
    Recipient,
    RecipientResult,
    StoredMessage,
    delivered,
    permanent,
    temporary,
)
from postier.delivery.smtp import SmtpRelay, Timeouts
from postier.dns import Resolver
from postier.queue import cli as queue_cli
from postier.queue import ids
from postier.queue.scheduler import Scheduler
from postier.queue.store import DELIVERED, PENDING, EntryNotFound, QueueStore
from tests.dnsserver import DnsServer
from tests.sinks import RecordingProxy, SmtpSink

Script = Callable[[StoredMessage, Recipient], RecipientResult]


def aio(fn: Callable[..., Awaitable[None]]) -> Callable[..., None]:
    """Run an async test on a fresh loop, bounded (no plugin needed)."""

    @functools.wraps(fn)
    def wrapper(*args: object, **kwargs: object) -> None:
        async def bounded() -> None:
            async with asyncio.timeout(120):
                await fn(*args, **kwargs)

        asyncio.run(bounded())

    return wrapper


class Clock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Backend:
    """Answers like a remote server would, per recipient, from `script`; records calls."""

    def __init__(self, script: Script, clock: Clock) -> None:
        self.script = script
        self.clock = clock
        self.calls: list[tuple[float, str, str, list[str]]] = []  # time, qid, sender, rcpts
        self.active = 0
        self.max_active = 0
        self.gate: asyncio.Event | None = None

    async def deliver(
        self, message: StoredMessage, recipients: Sequence[Recipient]
    ) -> list[RecipientResult]:
        self.calls.append(
            (self.clock(), message.queue_id, message.sender, [r.address for r in recipients])
        )
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        try:
            if self.gate is not None:
                await self.gate.wait()
            return [self.script(message, r) for r in recipients]
        finally:
            self.active -= 1


class SessionBackend(Backend):
    """Like SmtpRelay: `session(domain)` is one connection carrying several messages."""

    def __init__(self, script: Script, clock: Clock) -> None:
        super().__init__(script, clock)
        self.sessions: list[list[str]] = []

    def session(self, domain: str) -> _Session:
        return _Session(self)


class _Session:
    def __init__(self, backend: SessionBackend) -> None:
        self.backend = backend
        self.sent: list[str] = []
        self.host = "mx.example.net"
        self.connected = True

    async def __aenter__(self) -> _Session:
        self.backend.sessions.append(self.sent)
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    async def send(
        self, message: StoredMessage, recipients: Sequence[Recipient]
    ) -> list[RecipientResult]:
        self.sent.append(message.queue_id)
        return await self.backend.deliver(message, recipients)


def ok(m: StoredMessage, r: Recipient) -> RecipientResult:
    return delivered(r, "250 2.0.0 queued as X")


def later(m: StoredMessage, r: Recipient) -> RecipientResult:
    return temporary(r, "Greylisted, try later", 451, "4.7.1")


def never(m: StoredMessage, r: Recipient) -> RecipientResult:
    return permanent(r, "No such user here", 550, "5.1.1")


def commit(store: QueueStore, tmp: Path, sender: str, rcpts: list[str], arrival: float) -> str:
    qid = ids.new_queue_id()
    head = f"Return-Path: <{sender}>\n".encode()
    data = head + b"From: <" + sender.encode() + b">\nSubject: hello there\n\nbody\n"
    path = tmp / qid
    path.write_bytes(data)
    store.commit(StoredMessage(path, len(data), len(head), sender, qid, arrival), sender, rcpts)
    path.unlink()
    return qid


class World:
    def __init__(
        self, tmp: Path, script: Script = ok, *, session: bool = False, **kw: object
    ) -> None:
        self.tmp = tmp
        self.clock = Clock()
        self.store = QueueStore(tmp / "queue")
        self.backend = (SessionBackend if session else Backend)(script, self.clock)
        self.local = Backend(ok, self.clock)
        opts: dict[str, object] = {
            "jitter": 0.0,
            "clock": self.clock,
            "hostname": "mx.test",
            "rng": random.Random(1),
        }
        opts.update(kw)
        self.sched = Scheduler(self.store, lambda domain: self.backend, **opts)  # type: ignore[arg-type]

    def add(
        self, sender: str = "alice@example.org", rcpts: list[str] | None = None, age: float = 0.0
    ) -> str:
        qid = commit(self.store, self.tmp, sender, rcpts or ["bob@example.net"], self.clock() - age)
        self.sched.enqueue(qid)
        return qid

    async def settle(self) -> None:
        """Run everything that is due now, including bounces it creates."""
        for _ in range(100):
            await self.sched.run_once()
            if not self.sched._tasks:
                return
            await self.sched.drain()

    async def advance_to_next(self) -> float:
        due = min(t for t, _ in self.sched._heap)
        self.clock.now = max(self.clock.now, due)
        await self.settle()
        return due

    def bounces(self) -> list[email.message.EmailMessage]:
        out = []
        for e in self.store.list():
            if e.sender == "":
                data = self.store.body_path(e.queue_id).read_bytes()[e.content_offset :]
                out.append(email.message_from_bytes(data, policy=email.policy.default))
        return out


def status_blocks(msg: email.message.EmailMessage) -> list[dict[str, str]]:
    part = next(p for p in msg.walk() if p.get_content_type() == "message/delivery-status")
    return [dict(block.items()) for block in part.get_payload()]


@aio
async def test_first_attempt_at_once_and_removal(tmp_path: Path) -> None:
    w = World(tmp_path)
    qid = w.add(rcpts=["bob@example.net", "carol@example.net"])
    await w.settle()
    assert len(w.backend.calls) == 1 and w.backend.calls[0][0] == w.clock.now
    assert w.backend.calls[0][3] == ["bob@example.net", "carol@example.net"]
    with pytest.raises(EntryNotFound):
        w.store.load(qid)


@aio
async def test_backoff_sequence_then_last_step_repeats(tmp_path: Path) -> None:
    w = World(tmp_path, later, delay_warning_after=0)
    start = w.clock.now
    qid = w.add()
    await w.settle()
    for _ in range(8):
        await w.advance_to_next()
    times = [t - start for t, q, *_ in w.backend.calls if q == qid]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert times[0] == 0
    assert gaps == [60, 300, 900, 1800, 3600, 7200, 7200, 7200]
    entry = w.store.load(qid)
    assert entry.recipients[0].attempts == 9
    assert entry.recipients[0].last_reply == "451 4.7.1 Greylisted, try later"


@aio
async def test_jitter_stays_within_ten_percent(tmp_path: Path) -> None:
    w = World(tmp_path, later, jitter=0.1)
    qid = w.add()
    await w.settle()
    delay = w.store.load(qid).recipients[0].next_attempt - w.clock.now
    assert 54 <= delay <= 66
    assert {round(w.sched.backoff(3)) for _ in range(50)} != {900}  # it does vary


@aio
async def test_permanent_failure_bounces_only_failed_recipients(tmp_path: Path) -> None:
    def script(m: StoredMessage, r: Recipient) -> RecipientResult:
        return never(m, r) if r.address.startswith("ghost") else ok(m, r)

    w = World(tmp_path, script)
    qid = w.add(rcpts=["bob@example.net", "ghost@example.net"])
    await w.sched.run_once()
    await w.sched.drain()
    with pytest.raises(EntryNotFound):
        w.store.load(qid)
    [bounce] = w.bounces()
    assert bounce["To"].addresses[0].addr_spec == "alice@example.org"
    assert bounce["Auto-Submitted"] == "auto-replied"
    assert bounce["From"] == "Mail Delivery System <MAILER-DAEMON@mx.test>"
    blocks = status_blocks(bounce)
    assert blocks[0]["Reporting-MTA"] == "dns; mx.test"
    assert [b["Final-Recipient"] for b in blocks[1:]] == ["rfc822; ghost@example.net"]
    assert blocks[1]["Action"] == "failed" and blocks[1]["Status"] == "5.1.1"
    assert blocks[1]["Diagnostic-Code"] == "smtp; 550 5.1.1 No such user here"
    # The bounce itself goes out with the null sender to the original sender:
    await w.settle()
    assert w.backend.calls[-1][2:] == ("", ["alice@example.org"])


@aio
async def test_null_sender_never_bounced(tmp_path: Path) -> None:
    w = World(tmp_path, never)
    qid = w.add(sender="")
    await w.settle()
    assert w.bounces() == [] and w.store.list() == []
    assert len(w.backend.calls) == 1, qid


@aio
async def test_expiry_bounces_after_max_age(tmp_path: Path) -> None:
    w = World(tmp_path, later, schedule=(100, 400), max_age=1000, delay_warning_after=0)
    start = w.clock.now
    qid = w.add()
    await w.settle()
    for _ in range(10):
        if not w.store.list() or w.bounces():
            break
        await w.advance_to_next()
    times = [t - start for t, q, *_ in w.backend.calls if q == qid]
    assert times == [0, 100, 500, 900, 1000]  # the last try is at expiry, not after it
    with pytest.raises(EntryNotFound):
        w.store.load(qid)
    [bounce] = w.bounces()
    [block] = status_blocks(bounce)[1:]
    assert block["Action"] == "failed" and block["Status"] == "4.4.7"
    assert "451 4.7.1 Greylisted" in block["Diagnostic-Code"]


@aio
async def test_delay_warning_once(tmp_path: Path) -> None:
    w = World(tmp_path, later, schedule=(300,), delay_warning_after=1000, max_age=10_000)
    qid = w.add()
    await w.settle()
    for _ in range(8):
        await w.sched.run_once()
        if not w.sched._heap:
            break
        due = min(t for t, q in w.sched._heap if q == qid)
        w.clock.now = due
        await w.sched.run_once()
        await w.sched.drain()
    warnings = [b for b in w.bounces() if "Delayed" in b["Subject"]]
    assert len(warnings) == 1
    [block] = status_blocks(warnings[0])[1:]
    assert block["Action"] == "delayed" and block["Status"] == "4.7.1"
    assert "Will-Retry-Until" in block
    assert w.store.load(qid).delay_warned


@aio
async def test_delay_warning_off_with_zero(tmp_path: Path) -> None:
    w = World(tmp_path, later, delay_warning_after=0)
    w.add(age=10 * 3600)
    await w.settle()
    assert w.bounces() == []


@aio
async def test_double_bounce_is_dropped(tmp_path: Path) -> None:
    w = World(tmp_path, never)
    w.add(sender="alice@example.org")
    await w.settle()  # the message bounces, then the bounce bounces: no third message
    assert w.store.list() == []
    assert [c[2] for c in w.backend.calls] == ["alice@example.org", ""]


@aio
async def test_flush_retries_now_and_revives_destination(tmp_path: Path) -> None:
    w = World(tmp_path, later)
    qid = w.add()
    await w.settle()
    assert w.sched.next_due(qid) == w.clock.now + 60
    w.sched.flush(qid)
    await w.settle()
    assert len(w.backend.calls) == 2
    w.backend.script = ok
    w.sched.flush()
    await w.settle()
    assert len(w.backend.calls) == 3 and w.store.list() == []


@aio
async def test_flush_request_file_reaches_running_loop(tmp_path: Path) -> None:
    w = World(tmp_path, later, poll_interval=0.01)
    w.clock.now = time.time()
    w.sched.clock = time.time  # the loop really sleeps here
    qid = w.add()
    runner = asyncio.create_task(w.sched.run())
    try:
        async with asyncio.timeout(30):
            while len(w.backend.calls) < 1:
                await asyncio.sleep(0.01)
            QueueStore(w.store.directory, create=False).request_flush(qid)  # "another process"
            while len(w.backend.calls) < 2:
                await asyncio.sleep(0.01)
        assert [c[1] for c in w.backend.calls] == [qid, qid]  # retried long before 60 s
    finally:
        await w.sched.stop(grace=5)
        await asyncio.gather(runner, return_exceptions=True)
    assert w.store.take_flush_requests() == (False, set())


@aio
async def test_flush_during_an_attempt_retries_after_it(tmp_path: Path) -> None:
    w = World(tmp_path, later)
    w.backend.gate = asyncio.Event()
    qid = w.add()
    await w.sched.run_once()
    for _ in range(100):
        await asyncio.sleep(0)
    assert w.backend.active == 1
    w.sched.flush(qid)  # arrives while the first attempt is still talking to the server
    await w.sched.run_once()
    w.backend.gate.set()
    await w.settle()
    assert [c[1] for c in w.backend.calls] == [qid, qid]


@aio
async def test_failed_destination_is_not_retried_at_once(tmp_path: Path) -> None:
    w = World(tmp_path, later)
    first = w.add()
    await w.settle()
    second = w.add()  # same domain, just after the failure: it waits (RFC 5321 4.5.4.1)
    await w.settle()
    assert [c[1] for c in w.backend.calls] == [first]
    w.clock.now += 60  # the hold is over: one probe, which fails again and holds the rest
    await w.settle()
    assert len(w.backend.calls) == 2
    w.clock.now += 60
    await w.settle()
    assert {c[1] for c in w.backend.calls} == {first, second}
    assert w.store.load(second).recipients[0].attempts == 1
    other = w.add(rcpts=["dave@elsewhere.example"])  # another domain is not held up
    await w.settle()
    assert w.backend.calls[-1][1] == other


@aio
async def test_per_destination_connection_limit(tmp_path: Path) -> None:
    w = World(tmp_path, ok, per_destination_limit=2)
    w.backend.gate = asyncio.Event()
    for _ in range(6):
        w.add()
    w.add(rcpts=["x@other.example"])
    await w.sched.run_once()
    for _ in range(100):
        await asyncio.sleep(0)
    assert w.backend.active == 3  # two for example.net, one for other.example
    w.backend.gate.set()
    await w.settle()
    assert w.backend.max_active == 3 and len(w.backend.calls) == 7
    assert w.store.list() == []


@aio
async def test_messages_share_a_connection(tmp_path: Path) -> None:
    w = World(tmp_path, ok, session=True, per_destination_limit=1)
    queued = await queued_behind_a_gate(w, 5)  # all waiting: one session takes them all
    assert isinstance(w.backend, SessionBackend)
    assert w.backend.sessions == [queued]
    assert w.store.list() == []


async def queued_behind_a_gate(w: World, count: int) -> list[str]:
    """`count` messages to example.net, every one queued for the destination before the
    first send returns: the sessions then depend on the rules alone, not on how fast the
    thread pool loads the entries."""
    w.backend.gate = asyncio.Event()
    queued = [w.add(rcpts=[f"u{i}@example.net"]) for i in range(count)]
    await w.sched.run_once()
    for _ in range(10_000):
        dest = w.sched._dests.get("example.net")
        if dest is not None and len(dest.jobs) == count - 1 and w.backend.active:
            break
        await asyncio.sleep(0.001)
    w.backend.gate.set()
    await w.settle()
    return queued


@aio
async def test_a_connection_outlives_the_message_count_while_slots_are_free(
    tmp_path: Path,
) -> None:
    """Like Postfix's connection reuse: no count limit while nobody waits for a slot."""
    w = World(tmp_path, ok, session=True, per_destination_limit=1, messages_per_connection=2)
    queued = await queued_behind_a_gate(w, 5)
    assert isinstance(w.backend, SessionBackend)
    assert w.backend.sessions == [queued]


@aio
async def test_the_message_count_gives_a_taken_slot_back(tmp_path: Path) -> None:
    """Every connection slot taken: a session ends after its count, for another's turn."""
    w = World(tmp_path, ok, session=True, per_destination_limit=1, messages_per_connection=2,
              max_connections=1)  # fmt: skip
    queued = await queued_behind_a_gate(w, 5)
    assert isinstance(w.backend, SessionBackend)
    assert w.backend.sessions == [queued[:2], queued[2:4], queued[4:]]
    assert w.store.list() == []


@aio
async def test_a_connection_is_reused_for_a_time_only(tmp_path: Path) -> None:
    w = World(tmp_path, ok, session=True, per_destination_limit=1, connection_reuse_time=0.0)
    queued = [w.add(rcpts=[f"u{i}@example.net"]) for i in range(3)]
    await w.settle()
    assert isinstance(w.backend, SessionBackend)
    assert w.backend.sessions == [[q] for q in queued]


@aio
async def test_bounce_to_local_sender_goes_to_local_delivery(tmp_path: Path) -> None:
    w = World(tmp_path, never)
    w.sched.local_deliver = w.local.deliver
    w.sched.is_local = lambda domain: domain == "example.org"
    w.add(sender="alice@example.org")
    await w.settle()
    assert [(c[2], c[3]) for c in w.local.calls] == [("", ["alice@example.org"])]
    assert w.store.list() == []


@aio
async def test_recover_honours_schedule_and_mixed_results(tmp_path: Path) -> None:
    def script(m: StoredMessage, r: Recipient) -> RecipientResult:
        return later(m, r) if "@slow." in r.address else ok(m, r)

    w = World(tmp_path, script)
    qid = w.add(rcpts=["a@slow.example", "b@fast.example"])
    await w.settle()
    entry = w.store.load(qid)
    states = {r.address: r.state for r in entry.recipients}
    assert states == {"a@slow.example": PENDING, "b@fast.example": DELIVERED}
    assert len(w.backend.calls) == 2  # one job per domain
    # Restart: a new scheduler finds the entry and waits for its back-off.
    w2 = World(tmp_path, ok)
    w2.clock.now = w.clock.now
    await w2.sched.recover()
    await w2.settle()
    assert w2.backend.calls == []
    w2.clock.now += 60
    await w2.settle()
    assert [c[3] for c in w2.backend.calls] == [["a@slow.example"]]
    assert w2.store.list() == []


@aio
async def test_delete_during_delivery_is_not_resurrected(tmp_path: Path) -> None:
    w = World(tmp_path, later)

    def deleting(m: StoredMessage, r: Recipient) -> RecipientResult:
        assert w.store.remove(m.queue_id)  # `postier queue delete` while in flight
        return later(m, r)

    w.backend.script = deleting
    qid = w.add()
    await w.settle()
    assert w.store.list() == [] and w.sched.next_due(qid) is None


@aio
async def test_backend_exception_is_a_temporary_failure(tmp_path: Path) -> None:
    def boom(m: StoredMessage, r: Recipient) -> RecipientResult:
        raise RuntimeError("bug")

    w = World(tmp_path, boom)
    qid = w.add()
    await w.settle()
    r = w.store.load(qid).recipients[0]
    assert r.state == PENDING and r.attempts == 1 and "internal error" in r.reply


# --- through the real SmtpRelay to Postfix's smtp-sink on loopback -------------------------

ZONE = {
    "sink.test": {"MX": [(10, "mx.sink.test")]},
    "origin.test": {"MX": [(10, "mx.sink.test")]},
    "mx.sink.test": {"A": ["127.0.0.1"]},
}


@pytest.fixture
def dns_server() -> Iterator[DnsServer]:
    with DnsServer(ZONE) as server:
        yield server


def relay_world(tmp: Path, dns: DnsServer, port: int, **kw: object) -> World:
    w = World(tmp, ok, **kw)
    relay = SmtpRelay(
        "client.test",
        resolver=Resolver("127.0.0.1", dns.port, timeout=2.0),
        remote_port=port,
        timeouts=Timeouts.uniform(10),
    )
    w.sched.backend_for_domain = lambda domain: relay
    return w


@aio
async def test_relay_shares_one_connection(pub: Path, dns_server: DnsServer) -> None:
    with SmtpSink(pub / "sink") as sink:
        async with RecordingProxy("127.0.0.1", sink.port) as proxy:
            w = relay_world(pub, dns_server, proxy.port, per_destination_limit=1)
            queued = [w.add("sender@origin.test", [f"u{i}@sink.test"]) for i in range(4)]
            await w.settle()
            assert w.store.list() == []
            assert proxy.connections == 1
            assert proxy.sent.count(b"MAIL FROM:<sender@origin.test>") == 4
        for _ in range(200):  # smtp-sink writes its dump after replying: bounded wait
            if len(sink.messages()) == 4:
                break
            await asyncio.sleep(0.05)
        assert len(sink.messages()) == 4, queued


@aio
async def test_relay_4xx_then_success_after_queue_flush(pub: Path, dns_server: DnsServer) -> None:
    with SmtpSink(pub / "soft", options=("-r", "RCPT")) as soft:
        w = relay_world(pub, dns_server, soft.port)
        qid = w.add("sender@origin.test", ["bob@sink.test"])
        await w.settle()
        r = w.store.load(qid).recipients[0]
        assert (r.state, r.attempts, r.code) == (PENDING, 1, 450)
        assert r.remote_mta == "mx.sink.test"
        port = soft.port
    with SmtpSink(pub / "good", port=port) as good:
        assert queue_cli_flush(w.store.directory, qid) == 0  # what `postier queue flush` does
        await w.sched.poll_requests()
        await w.settle()
        assert w.store.list() == []
        assert good.proc is not None


@aio
async def test_relay_5xx_bounce_is_a_dsn(pub: Path, dns_server: DnsServer) -> None:
    with SmtpSink(pub / "hard", options=("-f", "RCPT")) as hard:
        w = relay_world(pub, dns_server, hard.port)
        qid = w.add("sender@origin.test", ["bob@sink.test"])
        await w.sched.run_once()
        await w.sched.drain()
        with pytest.raises(EntryNotFound):
            w.store.load(qid)
        [bounce] = w.bounces()
        [block] = status_blocks(bounce)[1:]
        assert block["Action"] == "failed" and block["Status"].startswith("5.")
        assert block["Diagnostic-Code"].startswith("smtp; 5")
        assert block["Remote-MTA"] == "dns; mx.sink.test"
        headers = next(p for p in bounce.walk() if p.get_content_type() == "text/rfc822-headers")
        assert b"Subject: hello there" in headers.get_payload(decode=True)
        await w.settle()  # the bounce to origin.test is refused too: dropped, no loop
        assert w.store.list() == []


def queue_cli_flush(directory: Path, qid: str) -> int:
    parser = argparse.ArgumentParser()
    queue_cli.add_arguments(parser)
    return queue_cli.run(
        parser.parse_args(["-Q", str(directory), "flush", qid]),
        out=io.StringIO(),
        err=io.StringIO(),
    )


@aio
async def test_one_scheduler_per_queue(tmp_path: Path) -> None:
    first, second = World(tmp_path), World(tmp_path)
    await first.sched.recover()
    with pytest.raises(RuntimeError, match="another postier daemon"):
        await second.sched.recover()
    await first.sched.stop()
    await second.sched.recover()  # free again once the first has stopped
    await second.sched.stop()


@aio
async def test_broken_backend_lookup_keeps_the_mail(tmp_path: Path) -> None:
    w = World(tmp_path, ok)
    good = w.sched.backend_for_domain

    def broken(domain: str) -> Backend:
        raise RuntimeError("misconfigured")

    w.sched.backend_for_domain = broken
    qid = w.add()
    await w.settle()
    assert w.store.load(qid).recipients[0].attempts == 0  # not an attempt, not lost
    w.sched.backend_for_domain = good
    w.clock.now += 60
    await w.settle()
    assert w.store.list() == [] and len(w.backend.calls) == 1
