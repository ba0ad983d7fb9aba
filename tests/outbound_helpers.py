"""Real peers for the outbound TLS tests: a private CA, a DNSSEC-flagging DNS responder,
receiving MX servers (our own postier listener) with good, wrong-name and expired
certificates or no STARTTLS at all, and a loopback HTTPS policy host for MTA-STS.

- `Pki`: a trustme CA; `issue(name)` writes a chain and key for a name.
- `SecureDnsServer`: tests/dnsserver.py's responder that sets the AD bit on answers for the
  names in `secure`, as a validating resolver would (we trust AD only from our resolver).
- `Receivers`: two `postier serve` processes: `tls` (STARTTLS, certificates chosen by SNI:
  mx.good.test is valid, mx.expired.test expired, any other name gets a certificate for
  default.test) and `plain` (no certificate, so no STARTTLS).
- `PolicyHost`: `http.server` + ssl in a thread, serving /.well-known/mta-sts.txt per Host
  header from a dict; special bodies "REDIRECT" and "SLOW" (never answers in time).
"""

from __future__ import annotations

import datetime as dt
import http.server
import itertools
import ssl
import struct
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dns.flags
import dns.message
import trustme

from postier.delivery.base import Recipient, StoredMessage
from tests.dnsserver import DnsServer
from tests.server import PostierServer, make_server

_counter = itertools.count(1)


