"""Scripted SMTP dialogues against a live server: one small scenario per file in dialogues/.

Format of a scenario file (`tests/dialogues/*.txt`), one directive per line:

    # a comment (blank lines are ignored too)
    S: 220                  expect one reply with this code (a multi-line reply counts once)
    S: 550 5.5.2            ... and the text after the code must appear in the reply
    A: PIPELINING           the last reply also contains this text (repeatable)
    C: EHLO client.test     send this line, followed by CRLF
    C:                      send an empty line (CRLF only)
    C*100: RCPT TO:<a@b>    send the line 100 times
    S*100: 250              expect 100 replies with this code
    CLOSE                   expect the server to close the connection (no further reply)

Text of `C:` lines is sent as UTF-8, with escapes for smuggling and malformed input: `\\r`,
`\\n`, `\\t`, `\\xHH` (one raw byte, e.g. `\\x00` or `\\xff`) and `\\\\` for a backslash;
`{{x*600}}` is the text `x` repeated 600 times. Consecutive `C:` lines are sent in one write,
so a group of them before the next `S:` is a pipelined group (RFC 2920); put an `S:` after
every command that must wait for its reply (EHLO, DATA, NOOP, ...), as a well-behaved client
would.

Every scenario starts from a fresh connection; the file must expect the greeting itself
(`S: 220`). All scenarios share one server (mx role; users alice, bob, carol at example.org;
default limits), because each uses its own connection and leaves nothing behind that another
could see. The server is checked to be alive after each scenario.
"""

from __future__ import annotations

import re
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.server import PostierServer, make_server

DIALOGUES = Path(__file__).parent / "dialogues"
SAFETY_TIMEOUT = 15.0  # seconds; a bound on a hung server, never a measurement


@dataclass(frozen=True)
class Step:
    kind: str  # "send", "expect", "also", "close"
    data: bytes = b""
    code: int = 0
    text: str = ""
    lineno: int = 0


_REPEAT = re.compile(r"\{\{(.*?)\*(\d+)\}\}")
_ESCAPE = re.compile(r"\\(x[0-9a-fA-F]{2}|r|n|t|\\)")
_DIRECTIVE = re.compile(r"^(C|S)(?:\*(\d+))?:(?: (.*))?$")


def decode_text(text: str) -> bytes:
    """Expand `{{x*N}}`, then the backslash escapes; literal text is sent as UTF-8."""
    text = _REPEAT.sub(lambda m: m.group(1) * int(m.group(2)), text)
    out = bytearray()
    pos = 0
    for m in _ESCAPE.finditer(text):
        out += text[pos : m.start()].encode("utf-8")
        e = m.group(1)
        if e.startswith("x"):
            out.append(int(e[1:], 16))
        else:
            out += {"r": b"\r", "n": b"\n", "t": b"\t", "\\": b"\\"}[e]
        pos = m.end()
    out += text[pos:].encode("utf-8")
    return bytes(out)


def parse_script(path: Path) -> list[Step]:
    steps: list[Step] = []
    for lineno, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = raw.rstrip("\n")
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if line.strip() == "CLOSE":
            steps.append(Step("close", lineno=lineno))
            continue
        if line.startswith("A: "):
            steps.append(Step("also", text=line[3:], lineno=lineno))
            continue
        m = _DIRECTIVE.match(line)
        if m is None:
            raise ValueError(f"{path.name}:{lineno}: cannot parse {line!r}")
        kind, count, text = m.group(1), int(m.group(2) or 1), m.group(3) or ""
        for _ in range(count):
            if kind == "C":
                steps.append(Step("send", data=decode_text(text) + b"\r\n", lineno=lineno))
            else:
                code, _, expect = text.partition(" ")
                if not (len(code) == 3 and code.isdigit()):
                    raise ValueError(f"{path.name}:{lineno}: 'S:' needs a 3-digit code")
                steps.append(Step("expect", code=int(code), text=expect, lineno=lineno))
    return steps


