"""VRFY and EXPN, truthful where it is safe (issue 15): the dialogue scripts of
tests/dialogues/local/ against the local listener, then vrfy_mx, expn_local and VRFY after
AUTH on submission against a second server configured for them."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.server import PostierServer, free_port, make_server
from tests.test_dialogues import DIALOGUES, parse_script, run_dialogue
from tests.test_tls_integration import Client, client_context, write_pair

LOCAL_SCENARIOS = sorted((DIALOGUES / "local").glob("*.txt"))
USERS = "alice@example.org\nbob@example.org\ndave\n@other.test catchbox\n"
ALIASES = "team: alice, bob\n"
DOMAINS = ("example.org", "other.test")


@pytest.fixture(scope="module")
def local_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PostierServer]:
    srv = make_server(
        tmp_path_factory.mktemp("vrfy") / "srv", users=USERS, aliases=ALIASES, domains=DOMAINS
    ).start()
    try:
        yield srv
    finally:
        assert srv.stop() == 0


@pytest.mark.parametrize("script", LOCAL_SCENARIOS, ids=[p.stem for p in LOCAL_SCENARIOS])
def test_local_dialogue(script: Path, local_server: PostierServer) -> None:
    steps = parse_script(script)
    run_dialogue(steps, "127.0.0.1", local_server.local_port, f"local/{script.name}")


def test_vrfy_answers_are_logged(local_server: PostierServer) -> None:
    c = Client(local_server.local_port)
    try:
        c.reply()
        c.ehlo()
        assert c.cmd("VRFY bob")[0] == 250
    finally:
        c.close()
    assert local_server.logged("event=vrfy", "query=bob"), local_server.log()


@pytest.fixture(scope="module")
def open_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[PostierServer, int]]:
    """vrfy_mx and expn_local on, and a submission listener with a seed password file."""
    tmp = tmp_path_factory.mktemp("vrfy-open")
    cert, key = tmp / "cert.pem", tmp / "key.pem"
    write_pair(cert, key, "mx.test")
    (tmp / "login_pass.txt").write_text("alice secret1\n")
    (tmp / "postier.toml").write_text("vrfy_mx = true\nexpn_local = true\n")
    submission = free_port()
    srv = make_server(
        tmp / "srv", users=USERS, aliases=ALIASES, domains=DOMAINS,
        extra=[
            "-c", str(tmp / "postier.toml"), "-pass", str(tmp / "login_pass.txt"),
            "--submission", f"127.0.0.1:{submission}",
            "--tls-cert", str(cert), "--tls-key", str(key),
        ],
    ).start()  # fmt: skip
    try:
        yield srv, submission
    finally:
        assert srv.stop() == 0


def _session(port: int) -> Client:
    c = Client(port)
    assert c.reply()[0] == 220
    c.ehlo()
    return c


def test_vrfy_mx_true_tells_the_truth_on_mx(open_server: tuple[PostierServer, int]) -> None:
    srv, _ = open_server
    c = _session(srv.mx_port)
    try:
        assert c.cmd("VRFY alice")[0] == 250
        assert c.cmd("VRFY nobody@example.org")[0] == 550
        assert c.cmd("EXPN team")[0] == 502  # expn_local is for local only
    finally:
        c.close()


def test_expn_local_lists_the_alias_members(open_server: tuple[PostierServer, int]) -> None:
    srv, _ = open_server
    c = _session(srv.local_port)
    try:
        code, text = c.cmd("EXPN team@example.org")
        assert code == 250
        assert "<alice@example.org>" in text and "<bob@example.org>" in text
        assert c.cmd("EXPN nobody@example.org")[0] == 550
    finally:
        c.close()


def test_vrfy_on_submission_is_truthful_only_after_auth(
    open_server: tuple[PostierServer, int],
) -> None:
    _, port = open_server
    c = _session(port)
    try:
        c.starttls(context=client_context())
        c.ehlo()
        assert c.cmd("VRFY alice")[0] == 252  # a stranger learns nothing
        token = base64.b64encode(b"\0alice\0secret1").decode()
        assert c.cmd(f"AUTH PLAIN {token}")[0] == 235
        assert c.cmd("VRFY bob")[0] == 250
        assert c.cmd("VRFY nobody@example.org")[0] == 550
    finally:
        c.close()
