"""The systemd unit: one text, shipped as contrib/postier.service and written by `setup`.

Hardening follows what postier needs and nothing more: it binds port 25 (or gets its sockets
from systemd), drops to its own user (setuid/setgid, chown of the mail root), reads TLS keys
that may be root-only (DAC override), writes only the mail root and the queue, and talks
IP plus AF_UNIX (the notify socket, LMTP sockets).
"""

from __future__ import annotations

DEFAULT_COMMAND = "/usr/local/bin/postier"
DEFAULT_CONFIG = "/etc/postier/postier.toml"
DEFAULT_MAIL_ROOT = "/var/spool/mail"
DEFAULT_QUEUE_DIR = "/var/spool/postier"


def unit_text(
    command: str = DEFAULT_COMMAND,
    config: str = DEFAULT_CONFIG,
    writable: tuple[str, ...] = (DEFAULT_MAIL_ROOT, DEFAULT_QUEUE_DIR),
    protect_home: bool = True,
) -> str:
    """The unit for `command serve -c config`; `writable` are the mail root and queue dir.

    `protect_home` must be False when mailboxes live in home directories
    (mailbox_template = "/home/{user}/Maildir")."""
    home = "ProtectHome=yes" if protect_home else "# ProtectHome= off: mailboxes are in homes"
    return f"""\
[Unit]
Description=postier SMTP mail transfer agent
After=network-online.target
Wants=network-online.target

[Service]
Type=notify
NotifyAccess=main
ExecStart={command} serve -c {config}
ExecReload=/bin/kill -HUP $MAINPID
# SIGTERM to the supervisor only: it lets the workers finish the transactions in flight.
KillMode=mixed
TimeoutStopSec=60
WatchdogSec=60
Restart=on-failure
LimitNOFILE=65536
UMask=0077

ProtectSystem=strict
ReadWritePaths={" ".join(writable)}
{home}
PrivateTmp=yes
PrivateDevices=yes
NoNewPrivileges=yes
CapabilityBoundingSet=CAP_NET_BIND_SERVICE CAP_SETUID CAP_SETGID CAP_CHOWN CAP_DAC_OVERRIDE
RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX
SystemCallFilter=@system-service
SystemCallArchitectures=native
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectClock=yes
ProtectHostname=yes
RestrictNamespaces=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
LockPersonality=yes

[Install]
WantedBy=multi-user.target
"""


def main() -> None:
    """`python -m postier.ops.systemd > contrib/postier.service` regenerates the shipped unit."""
    print(unit_text(), end="")


if __name__ == "__main__":
    main()
