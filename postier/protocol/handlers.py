"""One function per SMTP command (RFC 5321 §4.1.1, §4.5.1 plus RFC 3207 and RFC 4954).

Each handler takes the session state, the listener's configuration and the argument text, and
returns either a `Reply` (the protocol can answer alone) or an event (the application must
decide: accept or reject). Handlers never mutate state; the command's effect is the
`*_accepted` function right below its handler, which `ServerConnection.accept()` calls, so
a rejected command leaves the session exactly as it was. (Effects that change the phase —
DATA, STARTTLS, the end of data — are `ServerConnection._enter()`'s.)
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache

from postier.protocol import replies as R
from postier.protocol.address import (
    AddressError,
    parse_params,
    parse_path,
    split_path_and_params,
)
from postier.protocol.dsn import DsnError, parse_mail_dsn, parse_rcpt_dsn
from postier.protocol.events import Auth, Data, Event, Expn, Hello, Mail, Rcpt, StartTLS, Vrfy
from postier.protocol.replies import Reply
from postier.protocol.state import ServerConfig, Session

Handler = Callable[[Session, ServerConfig, str], "Reply | Event"]

# C0 and C1 controls, DEL, and the Unicode line and paragraph separators: none of them may
# reach a header line we write.
_CONTROL = (
    frozenset(chr(c) for c in range(32))
    | frozenset(chr(c) for c in range(0x7F, 0xA0))
    | {"\u2028", "\u2029"}
)


def _has_control(text: str) -> bool:
    return any(ch in _CONTROL for ch in text)


def handle_ehlo(session: Session, config: ServerConfig, arg: str) -> Reply | Event:
    return _hello(arg, extended=True)


def handle_helo(session: Session, config: ServerConfig, arg: str) -> Reply | Event:
    return _hello(arg, extended=False)


def _hello(arg: str, *, extended: bool) -> Reply | Event:
    name = arg.strip()
    if not name or " " in name:
        return Reply(501, "5.5.4", f"Syntax: {'EHLO' if extended else 'HELO'} hostname")
    # The name goes into our Received header: refuse anything that could break a header line.
    if _has_control(name) or len(name) > 255:
        return Reply(501, "5.5.4", "Invalid hostname")
    return Hello(name=name, extended=extended)


def hello_accepted(session: Session, config: ServerConfig, event: Hello, peer: str) -> Reply:
    """Remember the peer's name and dialect; the default reply lists our extensions."""
    session.helo = event.name
    session.esmtp = event.extended
    if event.extended:
        return _ehlo_reply(ehlo_lines(session, config, peer))
    return Reply(250, None, f"{config.hostname} Hello {peer}")


@lru_cache(maxsize=256)
def _ehlo_reply(lines: tuple[str, ...]) -> Reply:
    """One reply object per distinct EHLO answer (they differ by peer and TLS state): its
    ten-odd lines are rendered to bytes once, not at every session."""
    return Reply(250, None, lines)


def ehlo_lines(session: Session, config: ServerConfig, peer_name: str) -> tuple[str, ...]:
    """The EHLO reply: greeting line, then one extension keyword per line (RFC 5321 §4.1.1.1)."""
    lines = [f"{config.hostname} Hello {peer_name}"]
    lines += [
        "PIPELINING",
        f"SIZE {config.max_message_size}",
        "8BITMIME",
        "SMTPUTF8",
        "ENHANCEDSTATUSCODES",
        "CHUNKING",
        "BINARYMIME",
        "DSN",
    ]
    if config.starttls_available and not session.tls:
        lines.append("STARTTLS")
    if session.tls:
        lines.append("REQUIRETLS")  # RFC 8689 §3: offered over TLS only
    if (
        config.auth_mechanisms
        and session.auth_user is None
        and (session.tls or not config.auth_requires_tls)
    ):
        lines.append("AUTH " + " ".join(config.auth_mechanisms))
    lines.append("HELP")
    return tuple(lines)


