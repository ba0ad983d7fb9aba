"""Property tests of the sans-I/O server (issue 2 "How it is tested", issue 7 item 10).

(a) Any bytes, split any way, with any decisions: no exception, and every reply line is
    `^\\d{3}[ -].*\\r\\n$` with a code from a known set.
(b) A hypothesis state machine over SMTP commands (with byte splits) that predicts each reply
    code from a small model and checks the session invariants after every step.

POSTIER_HYPOTHESIS_EXAMPLES raises the number of examples (default 200) for a longer run.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
)

from postier.protocol import replies as R
from postier.protocol.events import (
    NEED_DATA,
    Auth,
    AuthResponse,
    ConnectionClosed,
    Data,
    DataRejected,
    EndOfData,
    Event,
    Rcpt,
    StartTLS,
)
from postier.protocol.replies import Reply
from postier.protocol.server import ServerConnection
from postier.protocol.state import Phase, ServerConfig

MAX_EXAMPLES = int(os.environ.get("POSTIER_HYPOTHESIS_EXAMPLES", "200"))
REPLY_LINE = re.compile(rb"\d{3}[ -][^\r\n]*\r\n")
KNOWN_CODES = {
    214, 220, 221, 235, 250, 252, 334, 354,
    421, 451, 452, 454,
    500, 501, 502, 503, 504, 530, 535, 538, 550, 552, 553, 554, 555,
}  # fmt: skip
# What a driver may answer on its own (policy refusals, storage trouble, shutdown).
DRIVER_REJECTS = [
    R.NO_SUCH_USER,
    R.RELAY_DENIED,
    R.STORAGE_FAILED,
    R.LOW_DISK,
    R.AUTH_FAILED,
    R.SHUTTING_DOWN,
    Reply(454, "4.7.0", "TLS not available due to temporary reason"),
]


def reply_lines(out: bytes) -> list[bytes]:
    """Split output into reply lines, asserting each one is well-formed."""
    found, pos = [], 0
    while pos < len(out):
        m = REPLY_LINE.match(out, pos)
        assert m is not None, f"malformed output at {pos}: {out[pos : pos + 80]!r}"
        found.append(m.group())
        pos = m.end()
    for line in found:
        assert int(line[:3]) in KNOWN_CODES, line
    return found


def final_codes(out: bytes) -> list[int]:
    return [int(line[:3]) for line in reply_lines(out) if line[3:4] == b" "]


def check_session(conn: ServerConnection) -> None:
    env = conn.session.envelope
    assert len(env.recipients) <= conn.config.max_recipients
    if env.recipients:
        assert env.mail_given
    if conn.phase is Phase.DATA:
        assert env.mail_given and env.recipients
        assert conn._reader is not None
    else:
        assert conn._reader is None
    if env.mail_given or conn.phase is Phase.DATA:
        assert conn.session.helo is not None


# ---- (a) arbitrary bytes ----------------------------------------------------------------------

TOKENS = [
    b"EHLO a.example\r\n",
    b"HELO h.example\r\n",
    b"MAIL FROM:<a@b.example>\r\n",
    b"MAIL FROM:<> SIZE=100 BODY=8BITMIME\r\n",
    "MAIL FROM:<jörg@bücher.example> SMTPUTF8\r\n".encode(),
    b"MAIL FROM:<a@b.example> SIZE=99999999999\r\n",
    b"RCPT TO:<u@example.org>\r\n",
    b"RCPT TO:<postmaster>\r\n",
    b'RCPT TO:<"a b"@[IPv6:2001:db8::1]>\r\n',
    b"RCPT TO:<@r.example:u@example.org>\r\n",
    b"DATA\r\n",
    b".\r\n",
    b"\r\n.\r\n",
    b"..\r\n",
    b"\n.\n",
    b"\r.\r\n",
    b"RSET\r\n",
    b"NOOP\r\n",
    b"QUIT\r\n",
    b"STARTTLS\r\n",
    b"AUTH PLAIN\r\n",
    b"AUTH LOGIN YWxpY2U=\r\n",
    b"AGFsaWNlAHNlY3JldA==\r\n",
    b"*\r\n",
    b"BDAT 10 LAST\r\n",
    b"GET / HTTP/1.1\r\n",
    b"VRFY root\r\n",
    b"EXPN staff\r\n",
    b"HELP\r\n",
    b"TURN\r\n",
    b"\r\n",
    b"\r",
    b"\n",
    b"\x00",
    b"\xff\xfe",
]

line_tokens = st.sampled_from([t for t in TOKENS if t.endswith(b"\r\n")])
tokens = st.one_of(
    line_tokens,
    line_tokens,
    line_tokens,
    line_tokens,
    line_tokens,
    st.sampled_from(TOKENS),
    st.binary(max_size=40),
    st.integers(min_value=400, max_value=1500).map(lambda n: b"NOOP " + b"x" * n + b"\r\n"),
    st.integers(min_value=400, max_value=1500).map(lambda n: b"MAIL FROM:<" + b"a" * n),
)
# A stream is a list of reads; each read holds a few tokens (often one, as a client that waits
# for replies would send), and the reads may be cut again anywhere.
reads = st.lists(st.lists(tokens, min_size=1, max_size=4).map(b"".join), max_size=40)
# A plausible session with random tokens inserted: reaches DATA, STARTTLS and AUTH far more often.
SCRIPT = [
    b"EHLO a.example\r\n",
    b"STARTTLS\r\n",
    b"EHLO a.example\r\n",
    b"AUTH PLAIN AGFsaWNlAHNlY3JldA==\r\n",
    b"MAIL FROM:<a@b.example>\r\n",
    b"RCPT TO:<u@example.org>\r\n",
    b"RCPT TO:<postmaster>\r\n",
    b"DATA\r\n",
    b"Subject: x\r\n\r\n..dots\r\nbody\r\n",
    b".\r\n",
    b"MAIL FROM:<> BODY=8BITMIME\r\nRCPT TO:<v@example.org>\r\nDATA\r\n",
    b"x\r\n.\r\nQUIT\r\n",
]


def _insert(pairs: list[tuple[int, bytes]]) -> list[bytes]:
    out = list(SCRIPT)
    for pos, token in pairs:
        out.insert(pos % (len(out) + 1), token)
    return out


scripted = st.lists(st.tuples(st.integers(0, 100), tokens), max_size=8).map(_insert)
streams = st.one_of(reads, scripted)
configs = st.builds(
    ServerConfig,
    hostname=st.just("mx.example.org"),
    max_message_size=st.sampled_from([10, 100, 35 * 1024 * 1024]),
    max_recipients=st.sampled_from([1, 2, 100]),
    max_errors=st.sampled_from([3, 10, 10, 10]),
    starttls_available=st.booleans(),
    implicit_tls=st.booleans(),
    auth_mechanisms=st.sampled_from([(), ("PLAIN", "LOGIN")]),
    auth_requires_tls=st.booleans(),
    auth_required_for_mail=st.booleans(),
    enforce_pipelining_sync=st.booleans(),
)


def resplit(chunks: list[bytes], cuts: list[int]) -> list[bytes]:
    """Cut some reads again at arbitrary positions."""
    out = list(chunks)
    for c in cuts:
        if not out:
            break
        i = c % len(out)
        j = c % (len(out[i]) + 1)
        out[i : i + 1] = [out[i][:j], out[i][j:]]
    return out


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    parts, prev = [], 0
    for p in [*points, len(data)]:
        parts.append(data[prev:p])
        prev = p
    return parts


def decide(conn: ServerConnection, event: Event, draw: st.DataObject | None) -> None:
    """Accept (None) or draw a decision for a pending event."""
    choice = 0 if draw is None else draw.draw(st.integers(0, 5), label="decision")
    if isinstance(event, Auth | AuthResponse):
        if choice == 0:
            conn.auth_succeeded("alice")
        elif choice == 1:
            conn.challenge("VXNlcm5hbWU6")
        else:
            conn.reject(draw.draw(st.sampled_from(DRIVER_REJECTS)) if draw else R.AUTH_FAILED)
    elif choice < 4 or draw is None:
        conn.accept()
    else:
        conn.reject(draw.draw(st.sampled_from(DRIVER_REJECTS), label="reject"))


def run_stream(
    config: ServerConfig, chunks: list[bytes], greet: bool, draw: st.DataObject | None
) -> None:
    conn = ServerConnection(config, peer_name="[192.0.2.7]")
    out = bytearray(conn.greeting() if greet else b"")
    closed = False
    for chunk in chunks:
        conn.receive_data(chunk)
        while (event := conn.next_event()) is not NEED_DATA:
            assert not closed, f"event after ConnectionClosed: {event!r}"
            if isinstance(event, ConnectionClosed):
                closed = True
                out += conn.data_to_send()
                reply_lines(out)
            elif conn.pending is not None:
                decide(conn, event, draw)
            check_session(conn)
        sent = conn.data_to_send()
        if closed:
            assert sent == b"", "bytes queued after the connection closed"
        out += sent
        if conn.phase is Phase.TLS_PENDING and (draw is None or draw.draw(st.booleans())):
            conn.tls_started()
        check_session(conn)
    reply_lines(bytes(out))


@settings(max_examples=MAX_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    config=configs,
    chunks=streams,
    cuts=st.lists(st.integers(min_value=0), max_size=20),
    greet=st.integers(0, 9).map(bool),
)
def test_any_bytes_accepting_every_decision(
    config: ServerConfig, chunks: list[bytes], cuts: list[int], greet: bool
) -> None:
    run_stream(config, resplit(chunks, cuts), greet, None)


@settings(max_examples=MAX_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    config=configs,
    chunks=streams,
    cuts=st.lists(st.integers(min_value=0), max_size=20),
    draw=st.data(),
)
def test_any_bytes_with_random_decisions(
    config: ServerConfig, chunks: list[bytes], cuts: list[int], draw: st.DataObject
) -> None:
    run_stream(config, resplit(chunks, cuts), True, draw)


@settings(max_examples=MAX_EXAMPLES, deadline=None)
@given(chunks=st.lists(st.binary(max_size=200), max_size=30))
def test_raw_binary_chunks(chunks: list[bytes]) -> None:
    run_stream(ServerConfig(hostname="mx.example.org"), chunks, True, None)


# ---- (b) a state machine over commands --------------------------------------------------------

MAX_RCPT = 3
MAX_SIZE = 300
MAX_ERRORS = 20

domains = st.sampled_from(["example.org", "b.example", "[192.0.2.1]"])
locals_ = st.from_regex(r"[a-z0-9][a-z0-9.+_-]{0,10}[a-z0-9]", fullmatch=True).filter(
    lambda s: ".." not in s
)
accepts = st.integers(0, 4).map(bool)  # decisions: mostly accept, so sessions go deep
cuts_st = st.lists(st.integers(min_value=0, max_value=4000), max_size=6)
body_lines = st.lists(
    st.one_of(
        st.binary(max_size=60).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")),
        st.sampled_from([b".", b"..", b".x", b"MAIL FROM:<evil@x.example>", b"QUIT"]),
    ),
    max_size=12,
)


class SmtpSession(RuleBasedStateMachine):
    """Model: helo/esmtp, mail given, recipient count, error count, closed."""

    @initialize(enforce=st.booleans(), ehlo=st.booleans())
    def start(self, enforce: bool, ehlo: bool) -> None:
        self.conn = ServerConnection(
            ServerConfig(
                hostname="mx.example.org",
                max_message_size=MAX_SIZE,
                max_recipients=MAX_RCPT,
                max_errors=MAX_ERRORS,
                enforce_pipelining_sync=enforce,
            ),
            peer_name="[192.0.2.9]",
        )
        assert final_codes(self.conn.greeting()) == [220]
        self.helo = False
        self.esmtp = False
        self.mail = False
        self.rcpts = 0
        self.errors = 0
        self.closed = False
        self.decisions: list[bool] = []
        self.events: list[Event] = []
        if ehlo:
            self.hello(True, True, [])

    # -- plumbing --
    def send(self, data: bytes, cuts: list[int], decisions: list[bool] | None = None) -> list[int]:
        """Send bytes in pieces; decide pending events from `decisions` (True = accept)."""
        self.decisions = list(decisions or [])
        out = bytearray()
        for piece in split(data, cuts):
            self.conn.receive_data(piece)
            while (event := self.conn.next_event()) is not NEED_DATA:
                self.events.append(event)
                if isinstance(event, Rcpt):
                    # No RCPT reaches the application outside an accepted MAIL.
                    assert self.conn.session.envelope.mail_given
                assert not isinstance(event, StartTLS | Auth)
                if self.conn.pending is not None:
                    if self.decisions.pop(0) if self.decisions else True:
                        self.conn.accept()
                    else:
                        self.conn.reject(
                            R.NO_SUCH_USER if not isinstance(event, Data) else R.LOW_DISK
                        )
            out += self.conn.data_to_send()
        got = final_codes(bytes(out))
        if self.closed:
            assert got == [], got
        return got

    def expect(self, got: list[int], code: int) -> None:
        """`code` for the command; then 421 if it was the error that reached the limit."""
        if self.closed:
            return
        expected = [code]
        if code >= 500:
            self.errors += 1
            if self.errors >= MAX_ERRORS:
                expected.append(421)
                self.closed = True
        assert got == expected, (got, expected)

    def reset(self) -> None:
        self.mail = False
        self.rcpts = 0

    # -- rules --
    @rule(extended=st.booleans(), accept=accepts, cuts=cuts_st)
    def hello(self, extended: bool, accept: bool, cuts: list[int]) -> None:
        got = self.send(
            b"%s client.example\r\n" % (b"EHLO" if extended else b"HELO"), cuts, [accept]
        )
        self.expect(got, 250 if accept else 550)
        if accept and not self.closed:
            self.helo, self.esmtp = True, extended
            self.reset()

    @rule(
        local=locals_,
        domain=domains,
        size=st.none() | st.integers(0, 2 * MAX_SIZE),
        accept=accepts,
        cuts=cuts_st,
    )
    def mail_from(
        self, local: str, domain: str, size: int | None, accept: bool, cuts: list[int]
    ) -> None:
        line = f"MAIL FROM:<{local}@{domain}>"
        if size is not None:
            line += f" SIZE={size}"
        got = self.send(line.encode() + b"\r\n", cuts, [accept])
        if not self.helo or self.mail:
            code = 503
        elif size is not None and not self.esmtp:
            code = 555
        elif size is not None and size > MAX_SIZE:
            code = 552
        else:
            code = 250 if accept else 550
        self.expect(got, code)
        if code == 250:
            self.mail = True

    @rule(local=locals_, domain=domains, accept=accepts, cuts=cuts_st)
    def rcpt_to(self, local: str, domain: str, accept: bool, cuts: list[int]) -> None:
        got = self.send(f"RCPT TO:<{local}@{domain}>\r\n".encode(), cuts, [accept])
        if not self.mail:
            code = 503
        elif self.rcpts >= MAX_RCPT:
            code = 452
        else:
            code = 250 if accept else 550
        self.expect(got, code)
        if code == 250:
            self.rcpts += 1

    @rule(n=st.integers(1, 5), accept=st.lists(accepts, min_size=6, max_size=6), cuts=cuts_st)
    def pipelined(self, n: int, accept: list[bool], cuts: list[int]) -> None:
        """MAIL and n RCPT in one write: one reply per command, in order."""
        data = b"MAIL FROM:<p@b.example>\r\n" + b"".join(
            b"RCPT TO:<r%d@example.org>\r\n" % i for i in range(n)
        )
        got = self.send(data, cuts, accept)
        decisions = iter(accept)
        expected_codes = []
        mail = self.mail
        if not self.helo or mail:
            expected_codes.append(503)
        else:
            mail = next(decisions)
            expected_codes.append(250 if mail else 550)
        for _ in range(n):
            if not mail:
                expected_codes.append(503)
            elif self.rcpts >= MAX_RCPT:
                expected_codes.append(452)
            elif next(decisions):
                expected_codes.append(250)
                self.rcpts += 1
            else:
                expected_codes.append(550)
        # Compare command by command, stopping where the error limit closes the session.
        seen = []
        for code in expected_codes:
            if self.closed:
                break
            seen.append(code)
            if code >= 500:
                self.errors += 1
                if self.errors >= MAX_ERRORS:
                    seen.append(421)
                    self.closed = True
        if not self.closed or seen:
            assert got == seen, (got, seen)
        if not self.closed and mail and expected_codes[0] == 250:
            self.mail = True

    @rule(
        lines=body_lines, bare=st.booleans(), accept_data=accepts, accept_end=accepts, cuts=cuts_st
    )
    def data(
        self, lines: list[bytes], bare: bool, accept_data: bool, accept_end: bool, cuts: list[int]
    ) -> None:
        got = self.send(b"DATA\r\n", [], [accept_data])
        if self.closed:
            return
        if not self.mail:
            self.expect(got, 503)
            return
        if not self.rcpts:
            self.expect(got, 554)
            return
        if not accept_data:
            self.expect(got, 452)
            return
        self.expect(got, 354)
        assert self.conn.phase is Phase.DATA
        body = b"".join((b"." + ln if ln.startswith(b".") else ln) + b"\r\n" for ln in lines)
        if bare:
            body += b"bare\nline\r\n"
        got = self.send(body + b".\r\n", cuts, [accept_end])
        size = sum(len(ln) + 2 for ln in lines) + (len(b"bare\nline\r\n") if bare else 0)
        if bare:
            code = 550
        elif size > MAX_SIZE:
            code = 552
        else:
            code = 250 if accept_end else 550
        self.expect(got, code)
        self.reset()
        kinds = [type(e) for e in self.events if not isinstance(e, ConnectionClosed)]
        assert kinds[-1] in (EndOfData, DataRejected)

    @rule(
        lines=body_lines,
        bare=st.booleans(),
        accept=st.lists(accepts, min_size=4, max_size=4),
        cuts=cuts_st,
    )
    def transaction(
        self, lines: list[bytes], bare: bool, accept: list[bool], cuts: list[int]
    ) -> None:
        """MAIL, RCPT, DATA and content, one command at a time (the common case)."""
        self.mail_from("s", "b.example", None, accept[0], [])
        self.rcpt_to("r", "example.org", accept[1], [])
        self.data(lines, bare, accept[2], accept[3], cuts)

    @rule(cuts=cuts_st)
    def rset(self, cuts: list[int]) -> None:
        self.expect(self.send(b"RSET\r\n", cuts), 250)
        self.reset()

    @rule(
        arg=st.binary(max_size=30).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")),
        cuts=cuts_st,
    )
    def noop(self, arg: bytes, cuts: list[int]) -> None:
        try:
            code = 501 if "\x00" in arg.decode("utf-8") else 250
        except UnicodeDecodeError:
            code = 501
        self.expect(self.send(b"NOOP " + arg + b"\r\n", cuts), code)

    @rule(
        junk=st.binary(max_size=80).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")),
        n=st.integers(490, 3000),
        long=st.booleans(),
        cuts=cuts_st,
    )
    def junk(self, junk: bytes, n: int, long: bool, cuts: list[int]) -> None:
        """An unknown verb ("Z..." is never one we know), or a line around the 512 limit."""
        if long:
            got = self.send(b"NOOP " + b"y" * n + b"\r\n", cuts)
            self.expect(got, 250 if 5 + n <= 510 else 500)
        else:
            self.expect(self.send(b"Z" + junk + b"\r\n", cuts), 500)

    @rule(roll=st.integers(0, 9), cuts=cuts_st)
    def quit(self, roll: int, cuts: list[int]) -> None:
        if roll != 9:  # rare on purpose, so that most sessions go deep
            return
        got = self.send(b"QUIT\r\n", cuts)
        if not self.closed:
            assert got == [221]
            assert self.events[-1] == ConnectionClosed("quit")
            self.closed = True

    # -- invariants --
    @invariant()
    def session_matches_model(self) -> None:
        conn = self.conn
        check_session(conn)
        if self.closed:
            assert conn.phase is Phase.CLOSED
            return
        assert conn.phase is Phase.COMMAND
        env = conn.session.envelope
        assert (conn.session.helo is not None) == self.helo
        assert conn.session.esmtp == (self.esmtp and self.helo)
        assert env.mail_given == self.mail
        assert len(env.recipients) == self.rcpts <= MAX_RCPT
        assert conn.session.errors == self.errors
        assert conn.pending is None


SmtpSession.TestCase.settings = settings(
    max_examples=MAX_EXAMPLES,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestSmtpSession = SmtpSession.TestCase


# ---- the atheris harness stays runnable ---------------------------------------------------------


def test_fuzz_harness_seeds_run_clean() -> None:
    """fuzz/fuzz_server.py: every seed decodes to its reads and passes all the harness checks."""
    atheris = pytest.importorskip("atheris")
    path = pathlib.Path(__file__).resolve().parent.parent / "fuzz" / "fuzz_server.py"
    spec = importlib.util.spec_from_file_location("postier_fuzz_server", path)
    assert spec is not None and spec.loader is not None
    harness = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(harness)
    for seed in harness.SEEDS:
        for config in (0, 0x4A0, 0x0C6, 0x1FFF):
            blob = harness.encode(config, seed)
            fdp = atheris.FuzzedDataProvider(blob)
            assert fdp.ConsumeIntInRange(0, (1 << 13) - 1) == config
            reads = []
            while fdp.remaining_bytes():
                reads.append(fdp.ConsumeBytes(fdp.ConsumeIntInRange(1, 600)))
            assert b"".join(reads) == b"".join(seed)
            harness.TestOneInput(blob)