class Pki:
    """A private CA; certificates for the fake MX names and the policy hosts."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.ca = trustme.CA()
        self.ca_file = self.dir / "ca.pem"
        self.ca.cert_pem.write_to_path(str(self.ca_file))

    def issue(
        self,
        *names: str,
        expired: bool = False,
        into: Path | None = None,
    ) -> tuple[Path, Path]:
        """Write `fullchain.pem` and `privkey.pem` into `into` (default: a dir per name)."""
        kwargs: dict[str, Any] = {}
        if expired:
            now = dt.datetime.now(dt.UTC)
            kwargs = {
                "not_before": now - dt.timedelta(days=30),
                "not_after": now - dt.timedelta(days=1),
            }
        leaf = self.ca.issue_cert(*names, **kwargs)
        target = into or self.dir / names[0]
        target.mkdir(parents=True, exist_ok=True)
        chain, key = target / "fullchain.pem", target / "privkey.pem"
        # The CA goes along (RFC 7671 §5.2.2 asks for the trust anchor in the chain: DANE-TA).
        pems = [blob.bytes() for blob in leaf.cert_chain_pems] + [self.ca.cert_pem.bytes()]
        chain.write_bytes(b"".join(pems))
        leaf.private_key_pem.write_to_path(str(key))
        return chain, key


class SecureDnsServer(DnsServer):
    """Sets the AD bit on answers for names in `secure` (and only those)."""

    def __init__(self, zone: dict[str, Any], secure: set[str] | None = None, **kwargs: Any) -> None:
        super().__init__(zone, **kwargs)
        self.secure = {name.lower().rstrip(".") for name in secure or set()}
        # name -> TLSA RDATA as raw bytes, for records dnspython refuses to write (wrong length)
        self.raw_tlsa: dict[str, list[bytes]] = {}

    def _raw_tlsa(self, query: dns.message.Message, rdatas: list[bytes]) -> bytes:
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA | dns.flags.AD
        response.use_edns(False)  # no OPT record, so what we append is the answer section
        wire = bytearray(response.to_wire())
        wire[6:8] = struct.pack("!H", len(rdatas))  # ANCOUNT
        for rdata in rdatas:  # owner: a pointer to the question name at offset 12
            wire += b"\xc0\x0c" + struct.pack("!HHIH", 52, 1, 60, len(rdata)) + rdata
        return bytes(wire)

    def answer(self, wire: bytes, *, tcp: bool = False) -> bytes | None:
        query = dns.message.from_wire(wire)
        name = query.question[0].name.to_text(omit_final_dot=True).lower()
        if name in self.raw_tlsa:
            return self._raw_tlsa(query, self.raw_tlsa[name])
        out = super().answer(wire, tcp=tcp)
        if out is None:
            return None
        response = dns.message.from_wire(out)
        if response.question:
            name = response.question[0].name.to_text(omit_final_dot=True).lower()
            if name in self.secure:
                response.flags |= dns.flags.AD
                return response.to_wire()
        return out


DOMAINS = (
    "good.test",
    "wrongname.test",
    "expired.test",
    "plain.test",
    "sts.test",
    "testing.test",
    "outside.test",
    "cached.test",
    "dane.test",
    "danebad.test",
    "daneta.test",
    "daneinsecure.test",
    "daneunusable.test",
    "static.test",
    "bad.test",
    "daneexp.test",
    "danetabad.test",
    "danemalformed.test",
    "daneaddr.test",
    "testingout.test",
)


@dataclass
class Receivers:
    tls: PostierServer
    plain: PostierServer
    pki: Pki

    def delivered(self, server: PostierServer) -> int:
        return len(server.maildir_files("alice"))


def start_receivers(root: Path, pki: Pki) -> Receivers:
    users = "".join(f"alice@{d}\n" for d in DOMAINS)
    cert_dir = root / "certs"
    pki.issue(
        "mx.good.test",
        "mx.sts.test",
        "mx.testing.test",
        "mx.outside.test",
        "mx.cached.test",
        "mx.dane.test",
        "mx.daneta.test",
        "mx.daneinsecure.test",
        "mx.static.test",
        into=cert_dir / "good",
    )
    pki.issue("mx.expired.test", expired=True, into=cert_dir / "expired")
    cert, key = pki.issue("default.test", into=root / "default")
    tls = make_server(
        root / "tls",
        users=users,
        domains=DOMAINS,
        extra=["--tls-cert", str(cert), "--tls-key", str(key), "--tls-cert-dir", str(cert_dir)],
    )
    plain = make_server(root / "plain", users=users, domains=DOMAINS)
    tls.start()
    try:
        plain.start()
    except BaseException:
        tls.stop()
        raise
    return Receivers(tls, plain, pki)


def stored(
    directory: Path,
    body: bytes = b"Subject: t\nFrom: s@origin.test\n\nHello.\n",
    sender: str = "s@origin.test",
) -> StoredMessage:
    head = f"Return-Path: <{sender}>\n".encode()
    path = directory / f"spool-{next(_counter)}"
    path.write_bytes(head + body)
    return StoredMessage(path, len(head) + len(body), len(head), sender, "QTLS", time.time())


def rcpt(address: str) -> list[Recipient]:
    return [Recipient(address)]


class PolicyHost:
    """An HTTPS server on loopback answering MTA-STS fetches from `policies[host]`.

    A value "REDIRECT" answers 301, "SLOW" holds the request past any sane time-out, and
    a missing host answers 404. `requests` counts fetches per host (cache assertions).
    """

    def __init__(self, pki: Pki, names: list[str]) -> None:
        self.policies: dict[str, str | bytes] = {}
        self.requests: dict[str, int] = {}
        self.release = threading.Event()  # set at stop: frees a "SLOW" handler
        chain, key = pki.issue(*names, into=pki.dir / "policy-host")
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(chain, key)
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                host = (self.headers.get("Host") or "").split(":")[0].lower()
                owner.requests[host] = owner.requests.get(host, 0) + 1
                body = owner.policies.get(host)
                if self.path != "/.well-known/mta-sts.txt" or body is None:
                    self.send_error(404)
                    return
                if body == "REDIRECT":
                    self.send_response(301)
                    self.send_header("Location", f"https://{host}/elsewhere")
                    self.end_headers()
                    return
                if body == "SLOW":
                    owner.release.wait(30)
                    return
                data = body.encode() if isinstance(body, str) else body
                self.send_response(200)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.httpd.socket = self.context.wrap_socket(self.httpd.socket, server_side=True)
        self.port = self.httpd.server_address[1]
        self._thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    def __enter__(self) -> PolicyHost:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        self._thread.join(timeout=5)


def policy_text(mode: str, *mx: str, max_age: int = 86400, eol: str = "\r\n") -> str:
    lines = ["version: STSv1", f"mode: {mode}", *(f"mx: {m}" for m in mx), f"max_age: {max_age}"]
    return eol.join(lines) + eol
