"""ServerConnection, command by command and reply by reply (issue 2 item 3, issue 7 items 1, 4).

Everything runs sans I/O: bytes in, events and reply bytes out. `Peer` plays the application:
it feeds bytes, drains events until NEED_DATA and decides each pending event with a callback
(accept everything by default), then returns what the connection wants to send.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import pytest

from postier.protocol import replies as R
from postier.protocol.address import Address
from postier.protocol.events import (
    NEED_DATA,
    Auth,
    AuthResponse,
    ConnectionClosed,
    Data,
    DataChunk,
    DataRejected,
    EndOfData,
    Event,
    Hello,
    Mail,
    ProtocolViolation,
    Rcpt,
    StartTLS,
)
from postier.protocol.replies import Reply
from postier.protocol.server import ProtocolUsageError, ServerConnection
from postier.protocol.state import Phase, ServerConfig

HOST = "mx.example.org"
PEER = "[192.0.2.1]"
REPLY_LINE = re.compile(rb"\d{3}[ -][^\r\n]*\r\n")

Decide = Callable[[ServerConnection, Event], None]


def accept_all(conn: ServerConnection, event: Event) -> None:
    if isinstance(event, Auth | AuthResponse):
        conn.auth_succeeded("alice")
    else:
        conn.accept()


class Peer:
    def __init__(self, *, greet: bool = True, **config: object) -> None:
        self.conn = ServerConnection(ServerConfig(hostname=HOST, **config), peer_name=PEER)
        self.events: list[Event] = []
        self.banner = self.conn.greeting() if greet else b""
        self.decide: Decide = accept_all

    def send(self, data: bytes, decide: Decide | None = None) -> bytes:
        """Feed bytes, drain and decide events; return the reply bytes (one write)."""
        self.conn.receive_data(data)
        return self.drain(decide)

    def drain(self, decide: Decide | None = None) -> bytes:
        decide = decide or self.decide
        while (event := self.conn.next_event()) is not NEED_DATA:
            self.events.append(event)
            if self.conn.pending is not None:
                decide(self.conn, event)
        out = self.conn.data_to_send()
        assert_well_formed(out)
        return out

    def new_events(self) -> list[Event]:
        events, self.events = self.events, []
        return events

    def ehlo(self) -> bytes:
        out = self.send(b"EHLO client.example\r\n")
        assert codes(out) == [250]
        self.new_events()
        return out

    def transaction_to_data(self, rcpts: int = 1) -> None:
        self.send(b"MAIL FROM:<sender@example.net>\r\n")
        for i in range(rcpts):
            self.send(b"RCPT TO:<user%d@example.org>\r\n" % i)
        assert codes(self.send(b"DATA\r\n")) == [354]
        self.new_events()


def assert_well_formed(out: bytes) -> None:
    pos = 0
    while pos < len(out):
        m = REPLY_LINE.match(out, pos)
        assert m is not None, out[pos:]
        pos = m.end()


def lines(out: bytes) -> list[bytes]:
    return out.split(b"\r\n")[:-1]


def codes(out: bytes) -> list[int]:
    """The code of every complete reply (multi-line replies count once)."""
    return [int(line[:3]) for line in lines(out) if line[3:4] == b" "]


def enhanced(out: bytes) -> list[str]:
    return [line[4:].split(b" ", 1)[0].decode() for line in lines(out) if line[3:4] == b" "]


@pytest.fixture
def peer() -> Peer:
    p = Peer()
    p.ehlo()
    return p


# ---- greeting, EHLO, HELO ---------------------------------------------------------------------


def test_greeting() -> None:
    p = Peer()
    assert p.banner == f"220 {HOST} ESMTP postier\r\n".encode()


def test_ehlo_reply_lists_extensions() -> None:
    p = Peer()
    out = p.send(b"EHLO client.example\r\n")
    assert p.new_events() == [Hello(name="client.example", extended=True)]
    rows = lines(out)
    assert rows[0] == f"250-{HOST} Hello {PEER}".encode()
    keywords = [r[4:] for r in rows[1:]]
    for kw in (b"PIPELINING", b"SIZE 36700160", b"8BITMIME", b"SMTPUTF8", b"ENHANCEDSTATUSCODES"):
        assert kw in keywords
    assert all(r.startswith(b"250-") for r in rows[:-1]) and rows[-1].startswith(b"250 ")
    assert b"STARTTLS" not in keywords and not any(k.startswith(b"AUTH") for k in keywords)


def test_ehlo_advertises_configured_size() -> None:
    p = Peer(max_message_size=1234)
    assert b"250-SIZE 1234\r\n" in p.send(b"EHLO c.example\r\n")


def test_helo() -> None:
    p = Peer()
    out = p.send(b"HELO client.example\r\n")
    assert out == f"250 {HOST} Hello {PEER}\r\n".encode()
    assert p.new_events() == [Hello(name="client.example", extended=False)]
    assert p.conn.session.helo == "client.example" and not p.conn.session.esmtp


@pytest.mark.parametrize("line", [b"EHLO\r\n", b"HELO\r\n", b"EHLO   \r\n", b"helo \r\n"])
def test_hello_without_argument_is_501(line: bytes) -> None:
    p = Peer()
    out = p.send(line)
    assert codes(out) == [501]
    assert p.new_events() == []
    assert p.conn.session.helo is None


@pytest.mark.parametrize("name", [b"a b", b"a\tb", b"x" * 256])
def test_hello_bad_names_are_501(name: bytes) -> None:
    p = Peer()
    assert codes(p.send(b"EHLO " + name + b"\r\n")) == [501]


def test_verbs_are_case_insensitive() -> None:
    p = Peer()
    assert codes(p.send(b"ehlo c.example\r\n")) == [250]
    assert codes(p.send(b"mail from:<a@b.example>\r\n")) == [250]
    assert codes(p.send(b"rcpt to:<c@d.example>\r\n")) == [250]


def test_second_ehlo_resets_the_transaction(peer: Peer) -> None:
    peer.send(b"MAIL FROM:<a@b.example>\r\n")
    peer.send(b"RCPT TO:<c@d.example>\r\n")
    assert codes(peer.send(b"EHLO again.example\r\n")) == [250]
    assert codes(peer.send(b"RCPT TO:<c@d.example>\r\n")) == [503]
    assert codes(peer.send(b"MAIL FROM:<a@b.example>\r\n")) == [250]


# ---- MAIL -----------------------------------------------------------------------------------


def test_mail(peer: Peer) -> None:
    out = peer.send(b"MAIL FROM:<sender@example.net>\r\n")
    assert out == b"250 2.1.0 Sender OK\r\n"
    [event] = peer.new_events()
    assert event == Mail(
        sender=Address("sender", "example.net"), size=None, body=None, smtputf8=False
    )
    assert peer.conn.session.envelope.mail_given


def test_mail_null_sender(peer: Peer) -> None:
    assert codes(peer.send(b"MAIL FROM:<>\r\n")) == [250]
    [event] = peer.new_events()
    assert isinstance(event, Mail) and event.sender is None


def test_mail_size(peer: Peer) -> None:
    assert codes(peer.send(b"MAIL FROM:<a@b.example> SIZE=1000\r\n")) == [250]
    [event] = peer.new_events()
    assert isinstance(event, Mail) and event.size == 1000
    assert peer.conn.session.envelope.size_hint == 1000


def test_mail_size_at_the_limit_is_accepted() -> None:
    p = Peer(max_message_size=5000)
    p.ehlo()
    assert codes(p.send(b"MAIL FROM:<a@b.example> SIZE=5000\r\n")) == [250]


def test_mail_size_over_the_limit_is_552() -> None:
    p = Peer(max_message_size=5000)
    p.ehlo()
    out = p.send(b"MAIL FROM:<a@b.example> SIZE=5001\r\n")
    assert codes(out) == [552] and enhanced(out) == ["5.3.4"]
    assert p.new_events() == []
    assert not p.conn.session.envelope.mail_given


@pytest.mark.parametrize("value", [b"SIZE", b"SIZE=", b"SIZE=abc", b"SIZE=-1", b"SIZE=1" * 30])
def test_mail_bad_size_is_501(peer: Peer, value: bytes) -> None:
    assert codes(peer.send(b"MAIL FROM:<a@b.example> " + value + b"\r\n")) == [501]


@pytest.mark.parametrize(("param", "body"), [(b"7BIT", "7BIT"), (b"8bitmime", "8BITMIME")])
def test_mail_body(peer: Peer, param: bytes, body: str) -> None:
    assert codes(peer.send(b"MAIL FROM:<a@b.example> BODY=" + param + b"\r\n")) == [250]
    [event] = peer.new_events()
    assert isinstance(event, Mail) and event.body == body


@pytest.mark.parametrize("param", [b"BODY=BINARY", b"BODY", b"BODY=8BIT"])
def test_mail_bad_body_is_501(peer: Peer, param: bytes) -> None:
    assert codes(peer.send(b"MAIL FROM:<a@b.example> " + param + b"\r\n")) == [501]
    assert peer.new_events() == []


def test_mail_smtputf8(peer: Peer) -> None:
    line = "MAIL FROM:<jörg@bücher.example> SMTPUTF8\r\n".encode()
    assert codes(peer.send(line)) == [250]
    [event] = peer.new_events()
    assert isinstance(event, Mail) and event.smtputf8
    assert event.sender == Address("jörg", "bücher.example")
    assert peer.conn.session.envelope.smtputf8
    # The transaction allows UTF-8 recipients too.
    assert codes(peer.send("RCPT TO:<zoë@example.org>\r\n".encode())) == [250]


def test_mail_utf8_address_without_smtputf8_is_553(peer: Peer) -> None:
    out = peer.send("MAIL FROM:<jörg@example.net>\r\n".encode())
    assert codes(out) == [553] and enhanced(out) == ["5.6.7"]


def test_mail_smtputf8_with_value_is_501(peer: Peer) -> None:
    assert codes(peer.send(b"MAIL FROM:<a@b.example> SMTPUTF8=yes\r\n")) == [501]


@pytest.mark.parametrize("param", [b"FOO=bar", b"XYZ", b"XRET=FULL", b"XENVID=abc"])
def test_mail_unknown_parameter_is_555(peer: Peer, param: bytes) -> None:
    out = peer.send(b"MAIL FROM:<a@b.example> " + param + b"\r\n")
    assert codes(out) == [555] and enhanced(out) == ["5.5.4"]


def test_mail_auth_parameter_is_ignored(peer: Peer) -> None:
    assert codes(peer.send(b"MAIL FROM:<a@b.example> AUTH=<>\r\n")) == [250]


def test_mail_parameters_after_helo_are_555() -> None:
    p = Peer()
    assert codes(p.send(b"HELO c.example\r\n")) == [250]
    assert codes(p.send(b"MAIL FROM:<a@b.example> SIZE=10\r\n")) == [555]
    assert codes(p.send(b"MAIL FROM:<a@b.example> BODY=8BITMIME\r\n")) == [555]
    assert codes(p.send(b"MAIL FROM:<a@b.example>\r\n")) == [250]


def test_nested_mail_is_503(peer: Peer) -> None:
    peer.send(b"MAIL FROM:<a@b.example>\r\n")
    out = peer.send(b"MAIL FROM:<other@b.example>\r\n")
    assert codes(out) == [503]
    assert peer.conn.session.envelope.sender == Address("a", "b.example")


def test_mail_before_helo_is_503() -> None:
    p = Peer()
    out = p.send(b"MAIL FROM:<a@b.example>\r\n")
    assert codes(out) == [503] and enhanced(out) == ["5.5.1"]
    assert p.new_events() == []


@pytest.mark.parametrize(
    "line",
    [
        b"MAIL\r\n",
        b"MAIL TO:<a@b.example>\r\n",
        b"MAIL FROM:a@b.example\r\n",
        b"MAIL FROM:<a@b.example\r\n",
        b"MAIL FROM:<a@@b.example>\r\n",
    ],
)
def test_mail_syntax_errors_are_501(peer: Peer, line: bytes) -> None:
    assert codes(peer.send(line)) == [501]


def test_mail_with_space_after_colon_is_tolerated(peer: Peer) -> None:
    assert codes(peer.send(b"MAIL FROM: <a@b.example>\r\n")) == [250]


# ---- RCPT -----------------------------------------------------------------------------------


def test_rcpt(peer: Peer) -> None:
    peer.send(b"MAIL FROM:<a@b.example>\r\n")
    peer.new_events()
    out = peer.send(b"RCPT TO:<User@Example.ORG>\r\n")
    assert out == b"250 2.1.5 Recipient OK\r\n"
    assert peer.new_events() == [Rcpt(recipient=Address("User", "example.org"))]
    assert peer.conn.session.envelope.recipients == [Address("User", "example.org")]


def test_rcpt_before_mail_is_503(peer: Peer) -> None:
    out = peer.send(b"RCPT TO:<u@example.org>\r\n")
    assert codes(out) == [503]
    assert peer.new_events() == []


def test_hundred_recipients_then_452() -> None:
    p = Peer()
    p.ehlo()
    p.send(b"MAIL FROM:<a@b.example>\r\n")
    for i in range(100):
        assert codes(p.send(b"RCPT TO:<u%d@example.org>\r\n" % i)) == [250]
    out = p.send(b"RCPT TO:<u100@example.org>\r\n")
    assert codes(out) == [452] and enhanced(out) == ["4.5.3"]
    assert len(p.conn.session.envelope.recipients) == 100
    # A temporary reply is not an error: the session goes on to DATA.
    assert p.conn.session.errors == 0
    assert codes(p.send(b"DATA\r\n")) == [354]


def test_recipient_limit_is_configurable() -> None:
    p = Peer(max_recipients=2)
    p.ehlo()
    p.send(b"MAIL FROM:<a@b.example>\r\n")
    out = p.send(b"RCPT TO:<a@x.example>\r\nRCPT TO:<b@x.example>\r\nRCPT TO:<c@x.example>\r\n")
    assert codes(out) == [250, 250, 452]


def test_rejected_recipients_do_not_count_toward_the_limit() -> None:
    p = Peer(max_recipients=2)
    p.ehlo()
    p.send(b"MAIL FROM:<a@b.example>\r\n")

    def refuse(conn: ServerConnection, event: Event) -> None:
        conn.reject(R.NO_SUCH_USER)

    for _ in range(3):
        assert codes(p.send(b"RCPT TO:<nobody@x.example>\r\n", refuse)) == [550]
    assert codes(p.send(b"RCPT TO:<a@x.example>\r\nRCPT TO:<b@x.example>\r\n")) == [250, 250]


@pytest.mark.parametrize("param", [b"XNOTIFY=NEVER", b"XORCPT=rfc822;a@b.example", b"FOO"])
def test_rcpt_parameters_are_555(peer: Peer, param: bytes) -> None:
    peer.send(b"MAIL FROM:<a@b.example>\r\n")
    assert codes(peer.send(b"RCPT TO:<u@example.org> " + param + b"\r\n")) == [555]


@pytest.mark.parametrize("path", [b"<postmaster>", b"<POSTMASTER>", b"<PostMaster>"])
def test_bare_postmaster_is_accepted(peer: Peer, path: bytes) -> None:
    peer.send(b"MAIL FROM:<a@b.example>\r\n")
    peer.new_events()
    assert codes(peer.send(b"RCPT TO:" + path + b"\r\n")) == [250]
    [event] = peer.new_events()
    assert isinstance(event, Rcpt)
    assert event.recipient == Address("postmaster", "")


@pytest.mark.parametrize(
    "line", [b"RCPT TO:<>\r\n", b"RCPT TO:<user>\r\n", b"RCPT FROM:<a@b.example>\r\n", b"RCPT\r\n"]
)
def test_rcpt_syntax_errors_are_501(peer: Peer, line: bytes) -> None:
    peer.send(b"MAIL FROM:<a@b.example>\r\n")
    assert codes(peer.send(line)) == [501]


def test_bare_postmaster_is_not_a_sender(peer: Peer) -> None:
    assert codes(peer.send(b"MAIL FROM:<postmaster>\r\n")) == [501]


# ---- DATA -----------------------------------------------------------------------------------


def test_data_without_mail_is_503(peer: Peer) -> None:
    assert codes(peer.send(b"DATA\r\n")) == [503]
    assert peer.conn.phase is Phase.COMMAND


def test_data_without_recipients_is_554(peer: Peer) -> None:
    peer.send(b"MAIL FROM:<a@b.example>\r\n")
    out = peer.send(b"DATA\r\n")
    assert codes(out) == [554]
    assert peer.conn.phase is Phase.COMMAND


def test_data_with_arguments_is_501(peer: Peer) -> None:
    peer.send(b"MAIL FROM:<a@b.example>\r\nRCPT TO:<u@example.org>\r\n")
    assert codes(peer.send(b"DATA now\r\n")) == [501]
    assert codes(peer.send(b"DATA\r\n")) == [354]


def test_data_full_transaction(peer: Peer) -> None:
    peer.transaction_to_data(rcpts=2)
    assert peer.conn.phase is Phase.DATA
    out = peer.send(b"Subject: test\r\n\r\n..dot\r\nbody\r\n")
    assert out == b""  # no reply while the content flows
    assert peer.new_events() == [DataChunk(b"Subject: test\r\n\r\n.dot\r\nbody\r\n")]
    out = peer.send(b".\r\n")
    assert out == b"250 2.0.0 OK\r\n"
    assert peer.new_events() == [EndOfData(size=len(b"Subject: test\r\n\r\n.dot\r\nbody\r\n"))]
    assert peer.conn.phase is Phase.COMMAND
    assert not peer.conn.session.envelope.mail_given
    assert peer.conn.session.transactions == 1


def test_data_accept_with_queue_id(peer: Peer) -> None:
    peer.transaction_to_data()

    def queued(conn: ServerConnection, event: Event) -> None:
        conn.accept(R.queued("ABC123"))

    assert peer.send(b"x\r\n.\r\n", queued) == b"250 2.0.0 OK: queued as ABC123\r\n"


def test_data_decision_can_be_a_temporary_failure(peer: Peer) -> None:
    peer.transaction_to_data()

    def fail(conn: ServerConnection, event: Event) -> None:
        conn.reject(R.STORAGE_FAILED)

    out = peer.send(b"x\r\n.\r\n", fail)
    assert codes(out) == [451]
    assert not peer.conn.session.envelope.mail_given  # the transaction is over either way
    assert codes(peer.send(b"MAIL FROM:<a@b.example>\r\n")) == [250]


def test_two_messages_in_one_session(peer: Peer) -> None:
    for _ in range(2):
        peer.transaction_to_data()
        assert codes(peer.send(b"hello\r\n.\r\n")) == [250]
    assert peer.conn.session.transactions == 2


def test_end_of_data_then_pipelined_commands(peer: Peer) -> None:
    peer.transaction_to_data()
    out = peer.send(b"hello\r\n.\r\nMAIL FROM:<a@b.example>\r\nQUIT\r\n")
    assert codes(out) == [250, 250, 221]
    kinds = [type(e) for e in peer.new_events()]
    assert kinds == [DataChunk, EndOfData, Mail, ConnectionClosed]


def test_bad_line_endings_550_and_the_session_goes_on(peer: Peer) -> None:
    peer.transaction_to_data()
    out = peer.send(b"Subject: x\r\n\r\nbad\n.\nMAIL FROM:<evil@x.example>\r\n")
    assert out == b""  # still reading: nothing after the bare LF is a command
    out = peer.send(b"more\r\n.\r\n")
    assert codes(out) == [550] and enhanced(out) == ["5.5.2"]
    events = peer.new_events()
    assert DataRejected(R.BAD_LINE_ENDINGS) in events
    assert not any(isinstance(e, EndOfData | Mail) for e in events)
    assert not peer.conn.session.envelope.mail_given
    assert codes(peer.send(b"MAIL FROM:<a@b.example>\r\n")) == [250]
    assert codes(peer.send(b"NOOP\r\n")) == [250]


def test_too_big_message_552_only_after_the_end_of_data() -> None:
    p = Peer(max_message_size=100)
    p.ehlo()
    p.transaction_to_data()
    for _ in range(20):
        assert p.send(b"y" * 50 + b"\r\n") == b""  # no early reply, never
    assert p.conn.phase is Phase.DATA
    out = p.send(b".\r\n")
    assert codes(out) == [552] and enhanced(out) == ["5.3.4"]
    events = p.new_events()
    assert events[-1] == DataRejected(R.MESSAGE_TOO_BIG)
    assert sum(len(e.data) for e in events if isinstance(e, DataChunk)) <= 100
    assert codes(p.send(b"NOOP\r\n")) == [250]


def test_smuggled_commands_inside_data_are_content(peer: Peer) -> None:
    peer.transaction_to_data()
    out = peer.send(
        b"Subject: a\r\n\r\nx\r\n\x00.\r\nMAIL FROM:<evil@x.example>\r\nRCPT TO:<v@example.org>\r\n"
        b"DATA\r\n.\r\n"
    )
    assert codes(out) == [250]
    events = peer.new_events()
    assert [type(e) for e in events] == [DataChunk, EndOfData]
    assert b"MAIL FROM:<evil@x.example>" in events[0].data  # type: ignore[union-attr]


# ---- RSET, NOOP, QUIT, HELP, VRFY, EXPN, unknown ------------------------------------------------


def test_rset(peer: Peer) -> None:
    peer.send(b"MAIL FROM:<a@b.example>\r\nRCPT TO:<u@example.org>\r\n")
    assert peer.send(b"RSET\r\n") == b"250 2.0.0 Reset OK\r\n"
    assert not peer.conn.session.envelope.mail_given
    assert peer.conn.session.envelope.recipients == []
    assert peer.conn.session.helo == "client.example"  # RSET keeps the EHLO
    assert codes(peer.send(b"RCPT TO:<u@example.org>\r\n")) == [503]
    assert codes(peer.send(b"RSET x\r\n")) == [501]


def test_rset_before_helo() -> None:
    assert codes(Peer().send(b"RSET\r\n")) == [250]


@pytest.mark.parametrize("line", [b"NOOP\r\n", b"NOOP anything at all\r\n"])
def test_noop(line: bytes) -> None:
    p = Peer()
    assert p.send(line) == b"250 2.0.0 OK\r\n"
    assert p.new_events() == []


def test_quit() -> None:
    p = Peer()
    out = p.send(b"QUIT\r\n")
    assert out == f"221 2.0.0 {HOST} closing connection\r\n".encode()
    assert p.new_events() == [ConnectionClosed("quit")]
    assert p.conn.phase is Phase.CLOSED
    # Nothing after QUIT is read.
    assert p.send(b"NOOP\r\n") == b""
    assert p.new_events() == []


def test_quit_with_pipelined_commands_after_it(peer: Peer) -> None:
    out = peer.send(b"QUIT\r\nNOOP\r\nMAIL FROM:<a@b.example>\r\n")
    assert codes(out) == [221]
    assert peer.new_events() == [ConnectionClosed("quit")]


def test_help_lists_commands() -> None:
    p = Peer()
    out = p.send(b"HELP\r\n")
    rows = lines(out)
    assert len(rows) >= 2 and codes(out) == [214]
    text = b" ".join(rows)
    for verb in (b"EHLO", b"HELO", b"MAIL", b"RCPT", b"DATA", b"RSET", b"NOOP", b"QUIT"):
        assert verb in text
    assert b"STARTTLS" not in text and b"AUTH" not in text


def test_help_lists_starttls_and_auth_when_offered() -> None:
    p = Peer(starttls_available=True, auth_mechanisms=("PLAIN",))
    text = p.send(b"HELP MAIL\r\n")
    assert b"STARTTLS" in text and b"AUTH" in text


def test_vrfy_never_confirms_or_denies() -> None:
    p = Peer()
    for who in (b"root", b"alice@example.org", b"<nobody@example.org>"):
        out = p.send(b"VRFY " + who + b"\r\n")
        assert codes(out) == [252]
    assert codes(p.send(b"VRFY\r\n")) == [501]


def test_expn_is_502() -> None:
    p = Peer()
    out = p.send(b"EXPN staff\r\n")
    assert codes(out) == [502] and b"EXPN" in out


@pytest.mark.parametrize("line", [b"FOO\r\n", b"XYZZY a b c\r\n", b"\r\n", b"MAILFROM:<a@b>\r\n"])
def test_unknown_command_is_500(line: bytes) -> None:
    p = Peer()
    out = p.send(line)
    assert codes(out) == [500] and enhanced(out) == ["5.5.2"]
    assert p.conn.phase is Phase.COMMAND


@pytest.mark.parametrize("verb", [b"TURN", b"SEND FROM:<a@b.example>", b"SOML", b"SAML", b"ETRN x"])
def test_unimplemented_verbs_are_502(verb: bytes) -> None:
    p = Peer()
    out = p.send(verb + b"\r\n")
    assert codes(out) == [502]
    assert p.conn.phase is Phase.COMMAND


def test_bare_lf_inside_a_command_line_is_not_two_commands() -> None:
    p = Peer()
    out = p.send(b"NOOP\nQUIT\r\n")
    assert codes(out) == [500]
    assert p.conn.phase is Phase.COMMAND


def test_cr_lf_nul_in_arguments_are_501(peer: Peer) -> None:
    assert codes(peer.send(b"MAIL FROM:<a@b.example>\nRCPT TO:<c@d.example>\r\n")) == [501]
    assert codes(peer.send(b"VRFY a\x00b\r\n")) == [501]
    assert codes(peer.send(b"EHLO a\rb\r\n")) == [501]


def test_invalid_utf8_in_arguments_is_501(peer: Peer) -> None:
    assert codes(peer.send(b"MAIL FROM:<\xff@b.example> SMTPUTF8\r\n")) == [501]


# ---- limits -----------------------------------------------------------------------------------


def test_command_line_of_512_octets_is_accepted() -> None:
    p = Peer()
    line = b"NOOP " + b"x" * (512 - 2 - 5) + b"\r\n"
    assert len(line) == 512
    assert codes(p.send(line)) == [250]


def test_command_line_over_512_octets_is_500_and_the_session_continues() -> None:
    p = Peer()
    line = b"NOOP " + b"x" * (512 - 2 - 5 + 1) + b"\r\n"
    out = p.send(line)
    assert codes(out) == [500] and enhanced(out) == ["5.5.6"]
    assert codes(p.send(b"EHLO c.example\r\n")) == [250]


def test_mail_line_gets_room_for_parameters(peer: Peer) -> None:
    line = b"MAIL FROM:<a@b.example> SIZE=100 BODY=8BITMIME AUTH=" + b"x" * 600 + b"\r\n"
    assert 512 < len(line) <= 1024
    assert codes(peer.send(line)) == [250]
    assert codes(peer.send(b"RCPT TO:<u@example.org> " + b"X" * 2000 + b"\r\n")) == [500]


def test_million_bytes_without_crlf_gives_one_500_and_continues() -> None:
    p = Peer()
    chunk = b"A" * 1024
    out = b""
    for _ in range(1_000_000 // 1024):
        out += p.send(chunk)
        assert len(p.conn._lines) <= p.conn.config.max_auth_line + 2 + 1024
    out += p.send(b"\r\nEHLO c.example\r\n")
    assert codes(out) == [500, 250]
    assert enhanced(out)[0] == "5.5.6"
    assert p.conn.phase is Phase.COMMAND


def test_ten_errors_then_421_and_close() -> None:
    p = Peer()
    for _ in range(9):
        assert codes(p.send(b"BOGUS\r\n")) == [500]
    assert p.conn.phase is Phase.COMMAND
    out = p.send(b"BOGUS\r\n")
    assert codes(out) == [500, 421]
    assert p.new_events()[-1] == ConnectionClosed("too many errors")
    assert p.conn.phase is Phase.CLOSED
    assert p.send(b"NOOP\r\n") == b""


def test_error_limit_is_configurable_and_pipelined_errors_stop_at_it() -> None:
    p = Peer(max_errors=3)
    out = p.send(b"A\r\nB\r\nC\r\nD\r\nE\r\n")
    assert codes(out) == [500, 500, 500, 421]


def test_errors_from_decisions_count_too() -> None:
    """A recipient-harvesting client that only gets 550s must be cut off as well."""
    p = Peer()
    p.ehlo()
    p.send(b"MAIL FROM:<a@b.example>\r\n")

    def unknown(conn: ServerConnection, event: Event) -> None:
        conn.reject(R.NO_SUCH_USER)

    out = b""
    for i in range(10):
        out += p.send(b"RCPT TO:<guess%d@example.org>\r\n" % i, unknown)
    assert codes(out) == [550] * 10 + [421]
    assert p.conn.phase is Phase.CLOSED


def test_temporary_replies_are_not_errors() -> None:
    p = Peer()
    for _ in range(30):
        assert codes(p.send(b"NOOP\r\n")) == [250]
    p.ehlo()
    p.send(b"MAIL FROM:<a@b.example>\r\n")
    for _ in range(20):
        p.send(b"RCPT TO:<u@example.org>\r\n", lambda c, e: c.reject(R.LOW_DISK))
    assert p.conn.phase is Phase.COMMAND


@pytest.mark.parametrize(
    "line", [b"GET / HTTP/1.1", b"POST /cgi HTTP/1.0", b"CONNECT mx.example.org:25 HTTP/1.1"]
)
def test_http_lines_close_the_connection(line: bytes) -> None:
    p = Peer()
    out = p.send(line + b"\r\nHost: x\r\n\r\n")
    assert codes(out) == [554]
    events = p.new_events()
    assert isinstance(events[0], ProtocolViolation)
    assert isinstance(events[-1], ConnectionClosed)
    assert p.conn.phase is Phase.CLOSED


def test_bdat_chunk_bytes_are_content_not_commands(peer: Peer) -> None:
    peer.send(b"MAIL FROM:<a@b.example>\r\nRCPT TO:<u@example.org>\r\n")
    peer.new_events()
    out = peer.send(b"BDAT 20 LAST\r\nMAIL FROM:<evil@x>\r\n")
    assert codes(out) == [250]
    kinds = [type(e) for e in peer.new_events()]
    assert Mail not in kinds
    assert kinds[-2:] == [DataChunk, EndOfData]


# ---- pipelining and synchronisation ----------------------------------------------------------


def test_pipelined_transaction_events_and_replies_in_order(peer: Peer) -> None:
    out = peer.send(
        b"MAIL FROM:<a@b.example>\r\nRCPT TO:<u1@example.org>\r\nRCPT TO:<u2@example.org>\r\n"
        b"RCPT TO:<u3@example.org>\r\nDATA\r\n"
    )
    assert out == (
        b"250 2.1.0 Sender OK\r\n"
        + b"250 2.1.5 Recipient OK\r\n" * 3
        + b"354 End data with <CR><LF>.<CR><LF>\r\n"
    )
    kinds = [type(e) for e in peer.new_events()]
    assert kinds == [Mail, Rcpt, Rcpt, Rcpt, Data]
    assert peer.conn.phase is Phase.DATA


def test_pipelined_with_a_rejected_recipient_keeps_order(peer: Peer) -> None:
    def decide(conn: ServerConnection, event: Event) -> None:
        if isinstance(event, Rcpt) and event.recipient.local == "u2":
            conn.reject(R.NO_SUCH_USER)
        else:
            conn.accept()

    out = peer.send(
        b"MAIL FROM:<a@b.example>\r\nRCPT TO:<u1@example.org>\r\nRCPT TO:<u2@example.org>\r\n"
        b"RCPT TO:<u3@example.org>\r\nDATA\r\n",
        decide,
    )
    assert codes(out) == [250, 250, 550, 250, 354]
    assert [a.local for a in peer.conn.session.envelope.recipients] == ["u1", "u3"]


def test_next_event_refuses_to_run_ahead_of_a_decision(peer: Peer) -> None:
    peer.conn.receive_data(b"MAIL FROM:<a@b.example>\r\nRCPT TO:<u@example.org>\r\n")
    assert isinstance(peer.conn.next_event(), Mail)
    with pytest.raises(ProtocolUsageError):
        peer.conn.next_event()
    peer.conn.accept()
    assert isinstance(peer.conn.next_event(), Rcpt)


def test_decision_without_a_pending_event_is_a_usage_error(peer: Peer) -> None:
    with pytest.raises(ProtocolUsageError):
        peer.conn.accept()
    with pytest.raises(ProtocolUsageError):
        peer.conn.reject(R.BAD_SEQUENCE)


def test_content_sent_with_data_before_354_is_a_sync_error(peer: Peer) -> None:
    out = peer.send(
        b"MAIL FROM:<a@b.example>\r\nRCPT TO:<u@example.org>\r\nDATA\r\n"
        b"Subject: eager\r\n\r\nbody\r\n.\r\n"
    )
    assert codes(out) == [250, 250, 554]
    assert enhanced(out)[-1] == "5.5.0"
    events = peer.new_events()
    assert [type(e) for e in events[-2:]] == [ProtocolViolation, ConnectionClosed]
    assert not any(isinstance(e, Data | DataChunk | EndOfData) for e in events)
    assert peer.conn.phase is Phase.CLOSED


def test_content_in_a_later_read_before_the_decision_is_a_sync_error(peer: Peer) -> None:
    peer.send(b"MAIL FROM:<a@b.example>\r\nRCPT TO:<u@example.org>\r\n")
    peer.conn.receive_data(b"DATA\r\n")
    assert isinstance(peer.conn.next_event(), Data)
    peer.conn.receive_data(b"Subject: eager\r\n")  # arrives while DATA is being decided
    peer.conn.accept()
    out = peer.drain()
    assert codes(out) == [354, 554]
    assert peer.conn.phase is Phase.CLOSED


@pytest.mark.parametrize("hello", [b"EHLO c.example", b"HELO c.example"])
def test_commands_pipelined_after_hello_are_a_sync_error(hello: bytes) -> None:
    p = Peer()
    out = p.send(hello + b"\r\nMAIL FROM:<a@b.example>\r\n")
    assert codes(out) == [554] and enhanced(out) == ["5.5.0"]
    kinds = [type(e) for e in p.new_events()]
    assert kinds == [ProtocolViolation, ConnectionClosed]
    assert p.conn.phase is Phase.CLOSED


def test_sync_enforcement_can_be_switched_off() -> None:
    p = Peer(enforce_pipelining_sync=False)
    out = p.send(b"EHLO c.example\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<u@example.org>\r\n")
    assert codes(out) == [250, 250, 250]


def test_talking_before_the_greeting_is_554_and_close() -> None:
    p = Peer(greet=False)
    out = p.send(b"EHLO early.example\r\n")
    assert codes(out) == [554] and enhanced(out) == ["5.5.0"]
    kinds = [type(e) for e in p.new_events()]
    assert kinds == [ProtocolViolation, ConnectionClosed]
    assert p.conn.phase is Phase.CLOSED


def test_refuse_sends_one_reply_and_closes() -> None:
    conn = ServerConnection(ServerConfig(hostname=HOST))
    assert conn.refuse(R.TOO_MANY_CONNECTIONS, "limit") == R.TOO_MANY_CONNECTIONS.to_bytes()
    assert conn.next_event() == ConnectionClosed("limit")
    assert conn.next_event() is NEED_DATA


def test_close_sends_421_even_with_a_pending_decision(peer: Peer) -> None:
    peer.conn.receive_data(b"MAIL FROM:<a@b.example>\r\n")
    assert isinstance(peer.conn.next_event(), Mail)
    peer.conn.close(R.TIMEOUT, "timeout")
    assert peer.conn.data_to_send() == R.TIMEOUT.to_bytes()
    assert peer.conn.next_event() == ConnectionClosed("timeout")


# ---- STARTTLS ---------------------------------------------------------------------------------


@pytest.fixture
def tls_peer() -> Peer:
    p = Peer(starttls_available=True, auth_mechanisms=("PLAIN", "LOGIN"))
    out = p.ehlo()
    assert b"250-STARTTLS\r\n" in out
    assert b"AUTH" not in out  # not before TLS (auth_requires_tls)
    return p


def test_starttls_not_offered_is_502(peer: Peer) -> None:
    assert codes(peer.send(b"STARTTLS\r\n")) == [502]


def test_starttls_with_argument_is_501(tls_peer: Peer) -> None:
    assert codes(tls_peer.send(b"STARTTLS now\r\n")) == [501]


def test_starttls_discards_everything_until_the_handshake(tls_peer: Peer) -> None:
    out = tls_peer.send(b"STARTTLS\r\n")
    assert out == b"220 2.0.0 Ready to start TLS\r\n"
    assert tls_peer.new_events() == [StartTLS()]
    assert tls_peer.conn.phase is Phase.TLS_PENDING
    injected = b"MAIL FROM:<evil@x.example>\r\nRCPT TO:<v@example.org>\r\nQUIT\r\n"
    assert tls_peer.send(injected) == b""
    assert tls_peer.new_events() == []
    assert tls_peer.conn.discarded_after_starttls == len(injected)
    tls_peer.conn.tls_started()
    assert tls_peer.drain() == b""  # the plaintext never produces a reply, even later
    assert tls_peer.conn.session.tls


@pytest.mark.parametrize("enforce", [True, False])
def test_commands_pipelined_with_starttls_are_discarded(enforce: bool) -> None:
    """CVE-2011-0411: plaintext sent with STARTTLS must not run inside the TLS session.

    It is dropped with the buffer when the 220 goes out (RFC 3207 §4.2), never answered, and
    not treated as a pipelining sync error either.
    """
    p = Peer(starttls_available=True, enforce_pipelining_sync=enforce)
    p.ehlo()
    injected = b"MAIL FROM:<evil@x.example>\r\nRCPT TO:<v@example.org>\r\n"
    out = p.send(b"STARTTLS\r\n" + injected)
    assert out == b"220 2.0.0 Ready to start TLS\r\n"
    assert p.new_events() == [StartTLS()]
    assert p.conn.discarded_after_starttls == len(injected)
    assert p.send(b"RSET\r\n") == b""  # still plaintext: dropped as well
    p.conn.tls_started()
    assert p.drain() == b""
    assert p.new_events() == []
    assert codes(p.send(b"MAIL FROM:<a@b.example>\r\n")) == [503]


def test_tls_started_resets_the_session(tls_peer: Peer) -> None:
    tls_peer.send(b"MAIL FROM:<a@b.example>\r\n")
    tls_peer.send(b"RSET\r\n")
    tls_peer.send(b"STARTTLS\r\n")
    tls_peer.conn.tls_started()
    assert tls_peer.conn.phase is Phase.COMMAND
    assert tls_peer.conn.session.helo is None
    assert codes(tls_peer.send(b"MAIL FROM:<a@b.example>\r\n")) == [503]
    out = tls_peer.send(b"EHLO client.example\r\n")
    assert codes(out) == [250]
    assert b"STARTTLS" not in out
    assert b"250-AUTH PLAIN LOGIN\r\n" in out  # offered now that the session is encrypted
    assert codes(tls_peer.send(b"MAIL FROM:<a@b.example>\r\n")) == [250]


def test_starttls_again_is_503(tls_peer: Peer) -> None:
    tls_peer.send(b"STARTTLS\r\n")
    tls_peer.conn.tls_started()
    tls_peer.ehlo()
    out = tls_peer.send(b"STARTTLS\r\n")
    assert codes(out) == [503]


def test_starttls_rejected_by_the_application(tls_peer: Peer) -> None:
    out = tls_peer.send(
        b"STARTTLS\r\n", lambda c, e: c.reject(Reply(454, "4.7.0", "TLS not available"))
    )
    assert codes(out) == [454]
    assert tls_peer.conn.phase is Phase.COMMAND
    assert codes(tls_peer.send(b"NOOP\r\n")) == [250]


def test_tls_started_without_starttls_is_a_usage_error(peer: Peer) -> None:
    with pytest.raises(ProtocolUsageError):
        peer.conn.tls_started()


# ---- AUTH -------------------------------------------------------------------------------------


def test_auth_not_offered_is_502(peer: Peer) -> None:
    out = peer.send(b"AUTH PLAIN\r\n")
    assert codes(out) == [502]


def test_auth_before_tls_is_538(tls_peer: Peer) -> None:
    out = tls_peer.send(b"AUTH PLAIN AGFsaWNlAHNlY3JldA==\r\n")
    assert codes(out) == [538] and enhanced(out) == ["5.7.11"]
    assert tls_peer.new_events() == []


@pytest.fixture
def auth_peer() -> Peer:
    p = Peer(implicit_tls=True, auth_mechanisms=("PLAIN", "LOGIN"))
    assert b"250-AUTH PLAIN LOGIN\r\n" in p.ehlo()
    return p


def test_auth_plain_challenge_response(auth_peer: Peer) -> None:
    def begin(conn: ServerConnection, event: Event) -> None:
        assert event == Auth(mechanism="PLAIN", initial_response=None)
        conn.challenge("")

    out = auth_peer.send(b"AUTH plain\r\n", begin)
    assert out == b"334 \r\n"
    assert auth_peer.conn.phase is Phase.AUTH
    auth_peer.new_events()

    def check(conn: ServerConnection, event: Event) -> None:
        assert event == AuthResponse("AGFsaWNlAHNlY3JldA==")
        conn.auth_succeeded("alice")

    out = auth_peer.send(b"AGFsaWNlAHNlY3JldA==\r\n", check)
    assert out == b"235 2.7.0 Authentication successful\r\n"
    assert auth_peer.conn.session.auth_user == "alice"
    assert auth_peer.conn.phase is Phase.COMMAND
    assert codes(auth_peer.send(b"AUTH PLAIN\r\n")) == [503]
    assert b"AUTH" not in auth_peer.send(b"EHLO again.example\r\n")


def test_auth_login_two_challenges(auth_peer: Peer) -> None:
    seen: list[Event] = []

    def decide(conn: ServerConnection, event: Event) -> None:
        seen.append(event)
        if isinstance(event, Auth):
            conn.challenge("VXNlcm5hbWU6")
        elif len(seen) == 2:
            conn.challenge("UGFzc3dvcmQ6")
        else:
            conn.auth_succeeded("alice")

    assert auth_peer.send(b"AUTH LOGIN\r\n", decide) == b"334 VXNlcm5hbWU6\r\n"
    assert auth_peer.send(b"YWxpY2U=\r\n", decide) == b"334 UGFzc3dvcmQ6\r\n"
    assert codes(auth_peer.send(b"c2VjcmV0\r\n", decide)) == [235]
    assert seen == [
        Auth("LOGIN", None),
        AuthResponse("YWxpY2U="),
        AuthResponse("c2VjcmV0"),
    ]


def test_auth_with_initial_response(auth_peer: Peer) -> None:
    out = auth_peer.send(b"AUTH PLAIN AGFsaWNlAHNlY3JldA==\r\n")
    assert codes(out) == [235]
    assert auth_peer.new_events() == [Auth("PLAIN", "AGFsaWNlAHNlY3JldA==")]


def test_auth_rejected(auth_peer: Peer) -> None:
    out = auth_peer.send(b"AUTH PLAIN AGJvYgB3cm9uZw==\r\n", lambda c, e: c.reject(R.AUTH_FAILED))
    assert codes(out) == [535] and enhanced(out) == ["5.7.8"]
    assert auth_peer.conn.session.auth_user is None
    assert auth_peer.conn.phase is Phase.COMMAND
    assert codes(auth_peer.send(b"NOOP\r\n")) == [250]


def test_auth_cancelled_during_the_exchange(auth_peer: Peer) -> None:
    auth_peer.send(b"AUTH PLAIN\r\n", lambda c, e: c.challenge(""))

    def cancel(conn: ServerConnection, event: Event) -> None:
        assert event == AuthResponse("*")
        conn.reject(R.AUTH_CANCELLED)

    assert codes(auth_peer.send(b"*\r\n", cancel)) == [501]
    assert auth_peer.conn.phase is Phase.COMMAND
    assert codes(auth_peer.send(b"MAIL FROM:<a@b.example>\r\n")) == [250]


def test_auth_response_line_too_long(auth_peer: Peer) -> None:
    auth_peer.send(b"AUTH PLAIN\r\n", lambda c, e: c.challenge(""))
    out = auth_peer.send(b"A" * 20000 + b"\r\n")
    assert codes(out) == [500]
    assert auth_peer.conn.phase is Phase.COMMAND


@pytest.mark.parametrize(
    ("line", "code"),
    [(b"AUTH CRAM-MD5\r\n", 504), (b"AUTH\r\n", 501), (b"AUTH PLAIN a b\r\n", 501)],
)
def test_auth_syntax(auth_peer: Peer, line: bytes, code: int) -> None:
    assert codes(auth_peer.send(line)) == [code]


def test_auth_needs_ehlo_and_no_transaction() -> None:
    p = Peer(implicit_tls=True, auth_mechanisms=("PLAIN",))
    assert codes(p.send(b"AUTH PLAIN\r\n")) == [503]
    p.ehlo()
    p.send(b"MAIL FROM:<a@b.example>\r\n")
    assert codes(p.send(b"AUTH PLAIN\r\n")) == [503]


def test_auth_allowed_without_tls_when_configured(peer: Peer) -> None:
    p = Peer(auth_mechanisms=("PLAIN",), auth_requires_tls=False)
    assert b"250-AUTH PLAIN\r\n" in p.ehlo()
    assert codes(p.send(b"AUTH PLAIN AGFsaWNlAHNlY3JldA==\r\n")) == [235]


def test_auth_required_for_mail() -> None:
    p = Peer(implicit_tls=True, auth_mechanisms=("PLAIN",), auth_required_for_mail=True)
    p.ehlo()
    assert codes(p.send(b"MAIL FROM:<a@b.example>\r\n")) == [530]
    p.send(b"AUTH PLAIN AGFsaWNlAHNlY3JldA==\r\n")
    assert codes(p.send(b"MAIL FROM:<a@b.example>\r\n")) == [250]


def test_accept_on_auth_is_a_usage_error(auth_peer: Peer) -> None:
    auth_peer.conn.receive_data(b"AUTH PLAIN\r\n")
    assert isinstance(auth_peer.conn.next_event(), Auth)
    with pytest.raises(ProtocolUsageError):
        auth_peer.conn.accept()


# ---- reply rendering --------------------------------------------------------------------------


def test_single_line_reply() -> None:
    assert Reply(250, "2.0.0", "OK").to_bytes() == b"250 2.0.0 OK\r\n"
    assert Reply(354, None, "Go on").to_bytes() == b"354 Go on\r\n"
    assert Reply(250, "2.0.0", "OK").to_bytes(enhanced_codes=False) == b"250 OK\r\n"


def test_multi_line_reply() -> None:
    rendered = Reply(214, "2.0.0", ("one", "two", "three")).to_bytes()
    assert rendered == b"214-2.0.0 one\r\n214-2.0.0 two\r\n214 2.0.0 three\r\n"


def test_the_wire_form_is_made_once_and_is_not_part_of_the_value() -> None:
    """A reply renders to bytes on its first send and keeps them (the catalogue's constants
    go out several times a message); equality, hashing and repr ignore that cache, and the
    form without enhanced codes is rendered, never served from it."""
    fresh = Reply(250, "2.0.0", "OK")
    sent = Reply(250, "2.0.0", "OK")
    wire = sent.to_bytes()
    assert sent.to_bytes() is wire
    assert sent == fresh and hash(sent) == hash(fresh) and repr(sent) == repr(fresh)
    assert sent.to_bytes(enhanced_codes=False) == b"250 OK\r\n"
    assert R.greeting("mx.example.org") is R.greeting("mx.example.org")
    assert R.greeting("mx.example.org").to_bytes() == b"220 mx.example.org ESMTP postier\r\n"


@pytest.mark.parametrize("text", ["a\r\n250 forged", "a\nb", "a\rb", ("x\r\n", "y\n")])
def test_cr_lf_in_reply_text_is_neutralised(text: str | tuple[str, ...]) -> None:
    rendered = Reply(550, "5.1.1", text).to_bytes()
    assert_well_formed(rendered)
    n = 1 if isinstance(text, str) else len(text)
    assert rendered.count(b"\r\n") == n
    assert rendered.count(b"\r") == n and rendered.count(b"\n") == n


def test_application_reply_with_crlf_cannot_forge_a_second_reply(peer: Peer) -> None:
    peer.send(b"MAIL FROM:<a@b.example>\r\n")
    out = peer.send(
        b"RCPT TO:<u@example.org>\r\n",
        lambda c, e: c.reject(Reply(550, "5.1.1", "no\r\n250 2.1.5 OK")),
    )
    assert codes(out) == [550]
    assert lines(out) == [b"550 5.1.1 no  250 2.1.5 OK"]


def test_reply_str_and_classes() -> None:
    assert str(R.MESSAGE_TOO_BIG).startswith("552 5.3.4 ")
    assert R.OK.is_positive and R.LOW_DISK.is_transient and R.BAD_SYNTAX.is_permanent


# ---- reject() leaves the state as it was --------------------------------------------------------


def refuse(conn: ServerConnection, event: Event) -> None:
    conn.reject(Reply(550, "5.7.1", "Refused by policy"))


def test_rejected_hello_leaves_no_helo() -> None:
    p = Peer()
    assert codes(p.send(b"EHLO bad.example\r\n", refuse)) == [550]
    assert p.conn.session.helo is None
    assert codes(p.send(b"MAIL FROM:<a@b.example>\r\n")) == [503]


def test_rejected_second_hello_keeps_the_first(peer: Peer) -> None:
    peer.send(b"MAIL FROM:<a@b.example>\r\n")
    assert codes(peer.send(b"HELO other.example\r\n", refuse)) == [550]
    assert peer.conn.session.helo == "client.example" and peer.conn.session.esmtp
    assert peer.conn.session.envelope.mail_given  # the transaction was not reset


def test_rejected_mail_leaves_no_transaction(peer: Peer) -> None:
    assert codes(peer.send(b"MAIL FROM:<a@b.example>\r\n", refuse)) == [550]
    assert not peer.conn.session.envelope.mail_given
    assert peer.conn.session.envelope.sender is None
    assert codes(peer.send(b"RCPT TO:<u@example.org>\r\n")) == [503]
    assert codes(peer.send(b"MAIL FROM:<a@b.example>\r\n")) == [250]


def test_rejected_rcpt_is_not_recorded(peer: Peer) -> None:
    peer.send(b"MAIL FROM:<a@b.example>\r\n")
    assert codes(peer.send(b"RCPT TO:<u@example.org>\r\n", refuse)) == [550]
    assert peer.conn.session.envelope.recipients == []
    assert codes(peer.send(b"DATA\r\n")) == [554]


def test_rejected_data_stays_in_command_phase(peer: Peer) -> None:
    peer.send(b"MAIL FROM:<a@b.example>\r\nRCPT TO:<u@example.org>\r\n")
    assert codes(peer.send(b"DATA\r\n", lambda c, e: c.reject(R.LOW_DISK))) == [452]
    assert peer.conn.phase is Phase.COMMAND
    assert peer.conn.session.envelope.recipients == [Address("u", "example.org")]
    assert codes(peer.send(b"DATA\r\n")) == [354]


def test_reject_with_421_closes(peer: Peer) -> None:
    out = peer.send(b"MAIL FROM:<a@b.example>\r\n", lambda c, e: c.reject(R.SHUTTING_DOWN))
    assert codes(out) == [421]
    assert peer.new_events()[-1] == ConnectionClosed("421 after Mail")
    assert peer.conn.phase is Phase.CLOSED
