"""Live reload of the users, aliases, password file and DKIM keys (and any registered hook).

Each worker reloads on its own: on SIGHUP (the supervisor forwards it to every worker), when
a file's modification stamp changes (checked every `reload_interval` seconds, 30 by default)
and once before it serves, against the stamps the start-up load took (`stamps_before_load`),
so a worker respawned from the supervisor's start-up data catches up. Nothing is shared
between workers and nothing is restarted:
- each file is read and validated off the event loop, then swapped in one assignment on it;
  a session holds no copy, so the next RCPT or AUTH sees the new data and no session drops;
- a file that does not validate keeps the old version, logs `event=reload result=failed`
  with the file and line, and counts in the metrics (`postier_reloads_total{result}`).

DKIM keys reload through `DkimSigner.reload()`, which validates every key before it swaps.
Other concerns add a hook: `register_hook(Hook(name, paths, load, swap))`, where `paths(ctx)`
lists the files to watch, `load(ctx)` reads and validates off the loop (a ConfigError names
the file and line) and `swap(ctx, value)` installs the result on the loop. Certificates
reload through `postier.tls.CertificateStore` on the same SIGHUP.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from postier import log
from postier.config import Config
from postier.errors import ConfigError
from postier.net.context import ServerContext
from postier.policy import Policy, load_aliases, load_users

_LOG = logging.getLogger("postier.reload")

DEFAULT_INTERVAL = 30.0


@dataclass(frozen=True, slots=True)
class Hook:
    name: str
    paths: Callable[[ServerContext], list[Path]]  # files whose change triggers the hook
    load: Callable[[ServerContext], Any]  # off the loop; ConfigError when invalid
    swap: Callable[[ServerContext, Any], None]  # on the loop


_HOOKS: list[Hook] = []


def register_hook(hook: Hook) -> None:
    """Reload one more thing with the others (e.g. DKIM keys)."""
    _HOOKS[:] = [h for h in _HOOKS if h.name != hook.name] + [hook]


Stamp = tuple[int, int, int] | None


def _stamp(path: Path) -> Stamp:
    """Changes when the file is edited in place or replaced by a rename."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


def stamps_before_load(config: Config) -> dict[Path, Stamp]:
    """The stamps of every built-in file, taken before the start-up load reads them.

    The workers compare against these, not against what they find when they start: a file
    replaced between the load and a worker's start (or before a crashed worker's
    replacement starts with the start-up data) then still reads as changed."""
    paths = [p for p in (config.users, config.aliases, config.passwords) if p is not None]
    if config.dkim_keys is not None:
        paths += _key_tree(Path(config.dkim_keys))
    return {p: _stamp(p) for p in paths}


# ---- the built-in files --------------------------------------------------------------------
def _users_paths(ctx: ServerContext) -> list[Path]:
    return [p for p in (ctx.config.users,) if p is not None]


def _aliases_paths(ctx: ServerContext) -> list[Path]:
    return [p for p in (ctx.config.aliases,) if p is not None]


def _swap_policy(ctx: ServerContext, users: dict | None, aliases: dict | None) -> None:
    old = ctx.policy
    policy = Policy(
        ctx.config.domain,
        old.users if users is None else users,
        old.aliases if aliases is None else aliases,
        ctx.config.recipient_delimiter,
        old.relay,
        old.srs,
    )
    ctx.replace_policy(policy)


def _load_users(ctx: ServerContext) -> dict:
    assert ctx.config.users is not None
    return load_users(ctx.config.users, ctx.config.domain)


def _load_aliases(ctx: ServerContext) -> dict:
    assert ctx.config.aliases is not None
    return load_aliases(ctx.config.aliases)


def _load_passwords(ctx: ServerContext) -> Any:
    from postier.auth.passwd import PasswordFile

    assert ctx.config.passwords is not None
    return PasswordFile.load(ctx.config.passwords)


def _swap_passwords(ctx: ServerContext, passwords: Any) -> None:
    ctx.passwords = passwords


def _dkim_paths(ctx: ServerContext) -> list[Path]:
    """The key directory, its domain directories and their keys: adding, replacing or
    removing a key changes one of their stamps."""
    signer = ctx.outbound.dkim if ctx.outbound is not None else None
    if signer is None or signer.directory is None:
        return []
    return _key_tree(Path(signer.directory))


def _key_tree(top: Path) -> list[Path]:
    found = [top]
    try:
        for domain_dir in sorted(top.iterdir()):
            if domain_dir.is_dir():
                found.append(domain_dir)
                found.extend(sorted(domain_dir.glob("*.pem")))
    except OSError:
        pass  # reload() then reports the directory with its reason
    return found


def _load_dkim(ctx: ServerContext) -> None:
    """DkimSigner.reload() validates every key and swaps them itself (thread-safe); on a
    ConfigError the keys in force stay."""
    assert ctx.outbound is not None and ctx.outbound.dkim is not None
    ctx.outbound.dkim.reload()


BUILT_IN = (
    Hook("users", _users_paths, _load_users, lambda ctx, v: _swap_policy(ctx, v, None)),
    Hook("aliases", _aliases_paths, _load_aliases, lambda ctx, v: _swap_policy(ctx, None, v)),
    Hook(
        "pass",
        lambda ctx: [p for p in (ctx.config.passwords,) if p is not None],
        _load_passwords,
        _swap_passwords,
    ),
    Hook("dkim", _dkim_paths, _load_dkim, lambda ctx, _value: None),
)


class Reloader:
    """One per worker: knows the files' stamps and reloads what changed."""

    def __init__(self, ctx: ServerContext, interval: float = DEFAULT_INTERVAL) -> None:
        self.ctx = ctx
        self.interval = interval
        self.hooks = [h for h in (*BUILT_IN, *_HOOKS) if h.paths(ctx)]
        # What the data in force was read from: the start-up load's stamps where it took
        # them (ctx.loaded_stamps), so a change since then is seen at the first check.
        self.stamps = {
            h.name: [ctx.loaded_stamps.get(p, _stamp(p)) for p in h.paths(ctx)] for h in self.hooks
        }
        self._lock = asyncio.Lock()

    def _stamps(self, hook: Hook) -> list[Stamp]:
        return [_stamp(p) for p in hook.paths(self.ctx)]

    async def reload(self, only_changed: bool = False, reason: str = "sighup") -> int:
        """Reload every file (or those whose stamp changed); the number that failed."""
        async with self._lock:  # a SIGHUP during a timed check waits for it
            loop = asyncio.get_running_loop()
            failed = 0
            for hook in self.hooks:
                stamps = self._stamps(hook)
                if only_changed and stamps == self.stamps[hook.name]:
                    continue
                files = ",".join(str(p) for p in hook.paths(self.ctx))
                try:
                    value = await loop.run_in_executor(self.ctx.executor, hook.load, self.ctx)
                except ConfigError as exc:
                    failed += 1
                    self.stamps[hook.name] = stamps  # logged once, not at every check
                    log.event(
                        "reload", logging.ERROR, _LOG, what=hook.name, file=files,
                        result="failed", reason=reason, error=exc,
                    )  # fmt: skip
                    continue
                hook.swap(self.ctx, value)
                self.stamps[hook.name] = stamps
                log.event(
                    "reload", logger=_LOG, what=hook.name, file=files, result="ok", reason=reason
                )
            return failed

    async def watch(self) -> None:
        """Check the stamps every `interval` seconds, until cancelled."""
        while True:
            await asyncio.sleep(self.interval)
            await self.reload(only_changed=True, reason="changed")
