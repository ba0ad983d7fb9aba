"""A chunk that cannot reach the disk fails the BDAT transaction at LAST (451), on a real,
full filesystem (the tmpfs of tests/test_storage_faults.py), and nothing is left behind."""

from __future__ import annotations

import os
import re

import pytest

from tests.test_bdat_integration import Client
from tests.test_storage_faults import (  # noqa: F401 - env is a fixture used by name
    Env,
    env,
    mailbox_items,
    markers,
    message,
    spool_leftovers,
)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")


def test_a_chunk_that_fails_to_store_fails_the_transaction_at_last(env: Env) -> None:  # noqa: F811
    srv = env.server("maildir", min_free=0, queue_on_tmpfs=False)
    filler = env.fill(leave=40_000)
    content = message("mk-1", 600_000)
    piece = 100_000
    client = Client(srv.mx_port)
    try:
        assert client.command(b"EHLO client.test")[0] == 250
        client.send(b"MAIL FROM:<sender@example.net>\r\nRCPT TO:<alice@example.org>\r\n")
        assert [client.reply()[0], client.reply()[0]] == [250, 250]
        chunks = [content[i : i + piece] for i in range(0, len(content), piece)]
        for chunk in chunks:
            client.send(b"BDAT %d\r\n" % len(chunk) + chunk)
        client.send(b"BDAT 0 LAST\r\n")
        replies = [client.reply() for _ in range(len(chunks) + 1)]
        # Every chunk is read (the session stays in sync); the transaction fails at LAST.
        assert [code for code, _ in replies[:-1]] == [250] * len(chunks)
        code, text = replies[-1]
        assert code == 451 and "4.3.0" in text, text
        assert re.search(r"event=(store-failed|spool-write-failed) .*No space left", srv.log())
        assert mailbox_items(srv.mail_root, "maildir") == []
        assert spool_leftovers(srv.mail_root) == []

        filler.unlink()  # room again: the same session sends the next message
        small = message("mk-2", 2000)
        client.send(b"MAIL FROM:<sender@example.net>\r\nRCPT TO:<alice@example.org>\r\n")
        client.send(b"BDAT %d LAST\r\n" % len(small) + small)
        assert [client.reply()[0] for _ in range(3)] == [250, 250, 250]
    finally:
        client.close()
    items = mailbox_items(srv.mail_root, "maildir")
    assert [markers(i) for i in items] == [["mk-2"]]