def handle_mail(session: Session, config: ServerConfig, arg: str) -> Reply | Event:
    if session.helo is None:
        return R.HELO_FIRST
    if session.envelope.mail_given:
        return R.NESTED_MAIL
    if config.auth_required_for_mail and session.auth_user is None:
        return R.AUTH_REQUIRED
    if arg[:5].upper() != "FROM:":
        return Reply(501, "5.5.4", "Syntax: MAIL FROM:<address>")
    try:
        path_text, params_text = split_path_and_params(arg[5:])
        params = parse_params(params_text)
    except AddressError as exc:
        return exc.reply
    if params and not session.esmtp:
        return R.PARAM_NOT_RECOGNIZED
    try:
        dsn = parse_mail_dsn(params)
    except DsnError as exc:
        return exc.reply
    size: int | None = None
    body: str | None = None
    smtputf8 = False
    for key, value in params.items():
        if key == "SIZE":
            if value is None or not value.isdigit() or len(value) > 20:
                return Reply(501, "5.5.4", "Syntax: SIZE=<number>")
            size = int(value)
            if size > config.max_message_size:
                return R.MESSAGE_TOO_BIG
        elif key == "BODY":
            if value is None or value.upper() not in ("7BIT", "8BITMIME", "BINARYMIME"):
                return Reply(501, "5.5.4", "Syntax: BODY=7BIT, 8BITMIME or BINARYMIME")
            body = value.upper()
        elif key == "SMTPUTF8":
            if value is not None:
                return Reply(501, "5.5.4", "SMTPUTF8 takes no value")
            smtputf8 = True
        elif key == "AUTH":
            continue  # RFC 4954 §5: we may ignore the AUTH= parameter
        elif key in ("RET", "ENVID"):
            continue  # DSN (RFC 3461), parsed above
        elif key == "REQUIRETLS":  # RFC 8689 §4.1; the application reads it from params
            if value is not None:
                return Reply(501, "5.5.4", "REQUIRETLS takes no value")
            if not session.tls:
                return Reply(530, "5.7.10", "REQUIRETLS needs a TLS session")
        else:
            return R.PARAM_NOT_RECOGNIZED
    try:
        sender = parse_path(
            path_text, utf8=smtputf8, null_ok=True, bare_postmaster_ok=False, sender=True
        )
    except AddressError as exc:
        return exc.reply
    return Mail(sender=sender, size=size, body=body, smtputf8=smtputf8, params=params, dsn=dsn)


def mail_accepted(session: Session, event: Mail) -> Reply:
    """The transaction is open: the envelope takes the sender and its parameters."""
    env = session.envelope
    env.mail_given = True
    env.sender = event.sender
    env.size_hint = event.size
    env.body = event.body
    env.smtputf8 = event.smtputf8
    return R.SENDER_OK


def handle_rcpt(session: Session, config: ServerConfig, arg: str) -> Reply | Event:
    envelope = session.envelope
    if not envelope.mail_given:
        return R.MAIL_FIRST
    if arg[:3].upper() != "TO:":
        return Reply(501, "5.5.4", "Syntax: RCPT TO:<address>")
    try:
        path_text, params_text = split_path_and_params(arg[3:])
        params = parse_params(params_text)
    except AddressError as exc:
        return exc.reply
    if params and (not session.esmtp or not params.keys() <= {"NOTIFY", "ORCPT"}):
        return R.PARAM_NOT_RECOGNIZED
    try:
        dsn = parse_rcpt_dsn(params)
    except DsnError as exc:
        return exc.reply
    if len(envelope.recipients) >= config.max_recipients:
        return R.TOO_MANY_RECIPIENTS
    try:
        recipient = parse_path(
            path_text,
            utf8=envelope.smtputf8,
            null_ok=False,
            bare_postmaster_ok=True,
            sender=False,
        )
    except AddressError as exc:
        return exc.reply
    assert recipient is not None
    return Rcpt(recipient=recipient, params=params, dsn=dsn)


def rcpt_accepted(session: Session, event: Rcpt) -> Reply:
    session.envelope.recipients.append(event.recipient)
    return R.RECIPIENT_OK


def handle_data(session: Session, config: ServerConfig, arg: str) -> Reply | Event:
    if arg.strip():
        return Reply(501, "5.5.4", "Syntax: DATA (no arguments)")
    if not session.envelope.mail_given:
        return R.MAIL_FIRST
    if session.envelope.chunking:
        return R.DATA_AFTER_BDAT
    if session.envelope.body == "BINARYMIME":
        return R.BINARYMIME_NEEDS_BDAT
    if not session.envelope.recipients:
        return R.NO_VALID_RECIPIENTS
    return Data()


