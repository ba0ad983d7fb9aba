"""Back-pressure: a client that sends commands and never reads the replies cannot make the
server read (and hold) more than a bounded amount of its input.

The session stops processing when its replies back up (the transport's write buffer is
full), and stops reading once COMMAND_BACKLOG bytes of commands wait (net/session.py). From
then on the kernel's socket buffers fill and the client's send blocks. Without that pause the
server reads on into memory while its task waits to write: its resident memory grew by about
10 to 30 MiB in this test (more with a faster client), against about 1 MiB with it.
"""

from __future__ import annotations

import socket
import time
from pathlib import Path

from tests.server import make_server

FLOOD = 64 * 1024 * 1024  # far more than the socket buffers of both ends can hold
GROWTH_LIMIT = 8 * 1024 * 1024  # resident memory the flood may add to the server


def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        line = next(line for line in f if line.startswith("VmRSS:"))
    return int(line.split()[1]) * 1024


def test_a_client_that_never_reads_replies_is_stopped_by_back_pressure(tmp_path: Path) -> None:
    srv = make_server(tmp_path).start()
    try:
        c = socket.create_connection(("127.0.0.1", srv.mx_port), timeout=10)
        c.recv(1024)  # the greeting
        c.sendall(b"EHLO flood.test\r\n")
        time.sleep(0.2)
        before = _rss(srv.proc.pid)
        c.setblocking(False)
        block = b"RSET\r\n" * 10_000  # RSET may be pipelined (NOOP ends a group)
        sent = 0
        stalled_since: float | None = None
        deadline = time.monotonic() + 60
        while sent < FLOOD and time.monotonic() < deadline:
            try:
                sent += c.send(block)
                stalled_since = None
            except BlockingIOError:
                # blocked: the server stopped reading; wait a while to be sure it stays so
                stalled_since = stalled_since or time.monotonic()
                if time.monotonic() - stalled_since > 2.0:
                    break
                time.sleep(0.01)
        assert sent < FLOOD, "the server read everything: no back-pressure"
        assert srv.proc.poll() is None
        grown = _rss(srv.proc.pid) - before
        assert grown < GROWTH_LIMIT, f"the server took {grown} bytes of the flood into memory"
        c.close()
    finally:
        srv.stop()
