"""No TLS session tickets on the mx listener, tickets on submission and submissions.

Outlook.com's senders abort STARTTLS with servers that send TLS 1.3 session tickets
(chasquid#64, mox#237, golang/go#70232). We count the NewSessionTicket handshake messages a
real client (`openssl s_client -msg`) sees on each listener of a real `postier serve`.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator

import pytest

from tests.outbound_helpers import Pki
from tests.server import PostierServer, free_port, make_server

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PostierServer]:
    root = tmp_path_factory.mktemp("tickets")
    cert, key = Pki(root / "pki").issue("mx.test")
    (root / "passwd").write_text("")
    srv = make_server(
        root / "srv",
        extra=[
            "--tls-cert", str(cert), "--tls-key", str(key), "-P", str(root / "passwd"),
            "--submission", f"127.0.0.1:{free_port()}",
            "--submissions", f"127.0.0.1:{free_port()}",
        ],
    )  # fmt: skip
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


def _port(server: PostierServer, flag: str) -> int:
    return int(server.args[server.args.index(flag) + 1].rpartition(":")[2])


def tickets(port: int, *, starttls: bool, version: str) -> int:
    """NewSessionTicket messages seen in one session that ends with QUIT and its 221."""
    cmd = ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-servername", "mx.test"]
    cmd += ["-msg", version, "-ign_eof"]
    if starttls:
        cmd += ["-starttls", "smtp"]
    out = subprocess.run(cmd, input=b"QUIT\r\n", capture_output=True, timeout=30)
    text = out.stdout.decode("utf-8", "replace")
    assert "221" in text, text[-2000:]  # the session ran to the end: no ticket was missed
    return text.count("NewSessionTicket")


@pytest.mark.parametrize("version", ["-tls1_3", "-tls1_2"])
def test_mx_sends_no_tickets_submission_does(server: PostierServer, version: str) -> None:
    assert tickets(server.mx_port, starttls=True, version=version) == 0
    assert tickets(_port(server, "--submission"), starttls=True, version=version) >= 1
    assert tickets(_port(server, "--submissions"), starttls=False, version=version) >= 1
