"""SPF, DKIM and DMARC on the mx listener: the verdicts, the DMARC policy, Authentication-Results.

Why it is split over two stages: SPF depends only on the envelope, so it starts at MAIL as a
task and runs while the client sends RCPT and DATA; DKIM and DMARC need the whole message,
so they run at end of data over the spool file (`postier.mailauth.authenticate`, in the
thread pool, the body hashed in blocks). The outcome:

- DMARC asks `reject` (after pct=) and `dmarc_reject` is on: 550 5.7.1, nothing stored.
- DMARC could only be decided on a temporary DNS failure and the policy could be `reject`:
  451 4.7.0 (with `dmarc_reject` on), so the sender retries instead of us guessing.
- Otherwise one `Authentication-Results:` field goes above our Received (RFC 8601 §4).

Clients in `exempt_networks` (loopback by default: a content filter re-injecting, a local
script) are not checked, as rspamd and OpenDMARC skip their local hosts: their SPF would
say nothing and their look-ups would only cost. The header filter still removes forged
Authentication-Results from them: that is per listener (`foreign_results_filter`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import Executor

from postier.checks.base import ACCEPT, ReceivedMessage, Verdict, refuse
from postier.dns import Resolver
from postier.inbound.header_scan import DropField, NamedDrop
from postier.inbound.transaction import Transaction
from postier.log import event
from postier.mailauth import AuthVerdicts, SpfResult, authenticate, check_spf, claims_authserv_id
from postier.protocol.replies import Reply

log = logging.getLogger("postier.mailauth")

NOTE = "mailauth-spf"  # Transaction.notes key of the SPF task started at MAIL

# Tasks still running after their transaction went away (RSET, a refused RCPT, a closed
# connection): held here until they end, so none is collected while pending.
_running: set[asyncio.Task[SpfResult]] = set()


def foreign_results_filter(hostname: str) -> DropField:
    """The spool writer's filter that removes Authentication-Results claiming `hostname`.

    RFC 8601 §5: a receiver removes such fields before adding its own, since downstream
    readers (Sieve, mail clients) trust our name; one from another host stays.
    """

    def claims_us(name: bytes, field: bytes) -> bool:
        return claims_authserv_id(field.partition(b":")[2], hostname)

    return NamedDrop(frozenset({b"authentication-results"}), claims_us)


class MessageAuthentication:
    """The mx check: SPF at MAIL, DKIM and DMARC at end of data, the policy, the header."""

    name = "mailauth"

    def __init__(
        self,
        resolver: Resolver,
        *,
        hostname: str,
        dmarc_reject: bool,
        executor: Executor | None,
        spf_executor: Executor | None = None,
        is_exempt: Callable[[str], bool] = lambda ip: False,
    ) -> None:
        """`spf_executor` runs pyspf, whose thread waits on each DNS answer (up to 20 s for
        a silent server): a pool of its own, so slow senders never hold up `executor`, which
        writes every session's spool files. Without it, `executor` does both."""
        self.resolver = resolver
        self.hostname = hostname
        self.dmarc_reject = dmarc_reject
        self.executor = executor
        self.spf_executor = spf_executor or executor
        self.is_exempt = is_exempt

    async def at_mail(self, txn: Transaction) -> Verdict:
        if txn.auth_user is not None or self.is_exempt(txn.client_ip):
            return ACCEPT
        sender = txn.sender_text
        task = asyncio.ensure_future(
            check_spf(self.resolver, txn.client_ip, sender, txn.helo, executor=self.spf_executor)
        )
        _running.add(task)
        task.add_done_callback(_running.discard)
        txn.notes[NOTE] = task
        return ACCEPT

    async def at_end_of_data(self, txn: Transaction, message: ReceivedMessage) -> Verdict:
        task: asyncio.Task[SpfResult] | None = txn.notes.get(NOTE)
        if task is None:  # not checked (exempt or authenticated)
            return ACCEPT
        stored = await message.stored()
        spf = await task
        verdicts = await authenticate(
            self.resolver, stored.path, stored.content_offset, spf=spf, executor=self.executor
        )
        refusal = self._refusal(verdicts)
        dmarc = verdicts.dmarc
        event(
            "mailauth",
            logging.INFO,
            log,
            qid=txn.queue_id,
            spf=spf.result,
            spf_domain=spf.domain or None,
            dkim=",".join(d.result for d in verdicts.dkim) or "none",
            dkim_domains=",".join(d.domain for d in verdicts.dkim if d.domain) or None,
            dmarc=dmarc.result,
            dis=dmarc.disposition,
            from_domain=dmarc.from_domain or None,
            policy=dmarc.policy or None,
            action=_action(refusal),
            why=dmarc.reason or None,
        )
        if refusal is not None:
            return refusal
        return Verdict(trace_fields=verdicts.header(self.hostname))

    def _refusal(self, verdicts: AuthVerdicts) -> Verdict | None:
        """The 550 or 451 that DMARC asks for, or None to deliver with the verdicts recorded."""
        if not self.dmarc_reject:
            return None
        dmarc = verdicts.dmarc
        disposition = verdicts.dmarc_disposition()
        if disposition == "reject":
            reason = f"DMARC policy of {dmarc.from_domain} is reject: {dmarc.reason}"
            text = f"Message rejected: the DMARC policy of {dmarc.from_domain} says reject"
            return refuse(Reply(550, "5.7.1", text), reason)
        if disposition == "temperror":
            reason = f"DMARC of {dmarc.from_domain} undecided: {dmarc.reason}"
            text = f"DMARC of {dmarc.from_domain} cannot be checked now; try again later"
            return refuse(Reply(451, "4.7.0", text), reason)
        return None


def _action(refusal: Verdict | None) -> str:
    if refusal is None or refusal.reply is None:
        return "deliver"
    return "reject" if refusal.reply.code >= 500 else "tempfail"
