"""Delivery over LMTP (RFC 2033) to Dovecot or any LMTP server.

`LmtpBackend` keeps a few connections open between deliveries (LMTP servers are local and
cheap to keep talking to), sends RSET before reusing one, and reconnects when the server has
closed it in the meantime (Dovecot closes idle LMTP connections). The transaction itself is
postier.delivery.client's, which the SMTP relay shares.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Sequence

from postier.delivery.base import (
    Recipient,
    RecipientResult,
    StoredMessage,
    result_from_error,
)
from postier.delivery.client import (
    ClientStream,
    Timeouts,
    outcome_fields,
    parse_hostport,
    reply_ok,
    run_transaction,
)
from postier.errors import DeliveryError
from postier.log import event
from postier.protocol import client as proto
from postier.protocol.client import Capabilities, ClientProtocolError

log = logging.getLogger("postier.delivery.lmtp")


class LmtpBackend:
    """Deliver to an LMTP server: `target` is `HOST:PORT` (port 24 by default), `[v6]:PORT`,
    or a UNIX socket path (absolute, or prefixed `unix:`).

    Recipients are sent as their canonical local user (`Recipient.user`) when known, since
    that is the name the LMTP server's user database knows, else as the envelope address.
    """

    def __init__(
        self,
        target: str,
        *,
        hostname: str = "localhost",
        timeouts: Timeouts | None = None,
        max_connections: int = 4,
    ) -> None:
        self.target = target
        self.hostname = hostname  # our name in LHLO
        self.timeouts = timeouts or Timeouts()
        self.unix_path: str | None = None
        if target.startswith("unix:") or target.startswith("/"):
            self.unix_path = target.removeprefix("unix:")
        else:
            self.host, self.port = parse_hostport(target, 24)
        self._idle: list[tuple[ClientStream, Capabilities]] = []
        self._slots = asyncio.Semaphore(max_connections)

    async def deliver(
        self, message: StoredMessage, recipients: Sequence[Recipient]
    ) -> list[RecipientResult]:
        async with self._slots:
            try:
                stream, caps = await self._acquire()
            except DeliveryError as exc:
                results = [result_from_error(r, exc) for r in recipients]
            else:
                results = await run_transaction(
                    stream,
                    caps,
                    message,
                    recipients,
                    self.timeouts,
                    peer=self.target,
                    lmtp=True,
                    address_of=lambda r: r.user or r.address,
                )
                if stream.usable():
                    self._idle.append((stream, caps))
        event(
            "delivery",
            logger=log,
            qid=message.queue_id,
            backend="lmtp",
            target=self.target,
            **outcome_fields(results),
        )
        return results

    async def close(self) -> None:
        """Close the idle connections (on shutdown)."""
        idle, self._idle = self._idle, []
        for stream, _ in idle:
            await stream.close(quit_timeout=min(self.timeouts.command, 10.0))

    async def _acquire(self) -> tuple[ClientStream, Capabilities]:
        """An idle connection that still answers RSET, else a new one."""
        while self._idle:
            stream, caps = self._idle.pop()
            try:
                if stream.usable():
                    reply = await stream.command(proto.RSET, self.timeouts.command)
                    if reply_ok(reply):
                        return stream, caps
            except (OSError, ClientProtocolError):
                pass
            stream.writer.close()
        return await self._connect()

    async def _connect(self) -> tuple[ClientStream, Capabilities]:
        t = self.timeouts
        try:
            if self.unix_path is not None:
                stream = await ClientStream.open_unix(self.unix_path, t.connect)
            else:
                stream = await ClientStream.open(self.host, self.port, t.connect)
        except OSError as exc:
            what = (
                "timeout"
                if isinstance(exc, TimeoutError)
                else (os.strerror(exc.errno) if exc.errno else str(exc))
            )
            raise DeliveryError(
                f"connect to LMTP {self.target}: {what}",
                permanent=False,
                code=451,
                enhanced="4.4.1",
            ) from None
        try:
            greeting = await stream.read_reply(t.greeting)
            if greeting.code != 220:
                raise DeliveryError(
                    f"LMTP {self.target} greeted us with: {greeting}",
                    permanent=False,
                    code=451,
                    enhanced="4.4.1",
                )
            reply = await stream.command(proto.lhlo(self.hostname), t.command)
            if not reply_ok(reply):
                raise DeliveryError(
                    f"LMTP {self.target} refused LHLO: {reply}",
                    permanent=False,
                    code=451,
                    enhanced="4.4.1",
                )
        except DeliveryError:
            stream.writer.close()
            raise
        except (OSError, ClientProtocolError) as exc:
            stream.writer.close()
            what = "timeout" if isinstance(exc, TimeoutError) else (str(exc) or repr(exc))
            raise DeliveryError(
                f"LMTP {self.target}: {what}", permanent=False, code=451, enhanced="4.4.2"
            ) from None
        return stream, Capabilities.parse(reply)
