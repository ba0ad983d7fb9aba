"""A small authoritative DNS responder on loopback for tests (UDP and TCP, one port).

Why our own: every look-up in the tests must stay on this machine, and the cases we need
(SERVFAIL on purpose, a server that never answers, a null MX) are awkward to get from a real
server. Records are given as a dict:

    zone = {
        "example.test": {"MX": [(10, "mx1.example.test"), (20, "mx2.example.test")]},
        "mx1.example.test": {"A": ["127.0.0.1"], "AAAA": ["::1"]},
        "nullmx.test": {"MX": [(0, ".")]},
        "broken.test": "SERVFAIL",       # every query for the name answers SERVFAIL
        "silent.test": "TIMEOUT",        # every query for the name is dropped
        "half.test": {"A": ["127.0.0.1"], "AAAA": "SERVFAIL"},  # per type, too
    }

A name that is absent answers NXDOMAIN; a present name without the asked type answers NOERROR
with no records (NODATA). Names are matched case-insensitively, with or without the final dot.
Every query is recorded in `queries` as (name, type) for assertions.

    with DnsServer(zone) as dns_server:
        resolver = Resolver("127.0.0.1", dns_server.port, timeout=2)
"""

from __future__ import annotations

import socket
import socketserver
import struct
import threading
from typing import Any

import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rrset

Zone = dict[str, Any]


def _rdata_text(rdtype: str, value: Any) -> str:
    if rdtype == "MX":
        pref, host = value
        host = host if host.endswith(".") else host + "."
        return f"{pref} {host}"
    return str(value)


class DnsServer:
    """Threaded UDP+TCP responder bound to 127.0.0.1 on a free port (or `port`)."""

    def __init__(self, zone: Zone, host: str = "127.0.0.1", port: int = 0) -> None:
        self.zone = {k.lower().rstrip("."): v for k, v in zone.items()}
        self.host = host
        self.port = port
        self.queries: list[tuple[str, str]] = []
        self.tcp_queries = 0
        self._servers: list[socketserver.BaseServer] = []
        self._threads: list[threading.Thread] = []

    # -- answering --

    def answer(self, wire: bytes, *, tcp: bool = False) -> bytes | None:
        """The reply to one query in wire format, or None to stay silent.

        Over UDP, an answer larger than the client's buffer (512 bytes, or its EDNS size)
        goes out truncated (TC set, no records), so the client must retry over TCP.
        """
        try:
            query = dns.message.from_wire(wire)
        except Exception:
            return None
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        if not query.question:
            response.set_rcode(dns.rcode.FORMERR)
            return response.to_wire()
        question = query.question[0]
        name = question.name.to_text(omit_final_dot=True).lower()
        rdtype = dns.rdatatype.to_text(question.rdtype)
        self.queries.append((name, rdtype))
        if tcp:
            self.tcp_queries += 1
        entry = self.zone.get(name)
        if entry == "TIMEOUT":
            return None
        if entry == "SERVFAIL":
            response.set_rcode(dns.rcode.SERVFAIL)
        elif entry is None:
            response.set_rcode(dns.rcode.NXDOMAIN)
        elif entry.get(rdtype) == "TIMEOUT":
            return None
        elif entry.get(rdtype) == "SERVFAIL":
            response.set_rcode(dns.rcode.SERVFAIL)
        else:
            values = entry.get(rdtype, [])
            if values:
                rrset = dns.rrset.from_text_list(
                    question.name,
                    60,
                    dns.rdataclass.IN,
                    rdtype,
                    [_rdata_text(rdtype, v) for v in values],
                )
                response.answer.append(rrset)
        wire_out = response.to_wire()
        limit = max(512, query.payload) if query.edns >= 0 else 512
        if not tcp and len(wire_out) > limit:
            response.answer.clear()
            response.flags |= dns.flags.TC
            wire_out = response.to_wire()
        return wire_out

    # -- serving --

    def start(self) -> DnsServer:
        owner = self

        class Udp(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                data, sock = self.request
                reply = owner.answer(data)
                if reply is not None:
                    sock.sendto(reply, self.client_address)

        class Tcp(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                sock: socket.socket = self.request
                sock.settimeout(5)
                try:
                    while True:
                        head = _recv_exact(sock, 2)
                        if head is None:
                            return
                        data = _recv_exact(sock, struct.unpack("!H", head)[0])
                        if data is None:
                            return
                        reply = owner.answer(data, tcp=True)
                        if reply is None:
                            return
                        sock.sendall(struct.pack("!H", len(reply)) + reply)
                except OSError:
                    return

        for _ in range(20):  # bounded: a TCP port equal to our UDP port is almost always free
            udp = socketserver.ThreadingUDPServer((self.host, self.port), Udp)
            port = udp.server_address[1]
            try:
                tcp = socketserver.ThreadingTCPServer((self.host, port), Tcp)
            except OSError:
                udp.server_close()
                if self.port:
                    raise
                continue
            break
        else:  # pragma: no cover
            raise RuntimeError("no free port for the DNS responder")
        udp.daemon_threads = tcp.daemon_threads = True
        self.port = port
        self._servers = [udp, tcp]
        for server in self._servers:
            thread = threading.Thread(
                target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
            )
            thread.start()
            self._threads.append(thread)
        return self

    def stop(self) -> None:
        for server in self._servers:
            server.shutdown()
            server.server_close()
        for thread in self._threads:
            thread.join(timeout=5)
        self._servers, self._threads = [], []

    def __enter__(self) -> DnsServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _recv_exact(sock: socket.socket, n: int) -> bytes | None:
    buf = b""
    while len(buf) < n:
        part = sock.recv(n - len(buf))
        if not part:
            return None
        buf += part
    return buf
