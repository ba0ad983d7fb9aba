"""The idle-connection client of bench/idle.py: open N SMTP connections and hold them.

Run by bench/idle.py in a child process of its own (so that its memory and CPU are never the
server's); it imports nothing from bench/. It raises its own RLIMIT_NOFILE soft limit to the
hard limit (each connection is a descriptor), opens the connections a bounded number at a
time (a burst of 10,000 SYNs would overflow the listen backlog), reads each greeting, sends
EHLO and reads its reply with ``--ehlo``, and then holds them all, reading nothing more:

    python3 bench/idle_client.py --port 2525 -n 10000 [--ehlo] [--sources 2]

When every connection is open (or has failed, or ``--deadline`` passed) it writes one JSON
line to stdout: ``{"open": N, "failed": N, "seconds": S, "errors": [...]}``. Then it waits
for its stdin to close, closes every connection and exits: the parent measures the server
in between. Plain sockets, not streams: the client should cost little and start fast.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import resource
import socket
import sys
import time

# Connects in flight at once: under the listen backlog (1024 for postier and aiosmtpd).
IN_FLIGHT = 256
MAX_REPLY = 4096


def raise_nofile(wanted: int) -> int:
    """The soft descriptor limit raised to the hard limit when it is below ``wanted``."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < wanted and (hard == resource.RLIM_INFINITY or hard > soft):
        soft = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    return soft


async def read_reply(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> bytes:
    """Bytes up to the end of one (possibly multi-line) reply: the line with a space after
    the code. An idle client reads nothing else, so nothing can follow it."""
    data = b""
    while True:
        chunk = await loop.sock_recv(sock, MAX_REPLY)
        if not chunk:
            raise ConnectionError(f"closed after {data[:80]!r}")
        data += chunk
        if data.endswith(b"\r\n"):
            last = data[:-2].rsplit(b"\r\n", 1)[-1]
            if len(last) >= 4 and last[3:4] == b" ":
                return data
        if len(data) > 8 * MAX_REPLY:
            raise ConnectionError(f"reply too long: {data[:80]!r}")


async def open_one(
    loop: asyncio.AbstractEventLoop, host: str, port: int, source: str, ehlo: bool
) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        if source != "127.0.0.1":
            sock.bind((source, 0))
        await loop.sock_connect(sock, (host, port))
        greeting = await read_reply(loop, sock)
        if not greeting.startswith(b"220"):
            raise ConnectionError(f"greeting {greeting[:80]!r}")
        if ehlo:
            await loop.sock_sendall(sock, b"EHLO idle.bench.test\r\n")
            reply = await read_reply(loop, sock)
            if not reply.startswith(b"250"):
                raise ConnectionError(f"EHLO {reply[:80]!r}")
    except BaseException:
        sock.close()
        raise
    return sock


async def open_all(opts: argparse.Namespace) -> tuple[list[socket.socket], list[str], float]:
    loop = asyncio.get_running_loop()
    slots = asyncio.Semaphore(IN_FLIGHT)
    sources = [f"127.0.0.{i + 1}" for i in range(opts.sources)]
    held: list[socket.socket] = []
    errors: list[str] = []
    started = time.monotonic()

    async def one(i: int) -> None:
        async with slots:
            try:
                held.append(
                    await open_one(loop, opts.host, opts.port, sources[i % len(sources)], opts.ehlo)
                )
            except (OSError, ConnectionError) as e:
                errors.append(f"{type(e).__name__}: {e}")

    tasks = [loop.create_task(one(i)) for i in range(opts.connections)]
    _, pending = await asyncio.wait(tasks, timeout=opts.deadline)
    for t in pending:
        t.cancel()
    if pending:
        await asyncio.wait(pending)
        errors.append(f"deadline: {len(pending)} connections not open after {opts.deadline} s")
    return held, errors, time.monotonic() - started


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="idle_client.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("-n", "--connections", type=int, default=10000)
    p.add_argument("--ehlo", action="store_true", help="send EHLO after the greeting")
    p.add_argument("--sources", type=int, default=1, help="spread over 127.0.0.1..127.0.0.N")
    p.add_argument("--deadline", type=float, default=120.0, help="seconds to open them all")
    opts = p.parse_args(argv)
    limit = raise_nofile(opts.connections + 64)
    held, errors, seconds = asyncio.run(open_all(opts))
    report = {
        "open": len(held),
        "failed": opts.connections - len(held),
        "seconds": round(seconds, 3),
        "nofile": limit,
        "errors": errors[:10],
    }
    print(json.dumps(report), flush=True)
    with contextlib.suppress(OSError):
        sys.stdin.buffer.read()  # until the parent has measured and closes our stdin
    for sock in held:
        sock.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
