"""`postier serve --inetd ROLE`: exactly one SMTP session on fd 0/1, then exit.

This is what inetd, `nc -l -p PORT -e`, ucspi-tcp's tcpserver and systemd `Accept=yes` expect
of a server. The session is the daemon's own: the same `ServerContext` (policy, check chain,
storage, limits, TLS) and the same `SmtpSession`; only the transport differs.

- fd 0 a socket (inetd, nc, systemd, tcpserver, socat's socketpair):
  `loop.connect_accepted_socket`, and STARTTLS works as on a listener. The peer of a TCP
  socket is `getpeername()`.
- fd 0 a pipe (socat's `EXEC:...,pipes`, a script): `net/pipes.py` joins fd 0 and fd 1 into
  one transport; STARTTLS is not offered, TLS needs a socket.
- When fd 0 is not a TCP socket, the peer comes from the environment the spawner sets
  (`TCPREMOTEIP` of ucspi-tcp, `REMOTE_HOST`, `NCAT_REMOTE_ADDR`, `SOCAT_PEERADDR`).
  With no address at all the session is refused: every decision (relay, DNSBL, SPF, rate
  limits, the loopback-only `local` role) starts from who the peer is.
- Implicit TLS (`submissions`) is not served here.

What it does not do: run the queue. Whatever it commits to the queue is sent by the daemon
that runs beside it (woken through the queue's flush requests) or by `postier queue flush`.
It does not clean the spool of stale files either (other sessions may be writing there).

Privileges are the daemon's: started as root, it reads the key and password files, then
becomes the `--user` account (or `postier` when it exists), as `postier serve` does.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ipaddress
import logging
import os
import signal
import socket
import stat
from collections.abc import Mapping
from pathlib import Path

from postier import log, privileges
from postier.config import Config
from postier.delivery.fsutil import write_all
from postier.errors import ConfigError
from postier.net.context import ServerContext
from postier.net.daemon import SPOOL_SUBDIR, build_context
from postier.net.pipes import PipePairTransport
from postier.net.roles import ROLES, Role
from postier.net.session import SmtpSession
from postier.protocol.replies import Reply
from postier.protocol.state import ServerConfig

_LOG = logging.getLogger("postier.inetd")

# Environment variables that name the peer when fd 0 is not a TCP socket, in order of trust.
PEER_VARIABLES = (
    ("TCPREMOTEIP", "TCPREMOTEPORT"),  # ucspi-tcp (tcpserver), also s6-tcpserver
    ("REMOTE_HOST", "REMOTE_PORT"),
    ("NCAT_REMOTE_ADDR", "NCAT_REMOTE_PORT"),  # ncat --exec
    ("SOCAT_PEERADDR", "SOCAT_PEERPORT"),  # socat TCP-LISTEN:...,fork EXEC:...
)
NOT_LOOPBACK = Reply(554, "5.7.1", "The local role serves loopback clients only")
PEER_UNKNOWN = Reply(421, "4.3.0", "Cannot tell the client's address; closing")


@dataclasses.dataclass(frozen=True, slots=True)
class StdinPeer:
    """Who is on the other end of fd 0, and how we know."""

    ip: str | None  # None: nobody told us
    port: int
    source: str  # "socket", or the environment variable that named it


def _stream_socket(fd: int) -> socket.socket | None:
    """A socket object for fd (a dup of it) when fd is a stream socket (TCP or UNIX)."""
    if not stat.S_ISSOCK(os.fstat(fd).st_mode):
        return None
    sock = socket.socket(fileno=os.dup(fd))
    if sock.type == socket.SOCK_STREAM:
        return sock
    sock.close()
    return None


def _plain_ip(text: str) -> str | None:
    """The address as the session writes it (IPv4-mapped IPv6 unwrapped), None if not one."""
    try:
        ip = ipaddress.ip_address(text.strip().strip("[]"))
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return str(ip)


def peer_from_environ(environ: Mapping[str, str]) -> tuple[str, int, str] | None:
    """(ip, port, variable) from the first variable that holds an IP address."""
    for ip_var, port_var in PEER_VARIABLES:
        ip = _plain_ip(environ.get(ip_var, ""))
        if ip is not None:
            port = environ.get(port_var, "0")
            return ip, int(port) if port.isdigit() else 0, ip_var
    return None


def stdin_peer(sock: socket.socket | None, environ: Mapping[str, str]) -> StdinPeer:
    """The peer of a TCP socket is its own word; anything else needs the spawner's."""
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        with contextlib.suppress(OSError):
            name = sock.getpeername()
            ip = _plain_ip(str(name[0]))
            if ip is not None:
                return StdinPeer(ip, int(name[1]), "socket")
    found = peer_from_environ(environ)
    if found is None:
        return StdinPeer(None, 0, "none")
    return StdinPeer(*found)


