"""Sans-I/O helpers for the client side of SMTP and LMTP (the relay and the LMTP backend).

Nothing here touches a socket: bytes from the server go into `ReplyParser.feed()` and come out
as `Reply` objects; commands and the message body come out as bytes to write. Keeping this
pure lets the relay and LMTP share it and lets tests check the wire format byte by byte,
above all the body encoder: whatever the spool holds, we never put a bare CR or LF on the wire
(RFC 5321 §2.3.8), because a receiver that treats them as line ends can be tricked into seeing
an end of data we did not mean (SMTP smuggling).
"""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass, field

from postier.protocol.replies import Reply

MAX_REPLY_LINE = 2048  # RFC 5321 allows 512; real servers send a little more, never this much
MAX_REPLY_LINES = 200  # a multi-line reply longer than this is a broken or hostile server

_ENHANCED = re.compile(rb"([245])\.(\d{1,3})\.(\d{1,3})(?: |$)")


class ClientProtocolError(Exception):
    """The server sent something that is not an SMTP reply; the connection is unusable."""


class ReplyParser:
    """Incremental reply parser: feed raw bytes, get the complete replies they finish.

    Lines may end in CRLF or, leniently, a bare LF. The buffer never grows past one line's
    limit, and each byte is scanned for a line end only once.
    """

    def __init__(self, max_line: int = MAX_REPLY_LINE, max_lines: int = MAX_REPLY_LINES) -> None:
        self.max_line = max_line
        self.max_lines = max_lines
        self._buf = bytearray()
        self._scanned = 0  # bytes of _buf already known to hold no LF
        self._lines: list[bytes] = []  # continuation lines of the reply being read
        self._code = 0

    @property
    def pending(self) -> int:
        """Bytes received beyond the last complete reply (must be 0 before STARTTLS)."""
        return len(self._buf) + sum(len(x) for x in self._lines)

    def feed(self, data: bytes) -> list[Reply]:
        self._buf += data
        replies: list[Reply] = []
        while True:
            nl = self._buf.find(b"\n", self._scanned)
            if nl < 0:
                self._scanned = len(self._buf)
                if self._scanned > self.max_line:
                    raise ClientProtocolError("reply line too long")
                return replies
            if nl > self.max_line:
                raise ClientProtocolError("reply line too long")
            line = bytes(self._buf[:nl]).rstrip(b"\r")
            del self._buf[: nl + 1]
            self._scanned = 0
            reply = self._line(line)
            if reply is not None:
                replies.append(reply)

    def _line(self, line: bytes) -> Reply | None:
        if len(line) < 3 or not line[:3].isdigit() or (len(line) > 3 and line[3:4] not in b" -"):
            raise ClientProtocolError(f"malformed reply line {line[:80]!r}")
        code = int(line[:3])
        if code < 200 or code > 599:
            raise ClientProtocolError(f"reply code out of range: {code}")
        if self._lines and code != self._code:
            raise ClientProtocolError(f"reply code changed inside a reply: {line[:80]!r}")
        self._code = code
        self._lines.append(line[4:])
        if len(self._lines) > self.max_lines:
            raise ClientProtocolError("too many lines in one reply")
        if line[3:4] == b"-":
            return None
        lines, self._lines = self._lines, []
        return _build(code, lines)


def _build(code: int, raw_lines: list[bytes]) -> Reply:
    """Split the enhanced status code (RFC 2034) off every line when the first has one."""
    enhanced: str | None = None
    m = _ENHANCED.match(raw_lines[0])
    if m and m.group(1) == str(code)[0].encode():
        enhanced = m.group(0).decode("ascii").strip()
    texts = []
    for raw in raw_lines:
        if enhanced is not None and raw.startswith(enhanced.encode()):
            raw = raw[len(enhanced) :].lstrip(b" ")
        texts.append(raw.decode("utf-8", "replace"))
    return Reply(code, enhanced, texts[0] if len(texts) == 1 else tuple(texts))


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What the server announced in its EHLO/LHLO reply (empty after HELO)."""

    names: frozenset[str] = frozenset()  # upper-cased keywords: PIPELINING, STARTTLS, ...
    params: dict[str, str] = field(default_factory=dict)  # keyword -> rest of its line
    size: int | None = None  # SIZE limit; None when not announced, 0 for "no fixed limit"
    auth: frozenset[str] = frozenset()  # SASL mechanisms, upper-cased

    @classmethod
    def parse(cls, reply: Reply) -> Capabilities:
        """Parse an EHLO reply; its first line is the server's name and greeting."""
        names: set[str] = set()
        params: dict[str, str] = {}
        auth: set[str] = set()
        size: int | None = None
        for line in reply.lines[1:]:
            words = line.split()
            if not words:
                continue
            keyword = words[0].upper()
            if keyword.startswith("AUTH="):  # old Outlook-style "AUTH=LOGIN PLAIN"
                words = [*keyword.split("=", 1), *words[1:]]
                keyword = "AUTH"
            names.add(keyword)
            params[keyword] = " ".join(words[1:])
            if keyword == "AUTH":
                auth.update(w.upper() for w in words[1:])
            elif keyword == "SIZE":
                size = int(words[1]) if len(words) > 1 and words[1].isdigit() else 0
        return cls(frozenset(names), params, size, frozenset(auth))

    def __contains__(self, name: str) -> bool:
        return name.upper() in self.names


