"""A raw SMTP client for tests: bytes exactly as given, whole (multi-line) replies back.

smtplib tidies what it sends; tests of pipelining, smuggling and STARTTLS injection need the
bytes on the wire to be exactly theirs.
"""

from __future__ import annotations

import socket


class RawReplies:
    """Reply reading over `self.sock` with a carry-over buffer `self.buf`."""

    sock: socket.socket
    buf: bytes

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def reply(self) -> tuple[int, str]:
        """One whole (possibly multi-line) reply: (code, all lines joined by newlines)."""
        lines = []
        while True:
            while b"\r\n" not in self.buf:
                data = self.sock.recv(65536)
                if not data:
                    raise ConnectionError(f"closed; partial {self.buf!r}, lines {lines}")
                self.buf += data
            line, self.buf = self.buf.split(b"\r\n", 1)
            lines.append(line.decode())
            if len(line) == 3 or line[3:4] == b" ":
                return int(line[:3]), "\n".join(lines)
