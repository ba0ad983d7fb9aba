"""The queue entry's file format: readable by old and new code, extensible, errors named.

Envelope files written by earlier versions (states as the strings "pending", "delivered",
"failed") load with delivery's `Status`; a key this version does not know (the DSN
parameters of a later one) is ignored; `postier queue list` and `show` name an unreadable
entry by its id instead of crashing, and the listing goes on.
"""

from __future__ import annotations

import argparse
import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from postier.delivery.base import Status, StoredMessage
from postier.queue import cli
from postier.queue.entry import DELIVERED, FAILED, PENDING, QueueEntry
from postier.queue.ids import new_queue_id
from postier.queue.store import BadEntry, QueueStore

NOW = 2_000_000_000.0


def commit(store: QueueStore, tmp: Path, rcpts: list[str]) -> str:
    qid = new_queue_id()
    head = b"Return-Path: <alice@example.org>\n"
    data = head + b"From: alice@example.org\nSubject: hi\n\nbody\n"
    path = tmp / qid
    path.write_bytes(data)
    spool = StoredMessage(path, len(data), len(head), "alice@example.org", qid, NOW - 60)
    store.commit(spool, "alice@example.org", rcpts)
    path.unlink()
    return qid


def call(store: QueueStore, *argv: str) -> tuple[int, str, str]:
    parser = argparse.ArgumentParser(prog="postier queue")
    cli.add_arguments(parser)
    out, err = io.StringIO(), io.StringIO()
    args = parser.parse_args(["-Q", str(store.directory), *argv])
    code = cli.run(args, out=out, err=err, clock=lambda: NOW)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture
def store(tmp_path: Path) -> QueueStore:
    return QueueStore(tmp_path / "q")


def test_states_are_status_in_memory_and_the_old_names_on_disk(
    store: QueueStore, tmp_path: Path
) -> None:
    qid = commit(store, tmp_path, ["a@x.example", "b@x.example", "c@x.example"])
    entry = store.load(qid)
    assert [r.state for r in entry.recipients] == [Status.QUEUED] * 3 == [PENDING] * 3
    entry.recipients[1].state = DELIVERED
    entry.recipients[2].state = FAILED
    store.update(entry)
    on_disk = json.loads(store.env_path(qid).read_bytes())
    assert [r["state"] for r in on_disk["recipients"]] == ["pending", "delivered", "failed"]
    assert on_disk["version"] == 1
    again = store.load(qid)
    assert [r.state for r in again.recipients] == [Status.QUEUED, Status.DELIVERED,
                                                    Status.PERMANENT]  # fmt: skip
    assert again == entry


def test_unknown_keys_are_ignored_and_missing_ones_take_defaults(
    store: QueueStore, tmp_path: Path
) -> None:
    qid = commit(store, tmp_path, ["bob@example.net"])
    data = json.loads(store.env_path(qid).read_bytes())
    data["envid"] = "QQ314159"  # what a later version may add
    data["ret"] = "HDRS"
    data["recipients"][0]["notify"] = ["FAILURE", "DELAY"]
    data["recipients"][0]["orcpt"] = "rfc822;bob@example.net"
    del data["delay_warned"]  # what an earlier version may not have written
    del data["recipients"][0]["remote_mta"]
    store.env_path(qid).write_text(json.dumps(data))
    entry = store.load(qid)
    assert entry.recipients[0].address == "bob@example.net"
    assert entry.delay_warned is False and entry.recipients[0].remote_mta == ""
    code, out, err = call(store, "show", qid)
    assert code == 0 and "recipient: bob@example.net\n  state: pending\n" in out, err


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(lambda d: d.pop("sender"), id="missing-key"),
        pytest.param(lambda d: d["recipients"][0].update(state="lost"), id="unknown-state"),
        pytest.param(lambda d: d.update(recipients=["bob"]), id="recipient-not-object"),
        pytest.param(lambda d: d.update(queue_id="../x"), id="bad-id"),
    ],
)
def test_a_bad_entry_is_named_by_its_id(
    store: QueueStore, tmp_path: Path, damage: Callable[[dict[str, Any]], object]
) -> None:
    good = commit(store, tmp_path, ["ok@example.net"])
    bad = commit(store, tmp_path, ["bob@example.net"])
    data = json.loads(store.env_path(bad).read_bytes())
    damage(data)
    store.env_path(bad).write_text(json.dumps(data))
    with pytest.raises(BadEntry, match=bad):
        store.load(bad)

    code, out, err = call(store, "list")
    assert code == 1
    assert good in out and "ok@example.net" in out and bad not in out
    assert err.startswith(f"postier queue list: {bad}: unreadable envelope: "), err

    code, out, err = call(store, "show", bad)
    assert code == 1 and out == ""
    assert err.startswith(f"postier queue show: {bad}: unreadable envelope: "), err


def test_not_json_at_all_is_a_bad_entry(store: QueueStore, tmp_path: Path) -> None:
    qid = commit(store, tmp_path, ["bob@example.net"])
    store.env_path(qid).write_bytes(b"\x00garbage")
    with pytest.raises(BadEntry, match=qid):
        store.load(qid)
    with pytest.raises(ValueError):
        QueueEntry.from_json(b"[1, 2]")
