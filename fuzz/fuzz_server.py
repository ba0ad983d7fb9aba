"""atheris harness for the sans-I/O SMTP server (issue 7 item 10).

Feeds fuzzer bytes into a `ServerConnection`, in chunks whose sizes come from the input, with a
driver that plays the application: it accepts every decision (or, in one mode, lets the input
choose accept / reject / SASL challenge), finishes STARTTLS handshakes, and checks after every
step that

- no exception escapes the protocol core (atheris reports any as a crash);
- every byte the server queues is a well-formed reply line, `^\\d{3}[ -].*\\r\\n$`, with a code
  from the set the protocol and the driver can produce;
- nothing is queued and no event comes after `ConnectionClosed`;
- the session invariants hold: recipients <= the limit, no recipient without MAIL, DATA only
  inside a transaction with recipients, a data reader exactly when in the DATA phase, the data
  reader's and the line buffer's memory bounded.

Input layout (FuzzedDataProvider): integers (configuration, chunk sizes, decisions) are taken
from the END of the input, chunk bytes from the FRONT. A plain SMTP transcript is therefore a
good seed: its beginning is read as protocol bytes. `--prepare DIR` writes such seeds to
DIR/corpus and an SMTP dictionary to DIR/smtp.dict (fuzz/run.sh does all this).

    python fuzz/fuzz_server.py --prepare work/
    python fuzz/fuzz_server.py -max_total_time=60 -dict=work/smtp.dict work/corpus
    python fuzz/fuzz_server.py crash-<sha1>          # replay one input
"""

from __future__ import annotations

import hashlib
import os
import re
import sys

import atheris

with atheris.instrument_imports():
    from postier.protocol import replies as R
    from postier.protocol.events import (
        NEED_DATA,
        Auth,
        AuthResponse,
        ConnectionClosed,
        Rcpt,
    )
    from postier.protocol.replies import Reply
    from postier.protocol.server import ServerConnection
    from postier.protocol.state import Phase, ServerConfig

REPLY_LINE = re.compile(rb"\d{3}[ -][^\r\n]*\r\n")
KNOWN_CODES = frozenset({
    214, 220, 221, 235, 250, 252, 334, 354,
    421, 451, 452, 454,
    500, 501, 502, 503, 504, 530, 535, 538, 550, 552, 553, 554, 555,
})  # fmt: skip
REJECTS = (
    R.NO_SUCH_USER,
    R.RELAY_DENIED,
    R.STORAGE_FAILED,
    R.LOW_DISK,
    R.AUTH_FAILED,
    R.SHUTTING_DOWN,
    Reply(454, "4.7.0", "TLS not available due to temporary reason"),
)
SIZES = (35 * 1024 * 1024, 1000, 10)  # index 0: the defaults
DATA_TAIL_BOUND = 2 * 65536  # dot.py keeps at most 64 KiB of a partial line (+ one read)


class Violation(AssertionError):
    """An invariant failed: reported by atheris as a crash, with the input saved."""


def check(cond: bool, what: str) -> None:
    if not cond:
        raise Violation(what)


def check_output(out: bytes) -> None:
    pos = 0
    while pos < len(out):
        m = REPLY_LINE.match(out, pos)
        check(m is not None, f"malformed reply bytes at {pos}: {out[pos : pos + 80]!r}")
        assert m is not None
        check(int(out[pos : pos + 3]) in KNOWN_CODES, f"unexpected code: {m.group()!r}")
        pos = m.end()


def check_session(conn: ServerConnection, max_read: int) -> None:
    env = conn.session.envelope
    check(len(env.recipients) <= conn.config.max_recipients, "too many recipients")
    check(not env.recipients or env.mail_given, "recipients without MAIL")
    check(not env.mail_given or conn.session.helo is not None, "MAIL without EHLO/HELO")
    reader = conn._reader
    if conn.phase is Phase.DATA:
        check(env.mail_given and bool(env.recipients), "DATA outside a transaction")
        check(reader is not None, "DATA phase without a reader")
        assert reader is not None
        check(len(reader._buf) <= DATA_TAIL_BOUND + max_read, "DATA tail not bounded")
    else:
        check(reader is None, "a data reader outside the DATA phase")


