"""`apply_results`: what one attempt means for a queue entry, decided without any I/O.

Every branch of the scheduler's decision, on plain values: delivered, temporary with
back-off (the schedule, its last step repeating, never past expiry), permanent → a failed
report, expiry → a failed report with 4.4.7, the delay warning once, and results that do
not concern a pending recipient ignored. The input entry is never changed.
"""

from __future__ import annotations

import copy
import random

from postier.delivery.base import Recipient, RecipientResult, delivered, permanent, temporary
from postier.queue.decide import Change, RetryPolicy, apply_results
from postier.queue.entry import DELIVERED, FAILED, PENDING, QueueEntry, RecipientState

ARRIVAL = 1_000_000.0
POLICY = RetryPolicy(
    schedule=(60, 300), max_age=1000, delay_warning_after=500, jitter=0.0, rng=random.Random(1)
)


def entry(*addresses: str, **fields: object) -> QueueEntry:
    e = QueueEntry("1K1M5C38MKP00YKK", "alice@example.org", ARRIVAL, 100, 20,
                   [RecipientState(a) for a in addresses])  # fmt: skip
    for name, value in fields.items():
        setattr(e, name, value)
    return e


def greylisted(address: str) -> RecipientResult:
    return temporary(Recipient(address), "Greylisted", 451, "4.7.1")


def test_delivered_is_final_and_reports_nothing() -> None:
    before = entry("bob@example.net")
    kept = copy.deepcopy(before)
    out = apply_results(before, [delivered(Recipient("bob@example.net"))], ARRIVAL + 1, POLICY,
                        remote_mta="mx.example.net")  # fmt: skip
    [bob] = out.entry.recipients
    assert (bob.state, bob.attempts, bob.code, bob.remote_mta) == (DELIVERED, 1, 250,
                                                                   "mx.example.net")  # fmt: skip
    assert out.final and out.failed == () and out.delayed == ()
    assert out.changes == (Change("bob@example.net", "delivered", 1, "250 2.0.0 Delivered"),)
    assert before == kept  # pure: the input is untouched


def test_temporary_backs_off_along_the_schedule_then_repeats_its_last_step() -> None:
    e = entry("bob@example.net")
    now = ARRIVAL
    delays = []
    for _ in range(3):
        e = apply_results(e, [greylisted("bob@example.net")], now, POLICY).entry
        delays.append(e.recipients[0].next_attempt - now)
        now = e.recipients[0].next_attempt
    assert delays == [60, 300, 300]
    [bob] = e.recipients
    assert bob.state is PENDING and bob.attempts == 3
    assert bob.last_reply == "451 4.7.1 Greylisted"


def test_the_next_attempt_never_falls_after_expiry() -> None:
    out = apply_results(entry("bob@example.net"), [greylisted("bob@example.net")],
                        ARRIVAL + 980, POLICY)  # fmt: skip
    assert out.entry.recipients[0].next_attempt == ARRIVAL + 1000
    assert out.next_attempt() == ARRIVAL + 1000
    assert out.next_attempt(skip_domains={"example.net"}) is None


def test_jitter_spreads_within_its_bounds() -> None:
    policy = RetryPolicy(schedule=(100,), jitter=0.1, rng=random.Random(7))
    draws = {policy.backoff(1) for _ in range(50)}
    assert all(90 <= d <= 110 for d in draws) and len(draws) > 1


def test_permanent_fails_only_that_recipient_and_reports_it() -> None:
    results = [permanent(Recipient("ghost@example.net"), "No such user", 550, "5.1.1"),
               greylisted("bob@example.net")]  # fmt: skip
    out = apply_results(entry("ghost@example.net", "bob@example.net"), results, ARRIVAL, POLICY)
    ghost, bob = out.entry.recipients
    assert ghost.state is FAILED and bob.state is PENDING and not out.final
    [report] = out.failed
    assert (report.address, report.status) == ("ghost@example.net", "5.1.1")
    assert report.diagnostic == "550 5.1.1 No such user"
    assert [c.event for c in out.changes] == ["bounced", "deferred"]


def test_temporary_at_expiry_fails_with_4_4_7() -> None:
    out = apply_results(entry("bob@example.net"), [greylisted("bob@example.net")],
                        ARRIVAL + 1000, POLICY)  # fmt: skip
    assert out.final and out.entry.recipients[0].state is FAILED
    [report] = out.failed
    assert report.status == "4.4.7" and report.diagnostic == "451 4.7.1 Greylisted"
    assert out.changes[0].event == "expired"


def test_delay_warning_once_for_recipients_already_tried() -> None:
    e = entry("bob@example.net", "carol@example.org")
    early = apply_results(e, [greylisted("bob@example.net")], ARRIVAL + 100, POLICY)
    assert early.delayed == () and not early.entry.delay_warned
    late = apply_results(early.entry, [greylisted("bob@example.net")], ARRIVAL + 500, POLICY)
    [report] = late.delayed  # carol was never tried: nothing to say about her yet
    assert (report.address, report.status) == ("bob@example.net", "4.7.1")
    assert late.entry.delay_warned
    again = apply_results(late.entry, [greylisted("bob@example.net")], ARRIVAL + 900, POLICY)
    assert again.delayed == ()


def test_no_delay_warning_when_turned_off() -> None:
    policy = RetryPolicy(schedule=(60,), max_age=1000, delay_warning_after=0, jitter=0.0)
    out = apply_results(entry("bob@example.net"), [greylisted("bob@example.net")],
                        ARRIVAL + 900, policy)  # fmt: skip
    assert out.delayed == () and not out.entry.delay_warned


def test_results_for_unknown_or_final_recipients_are_ignored() -> None:
    e = entry("bob@example.net", "carol@example.net")
    e.recipients[1].state = DELIVERED
    results = [greylisted("carol@example.net"), greylisted("stranger@example.net")]
    out = apply_results(e, results, ARRIVAL, POLICY)
    assert out.changes == () and out.entry == e
