"""Build the local delivery backend the configuration names (`-F`, `--lmtp`).

The result is tagged with its kind (`FileDelivery` or `NetworkDelivery`): the router and the
queue pick their way of calling it from that tag, once, at construction.
"""

from __future__ import annotations

from pathlib import Path

from postier.config import Config
from postier.delivery.base import FileDelivery, LocalDelivery, NetworkDelivery


def make_backend(config: Config) -> LocalDelivery:
    fmt = config.mailbox_format
    root = Path(config.mail_root)
    template = config.mailbox_template or None
    if fmt == "maildir":
        from postier.delivery.maildir import MaildirBackend

        return FileDelivery(MaildirBackend(root, config.hostname, template))
    if fmt == "mbox":
        from postier.delivery.mbox import MboxBackend

        return FileDelivery(MboxBackend(root, template))
    if fmt == "spool":
        from postier.delivery.numbered import NumberedSpoolBackend

        return FileDelivery(NumberedSpoolBackend(root, template))
    from postier.delivery.lmtp import LmtpBackend

    return NetworkDelivery(LmtpBackend(config.lmtp, hostname=config.hostname))
