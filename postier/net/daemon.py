"""`postier serve`: bind the listeners, start the workers, run until SIGTERM/SIGINT.

Processes: Python runs one core per process, so with `workers = N` the parent binds every
listening socket (it may need root for port 25), then forks N workers that each run their own
event loop on the same sockets; the kernel spreads connections among them. The pid in Maildir
names and queue ids keeps the workers' files distinct. With one worker, the parent serves
directly.

Shutdown: stop accepting, let every transaction in flight finish (idle sessions get 421 at
once), wait up to `shutdown_grace` seconds, exit 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from postier import log, privileges
from postier.config import Config
from postier.errors import ConfigError
from postier.net.context import ServerContext
from postier.net.limits import ConnectionTracker
from postier.net.roles import ROLES
from postier.net.session import SmtpSession, server_config
from postier.netaddr import ListenSpec, resolve_bind_addresses
from postier.policy import Policy, load_aliases, load_users
from postier.router import Router
from postier.tls import front_tls_context

_LOG = logging.getLogger("postier.daemon")

SPOOL_SUBDIR = ".postier-tmp"


Bound = list[tuple[str, list[socket.socket]]]  # (role, one listening socket per worker)


def _listen_socket(family: int, addr: tuple, reuse_port: bool) -> socket.socket:  # type: ignore[type-arg]
    s = socket.socket(family, socket.SOCK_STREAM)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        s.bind(addr)
        s.listen(1024)
        s.setblocking(False)
    except OSError:
        s.close()
        raise
    return s


def bind_sockets(spec: ListenSpec, copies: int = 1) -> list[list[socket.socket]]:
    """Create, bind and listen; IPv6 sockets are IPv6-only so both families can share a port.

    With several workers each gets its own socket on the same address (SO_REUSEPORT): the
    kernel spreads new connections among them, instead of waking every worker for each
    connection on one shared socket. All are bound here, before privileges are dropped.
    """
    groups: list[list[socket.socket]] = []
    try:
        for host in resolve_bind_addresses(spec):
            infos = socket.getaddrinfo(
                host, spec.port, socket.AF_UNSPEC, socket.SOCK_STREAM, 0, socket.AI_PASSIVE
            )
            seen = set()
            for family, _, _, _, addr in infos:
                if (family, addr) in seen:
                    continue
                seen.add((family, addr))
                first = _listen_socket(family, addr, copies > 1)
                group = [first]
                groups.append(group)
                actual = first.getsockname()  # port 0 becomes a real port: copies share it
                for _ in range(copies - 1):
                    group.append(_listen_socket(family, actual, True))
    except OSError as exc:
        for group in groups:
            for s in group:
                s.close()
        raise ConfigError(f"cannot listen on {spec}: {exc.strerror}") from None
    return groups


def bind_all(config: Config) -> Bound:
    bound: Bound = []
    for role, specs in config.listeners.items():
        for spec in specs:
            bound += [(role, group) for group in bind_sockets(spec, config.workers)]
    return bound


def build_context(config: Config) -> ServerContext:
    """Load everything a worker needs; ConfigError on anything wrong."""
    users = load_users(config.users, config.domain) if config.users else {}
    aliases = load_aliases(config.aliases) if config.aliases else {}
    policy = Policy(config.domain, users, aliases, config.recipient_delimiter)
    executor = ThreadPoolExecutor(max_workers=16, thread_name_prefix="postier-io")
    backend = make_backend(config)
    from postier.net.outbound import Outbound

    outbound = Outbound(config, policy, backend, executor)
    router = Router(backend, executor, queue_commit=outbound.commit, queue_notify=outbound.notify)
    ctx = ServerContext(
        config=config,
        policy=policy,
        router=router,
        executor=executor,
        # Each worker counts its own connections: split the caps so the totals hold.
        connections=ConnectionTracker(
            max(1, config.max_connections // config.workers),
            max(1, config.max_connections_per_ip // config.workers),
        ),
        spool_dir=Path(config.mail_root) / SPOOL_SUBDIR,
        outbound=outbound,
    )
    if config.tls_cert is not None and config.tls_key is not None:
        from postier.tls import CertificateStore

        if config.tls_self_signed:
            from postier.gencert import ensure_self_signed

            if ensure_self_signed(config.tls_cert, config.tls_key, config.hostname):
                log.event("tls-self-signed", logger=_LOG, cert=str(config.tls_cert))

        ctx.tls = CertificateStore(config.tls_cert, config.tls_key, config.tls_cert_dir)
        # Made here, before the workers fork, so they all share its session-ticket keys.
        front_tls_context(ctx.tls)
        front_tls_context(ctx.tls, tickets=False)  # mx: no tickets (tls.sends_tickets)
    if config.passwords is not None:
        from postier.auth.passwd import PasswordFile
        from postier.auth.throttle import FailureThrottle

        ctx.passwords = PasswordFile.load(config.passwords)
        ctx.throttle = FailureThrottle()
        if ctx.passwords.plain_users:
            log.event(
                "config-warning",
                logging.WARNING,
                _LOG,
                file=str(config.passwords),
                problem=f"{len(ctx.passwords.plain_users)} users have plain-text passwords; "
                "run 'postier passwd' to hash them",
            )
    return ctx


def remove_stale_spool_files(spool_dir: Path) -> int:
    """Spool files left by a killed server belong to messages that never got their 250
    (the client will retry them), so they are removed before any session starts."""
    removed = 0
    if spool_dir.is_dir():
        for path in spool_dir.glob("*.spool"):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                removed += 1
    if removed:
        log.event("spool-cleaned", logging.WARNING, _LOG, dir=str(spool_dir), removed=removed)
    return removed


def make_backend(config: Config) -> object:
    fmt = config.mailbox_format
    root = Path(config.mail_root)
    if fmt == "maildir":
        from postier.delivery.maildir import MaildirBackend

        return MaildirBackend(root, config.hostname, config.mailbox_template)
    if fmt == "mbox":
        from postier.delivery.mbox import MboxBackend

        return MboxBackend(root, config.mailbox_template or None)
    if fmt == "spool":
        from postier.delivery.numbered import NumberedSpoolBackend

        return NumberedSpoolBackend(root, config.mailbox_template or None)
    from postier.delivery.lmtp import LmtpBackend

    return LmtpBackend(config.lmtp, hostname=config.hostname)


def _install_uvloop() -> str:
    try:
        import uvloop
    except ImportError:
        return "asyncio"
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return "uvloop"


async def _serve_worker(ctx: ServerContext, bound: Bound, worker: int | None) -> int:
    loop = asyncio.get_running_loop()
    config = ctx.config
    ctx.spool_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    servers: list[asyncio.Server] = []
    mine: list[tuple[str, socket.socket]] = []
    for role_name, group in bound:
        index = worker or 0
        mine.append((role_name, group[index]))
        for i, other in enumerate(group):
            if i != index:
                other.close()  # another worker's socket: only the parent keeps them all
    for role_name, sock in mine:
        role = ROLES[role_name]
        pcfg = server_config(ctx, role)

        def factory(role=role, pcfg=pcfg) -> SmtpSession:  # type: ignore[no-untyped-def]
            return SmtpSession(ctx, role, pcfg)

        tls_args: dict[str, object] = {}
        if role.implicit_tls and ctx.tls is not None:
            # The handshake runs before the session sees the connection: started from the
            # session task instead, uvloop delivers an early ClientHello to data_received
            # first (it starts reading right after connection_made), and the handshake hangs.
            tls_args = {
                "ssl": front_tls_context(ctx.tls),
                "ssl_handshake_timeout": min(60.0, config.command_timeout),
            }
        servers.append(await loop.create_server(factory, sock=sock, backlog=1024, **tls_args))
    if worker in (None, 0) and ctx.outbound is not None:
        await ctx.outbound.start()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    watch_task = None
    if ctx.tls is not None:
        loop.add_signal_handler(signal.SIGHUP, ctx.tls.reload)
        watch_task = loop.create_task(ctx.tls.watch())
    else:
        loop.add_signal_handler(signal.SIGHUP, lambda: None)
    for role_name, sock in mine:
        name = sock.getsockname()
        log.event("listening", logger=_LOG, role=role_name, address=f"{name[0]}:{name[1]}")
    log.event("ready", logger=_LOG, pid=os.getpid(), worker=worker)
    await stop.wait()
    log.event("shutdown", logger=_LOG, sessions=len(ctx.sessions))
    for srv in servers:
        srv.close()
    ctx.begin_shutdown()
    deadline = loop.time() + config.shutdown_grace
    while ctx.sessions and loop.time() < deadline:
        await asyncio.sleep(0.05)
    if ctx.sessions:
        log.event("shutdown-forced", logging.WARNING, _LOG, sessions=len(ctx.sessions))
        for s in list(ctx.sessions):
            if s.transport is not None:
                s.transport.abort()
        await asyncio.sleep(0.1)
    if watch_task is not None:
        watch_task.cancel()
    if ctx.outbound is not None:
        await ctx.outbound.stop(config.shutdown_grace)
    backend_close = getattr(ctx.router.backend, "close", None)
    if backend_close is not None:
        await backend_close()
    ctx.executor.shutdown(wait=True)
    log.event("stopped", logger=_LOG, pid=os.getpid())
    return 0


def _run_worker(ctx: ServerContext, bound: Bound, worker: int | None) -> int:
    _install_uvloop()
    return asyncio.run(_serve_worker(ctx, bound, worker))


def serve(config: Config) -> int:
    log.setup(config.log_level)
    # Everything is read here, in the parent, before dropping privileges (a TLS key or a
    # password file may be readable by root only) and before forking (workers inherit it;
    # the thread pool starts its threads lazily, so none exist yet at fork time).
    ctx = build_context(config)
    remove_stale_spool_files(ctx.spool_dir)
    loop_name = _preload_modules()
    bound = bind_all(config)
    account = privileges.target_user(config.user)
    if account is not None and not config.user and "{user}" in config.mailbox_template:
        # Mailboxes in users' homes must be created as those users: like Postfix's local,
        # that needs root. An explicit --user still wins.
        log.event(
            "privileges-kept",
            logging.WARNING,
            _LOG,
            reason="mailbox_template delivers into users' homes, which needs root",
        )
        account = None
    if account is not None:
        privileges.prepare_dirs(
            [Path(config.mail_root), Path(config.mail_root) / SPOOL_SUBDIR], account
        )
        privileges.chown_tree(Path(config.queue_dir), account)
        from postier.queue.maildrop import ensure_maildrop_dir as ensure_maildrop

        ensure_maildrop(config.queue_dir, uid=account.pw_uid, gid=account.pw_gid)
        privileges.drop(account)
    else:
        privileges.warn_if_root()
    log.event(
        "starting",
        logger=_LOG,
        hostname=config.hostname,
        domains=",".join(config.domain) or "-",
        mail_root=str(config.mail_root),
        format=config.mailbox_format,
        workers=config.workers,
        loop=loop_name,
    )
    if config.workers == 1:
        return _run_worker(ctx, bound, None)
    return _supervise(ctx, bound)


def _preload_modules() -> str:
    """Import now what sessions import later: after the privilege drop the installation
    directory may no longer be readable (e.g. a virtualenv under /root)."""
    import email.policy  # noqa: F401
    import encodings.idna  # noqa: F401

    import idna  # noqa: F401

    import postier.auth.sasl
    import postier.delivery.smtp
    import postier.queue.bounce
    import postier.queue.maildrop
    import postier.queue.scheduler
    import postier.tls  # noqa: F401

    try:
        import uvloop  # noqa: F401
    except ImportError:
        return "asyncio"
    return "uvloop"


def _supervise(ctx: ServerContext, bound: Bound) -> int:
    """Fork the workers and wait; forward SIGTERM/SIGINT; exit 0 when they all stopped."""
    config = ctx.config
    children: dict[int, int] = {}

    def spawn(index: int) -> None:
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                log.setup(config.log_level, worker=index)
                code = _run_worker(ctx, bound, index)
            except BaseException:
                _LOG.exception("event=worker-crash worker=%s", index)
            finally:
                os._exit(code)
        children[pid] = index

    stopping = False

    def forward(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = stopping or signum in (signal.SIGTERM, signal.SIGINT)
        for pid in list(children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, forward)
    for i in range(config.workers):
        spawn(i)
    status = 0
    while children:
        try:
            pid, wstatus = os.wait()
        except ChildProcessError:
            break
        except InterruptedError:
            continue
        index = children.pop(pid, None)
        code = os.waitstatus_to_exitcode(wstatus)
        if code != 0:
            status = 1
        if not stopping and index is not None:
            log.event("worker-died", logging.ERROR, _LOG, worker=index, code=code)
            spawn(index)
    for _, group in bound:
        for s in group:
            s.close()
    sys.stderr.flush()
    return 0 if stopping and status == 0 else status
