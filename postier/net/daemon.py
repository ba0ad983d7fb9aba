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
import gc
import logging
import os
import signal
import socket
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

from postier import log, privileges
from postier.config import Config
from postier.delivery.factory import make_backend
from postier.net.context import ServerContext
from postier.net.limits import ConnectionTracker
from postier.net.listeners import Bound, bind_all
from postier.net.roles import ROLES
from postier.net.session import SmtpSession
from postier.netaddr import parse_networks
from postier.ops.reload import Reloader, stamps_before_load
from postier.ops.sd_notify import (
    Notifier,
    listen_fds,
    start_watchdog_timer,
    stop_watchdog_timer,
    watchdog_interval,
)
from postier.policy import Policy, load_aliases, load_users
from postier.router import Router
from postier.tls import front_tls_context

if TYPE_CHECKING:
    from postier.ops.metrics_runtime import MetricsRuntime

_LOG = logging.getLogger("postier.daemon")

SPOOL_SUBDIR = ".postier-tmp"


# Blocked in a worker from fork until its own handlers exist: a signal forwarded by the
# supervisor in that window would otherwise run the handler inherited from the supervisor.
CONTROL_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}


# Threads per worker for blocking file work (spool, Maildir, queue). Every one of them that
# waits for the GIL after a system call costs the event loop a hand-over: with 16, the loop
# spent a visible share of its time in futex calls (strace: ~60 per message at 20 sessions).
# One interleaved run (bench/run.py, smtp-source, 20 and 100 sessions, default workers):
# 16 threads 780/867 msgs/s, 4 threads 777/874, 8 threads 894/941, CPU alike.
IO_THREADS = 8