class ReplyReader:
    """Reads whole SMTP replies (all continuation lines) from a socket, checking their form."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""
        self.eof = False

    def _fill(self) -> None:
        try:
            data = self.sock.recv(65536)
        except ConnectionResetError:
            data = b""
        if not data:
            self.eof = True
        self.buf += data

    def read_reply(self) -> tuple[int, list[str]] | None:
        """The next reply as (code, lines), or None when the server closed first."""
        lines: list[str] = []
        while True:
            while b"\r\n" not in self.buf:
                if self.eof:
                    return None
                self._fill()
            raw, self.buf = self.buf.split(b"\r\n", 1)
            line = raw.decode("utf-8", "replace")
            assert re.match(r"^[2-5]\d\d([ -]|$)", line), f"malformed reply line {line!r}"
            if lines:
                assert line[:3] == lines[0][:3], f"code changed inside a reply: {[*lines, line]}"
            lines.append(line)
            if len(line) == 3 or line[3] == " ":
                return int(line[:3]), lines

    def expect_close(self) -> bytes:
        """Read until the server closes; return at once anything it sends instead."""
        while not self.eof and not self.buf:
            self._fill()
        extra, self.buf = self.buf, b""
        return extra


def run_dialogue(steps: list[Step], host: str, port: int, name: str) -> None:
    transcript: list[str] = []

    def fail(msg: str) -> None:
        pytest.fail(f"{name}: {msg}\n--- transcript ---\n" + "\n".join(transcript[-40:]))

    with socket.create_connection((host, port), timeout=SAFETY_TIMEOUT) as sock:
        try:
            _run_steps(sock, steps, transcript, fail)
        except TimeoutError:
            fail(f"no answer within {SAFETY_TIMEOUT} s")


def _run_steps(
    sock: socket.socket, steps: list[Step], transcript: list[str], fail: Callable[[str], None]
) -> None:
    reader = ReplyReader(sock)
    last: list[str] = []
    pending = bytearray()
    for step in steps:
        if step.kind == "send":
            pending += step.data
            shown = step.data[:-2]
            transcript.append(f"C: {shown[:120]!r}{'...' if len(shown) > 120 else ''}")
            continue
        if pending:
            try:
                sock.sendall(pending)
            except (BrokenPipeError, ConnectionResetError) as exc:
                fail(f"line {step.lineno}: server closed while we were sending: {exc}")
            pending.clear()
        if step.kind == "expect":
            reply = reader.read_reply()
            if reply is None:
                fail(f"line {step.lineno}: expected {step.code}, the server closed")
                return
            code, last = reply
            transcript.extend(f"S: {x}" for x in last)
            if code != step.code:
                fail(f"line {step.lineno}: expected {step.code}, got {last}")
            if step.text and step.text not in "\n".join(last):
                fail(f"line {step.lineno}: {step.text!r} not in reply {last}")
        elif step.kind == "also":
            if step.text not in "\n".join(last):
                fail(f"line {step.lineno}: {step.text!r} not in reply {last}")
        elif step.kind == "close":
            extra = reader.expect_close()
            if extra:
                fail(f"line {step.lineno}: expected close, got {extra!r}")
            transcript.append("(closed)")
    if pending:
        sock.sendall(pending)
    if reader.buf:
        fail(f"unexpected reply at the end: {reader.buf!r}")


SCENARIOS = sorted(DIALOGUES.glob("*.txt"))


@pytest.fixture(scope="module")
def dialogue_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PostierServer]:
    srv = make_server(tmp_path_factory.mktemp("dialogues") / "srv").start()
    try:
        yield srv
    finally:
        assert srv.stop() == 0


@pytest.mark.parametrize("script", SCENARIOS, ids=[p.stem for p in SCENARIOS])
def test_dialogue(script: Path, dialogue_server: PostierServer) -> None:
    steps = parse_script(script)
    assert steps and steps[0].kind == "expect", f"{script.name}: start with 'S: 220'"
    run_dialogue(steps, "127.0.0.1", dialogue_server.mx_port, script.name)
    # The server survived the scenario and still answers.
    assert dialogue_server.proc is not None and dialogue_server.proc.poll() is None
    with socket.create_connection(("127.0.0.1", dialogue_server.mx_port), SAFETY_TIMEOUT) as s:
        reader = ReplyReader(s)
        assert reader.read_reply() is not None
        s.sendall(b"QUIT\r\n")
        reply = reader.read_reply()
        assert reply is not None and reply[0] == 221


def test_parser_understands_the_format() -> None:
    assert decode_text(r"a\r\nb\x00\\{{x*3}}") == b"a\r\nb\x00\\xxx"
    assert decode_text(r"jö\xff") == "jö".encode() + b"\xff"
    steps = parse_script(DIALOGUES / "minimal.txt")
    assert steps[0] == Step("expect", code=220, lineno=steps[0].lineno)
    assert any(s.kind == "close" for s in steps)


def test_there_are_enough_scenarios() -> None:
    assert len(SCENARIOS) >= 20
