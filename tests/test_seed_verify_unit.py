"""VRFY/EXPN without sockets: when the sans-I/O protocol hands them to the application, and
what `inbound/verify.py` answers from a users map; the inetd peer rules."""

from __future__ import annotations

from pathlib import Path

import pytest

from postier.inbound.verify import answer_expn, answer_vrfy
from postier.net.inetd import StdinPeer, peer_from_environ, refusal_for
from postier.net.roles import LOCAL, MX
from postier.policy import Policy, load_users
from postier.protocol.events import NEED_DATA, Expn, Vrfy
from postier.protocol.server import ServerConnection
from postier.protocol.state import ServerConfig


def _conn(**config: bool) -> ServerConnection:
    conn = ServerConnection(ServerConfig(hostname="mx.test", **config))
    conn.greeting()
    conn.receive_data(b"EHLO c.test\r\n")
    conn.next_event()
    conn.accept()
    conn.data_to_send()
    return conn


def _command(conn: ServerConnection, line: bytes) -> object:
    conn.receive_data(line + b"\r\n")
    return conn.next_event()


def test_vrfy_is_answered_alone_by_default() -> None:
    conn = _conn()
    assert _command(conn, b"VRFY alice") is NEED_DATA
    assert conn.data_to_send().startswith(b"252 ")
    assert _command(conn, b"EXPN team") is NEED_DATA
    assert conn.data_to_send().startswith(b"502 ")


def test_vrfy_and_expn_become_events_where_allowed() -> None:
    conn = _conn(vrfy_truthful=True, expn_allowed=True)
    assert _command(conn, b"VRFY <alice@example.org>") == Vrfy("<alice@example.org>")
    conn.reject(answer_vrfy(Policy(["example.org"], {}), "<alice@example.org>"))
    assert conn.data_to_send().startswith(b"550 5.1.1 ")
    assert _command(conn, b"EXPN team") == Expn("team")
    conn.decide(None)
    assert conn.data_to_send().startswith(b"252 ")
    assert _command(conn, b"EXPN") is NEED_DATA  # syntax stays the protocol's
    assert conn.data_to_send().startswith(b"501 ")


def test_vrfy_after_auth_is_an_event() -> None:
    conn = _conn()
    conn.session.auth_user = "alice"
    assert isinstance(_command(conn, b"VRFY bob"), Vrfy)


@pytest.fixture
def policy(tmp_path: Path) -> Policy:
    users = tmp_path / "users"
    users.write_text("alice@example.org\ndave\n@other.test catchbox\n")
    aliases = {"team": ["alice@example.org", "someone@remote.test"]}
    return Policy(["example.org", "other.test"], load_users(users, []), aliases, "+")


@pytest.mark.parametrize(
    ("query", "line"),
    [
        ("alice", "250 2.1.5 <alice@example.org>"),
        ("Alice Liddell <alice+x@example.org>", "250 2.1.5 <alice+x@example.org>"),
        ("nobody@example.org", "550 5.1.1"),
        ("dave", "252 2.1.5 Ambiguous"),
        ("who@other.test", "252 2.1.5 Cannot VRFY"),
        ("x@remote.test", "252 2.1.5 Not a local domain"),
        ("<broken", "252 "),
    ],
)
def test_answer_vrfy(policy: Policy, query: str, line: str) -> None:
    assert answer_vrfy(policy, query).to_bytes().decode().startswith(line)


def test_answer_expn_lists_local_and_remote_members(policy: Policy) -> None:
    text = answer_expn(policy, "team@example.org").to_bytes().decode()
    assert text == "250-2.1.5 <alice@example.org>\r\n250 2.1.5 <someone@remote.test>\r\n"
    assert answer_expn(policy, "nobody@example.org").code == 550


def test_inetd_peer_from_the_spawners_environment() -> None:
    assert peer_from_environ({"TCPREMOTEIP": "192.0.2.1", "TCPREMOTEPORT": "25"}) == (
        "192.0.2.1", 25, "TCPREMOTEIP",
    )  # fmt: skip
    assert peer_from_environ({"REMOTE_HOST": "not-an-ip", "SOCAT_PEERADDR": "::ffff:127.0.0.1"})
    assert peer_from_environ({"REMOTE_HOST": "host.example"}) is None
    assert refusal_for(LOCAL, StdinPeer("127.0.0.2", 0, "socket")) is None
    assert refusal_for(LOCAL, StdinPeer("192.0.2.1", 0, "socket")) is not None
    assert refusal_for(MX, StdinPeer("192.0.2.1", 0, "socket")) is None
    assert refusal_for(MX, StdinPeer(None, 0, "none")) is not None