def build_context(config: Config) -> ServerContext:
    """Load everything a worker needs; ConfigError on anything wrong."""
    loaded_stamps = stamps_before_load(config)  # before reading: a later change reloads
    users = load_users(config.users, config.domain) if config.users else {}
    aliases = load_aliases(config.aliases) if config.aliases else {}
    from postier.outbound.backup_mx import RelayDomains

    relay = RelayDomains.from_config(config.relay_domain, config.relay_recipients)
    srs = None
    if config.srs_secret_file is not None:
        from postier.outbound.srs import Srs  # srslib, needed only with a secret

        srs = Srs.from_file(config.srs_secret_file)
    policy = Policy(config.domain, users, aliases, config.recipient_delimiter, relay, srs)
    executor = ThreadPoolExecutor(max_workers=IO_THREADS, thread_name_prefix="postier-io")
    backend = make_backend(config)
    from postier.net.outbound import Outbound

    outbound = Outbound(config, policy, backend, executor)
    # outbound.backend: the local backend with the transport routes of local domains applied.
    router = Router(
        outbound.backend,
        executor,
        queue_commit=outbound.commit,
        queue_notify=outbound.notify,
        queue_report=outbound.report_delivered,
        queue_forward=outbound.forward,
    )
    ctx = ServerContext(
        config=config,
        policy=policy,
        router=router,
        executor=executor,
        # Each worker counts its own connections: split the caps so the totals hold.
        connections=ConnectionTracker(
            max(1, config.max_connections // config.workers),
            max(1, config.max_connections_per_ip // config.workers),
            parse_networks(config.exempt_networks, "exempt_networks"),
        ),
        spool_dir=Path(config.mail_root) / SPOOL_SUBDIR,
        outbound=outbound,
        loaded_stamps=loaded_stamps,
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


def _install_uvloop() -> str:
    try:
        import uvloop
    except ImportError:
        return "asyncio"
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return "uvloop"


async def _watchdog(notifier: Notifier, interval: float) -> None:
    while True:
        notifier.watchdog()
        await asyncio.sleep(interval)


async def _serve_worker(
    ctx: ServerContext,
    bound: Bound,
    worker: int | None,
    notifier: Notifier | None = None,
    metrics: MetricsRuntime | None = None,
) -> int:
    loop = asyncio.get_running_loop()
    log.attach_loop(loop)
    config = ctx.config
    ctx.spool_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    if metrics is not None:  # before the first session, so that every event is counted
        await metrics.start_worker(serve_http=worker in (None, 0))
    # Catch up before serving: a worker respawned after a crash is a fork of the supervisor
    # and holds the start-up users, passwords, keys and certificates, not the reloaded ones
    # (a revoked password would otherwise work for up to reload_interval seconds).
    reloader = Reloader(ctx, config.reload_interval)
    await reloader.reload(only_changed=True, reason="changed")
    if ctx.tls is not None:
        await loop.run_in_executor(ctx.executor, ctx.tls.reload_if_changed)
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
        pcfg = ctx.protocol_config(role)

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
    reload_tls = ctx.tls.reload if ctx.tls is not None else (lambda: None)
    if ctx.tls is not None:
        watch_task = loop.create_task(ctx.tls.watch())

    reload_tasks = {loop.create_task(reloader.watch())}

    async def reload_all() -> None:
        if notifier is not None:
            notifier.reloading()
        reload_tls()
        await reloader.reload()
        if notifier is not None:
            notifier.ready()

    def on_sighup() -> None:
        task = loop.create_task(reload_all())
        reload_tasks.add(task)
        task.add_done_callback(reload_tasks.discard)

    loop.add_signal_handler(signal.SIGHUP, on_sighup)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, CONTROL_SIGNALS)
    for role_name, sock in mine:
        name = sock.getsockname()
        log.event("listening", logger=_LOG, role=role_name, address=f"{name[0]}:{name[1]}")
    log.event("ready", logger=_LOG, pid=os.getpid(), worker=worker)
    watchdog_task = None
    if notifier is not None:
        notifier.ready()
        interval = watchdog_interval()
        if interval is not None:
            watchdog_task = loop.create_task(_watchdog(notifier, interval))
    await stop.wait()
    if notifier is not None:
        notifier.stopping()
    if watchdog_task is not None:
        watchdog_task.cancel()
    log.event("shutdown", logger=_LOG, sessions=len(ctx.sessions))
    for srv in servers:
        srv.close()
    if metrics is not None:
        await metrics.stop_worker()
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
    for task in reload_tasks:
        task.cancel()
    if ctx.outbound is not None:
        await ctx.outbound.stop(config.shutdown_grace)
    backend_close = getattr(ctx.router.backend, "close", None)
    if backend_close is not None:
        await backend_close()
    ctx.executor.shutdown(wait=True)
    if ctx.spf_executor is not None:  # evaluations of sessions gone: their answers are moot
        ctx.spf_executor.shutdown(wait=False, cancel_futures=True)
    log.event("stopped", logger=_LOG, pid=os.getpid())
    return 0


def _run_worker(
    ctx: ServerContext,
    bound: Bound,
    worker: int | None,
    notifier: Notifier | None = None,
    metrics: MetricsRuntime | None = None,
) -> int:
    _install_uvloop()
    try:
        return asyncio.run(_serve_worker(ctx, bound, worker, notifier, metrics))
    finally:
        log.attach_loop(None)  # the loop is gone: write what it left, and from now on at once


def serve(config: Config) -> int:
    log.setup(config.log_level, fmt=config.log_format)
    # Everything is read here, in the parent, before dropping privileges (a TLS key or a
    # password file may be readable by root only) and before forking (workers inherit it;
    # the thread pool starts its threads lazily, so none exist yet at fork time).
    ctx = build_context(config)
    remove_stale_spool_files(ctx.spool_dir)
    loop_name = _preload_modules()
    notifier = Notifier.from_environ()
    metrics = None
    if config.metrics:
        from postier.ops.metrics_runtime import MetricsRuntime

        metrics = MetricsRuntime(config)  # before anything imports prometheus_client
    try:
        bound = bind_all(config, listen_fds())
        return _serve_bound(config, ctx, bound, loop_name, notifier, metrics)
    finally:
        if metrics is not None:
            metrics.close()


def _serve_bound(
    config: Config,
    ctx: ServerContext,
    bound: Bound,
    loop_name: str,
    notifier: Notifier,
    metrics: MetricsRuntime | None,
) -> int:
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
        if metrics is not None:
            metrics.chown(account.pw_uid, account.pw_gid)
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
        return _run_worker(ctx, bound, None, notifier, metrics)
    return _supervise(ctx, bound, notifier, metrics)


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


def _supervise(
    ctx: ServerContext, bound: Bound, notifier: Notifier, metrics: MetricsRuntime | None
) -> int:
    """Fork the workers and wait; forward SIGTERM/SIGINT/SIGHUP; exit 0 when they all stopped.

    This process is the service's main pid: it alone talks to systemd (the workers' sockets
    are bound before the fork, so READY=1 follows right after spawning them)."""
    config = ctx.config
    children: dict[int, int] = {}

    def spawn(index: int) -> None:
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, CONTROL_SIGNALS)
        log.flush()  # a line still buffered would be written by the child too
        pid = os.fork()
        if pid != 0:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        else:
            code = 1
            try:
                log.setup(config.log_level, worker=index, fmt=config.log_format)
                code = _run_worker(ctx, bound, index, None, metrics)
            except BaseException:
                _LOG.exception("event=worker-crash worker=%s", index)
            finally:
                log.flush()
                os._exit(code)
        children[pid] = index

    stopping = False

    def forward(signum: int, _frame: object) -> None:
        nonlocal stopping
        if signum in (signal.SIGTERM, signal.SIGINT) and not stopping:
            stopping = True
            notifier.stopping()
            stop_watchdog_timer()
        if signum == signal.SIGHUP:
            notifier.reloading()
        for pid in list(children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)
        if signum == signal.SIGHUP:
            notifier.ready()  # the workers reload on their own; none stops serving meanwhile

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, forward)
    # Everything built so far (modules, the context, the policy) is shared with the workers
    # copy-on-write. Their cyclic GC writes into the header of every object it examines, which
    # copies those pages into each worker: PSS rose by 20 MB at 100 sessions, and by 2 KiB per
    # idle connection at 10,000. Frozen objects are left out of the workers' collections
    # (refcounting still frees them; only a cycle among them would stay).
    gc.collect()
    gc.freeze()
    for i in range(config.workers):
        spawn(i)
    notifier.ready()
    start_watchdog_timer(notifier)
    status = 0
    while children:
        try:
            pid, wstatus = os.wait()
        except ChildProcessError:
            break
        except InterruptedError:
            continue
        index = children.pop(pid, None)
        if metrics is not None:
            metrics.worker_died(pid)
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
