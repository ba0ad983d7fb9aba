"""The queue keeps REQUIRETLS with the entry and each recipient's TLS policy and last TLS
failure (what `postier queue show` prints), and reads entries written before these keys."""

from __future__ import annotations

import dataclasses
import io
import json
from pathlib import Path

from postier.delivery.base import Recipient, RecipientResult, Status
from postier.queue import cli
from postier.queue.decide import RetryPolicy, apply_results
from postier.queue.entry import QueueEntry, RecipientState
from postier.queue.store import QueueStore
from tests.outbound_helpers import stored


def test_entry_round_trip_and_old_entries() -> None:
    entry = QueueEntry(
        "1K1M8HGXFC4009EN", "s@origin.test", 1.0, 10, 2, [RecipientState("a@x.test")]
    )
    entry.requiretls = True
    entry.recipients[0].tls_policy = "dane"
    entry.recipients[0].tls_failure = "tlsa-invalid: no match"
    again = QueueEntry.from_json(entry.to_json())
    assert again.requiretls and again.recipients[0].tls_failure == "tlsa-invalid: no match"
    old = json.loads(entry.to_json())
    del old["requiretls"], old["recipients"][0]["tls_policy"], old["recipients"][0]["tls_failure"]
    before = QueueEntry.from_json(json.dumps(old).encode())
    assert not before.requiretls and before.recipients[0].tls_policy == ""


def test_results_keep_the_last_tls_failure(tmp_path: Path) -> None:
    store = QueueStore(tmp_path / "q")
    message = dataclasses.replace(stored(tmp_path), requiretls=True, queue_id="")
    entry = store.commit(message, message.sender, ["alice@sts.test"])
    assert store.message(entry).requiretls
    r = Recipient("alice@sts.test")
    failed = RecipientResult(r, Status.TEMPORARY, 451, "4.7.5", "TLS required", "mta-sts",
                             "certificate-expired: certificate of mx: expired")  # fmt: skip
    policy = RetryPolicy(jitter=0.0)
    after = apply_results(entry, [failed], 10.0, policy).entry
    # A later attempt without a TLS failure (another cause) keeps the last one known.
    later = RecipientResult(r, Status.TEMPORARY, 451, "4.4.1", "refused", "mta-sts", "")
    after = apply_results(after, [later], 20.0, policy).entry
    rs = after.recipients[0]
    assert (rs.tls_policy, rs.tls_failure.split(":")[0]) == ("mta-sts", "certificate-expired")
    store.update(after)
    out = io.StringIO()
    cli.cmd_show(store, store.load(entry.queue_id), out, 30.0)
    text = out.getvalue()
    assert "flags: requiretls" in text
    assert "  TLS policy: mta-sts\n" in text
    assert "  last TLS failure: certificate-expired: certificate of mx: expired\n" in text
