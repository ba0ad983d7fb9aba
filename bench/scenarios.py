"""The rows and tables a run measures: ``--servers`` by default, or a prepared scenario.

- default: one row per ``--servers`` name, and one postier row per ``-F`` format and
  ``--workers`` value, for every postier tree named (``postier``, ``postier@PATH``).
- ``basic``: postier to Maildir at 1, 20 and 100 sessions, with ``--workers 1`` and ``2``.
- ``tls``: (a) new TLS sessions per second: connections that only say EHLO, STARTTLS, EHLO,
  QUIT (full handshakes, then resumed ones; implicit TLS likewise; plaintext EHLO, QUIT as the
  floor; one row with AUTH PLAIN against an ARGON2ID hash); (b) messages per second over
  plaintext, STARTTLS, STARTTLS + AUTH (submission) and implicit TLS + AUTH (submissions) on
  persistent connections.
- ``relay``: messages per second through the queue to a local smtp-sink, end to end (from
  the first MAIL to the last message the sink counted, and the queue empty after), sent to the
  ``local`` listener and to ``submission`` (STARTTLS + AUTH), beside local Maildir delivery.
  postier finds the sink by MX: a DNS responder on loopback (tests/dnsserver.py) maps
  ``relay.test`` to 127.0.0.1, ``--remote-port`` is the sink's port.
- ``formats``: messages per second into Maildir, mbox, the numbered spool and LMTP (a private
  Dovecot, tests/dovecot.py, storing Maildir), side by side.
- ``mailauth``: the mx taking DKIM-signed mail from a domain whose SPF, DKIM key and DMARC
  record a loopback DNS responder serves, with the SPF/DKIM/DMARC checks on and off
  (bench/mailauth_target.py): msgs/s and server CPU ms per message of each.

Each is a list of ``Part``s (one table each) of ``Spec``s (one row each). A scenario's
postier rows are repeated for every postier tree of ``--servers`` (``--servers
postier,postier@../before --scenario basic``). Presets for --sessions, --messages and
--repeat are in PRESETS; flags given on the command line win.
"""

from __future__ import annotations

import argparse
import functools

from bench.mailauth_target import MailauthTarget
from bench.runner import Part, Spec
from bench.targets import (
    RELAY_DOMAIN,
    LmtpTarget,
    PostierTarget,
    RelayTarget,
    Tree,
    make_target,
    parse_tree,
    postier_target,
)

PRESETS = {
    "basic": {"sessions": "1,20,100", "messages": 3000, "repeat": 3},
    "tls": {"sessions": "20", "messages": 5000, "repeat": 3},
    "relay": {"sessions": "20", "messages": 5000, "repeat": 3},
    "formats": {"sessions": "20", "messages": 5000, "repeat": 3},
    "mailauth": {"sessions": "20", "messages": 3000, "repeat": 3},
}


def _spec(name: str, cls: type[PostierTarget] = PostierTarget, **kw) -> Spec:
    """A scenario's postier row (repeated per postier tree by ``parts``)."""
    return Spec(name, functools.partial(cls, **kw), postier=True)


def default(opts: argparse.Namespace) -> list[Part]:
    """``--servers``, with one postier row per tree, ``-F`` format and ``--workers`` value."""
    specs = []
    trees = iter(opts.trees)
    for name in opts.servers:
        if parse_tree(name) is None:
            specs.append(Spec(name, functools.partial(make_target, name)))
            continue
        tree = next(trees)
        for fmt in opts.formats:
            for w in opts.workers_list:
                make = functools.partial(postier_target, fmt=fmt, workers=w, tree=tree)
                suffix = f"-tree{tree.index}" if tree.index else ""
                specs.append(Spec(f"postier-{fmt}-w{w}{suffix}", make))
    return [Part("", specs)]


def basic(opts: argparse.Namespace) -> list[Part]:
    return [
        Part(
            "Maildir, --workers 1 and 2",
            [_spec(f"postier-w{w}", fmt="maildir", workers=w) for w in (1, 2)],
        )
    ]