def handle_rset(session: Session, config: ServerConfig, arg: str) -> Reply | Event:
    if arg.strip():
        return Reply(501, "5.5.4", "Syntax: RSET (no arguments)")
    return R.RESET_OK  # the server ends the transaction when this reply goes out


def handle_noop(session: Session, config: ServerConfig, arg: str) -> Reply | Event:
    return R.NOOP_OK  # RFC 5321 §4.1.1.9: a parameter string is allowed and ignored


def handle_help(session: Session, config: ServerConfig, arg: str) -> Reply | Event:
    verbs = "EHLO HELO MAIL RCPT DATA BDAT RSET NOOP QUIT HELP VRFY"
    if config.starttls_available:
        verbs += " STARTTLS"
    if config.auth_mechanisms:
        verbs += " AUTH"
    return Reply(214, "2.0.0", ("Commands supported:", verbs, "See RFC 5321"))


def handle_vrfy(session: Session, config: ServerConfig, arg: str) -> Reply | Event:
    if not arg.strip():
        return Reply(501, "5.5.4", "Syntax: VRFY <address>")
    if config.vrfy_truthful or session.auth_user is not None:
        return Vrfy(arg.strip())
    return R.VRFY_CANNOT  # never confirm or deny a user (no enumeration)


def handle_expn(session: Session, config: ServerConfig, arg: str) -> Reply | Event:
    if not config.expn_allowed:
        return R.EXPN_DISABLED
    if not arg.strip():
        return Reply(501, "5.5.4", "Syntax: EXPN <list>")
    return Expn(arg.strip())


def handle_starttls(session: Session, config: ServerConfig, arg: str) -> Reply | Event:
    if arg.strip():
        return Reply(501, "5.5.4", "Syntax: STARTTLS (no arguments)")
    if session.tls:
        return R.ALREADY_TLS
    if not config.starttls_available:
        return R.NO_TLS
    return StartTLS()


def handle_auth(session: Session, config: ServerConfig, arg: str) -> Reply | Event:
    if not config.auth_mechanisms:
        return R.NO_AUTH
    if session.helo is None or not session.esmtp:
        return R.HELO_FIRST
    if session.auth_user is not None:
        return R.ALREADY_AUTH
    if session.envelope.mail_given:
        return Reply(503, "5.5.1", "AUTH not allowed during a mail transaction")
    if config.auth_requires_tls and not session.tls:
        return R.AUTH_NEEDS_TLS
    words = arg.split()
    if not words or len(words) > 2:
        return Reply(501, "5.5.4", "Syntax: AUTH mechanism [initial-response]")
    mechanism = words[0].upper()
    if mechanism not in config.auth_mechanisms:
        return R.AUTH_MECH_UNKNOWN
    return Auth(mechanism=mechanism, initial_response=words[1] if len(words) == 2 else None)


HANDLERS: dict[str, Handler] = {
    "EHLO": handle_ehlo,
    "HELO": handle_helo,
    "MAIL": handle_mail,
    "RCPT": handle_rcpt,
    "DATA": handle_data,
    "RSET": handle_rset,
    "NOOP": handle_noop,
    "HELP": handle_help,
    "VRFY": handle_vrfy,
    "EXPN": handle_expn,
    "STARTTLS": handle_starttls,
    "AUTH": handle_auth,
}

# Verbs from RFC 821/5321 and common extensions that we recognise but do not implement.
NOT_IMPLEMENTED = frozenset({"TURN", "SEND", "SOML", "SAML", "ETRN", "ATRN", "VERB", "XCLIENT"})

# Verbs after which the client must wait for our reply (RFC 2920 §3.1: last in a group).
GROUP_ENDERS = frozenset({"EHLO", "HELO", "DATA", "NOOP", "VRFY", "EXPN", "STARTTLS", "AUTH"})

# Lines that mean the peer is not speaking SMTP at all (HTTP proxies abused to send mail).
CROSS_PROTOCOL = frozenset({"GET", "POST", "CONNECT", "HEAD", "PUT", "OPTIONS"})