def decide(conn: ServerConnection, event: object, fdp: atheris.FuzzedDataProvider | None) -> None:
    choice = 0 if fdp is None else fdp.ConsumeIntInRange(0, 7)
    if isinstance(event, Auth | AuthResponse):
        if choice < 3:
            conn.auth_succeeded("alice")
        elif choice < 6:
            conn.challenge("VXNlcm5hbWU6")
        else:
            conn.reject(R.AUTH_FAILED)
    elif choice < 5:
        conn.accept()
    else:
        conn.reject(REJECTS[fdp.ConsumeIntInRange(0, len(REJECTS) - 1)] if fdp else R.LOW_DISK)


def config_from(bits: int) -> ServerConfig:
    """Configuration from 13 bits of the input; 0 gives the defaults of an mx listener."""
    return ServerConfig(
        hostname="mx.example.org",
        max_message_size=SIZES[(bits & 3) % 3],
        max_recipients=(100, 3, 1)[(bits >> 2 & 3) % 3],
        max_errors=(10, 3)[(bits >> 4) & 1],
        starttls_available=bool(bits >> 5 & 1),
        implicit_tls=bool(bits >> 6 & 1),
        auth_mechanisms=("PLAIN", "LOGIN") if bits >> 7 & 1 else (),
        auth_requires_tls=not bits >> 8 & 1,
        auth_required_for_mail=bool(bits >> 9 & 1),
        enforce_pipelining_sync=not bits >> 10 & 1,
    )