def tls(opts: argparse.Namespace) -> list[Part]:
    n = opts.handshakes
    conn = ("--connect-only",)
    handshakes = [
        _spec("plain", tls=True, loadgen_args=conn, label="mx, no TLS: EHLO, QUIT"),
        _spec(
            "starttls",
            tls=True,
            loadgen_args=(*conn, "--starttls"),
            label="mx, STARTTLS, full handshake",
        ),
        _spec(
            "starttls-resumed",
            tls=True,
            loadgen_args=(*conn, "--starttls", "--tls-resume"),
            label="mx, STARTTLS, resumed session",
        ),
        _spec(
            "implicit",
            listener="submissions",
            auth=False,
            loadgen_args=(*conn, "--tls"),
            label="submissions, implicit TLS, full handshake",
        ),
        _spec(
            "implicit-resumed",
            listener="submissions",
            auth=False,
            loadgen_args=(*conn, "--tls", "--tls-resume"),
            label="submissions, implicit TLS, resumed session",
        ),
        _spec(
            "starttls-auth",
            listener="submission",
            loadgen_args=(*conn, "--starttls"),
            messages=max(20, n // 40),
            label="submission, STARTTLS + AUTH PLAIN (ARGON2ID), full handshake",
        ),
    ]
    messages = [
        _spec("plain", tls=True, label="mx, plaintext"),
        _spec("starttls", tls=True, loadgen_args=("--starttls",), label="mx, STARTTLS"),
        _spec(
            "submission",
            listener="submission",
            loadgen_args=("--starttls",),
            label="submission, STARTTLS + AUTH",
        ),
        _spec(
            "submissions",
            listener="submissions",
            loadgen_args=("--tls",),
            label="submissions, implicit TLS + AUTH",
        ),
    ]
    return [
        Part(
            f"new sessions per second: {n} connections (EHLO [STARTTLS EHLO] [AUTH] QUIT)",
            handshakes,
            overrides={"messages": n, "warmup": min(opts.warmup, 100)},
        ),
        Part(
            "messages per second, persistent connections (one TLS handshake and AUTH each)",
            messages,
        ),
    ]


def relay(opts: argparse.Namespace) -> list[Part]:
    return [
        Part(
            f"relay to smtp-sink via the queue (MX of {RELAY_DOMAIN} from a loopback DNS "
            "responder), end to end",
            [
                _spec("local-delivery", label="mx, local delivery to Maildir (for comparison)"),
                _spec(
                    "relay-local",
                    RelayTarget,
                    listener="local",
                    label="local listener -> queue -> smtp-sink",
                ),
                _spec(
                    "relay-submission",
                    RelayTarget,
                    listener="submission",
                    loadgen_args=("--starttls",),
                    label="submission STARTTLS + AUTH -> queue -> smtp-sink",
                ),
            ],
        )
    ]


def formats(opts: argparse.Namespace) -> list[Part]:
    return [
        Part(
            "mailbox formats, 5 mailboxes rotated",
            [
                _spec("maildir", fmt="maildir", label="maildir"),
                _spec("mbox", fmt="mbox", label="mbox"),
                _spec("spool", fmt="spool", label="spool"),
                _spec("lmtp", LmtpTarget, fmt="lmtp", label="lmtp to Dovecot (Maildir)"),
            ],
        )
    ]


def mailauth(opts: argparse.Namespace) -> list[Part]:
    return [
        Part(
            "mx, DKIM-signed mail; SPF, DKIM key and DMARC from a loopback DNS responder",
            [
                _spec("checks-off", MailauthTarget, checks=False, label="mx, checks off"),
                _spec(
                    "checks-on",
                    MailauthTarget,
                    checks=True,
                    label="mx, SPF + DKIM + DMARC + Authentication-Results",
                ),
            ],
        )
    ]


SCENARIOS = {
    "basic": basic,
    "tls": tls,
    "relay": relay,
    "formats": formats,
    "mailauth": mailauth,
}


def _per_tree(spec: Spec, trees: list[Tree]) -> list[Spec]:
    """A postier row once per tree (the first tree keeps the row's name)."""
    if not spec.postier or len(trees) < 2:
        return [spec]
    return [
        Spec(
            f"{spec.name}-tree{t.index}" if t.index else spec.name,
            functools.partial(spec.make, tree=t),
        )
        for t in trees
    ]


def parts(opts: argparse.Namespace) -> list[Part]:
    """The tables to measure, in order: a scenario's, or the default one."""
    if not opts.scenario:
        return default(opts)
    out = SCENARIOS[opts.scenario](opts)
    for part in out:
        part.specs = [s for spec in part.specs for s in _per_tree(spec, opts.trees)]
    return out
