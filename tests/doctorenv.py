"""A small world for `postier doctor` tests: a private CA, our certificate, a DKIM key, a real
postier server on loopback (IPv4 and IPv6, one port) and the zone our own `--records` prints.

The "correct zone" of the tests is parsed back from `postier doctor --records` (dnspython reads
zone text), so the tests also prove that doctor never complains about what it recommends.
Each problem test changes one thing in a copy of that zone and serves it from
tests/dnsserver.py.
"""

from __future__ import annotations

import contextlib
import copy
import datetime as dt
import io
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dns.name
import dns.rdatatype
import dns.zone
import trustme

from postier.cli import main
from postier.dkim.keys import generate_key
from tests.dnsserver import DnsServer, Zone
from tests.server import PostierServer, make_server

DOMAIN = "example.test"
HOST = "mx.example.test"
ADDRESSES = ("127.0.0.1", "::1")


def zone_from_text(text: str) -> Zone:
    """Zone text (as `--records` prints it) to the dict tests/dnsserver.py serves."""
    parsed = dns.zone.from_text(text, origin=dns.name.root, relativize=False, check_origin=False)
    zone: Zone = {}
    for name, node in parsed.nodes.items():
        for rdataset in node.rdatasets:
            rtype = dns.rdatatype.to_text(rdataset.rdtype)
            if rtype == "MX":
                values: list[Any] = [(r.preference, r.exchange.to_text()) for r in rdataset]
            else:
                values = [r.to_text() for r in rdataset]
            zone.setdefault(name.to_text(omit_final_dot=True).lower(), {})[rtype] = values
    return zone


def run_doctor(*args: str) -> tuple[int, str, str]:
    """`postier doctor ARGS` in this process (same code path as the command line)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["doctor", *args])
    return code, out.getvalue(), err.getvalue()


@dataclass
class DoctorWorld:
    root: Path
    server: PostierServer
    dns: DnsServer
    ca_file: Path
    cert_file: Path
    key_file: Path
    dkim_dir: Path
    good_zone: Zone = field(default_factory=dict)

    def config_args(self) -> list[str]:
        """Our server's settings, as doctor reads them (the same flags as `serve`)."""
        return [
            "-H", HOST, "-s", DOMAIN,
            "--public-ip", ADDRESSES[0], "--public-ip", ADDRESSES[1],
            "--mx", f"127.0.0.1:{self.server.mx_port}",
            "--tls-cert", str(self.cert_file), "--tls-key", str(self.key_file),
            "--dkim-keys", str(self.dkim_dir),
        ]  # fmt: skip

    def records(self) -> str:
        code, out, err = run_doctor(*self.config_args(), "--records")
        assert code == 0, err
        return out

    def check(self, zone: Zone | None = None, *extra: str) -> tuple[int, list[str], str]:
        """Serve `zone` (default: the correct one) and run doctor: (exit, PROBLEM lines, out)."""
        self.dns.zone = {k.lower().rstrip("."): v for k, v in (zone or self.good_zone).items()}
        code, out, err = run_doctor(
            *self.config_args(),
            "--dns-server", f"127.0.0.1:{self.dns.port}",
            "--tls-ca-file", str(self.ca_file),
            "--dns-timeout", "1",
            *extra,
        )  # fmt: skip
        assert code in (0, 1), err
        return code, [line for line in out.splitlines() if line.startswith("PROBLEM")], out

    def zone(self) -> Zone:
        """A copy of the correct zone to break one thing in."""
        return copy.deepcopy(self.good_zone)


@contextlib.contextmanager
def doctor_world(
    *, cert_names: tuple[str, ...] = (HOST,), valid_days: int = 90
) -> Iterator[DoctorWorld]:
    """Everything started, and stopped and removed again whatever happens."""
    root = Path(tempfile.mkdtemp(prefix="postier-doctor-"))
    server: PostierServer | None = None
    dns_server: DnsServer | None = None
    try:
        ca = trustme.CA()
        now = dt.datetime.now(dt.UTC)
        leaf = ca.issue_cert(
            *cert_names,
            not_before=now - dt.timedelta(days=1),
            not_after=now + dt.timedelta(days=valid_days),
        )
        cert_file, key_file, ca_file = root / "cert.pem", root / "key.pem", root / "ca.pem"
        cert_file.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
        leaf.private_key_pem.write_to_path(str(key_file))
        ca.cert_pem.write_to_path(str(ca_file))
        dkim_dir = root / "dkim"
        generate_key(dkim_dir, DOMAIN, "s1")
        server = make_server(root / "srv", domains=(DOMAIN,), extra=["--tls-cert", str(cert_file),
                             "--tls-key", str(key_file)])  # fmt: skip
        server.args += ["--mx", f"[::1]:{server.mx_port}"]  # our AAAA answers on the same port
        server.start()
        dns_server = DnsServer({}).start()
        world = DoctorWorld(root, server, dns_server, ca_file, cert_file, key_file, dkim_dir)
        world.good_zone = zone_from_text(world.records())
        yield world
    finally:
        if dns_server is not None:
            dns_server.stop()
        if server is not None:
            server.stop()
        shutil.rmtree(root, ignore_errors=True)