# --- commands --------------------------------------------------------------------------


def _command(text: str) -> bytes:
    """Encode one command line; a CR or LF inside an argument would inject a command."""
    if "\r" in text or "\n" in text:
        raise ValueError(f"CR or LF in SMTP command {text!r}")
    return text.encode("utf-8") + b"\r\n"


def _params(params: dict[str, str | None] | None) -> str:
    if not params:
        return ""
    return "".join(f" {k}" if v is None else f" {k}={v}" for k, v in params.items())


def ehlo(name: str) -> bytes:
    return _command(f"EHLO {name}")


def helo(name: str) -> bytes:
    return _command(f"HELO {name}")


def lhlo(name: str) -> bytes:
    return _command(f"LHLO {name}")


def mail_from(sender: str, params: dict[str, str | None] | None = None) -> bytes:
    """`MAIL FROM:<sender>`; the empty string is the null sender `<>`."""
    return _command(f"MAIL FROM:<{sender}>{_params(params)}")


def rcpt_to(recipient: str, params: dict[str, str | None] | None = None) -> bytes:
    return _command(f"RCPT TO:<{recipient}>{_params(params)}")


DATA = b"DATA\r\n"
RSET = b"RSET\r\n"
QUIT = b"QUIT\r\n"
STARTTLS = b"STARTTLS\r\n"
END_OF_DATA = b".\r\n"  # what to send after 354 when there is nothing to send


def bdat(size: int, *, last: bool) -> bytes:
    """`BDAT <size> [LAST]` (RFC 3030); exactly `size` octets must follow it."""
    return f"BDAT {size}{' LAST' if last else ''}\r\n".encode("ascii")


def spool_to_wire(content: bytes) -> bytes:
    """Spool content (LF line ends) as BDAT octets: LF back to CRLF, every other octet as it
    is (a bare CR and NUL included). No dot-stuffing: BDAT has no end marker to protect."""
    return content.replace(b"\n", b"\r\n")


def auth_plain(username: str, password: str) -> bytes:
    """`AUTH PLAIN <initial response>` (RFC 4616), with an empty authorization identity."""
    token = base64.b64encode(f"\0{username}\0{password}".encode()).decode("ascii")
    return _command(f"AUTH PLAIN {token}")


def auth_login_steps(username: str, password: str) -> tuple[bytes, bytes, bytes]:
    """The three lines of `AUTH LOGIN`: the command, then the user name and the password,
    each sent after a 334 challenge."""
    user = base64.b64encode(username.encode()).decode("ascii")
    secret = base64.b64encode(password.encode()).decode("ascii")
    return b"AUTH LOGIN\r\n", _command(user), _command(secret)


# --- message body ----------------------------------------------------------------------


class BodyEncoder:
    """Turn spool content (LF line ends) into DATA bytes: CRLF, dot-stuffed, terminated.

    Every line end on the wire is CRLF: LF becomes CRLF, CRLF stays one line end, and a lone
    CR (which cannot come from our own server, but could from a hand-made spool or a future
    input path) also becomes CRLF. A line starting with "." gets another "." (RFC 5321
    §4.5.2). Chunks can split anywhere, including between CR and LF.
    """

    def __init__(self) -> None:
        self._at_line_start = True
        self._held_cr = False  # a CR ended the last chunk: wait to see if LF follows
        self.bytes_out = 0

    def feed(self, chunk: bytes) -> bytes:
        if not chunk:
            return b""
        if self._held_cr:
            chunk = b"\r" + chunk
            self._held_cr = False
        if chunk.endswith(b"\r"):
            chunk = chunk[:-1]
            self._held_cr = True
        return self._encode(chunk)

    def finish(self) -> bytes:
        """The rest of the body and the final `.`; a last line without a line end gets one."""
        out = b""
        if self._held_cr:
            self._held_cr = False
            out = self._encode(b"\r")  # counted in bytes_out by _encode
        if not self._at_line_start:
            out += b"\r\n"
            self.bytes_out += 2
            self._at_line_start = True
        self.bytes_out += len(END_OF_DATA)
        return out + END_OF_DATA

    def _encode(self, data: bytes) -> bytes:
        if not data:
            return b""
        # Normalise every line end to LF first, so that stuffing and CRLF are done once each.
        data = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        if self._at_line_start and data.startswith(b"."):
            data = b"." + data
        data = data.replace(b"\n.", b"\n..").replace(b"\n", b"\r\n")
        self._at_line_start = data.endswith(b"\n")
        self.bytes_out += len(data)
        return data


def encode_body(content: bytes) -> bytes:
    """The whole DATA payload for a small body in one call (tests, bounces)."""
    enc = BodyEncoder()
    return enc.feed(content) + enc.finish()