def refusal_for(role: Role, peer: StdinPeer) -> Reply | None:
    """Why this peer may not have a session in this role at all; None when it may."""
    if peer.ip is None:
        return PEER_UNKNOWN
    if role.name == "local" and not ipaddress.ip_address(peer.ip).is_loopback:
        return NOT_LOOPBACK
    return None


def _keep_logs_off_the_wire() -> None:
    """inetd (and systemd's default for socket units) gives stderr the client's socket too:
    a log line there would reach the client in the middle of SMTP. Send it nowhere instead;
    run with `2>>FILE` or `StandardError=journal` to keep the logs."""
    try:
        err = os.fstat(2)
    except OSError:
        return
    for fd in (0, 1):
        with contextlib.suppress(OSError):
            st = os.fstat(fd)
            if (st.st_dev, st.st_ino) == (err.st_dev, err.st_ino):
                null = os.open(os.devnull, os.O_WRONLY)
                os.dup2(null, 2)
                os.close(null)
                return


def _check_descriptors() -> None:
    """fd 0 and fd 1 must be a connection: a socket, a pipe (or a terminal, for trying)."""
    for fd, name in ((0, "stdin"), (1, "stdout")):
        try:
            mode = os.fstat(fd).st_mode
        except OSError:
            raise ConfigError(f"--inetd: {name} is closed; start postier from inetd") from None
        if not (stat.S_ISSOCK(mode) or stat.S_ISFIFO(mode) or stat.S_ISCHR(mode)):
            raise ConfigError(f"--inetd: {name} is a file, not a socket or a pipe")


def serve_inetd(config: Config, environ: Mapping[str, str] | None = None) -> int:
    """Serve one session on fd 0/1 in the role `config.inetd`; 0 when it ran, 1 if refused."""
    _keep_logs_off_the_wire()
    log.setup(config.log_level, fmt=config.log_format)
    role = ROLES[config.inetd]
    _check_descriptors()
    sock = _stream_socket(0)
    peer = stdin_peer(sock, os.environ if environ is None else environ)
    refusal = refusal_for(role, peer)
    if refusal is not None:
        log.event(
            "inetd-refused", logging.WARNING, _LOG, role=role.name,
            ip=peer.ip or "-", source=peer.source, reply=refusal,
        )  # fmt: skip
        with contextlib.suppress(OSError):
            write_all(1, refusal.to_bytes())
        return 1
    ctx = build_context(config)  # as root, if we are: keys and password files
    _drop_privileges(config)
    log.event("inetd-session", logger=_LOG, role=role.name, ip=peer.ip, source=peer.source)
    return asyncio.run(_serve_one(ctx, role, peer, sock))


def _drop_privileges(config: Config) -> None:
    """The daemon's rule: become the service account, unless mailboxes live in users'
    homes (`{user}` templates need root, like Postfix's local) and no --user was given."""
    account = privileges.target_user(config.user)
    if account is not None and not config.user and "{user}" in config.mailbox_template:
        account = None
    if account is None:
        privileges.warn_if_root()
        return
    privileges.prepare_dirs(
        [Path(config.mail_root), Path(config.mail_root) / SPOOL_SUBDIR], account
    )
    if Path(config.queue_dir).stat().st_uid != account.pw_uid:
        privileges.chown_tree(Path(config.queue_dir), account)
    privileges.drop(account)


class _OneSession(SmtpSession):
    """A session on a known peer whose end (its task done and its transport gone) the
    process waits for."""

    def __init__(
        self, ctx: ServerContext, role: Role, protocol_config: ServerConfig, peer: StdinPeer
    ) -> None:
        super().__init__(ctx, role, protocol_config)
        self.known_peer = peer
        self.gone: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def peer_address(self, transport: asyncio.BaseTransport) -> tuple[str, int]:
        assert self.known_peer.ip is not None
        return self.known_peer.ip, self.known_peer.port

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        if not self.gone.done():
            self.gone.set_result(None)

    async def wait_closed(self) -> None:
        if self._task is not None:
            await self._task
        await self.gone


async def _serve_one(
    ctx: ServerContext, role: Role, peer: StdinPeer, sock: socket.socket | None
) -> int:
    loop = asyncio.get_running_loop()
    ctx.spool_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    pcfg = ctx.protocol_config(role)
    if sock is None:  # pipes: no TLS layer can be put under us
        pcfg = dataclasses.replace(pcfg, starttls_available=False)
    session = _OneSession(ctx, role, pcfg, peer)
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, ctx.begin_shutdown)
    if sock is not None:
        await loop.connect_accepted_socket(lambda: session, sock=sock)
    else:
        await PipePairTransport.open(session, 0, 1, {"peername": (peer.ip, peer.port)})
    await session.wait_closed()
    if ctx.outbound is not None:
        await ctx.outbound.stop(ctx.config.shutdown_grace)
    backend_close = getattr(ctx.router.backend, "close", None)
    if backend_close is not None:
        await backend_close()
    ctx.executor.shutdown(wait=True)
    return 0
