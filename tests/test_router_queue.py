"""The router hands every undelivered copy to the queue, in one entry per message.

A message for a remote recipient and a local one whose mailbox cannot be written: the remote
recipient is committed first, then the failed local one joins that same entry (the queue
id is the message's), and the client gets its 250 once both are durable.
"""

from __future__ import annotations

import smtplib
from pathlib import Path

from postier.queue.entry import PENDING
from postier.queue.store import QueueStore
from tests.server import free_port, make_server


def test_remote_and_failed_local_recipients_share_one_queue_entry(tmp_path: Path) -> None:
    # No DNS answers (a closed loopback port): the remote attempt fails temporarily.
    srv = make_server(tmp_path / "srv", extra=["--dns-server", f"127.0.0.1:{free_port()}"])
    srv.start()
    try:
        srv.mail_root.mkdir(exist_ok=True)
        (srv.mail_root / "alice").write_bytes(b"not a maildir\n")  # alice's write fails
        with smtplib.SMTP("127.0.0.1", srv.local_port, timeout=30) as c:
            c.ehlo("cron.test")
            assert c.mail("cron@example.org")[0] == 250
            assert c.rcpt("someone@remote.test")[0] == 250
            assert c.rcpt("alice@example.org")[0] == 250
            code, text = c.data(b"Subject: both\r\n\r\nx\r\n")
            assert code == 250, (text, srv.log())
    finally:
        assert srv.stop() == 0
    [entry] = [e for e in QueueStore(srv.root / "queue", create=False).list() if e.sender]
    states = {r.address: r.state for r in entry.recipients}
    assert states == {"someone@remote.test": PENDING, "alice@example.org": PENDING}
