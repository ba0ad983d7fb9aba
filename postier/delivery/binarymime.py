"""BINARYMIME toward the next hop (RFC 3030 §3): send it as is, downgrade it, or bounce it.

Which messages need BINARYMIME is read from the content, not from a flag: in the spool (LF
line ends, see delivery/base.py) a CR is always a bare CR of the original, and a NUL is a
NUL. Content with neither is a valid 8BITMIME body however it arrived (DATA or BDAT), so it
goes by DATA like any other message; only content with one of them needs a next hop that
offers BINARYMIME and CHUNKING. Deciding from the octets covers every way in (mx, the local
listener, sendmail) and needs nothing new in the queue entry.

Only messages that announced 8-bit content (BODY=8BITMIME or BINARYMIME) are scanned: a
7BIT message cannot hold a bare CR (the DATA reader refuses it), and the scan is then one
pass over the file per delivery attempt of an 8-bit message, in the thread pool.

When the next hop lacks BINARYMIME, the MIME leaf parts that hold the binary octets are
re-encoded as base64 (what RFC 3030 §3 asks of a gateway). That works when the octets are
in MIME parts; when they are in the header section, a preamble, or a message without MIME
structure, no faithful downgrade exists and the message bounces with 5.6.3.
"""

from __future__ import annotations

import asyncio
import base64
import email
import email.message
import email.policy
import io
import logging
from dataclasses import dataclass
from email.generator import BytesGenerator
from pathlib import Path
from typing import Final

from postier.delivery.base import StoredMessage
from postier.errors import DeliveryError
from postier.log import event
from postier.protocol.client import Capabilities

_SCAN_BLOCK: Final = 256 * 1024
log = logging.getLogger("postier.delivery.binarymime")


def is_binary(content: bytes) -> bool:
    """Spool content (LF line ends) that only BINARYMIME can carry: a bare CR or a NUL."""
    return b"\r" in content or b"\x00" in content


def file_needs_binarymime(path: Path, offset: int) -> bool:
    """Scan the spool or queue file from `offset` (blocking: run it in the thread pool)."""
    with open(path, "rb") as f:
        f.seek(offset)
        while block := f.read(_SCAN_BLOCK):
            if is_binary(block):
                return True
    return False


def downgrade(content: bytes) -> bytes | None:
    """The message with its binary MIME parts in base64, or None when that cannot be done.

    `content` is spool content (LF line ends); the result is too. Parts without binary
    octets, and every header line, are written back as they were.
    """
    head, sep, _ = content.partition(b"\n\n")
    if is_binary(head if sep else content):
        return None  # octets in the header section: nothing MIME can re-encode
    message = email.message_from_bytes(content, policy=email.policy.compat32)
    if message.get("MIME-Version") is None:
        return None  # no MIME structure to carry an encoding
    changed = False
    for part in message.walk():
        if part.is_multipart():
            continue
        raw = part.get_payload(decode=True)
        if not isinstance(raw, bytes) or not is_binary(raw):
            continue
        octets = raw.replace(b"\n", b"\r\n")  # the part as it was on the wire
        del part["Content-Transfer-Encoding"]
        part["Content-Transfer-Encoding"] = "base64"
        part.set_payload(base64.encodebytes(octets).decode("ascii"))
        changed = True
    if not changed:
        return None
    out = io.BytesIO()
    policy = email.policy.compat32.clone(linesep="\n", max_line_length=0)
    BytesGenerator(out, mangle_from_=False, maxheaderlen=0, policy=policy).flatten(message)
    result = out.getvalue()
    return None if is_binary(result) else result


@dataclass(frozen=True, slots=True)
class BodyPlan:
    """How this attempt sends the body: by DATA (the default), by BDAT with BINARYMIME, or
    by DATA with a downgraded copy in place of the file."""

    chunking: bool = False
    replacement: bytes | None = None  # downgraded content (spool form), sent instead


AS_USUAL: Final = BodyPlan()


async def plan_body(message: StoredMessage, caps: Capabilities, peer: str) -> BodyPlan:
    """Decide before MAIL FROM; DeliveryError (5.6.3) when the next hop cannot take it."""
    if not message.body_8bit:
        return AS_USUAL
    path, offset = message.path, message.content_offset
    if not await asyncio.to_thread(file_needs_binarymime, path, offset):
        return AS_USUAL
    if "CHUNKING" in caps and "BINARYMIME" in caps:
        event("binarymime", logger=log, qid=message.queue_id, peer=peer, action="bdat")
        return BodyPlan(chunking=True)
    replacement = await asyncio.to_thread(_downgraded, path, offset)
    action = "bounce" if replacement is None else "downgrade"
    event("binarymime", logger=log, qid=message.queue_id, peer=peer, action=action)
    if replacement is None:
        raise DeliveryError(
            f"{peer} does not support BINARYMIME, and this message's binary content "
            "cannot be converted",
            permanent=True,
            code=554,
            enhanced="5.6.3",
        )
    return BodyPlan(replacement=replacement)


def _downgraded(path: Path, offset: int) -> bytes | None:
    with open(path, "rb") as f:
        f.seek(offset)
        return downgrade(f.read())