def TestOneInput(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    bits = fdp.ConsumeIntInRange(0, (1 << 13) - 1)
    config = config_from(bits)
    greet = not bits >> 11 & 1 or bits >> 12 & 1  # one input in four talks before the banner
    driver = fdp if bits >> 12 & 1 else None  # accept everything, or let the input decide
    conn = ServerConnection(config, peer_name="[192.0.2.1]")
    if greet:
        check_output(conn.greeting())
    closed = False
    max_read = 0
    while fdp.remaining_bytes():
        chunk = fdp.ConsumeBytes(fdp.ConsumeIntInRange(1, 600))
        max_read = max(max_read, len(chunk))
        conn.receive_data(chunk)
        while (event := conn.next_event()) is not NEED_DATA:
            check(not closed, f"event after ConnectionClosed: {event!r}")
            if isinstance(event, ConnectionClosed):
                closed = True
                check_output(conn.data_to_send())
                continue
            if isinstance(event, Rcpt):
                check(conn.session.envelope.mail_given, "RCPT event without MAIL")
            if conn.pending is not None:
                decide(conn, event, driver)
            check_session(conn, max_read)
        out = conn.data_to_send()
        check(not (closed and out), f"bytes queued after close: {out[:80]!r}")
        check_output(out)
        if conn.phase is Phase.TLS_PENDING and (driver is None or fdp.ConsumeBool()):
            conn.tls_started()
        check_session(conn, max_read)
        check(len(conn._lines) <= config.max_auth_line + 2 + max_read, "line buffer unbounded")


# Seeds: sessions as a client that waits for each reply would send them (one read per group).
SEEDS: list[list[bytes]] = [
    [b"EHLO client.example\r\n", b"QUIT\r\n"],
    [
        b"HELO c.example\r\n",
        b"MAIL FROM:<a@b.example>\r\n",
        b"RCPT TO:<u@example.org>\r\n",
        b"DATA\r\n",
        b"Subject: hi\r\n\r\n..dot\r\nbody\r\n",
        b".\r\n",
        b"QUIT\r\n",
    ],
    [
        b"EHLO c.example\r\n",
        b"MAIL FROM:<> SIZE=100 BODY=8BITMIME\r\nRCPT TO:<postmaster>\r\n"
        b'RCPT TO:<"a b"@[IPv6:2001:db8::1]>\r\nRCPT TO:<@r.example:u@example.org>\r\nDATA\r\n',
        b"x\n.\ny\r\n\r\n.\r\nRSET\r\n",
        b"NOOP\r\n",
        b"VRFY root\r\n",
        b"EXPN x\r\nHELP\r\n",
        b"QUIT\r\n",
    ],
    [
        b"EHLO c.example\r\n",
        "MAIL FROM:<jörg@bücher.example> SMTPUTF8\r\nRCPT TO:<zoë@example.org>\r\n".encode(),
        b"DATA\r\n",
        b"x" * 500,
        b"\r\n.\r\n",
    ],
    [
        b"EHLO c.example\r\n",
        b"STARTTLS\r\n",
        b"MAIL FROM:<evil@x.example>\r\n",
        b"EHLO c.example\r\n",
        b"MAIL FROM:<a@b.example>\r\n",
    ],
    [
        b"EHLO c.example\r\n",
        b"AUTH PLAIN\r\n",
        b"AGFsaWNlAHNlY3JldA==\r\n",
        b"AUTH LOGIN YWxpY2U=\r\n",
        b"*\r\n",
    ],
    [b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"],
    [b"EHLO c.example\r\n", b"BDAT 10 LAST\r\n0123456789"],
    [b"NOOP " + b"x" * 590, b"y" * 590, b"\r\nEHLO c.example\r\n"],
    [b"TURN\r\n", b"ETRN x\r\n", b"FOO\r\n", b"\r\n", b"\x00\xff\r\n"],
]


def encode(config: int, reads: list[bytes]) -> bytes:
    """The input TestOneInput decodes as `config` and exactly these reads.

    FuzzedDataProvider takes integers from the end, most significant byte first.
    """
    reads = [r[i : i + 600] for r in reads for i in range(0, len(r), 600)]
    ints = [config.to_bytes(2, "little")] + [(len(r) - 1).to_bytes(2, "little") for r in reads]
    return b"".join(reads) + b"".join(reversed(ints))


DICTIONARY = [
    "EHLO ", "HELO ", "MAIL FROM:<", "RCPT TO:<", "DATA", "RSET", "NOOP", "QUIT", "HELP",
    "VRFY ", "EXPN ", "STARTTLS", "AUTH PLAIN", "AUTH LOGIN", "BDAT ", "GET ", "TURN",
    " SIZE=", " BODY=8BITMIME", " BODY=7BIT", " SMTPUTF8", " AUTH=<>", "<postmaster>", "<>",
    "@example.org>", "[IPv6:::1]", "[127.0.0.1]", "\r\n", "\r\n.\r\n", "\n.\n", "..",
    "AGFsaWNlAHNlY3JldA==", "*",
]  # fmt: skip


def prepare(workdir: str) -> None:
    """Write the seed corpus (WORKDIR/corpus) and a libFuzzer dictionary (WORKDIR/smtp.dict)."""
    corpus = os.path.join(workdir, "corpus")
    os.makedirs(corpus, exist_ok=True)
    for seed in SEEDS:
        # 0: the defaults; 0x4A0: STARTTLS and AUTH offered, pipelining sync off;
        # 0x0C6: implicit TLS, AUTH, a 10-byte message limit and 3 recipients at most.
        for config in (0, 0x4A0, 0x0C6):
            blob = encode(config, seed)
            name = hashlib.sha1(blob).hexdigest()
            with open(os.path.join(corpus, name), "wb") as f:
                f.write(blob)
    with open(os.path.join(workdir, "smtp.dict"), "w", encoding="ascii") as f:
        for word in DICTIONARY:
            escaped = "".join(
                c if c.isprintable() and c not in '"\\' else f"\\x{ord(c):02x}" for c in word
            )
            f.write(f'"{escaped}"\n')


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--prepare":
        prepare(sys.argv[2])
        return
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
