"""REQUIRETLS (RFC 8689) end to end: our listener's EHLO and MAIL, then the relay's choice of
hop, against real receivers (our own postier with trustme certificates, a private Postfix,
which does not offer REQUIRETLS), MTA-STS from a loopback policy host and DANE from the
loopback responder."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import re
import smtplib
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from postier.delivery.base import RecipientResult, Status, StoredMessage
from postier.delivery.smtp import SmtpRelay, Timeouts
from postier.dns import Resolver, SecureLookups
from postier.outbound.dane import Dane
from postier.outbound.mta_sts import MtaSts
from postier.outbound.requiretls import tls_required_no
from postier.outbound.tls_policy import TlsPolicy
from postier.tls import client_context
from tests.outbound_helpers import (
    Pki,
    PolicyHost,
    Receivers,
    SecureDnsServer,
    policy_text,
    rcpt,
    start_receivers,
    stored,
)
from tests.server import make_server
from tests.sinks import POSTFIX, PrivatePostfix, have, public_tmpdir

STS = ("sts.test", "wrongname.test")


@dataclasses.dataclass
class World:
    recv: Receivers
    dns: SecureDnsServer
    policy_host: PolicyHost
    postfix: PrivatePostfix | None


def _spki_sha256(chain: Path) -> str:
    leaf = x509.load_pem_x509_certificates(chain.read_bytes())[0]
    spki = leaf.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(spki).hexdigest()


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    root = tmp_path_factory.mktemp("requiretls")
    pki = Pki(root / "pki")
    recv = start_receivers(root, pki)
    zone: dict[str, object] = {}
    for d in (*STS, "good.test", "plain.test", "pf.test", "dane.test"):
        zone[d] = {"MX": [(10, f"mx.{d}")]}
        zone[f"mx.{d}"] = {"A": ["127.0.0.1"]}
    for d in (*STS, "pf.test"):
        zone[f"mta-sts.{d}"] = {"A": ["127.0.0.1"]}
        zone[f"_mta-sts.{d}"] = {"TXT": ['"v=STSv1; id=1"']}
    good_chain = root / "certs" / "good" / "fullchain.pem"
    zone["_25._tcp.mx.dane.test"] = {"TLSA": [f"3 1 1 {_spki_sha256(good_chain)}"]}
    secure = {"dane.test", "mx.dane.test", "_25._tcp.mx.dane.test"}
    with public_tmpdir() as pub:
        postfix = None
        try:
            if have(POSTFIX):
                chain, key = pki.issue("mx.pf.test", into=pub / "pfcert")
                tls_files = {"smtpd_tls_cert_file": str(chain), "smtpd_tls_key_file": str(key)}
                postfix = PrivatePostfix(pub / "pf", "pf.test", ["alice"], extra=tls_files)
                postfix.start()
            with (
                SecureDnsServer(zone, secure) as dns_server,
                PolicyHost(pki, [f"mta-sts.{d}" for d in (*STS, "pf.test")]) as host,
            ):
                for d in (*STS, "pf.test"):
                    host.policies[f"mta-sts.{d}"] = policy_text("enforce", f"mx.{d}")
                yield World(recv, dns_server, host, postfix)
        finally:
            if postfix is not None:
                postfix.stop()
            recv.tls.stop()
            recv.plain.stop()


def send(
    world: World,
    tmp: Path,
    to: str,
    message: StoredMessage,
    *,
    port: int | None = None,
) -> tuple[RecipientResult, str]:
    resolver = Resolver("127.0.0.1", world.dns.port, timeout=2.0)
    lookups = SecureLookups(resolver)
    context = client_context(verify=True, ca_file=world.recv.pki.ca_file)
    sts = MtaSts(lookups, tmp / "cache", context=context, port=world.policy_host.port, timeout=2.0)
    relay = SmtpRelay(
        "client.test",
        resolver=resolver,
        timeouts=Timeouts.uniform(10.0),
        remote_port=port or world.recv.tls.mx_port,
        tls_policy=TlsPolicy(mta_sts=sts, dane=Dane(lookups)),
        ca_file=str(world.recv.pki.ca_file),
    )

    async def go() -> tuple[RecipientResult, str]:
        async with relay.session(to.rpartition("@")[2]) as s:
            res = await s.send(message, rcpt(to))
            return res[0], s.tls_state()

    return asyncio.run(go())


def requiring(tmp: Path, body: bytes | None = None) -> StoredMessage:
    message = stored(tmp) if body is None else stored(tmp, body)
    return dataclasses.replace(message, requiretls=True)


RELAXED = b"Subject: t\nFrom: s@origin.test\nTLS-Required: No\n\nHello.\n"


# --- our listener -------------------------------------------------------------------------


def test_plaintext_mail_with_requiretls_gets_530(world: World) -> None:
    with smtplib.SMTP("127.0.0.1", world.recv.plain.mx_port, timeout=10) as s:
        s.ehlo("client.test")
        assert not s.has_extn("requiretls")
        code, text = s.mail("s@origin.test", ["REQUIRETLS"])
        assert code == 530 and text.startswith(b"5.7.10")
        assert s.mail("s@origin.test")[0] == 250  # the session stays usable


def test_requiretls_offered_and_accepted_over_tls(world: World) -> None:
    context = ssl.create_default_context(cafile=str(world.recv.pki.ca_file))
    context.check_hostname = False
    with smtplib.SMTP("127.0.0.1", world.recv.tls.mx_port, timeout=10) as s:
        s.ehlo("client.test")
        assert not s.has_extn("requiretls")  # not before TLS
        s.starttls(context=context)
        s.ehlo("client.test")
        assert s.has_extn("requiretls")
        assert s.mail("s@origin.test", ["REQUIRETLS=yes"])[0] == 501
        assert s.mail("s@origin.test", ["REQUIRETLS"])[0] == 250


# --- the relay: verified hops carry it, others bounce it with 5.7.30 ------------------------


def test_delivered_through_mta_sts_verified_hop(world: World, tmp_path: Path) -> None:
    before = world.recv.delivered(world.recv.tls)
    res, tls = send(world, tmp_path, "alice@sts.test", requiring(tmp_path))
    assert res.status is Status.DELIVERED, res
    assert (tls, res.tls_policy) == ("verified", "mta-sts")
    assert world.recv.delivered(world.recv.tls) == before + 1
    assert world.recv.tls.logged("requiretls=True")  # the parameter was passed on


def test_delivered_through_dane_verified_hop(world: World, tmp_path: Path) -> None:
    res, tls = send(world, tmp_path, "alice@dane.test", requiring(tmp_path))
    assert res.status is Status.DELIVERED, res
    assert (tls, res.tls_policy) == ("verified", "dane")


def test_bounced_without_a_policy(world: World, tmp_path: Path) -> None:
    """good.test has a valid certificate, but no MTA-STS or DANE says which name to trust."""
    res, tls = send(world, tmp_path, "alice@good.test", requiring(tmp_path))
    assert res.status is Status.PERMANENT and res.enhanced == "5.7.30", res
    assert "no MTA-STS or DANE policy" in res.text and tls == "encrypted"


def test_bounced_when_the_hop_has_no_starttls(world: World, tmp_path: Path) -> None:
    res, tls = send(
        world, tmp_path, "alice@plain.test", requiring(tmp_path), port=world.recv.plain.mx_port
    )
    assert res.status is Status.PERMANENT and res.enhanced == "5.7.30", res
    assert tls == "none"


def test_bounced_when_the_hop_does_not_offer_requiretls(world: World, tmp_path: Path) -> None:
    if world.postfix is None:
        pytest.skip("postfix is not installed")
    res, tls = send(world, tmp_path, "alice@pf.test", requiring(tmp_path), port=world.postfix.port)
    assert res.status is Status.PERMANENT and res.enhanced == "5.7.30", res
    assert "does not offer REQUIRETLS" in res.text
    assert (tls, res.tls_policy) == ("verified", "mta-sts")
    # The same hop takes a message that did not ask for REQUIRETLS.
    res, _ = send(world, tmp_path, "alice@pf.test", stored(tmp_path), port=world.postfix.port)
    assert res.status is Status.DELIVERED, res
    assert len(world.postfix.delivered("alice")) == 1


# --- TLS-Required: No -----------------------------------------------------------------------


def test_tls_required_no_relaxes_an_enforced_policy(world: World, tmp_path: Path) -> None:
    strict, _ = send(world, tmp_path, "alice@wrongname.test", stored(tmp_path))
    assert strict.status is Status.TEMPORARY, strict  # enforce + wrong name: deferred
    res, tls = send(world, tmp_path, "alice@wrongname.test", stored(tmp_path, RELAXED))
    assert res.status is Status.DELIVERED, res
    assert tls == "encrypted" and res.tls_policy == "mta-sts"
    assert res.tls_failure.startswith("certificate-host-mismatch")


def test_the_parameter_wins_over_tls_required_no(world: World, tmp_path: Path) -> None:
    res, _ = send(world, tmp_path, "alice@wrongname.test", requiring(tmp_path, RELAXED))
    assert res.status is not Status.DELIVERED, res


@pytest.mark.parametrize(
    ("head", "expected"),
    [
        (b"TLS-Required: No\n", True),
        (b"tls-required:   NO  \n", True),
        (b"TLS-Required:\n No\n", True),  # folded
        (b"TLS-Required: Yes\n", False),
        (b"X-TLS-Required: No\n", False),
        (b"", False),
    ],
)
def test_tls_required_header(tmp_path: Path, head: bytes, expected: bool) -> None:
    message = stored(tmp_path, b"Subject: t\n" + head + b"\nTLS-Required: No\n")
    assert tls_required_no(message) is expected


# --- visibility: postier queue show names the policy and the last TLS failure ---------------


def test_queue_show_names_tls_policy_and_last_failure(world: World, tmp_path: Path) -> None:
    sender = make_server(
        tmp_path / "sender",
        users="s@origin.test\n",
        domains=("origin.test",),
        extra=[
            "--dns-server", f"127.0.0.1:{world.dns.port}",
            "--remote-port", str(world.recv.tls.mx_port),
            "--tls-ca-file", str(world.recv.pki.ca_file),
            "--mta-sts-port", str(world.policy_host.port),
        ],
    )  # fmt: skip
    sender.start()
    try:
        with smtplib.SMTP("127.0.0.1", sender.local_port, timeout=10) as s:
            s.ehlo("client.test")
            assert s.mail("s@origin.test")[0] == 250
            assert s.rcpt("alice@wrongname.test")[0] == 250
            code, text = s.data(b"Subject: t\r\nFrom: s@origin.test\r\n\r\nHello.\r\n")
        assert code == 250, text
        match = re.search(r"queued as (\S+)", text.decode())
        assert match, text
        qid = match.group(1)
        show = [sys.executable, "-m", "postier", "queue", "-Q", str(tmp_path / "sender" / "queue")]
        out = ""
        for _ in range(200):  # bounded: the first attempt is made at once
            proc = subprocess.run([*show, "show", qid], capture_output=True, text=True, timeout=60)
            out = proc.stdout
            if "last TLS failure" in out:
                break
            time.sleep(0.1)
        assert "TLS policy: mta-sts" in out, out + sender.log()
        assert "last TLS failure: certificate-host-mismatch" in out, out
        assert "state: pending" in out
        assert sender.logged("tls=none policy=mta-sts")  # the delivery log line
    finally:
        sender.stop()


def test_requiretls_from_a_client_bounces_with_5_7_30_through_the_queue(
    world: World, tmp_path: Path
) -> None:
    """The whole path: MAIL ... REQUIRETLS over STARTTLS, the flag in the queue entry, the
    relay's refusal of a hop without a policy, and the DSN back to the (local) sender."""
    cert, key = world.recv.pki.issue("mx.test", into=tmp_path / "cert")
    sender = make_server(
        tmp_path / "sender",
        users="s@origin.test\n",
        domains=("origin.test",),
        extra=[
            "--dns-server", f"127.0.0.1:{world.dns.port}",
            "--remote-port", str(world.recv.tls.mx_port),
            "--tls-ca-file", str(world.recv.pki.ca_file),
            "--mta-sts-port", str(world.policy_host.port),
            "--tls-cert", str(cert), "--tls-key", str(key),
        ],
    )  # fmt: skip
    sender.start()
    try:
        context = ssl.create_default_context(cafile=str(world.recv.pki.ca_file))
        context.check_hostname = False  # we connect by address; the chain is still checked
        with smtplib.SMTP("127.0.0.1", sender.local_port, timeout=10) as s:
            s.ehlo("client.test")
            s.starttls(context=context)
            s.ehlo("client.test")
            assert s.mail("s@origin.test", ["REQUIRETLS"])[0] == 250
            assert s.rcpt("alice@good.test")[0] == 250
            code, text = s.data(b"Subject: secret\r\nFrom: s@origin.test\r\n\r\nHello.\r\n")
        assert code == 250, text
        bounces = []
        for _ in range(300):  # bounded: the attempt and its DSN follow at once
            bounces = sender.maildir_files("s")
            if bounces:
                break
            time.sleep(0.1)
        assert len(bounces) == 1, sender.log()
        dsn = bounces[0].read_bytes()
        assert b"Status: 5.7.30" in dsn and b"alice@good.test" in dsn
        assert sender.logged("requiretls=True")
    finally:
        sender.stop()
