"""REQUIRETLS (RFC 8689) in the sans-I/O server: offered and accepted on TLS sessions only."""

from __future__ import annotations

from postier.protocol.events import Mail
from tests.test_server_protocol import Peer, codes


def test_plaintext_session_neither_offers_nor_accepts_requiretls() -> None:
    p = Peer()
    assert b"REQUIRETLS" not in p.ehlo()
    out = p.send(b"MAIL FROM:<a@example.org> REQUIRETLS\r\n")
    assert out.startswith(b"530 5.7.10 ") and p.new_events() == []
    assert codes(p.send(b"MAIL FROM:<a@example.org>\r\n")) == [250]  # still usable


def test_tls_session_offers_and_accepts_requiretls() -> None:
    p = Peer(implicit_tls=True)
    assert b"250-REQUIRETLS\r\n" in p.ehlo()
    assert p.send(b"MAIL FROM:<a@example.org> REQUIRETLS=1\r\n").startswith(b"501 5.5.4 ")
    assert codes(p.send(b"MAIL FROM:<a@example.org> REQUIRETLS\r\n")) == [250]
    (event,) = p.new_events()
    assert isinstance(event, Mail) and "REQUIRETLS" in event.params
