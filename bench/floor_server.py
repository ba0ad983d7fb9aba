"""The floor: the least work a Python SMTP server on uvloop does for one durable message.

Not a server to run, a measuring stick (``bench/run.py --servers floor``). It answers every
command with a canned reply, reads the content to the final dot, and makes one copy per
recipient durable the way postier does before its 250: the file written and fsync'd in a
thread pool (8 threads, as postier), renamed from tmp/ into new/, and new/ fsync'd. There is
no parsing beyond the verb and the recipient's local part, no limits, no logging, no checks,
no dot-unstuffing and no Received header: whatever postier spends above this row is the
price of its own layers (the session, the protocol engine, the handler, logging), and this
row's figures are what a Python server on this machine and loop can reach at all.

    python3 bench/floor_server.py --port 2525 --root MAILROOT --workers 2

``--workers N`` forks N processes that accept on the one listening socket, like postier's
``--workers``. It imports nothing from bench/ or postier.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import time
from concurrent.futures import ThreadPoolExecutor

HOSTNAME = b"bench.floor.test"
END = b"\r\n.\r\n"


class Store:
    """One copy into ROOT/user/: tmp/, fsync, rename into new/, fsync of new/ (blocking)."""

    def __init__(self, root: str) -> None:
        self.root = root
        self.counter = 0
        self.pid = os.getpid()

    def deliver(self, user: str, data: bytes, name: str) -> None:
        mailbox = os.path.join(self.root, user)
        if not os.path.isdir(os.path.join(mailbox, "tmp")):
            for sub in ("tmp", "new", "cur"):
                os.makedirs(os.path.join(mailbox, sub), mode=0o700, exist_ok=True)
        tmp = os.path.join(mailbox, "tmp", name)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        new = os.path.join(mailbox, "new")
        os.rename(tmp, os.path.join(new, name))
        dfd = os.open(new, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)

    def name(self) -> str:
        self.counter += 1
        now = time.time()
        return f"{int(now)}.M{int(now % 1 * 1e6)}P{self.pid}Q{self.counter}.floor"


class FloorProtocol(asyncio.Protocol):
    """Canned replies; the content collected until CRLF.CRLF, then stored, then 250."""

    def __init__(self, store: Store, pool: ThreadPoolExecutor) -> None:
        self.store = store
        self.pool = pool
        self.buffer = b""
        self.content: list[bytes] | None = None
        self.tail = b""
        self.users: list[str] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]
        self.transport.write(b"220 " + HOSTNAME + b" ESMTP floor\r\n")

    def data_received(self, data: bytes) -> None:
        if self.content is not None:
            self._content(data)
            return
        self.buffer += data
        while self.content is None and (end := self.buffer.find(b"\r\n")) >= 0:
            line, self.buffer = self.buffer[:end], self.buffer[end + 2 :]
            self._command(line)
        if self.content is not None and self.buffer:
            rest, self.buffer = self.buffer, b""
            self._content(rest)

    def _command(self, line: bytes) -> None:
        verb = line[:4].upper()
        write = self.transport.write
        if verb == b"EHLO":
            write(b"250-" + HOSTNAME + b"\r\n250-PIPELINING\r\n250 8BITMIME\r\n")
        elif verb == b"RCPT":
            address = line[line.find(b"<") + 1 : line.rfind(b">")]
            self.users.append(address.rpartition(b"@")[0].decode("ascii", "replace").lower())
            write(b"250 2.1.5 OK\r\n")
        elif verb == b"DATA":
            self.content, self.tail = [], b""
            write(b"354 End data with <CR><LF>.<CR><LF>\r\n")
        elif verb == b"QUIT":
            write(b"221 2.0.0 Bye\r\n")
            self.transport.close()
        elif verb == b"RSET" or verb == b"MAIL":
            self.users = []
            write(b"250 2.0.0 OK\r\n")
        else:
            write(b"250 2.0.0 OK\r\n")

    def _content(self, data: bytes) -> None:
        assert self.content is not None
        seen = self.tail + data
        end = seen.find(END)
        if end < 0:
            self.content.append(data)
            self.tail = seen[-4:]
            return
        # the end may straddle two reads: cut the joined content at its first CRLF.CRLF
        whole = b"".join(self.content) + data
        cut = whole.find(END)
        message, rest = whole[: cut + 2], whole[cut + len(END) :]
        self.content = None
        users, self.users = self.users, []
        self._store(message, users)
        if rest:
            self.data_received(rest)

    def _store(self, message: bytes, users: list[str]) -> None:
        loop = asyncio.get_running_loop()
        jobs = [
            loop.run_in_executor(self.pool, self.store.deliver, u, message, self.store.name())
            for u in users
        ]
        done = asyncio.gather(*jobs)
        done.add_done_callback(self._stored)

    def _stored(self, done: asyncio.Future) -> None:
        if not self.transport.is_closing():
            failed = done.exception() is not None
            self.transport.write(b"451 4.3.0 Failed\r\n" if failed else b"250 2.0.0 OK\r\n")


async def serve(sock: socket.socket, root: str) -> None:
    loop = asyncio.get_running_loop()
    store, pool = Store(root), ThreadPoolExecutor(8)
    server = await loop.create_server(lambda: FloorProtocol(store, pool), sock=sock)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    server.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="floor_server.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--root", required=True)
    p.add_argument("--workers", type=int, default=1)
    a = p.parse_args(argv)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", a.port))
    sock.listen(1024)
    children = []
    for _ in range(a.workers - 1):
        pid = os.fork()
        if pid == 0:
            children = []
            break
        children.append(pid)
    import uvloop

    uvloop.run(serve(sock, a.root))
    for pid in children:  # the parent forwards its stop to the workers it forked
        os.kill(pid, signal.SIGTERM)
        os.waitpid(pid, 0)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
