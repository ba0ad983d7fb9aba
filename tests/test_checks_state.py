"""Rate limits and greylisting state: exact counts, time with an injectable clock, and the
state shared between processes and kept across a restart (a new object on the same file)."""

from __future__ import annotations

import multiprocessing
import threading
from pathlib import Path

import pytest

from postier.checks.greylist_store import GreylistStore, client_network
from postier.checks.ratelimit import RateLimiter, client_key
from postier.checks.sqlite_state import StateFile


class Clock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_exactly_n_then_refused_then_refills(tmp_path: Path) -> None:
    clock = Clock()
    rl = RateLimiter(tmp_path / "rate.sqlite", clock)
    assert [rl.allow("1.2.3.4", 5, 60) for _ in range(6)] == [True] * 5 + [False]
    clock.now += 11.9  # one allowance comes back every 12 s
    assert not rl.allow("1.2.3.4", 5, 60)
    clock.now += 0.2
    assert rl.allow("1.2.3.4", 5, 60)
    assert not rl.allow("1.2.3.4", 5, 60)
    clock.now += 60
    assert [rl.allow("1.2.3.4", 5, 60) for _ in range(6)] == [True] * 5 + [False]


def test_keys_are_independent_and_zero_is_unlimited(tmp_path: Path) -> None:
    rl = RateLimiter(tmp_path / "rate.sqlite", Clock())
    assert rl.allow("a", 1, 60) and not rl.allow("a", 1, 60)
    assert rl.allow("b", 1, 60)
    assert all(rl.allow("c", 0, 60) for _ in range(100))


def test_cost_counts_several_at_once(tmp_path: Path) -> None:
    rl = RateLimiter(tmp_path / "rate.sqlite", Clock())
    assert rl.allow("u", 10, 3600, cost=7)
    assert not rl.allow("u", 10, 3600, cost=4)
    assert rl.allow("u", 10, 3600, cost=3)


def test_client_key_groups_ipv6_by_64() -> None:
    assert client_key("2001:db8:1:2:3::4") == client_key("2001:db8:1:2:ffff::1")
    assert client_key("2001:db8:1:3::4") != client_key("2001:db8:1:2::4")
    assert client_key("::ffff:192.0.2.1") == "192.0.2.1"


def _spend(path: str, n: int, queue: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    rl = RateLimiter(Path(path), lambda: 1_000_000.0)
    queue.put(sum(rl.allow("shared", 50, 60) for _ in range(n)))


def test_count_is_shared_by_processes(tmp_path: Path) -> None:
    """Two workers spending the same allowance at once get exactly the limit between them."""
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_spend, args=(str(tmp_path / "r.sqlite"), 40, queue)) for _ in "ab"]
    for p in procs:
        p.start()
    totals = [queue.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=30)
    assert sum(totals) == 50


def test_greylist_first_defer_early_defer_window_pass(tmp_path: Path) -> None:
    clock = Clock()
    gl = GreylistStore(tmp_path / "gl.sqlite", delay=300, expire=86400, clock=clock)
    first = gl.check("192.0.2.10", "a@remote.example", "alice@example.org")
    assert not first.passed and first.reason == "new"
    clock.now += 100
    early = gl.check("192.0.2.10", "a@remote.example", "alice@example.org")
    assert not early.passed and early.reason == "too-early"
    assert early.retry_after == pytest.approx(200)
    clock.now += 250
    assert gl.check("192.0.2.10", "a@remote.example", "alice@example.org").passed
    # The network passed: another sender, recipient and address of the /24 pass at once.
    assert gl.check("192.0.2.99", "b@other.example", "bob@example.org").reason == "known-client"


def test_greylist_pass_survives_restart_and_expires(tmp_path: Path) -> None:
    clock = Clock()
    path = tmp_path / "gl.sqlite"
    gl = GreylistStore(path, delay=300, pass_ttl=36 * 86400, clock=clock)
    gl.check("2001:db8::1", "a@r.example", "x@example.org")
    clock.now += 301
    assert gl.check("2001:db8::1", "a@r.example", "x@example.org").passed
    gl.close()
    again = GreylistStore(path, delay=300, pass_ttl=36 * 86400, clock=clock)
    clock.now += 35 * 86400
    assert again.check("2001:db8::ffff", "z@r.example", "y@example.org").passed
    clock.now += 2 * 86400
    assert not again.check("2001:db8::1", "a@r.example", "x@example.org").passed


def test_greylist_window_expires(tmp_path: Path) -> None:
    clock = Clock()
    gl = GreylistStore(tmp_path / "gl.sqlite", delay=300, expire=3600, clock=clock)
    gl.check("192.0.2.1", "s@r.example", "r@example.org")
    clock.now += 4000  # too late: the first attempt is forgotten and counts as new
    late = gl.check("192.0.2.1", "s@r.example", "r@example.org")
    assert not late.passed and late.reason == "expired"


def test_client_network() -> None:
    assert client_network("192.0.2.77") == "192.0.2.0/24"
    assert client_network("2001:db8:a:b:c::1") == "2001:db8:a:b::/64"
    assert client_network("::ffff:198.51.100.3") == "198.51.100.0/24"


def test_workers_opening_a_new_state_file_at_once_all_get_it(tmp_path: Path) -> None:
    """The workers start together and open the same new file at once: SQLite fails one of
    two connections switching it to WAL with "database is locked" at once (no busy wait);
    every one must still open it. 30 new files, 4 openers each, released together."""
    schema = "CREATE TABLE IF NOT EXISTS hits (key TEXT PRIMARY KEY, n INTEGER NOT NULL);"
    errors: list[BaseException] = []
    for i in range(30):
        path = tmp_path / f"state-{i}.sqlite"
        start = threading.Barrier(4)

        def open_it(path: Path = path, start: threading.Barrier = start) -> None:
            start.wait()
            try:
                conn = StateFile(path, schema).connection()
                conn.execute("INSERT OR IGNORE INTO hits VALUES ('k', 1)")
            except BaseException as exc:  # collected: the assertion below names it
                errors.append(exc)

        openers = [threading.Thread(target=open_it) for _ in range(4)]
        for t in openers:
            t.start()
        for t in openers:
            t.join(60)
    assert errors == []
