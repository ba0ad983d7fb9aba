"""`postier setup DOMAIN`: write a working deployment, then say what to publish and run.

It writes only what does not exist yet and never overwrites: a second run changes nothing
(and says so), and an operator's edits survive. Under `--dir` (default /etc/postier):
postier.toml, users, aliases (postmaster and abuse go to the first user), passwd (the first
user's password, hashed), dkim/<domain>/ (an Ed25519 and an RSA-2048 key), TLS (certbot's
files when /etc/letsencrypt/live/<hostname>/ exists, else a self-signed pair, loudly noted)
and postier.service (the unit of `postier.ops.systemd`).

Then it prints, in this order: what it wrote, the DNS records (the text of
`postier doctor --records`), the firewall ports, and the next three commands.
"""

from __future__ import annotations

import argparse
import getpass
import os
import secrets
import shutil
import sys
import time
from pathlib import Path

from postier.config import Config, build, load_toml
from postier.errors import ConfigError
from postier.netaddr import parse_listen
from postier.ops.systemd import unit_text

LETSENCRYPT_LIVE = Path("/etc/letsencrypt/live")
LISTENERS = {
    "mx": [":25"],
    "submission": [":587"],
    "submissions": [":465"],
    "local": ["127.0.0.1:2525"],
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("domain", help="the mail domain, e.g. example.org")
    p.add_argument("--hostname", help="the server's name (default mx.DOMAIN)")
    p.add_argument("--dir", type=Path, default=Path("/etc/postier"), help="where to write")
    p.add_argument("--mail-root", default="/var/spool/mail", help="where mailboxes live")
    p.add_argument("--queue-dir", default="/var/spool/postier", help="the outbound queue")
    p.add_argument("--user", default="admin", help="the first mail user (default admin)")
    p.add_argument(
        "--password-stdin", action="store_true", help="read the first user's password from stdin"
    )
    for role, default in LISTENERS.items():
        p.add_argument(
            f"--{role}", action="append", metavar="ADDR:PORT", help=f"default {default[0]}"
        )
    p.add_argument("--letsencrypt-live", type=Path, default=LETSENCRYPT_LIVE, help="certbot dir")


class Writer:
    """Creates files that do not exist, and remembers what it did for the report."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def exists(self, path: Path) -> bool:
        if path.exists():
            self.lines.append(f"  kept     {path}")
            return True
        return False

    def write(self, path: Path, text: str, mode: int = 0o644) -> None:
        if self.exists(path):
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        self.lines.append(f"  wrote    {path}")


def _read_password(from_stdin: bool) -> str:
    if from_stdin:
        raw = sys.stdin.buffer.readline()
        try:
            password = raw.decode("utf-8").rstrip("\r\n")
        except UnicodeDecodeError:
            raise ConfigError("--password-stdin: the password is not UTF-8") from None
    else:
        password = getpass.getpass("Password for the first user: ")
        if getpass.getpass("Again: ") != password:
            raise ConfigError("the two passwords differ")
    if not password:
        raise ConfigError("the password is empty")
    return password


def _toml_list(values: list[str]) -> str:
    return "[" + ", ".join(f'"{v}"' for v in values) + "]"


def _config_text(args: argparse.Namespace, domain: str, host: str, tls: tuple[str, str]) -> str:
    lines = [
        f"# postier configuration, written by `postier setup {domain}` on "
        f"{time.strftime('%Y-%m-%d')}.",
        "# Every key is documented by `postier serve --help` (the flag of the same name).",
        f'hostname = "{host}"',
        f'domain = ["{domain}"]',
        f'mail_root = "{args.mail_root}"',
        f'queue_dir = "{args.queue_dir}"',
        'users = "users"',
        'aliases = "aliases"',
        'pass = "passwd"',
        f'tls_cert = "{tls[0]}"',
        f'tls_key = "{tls[1]}"',
    ]
    lines.append('dkim_keys = "dkim"')
    lines.append('srs_secret_file = "srs-secret"  # forwarded mail keeps passing SPF')
    for role, default in LISTENERS.items():
        lines.append(f"{role} = {_toml_list(getattr(args, role) or default)}")
    return "\n".join(lines) + "\n"


def _dkim_keys(out: Writer, directory: Path, domain: str) -> None:
    """An Ed25519 and an RSA-2048 key, unless the domain has keys already."""
    from postier.dkim.keys import generate_key

    domain_dir = directory / domain
    if domain_dir.is_dir() and any(domain_dir.glob("*.pem")):
        out.exists(domain_dir)
        return
    month = time.strftime("%Y%m")
    for kind, selector in (("ed25519", f"ed{month}"), ("rsa", f"rsa{month}")):
        key = generate_key(directory, domain, selector, kind, 2048)
        out.lines.append(f"  wrote    {key.path}")


def _tls(out: Writer, args: argparse.Namespace, host: str) -> tuple[tuple[str, str], str]:
    """(cert, key) for the config, and a note for the operator."""
    live = args.letsencrypt_live / host
    if (live / "fullchain.pem").is_file() and (live / "privkey.pem").is_file():
        note = f"TLS: using certbot's certificate in {live} (renewals are picked up by reload)"
        return (str(live / "fullchain.pem"), str(live / "privkey.pem")), note
    from postier.gencert import ensure_self_signed

    cert, key = args.dir / "tls" / "cert.pem", args.dir / "tls" / "key.pem"
    if ensure_self_signed(cert, key, host):
        out.lines.append(f"  wrote    {cert}")
        out.lines.append(f"  wrote    {key}")
    else:
        out.exists(cert)
    note = (
        "!!! TLS: a SELF-SIGNED certificate was written. Senders will still encrypt, but\n"
        f"!!! clients will warn. Get a real one: certbot certonly --standalone -d {host}\n"
        "!!! then run `postier setup` again on a fresh --dir, or set tls_cert/tls_key."
    )
    return ("tls/cert.pem", "tls/key.pem"), note


def run(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except ConfigError as exc:
        print(f"postier setup: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"postier setup: {exc.filename or ''}: {exc.strerror or exc}", file=sys.stderr)
        return 1


def _run(args: argparse.Namespace) -> int:
    from postier.auth.passwd import hash_password
    from postier.delivery.paths import validate_mailbox_name

    domain = args.domain.strip().lower().rstrip(".")
    if not domain or "." not in domain or any(c in domain for c in " /@"):
        raise ConfigError(f"DOMAIN: {args.domain!r} is not a domain name")
    host = (args.hostname or f"mx.{domain}").strip().lower().rstrip(".")
    local = args.user.partition("@")[0].strip().lower()
    try:
        validate_mailbox_name(local)
    except ValueError as exc:
        raise ConfigError(f"--user: {exc}") from None
    if any(c in local for c in ' <>(),;:"'):
        raise ConfigError(f"--user: {local!r} is not a plain local part")
    address = f"{local}@{domain}"
    for role in LISTENERS:
        for spec in getattr(args, role) or []:
            parse_listen(spec, f"--{role}")
    # The config file reads relative paths as relative to itself: write absolute ones, so
    # `--mail-root run/mail` means what it meant on the command line.
    args.mail_root = str(Path(args.mail_root).absolute())
    args.queue_dir = str(Path(args.queue_dir).absolute())
    directory: Path = args.dir
    directory.mkdir(mode=0o755, parents=True, exist_ok=True)
    out = Writer()

    passwd = directory / "passwd"
    if not passwd.exists():
        out.write(
            passwd, f"{address}:{hash_password(_read_password(args.password_stdin))}\n", 0o600
        )
    else:
        out.exists(passwd)
    out.write(directory / "users", f"# address [mailbox]\n{address} {local}\n")
    out.write(
        directory / "aliases",
        f"# alias: target, target\npostmaster@{domain}: {address}\nabuse@{domain}: {address}\n",
    )
    _dkim_keys(out, directory / "dkim", domain)
    out.write(directory / "srs-secret", secrets.token_urlsafe(32) + "\n", 0o600)
    tls, tls_note = _tls(out, args, host)
    conf = directory / "postier.toml"
    out.write(conf, _config_text(args, domain, host, tls))
    config = build(load_toml(conf), {})  # what we wrote (or kept) must load
    command = shutil.which("postier") or f"{sys.executable} -m postier"
    writable = (str(config.mail_root), str(config.queue_dir))
    home = "{user}" not in config.mailbox_template
    out.write(directory / "postier.service", unit_text(command, str(conf), writable, home))

    print("Files:")
    print("\n".join(out.lines))
    print(f"\n{tls_note}\n")
    print("DNS records to publish (the same as `postier doctor --records`):\n")
    print(_records(config, domain, directory / "dkim"))
    print("Firewall: open these TCP ports to the Internet:")
    for role in ("mx", "submission", "submissions"):
        for spec in getattr(config, role):
            print(f"  {spec.port}/tcp  ({role})")
    print("\nNext:")
    print(f"  cp {directory / 'postier.service'} /etc/systemd/system/ && systemctl daemon-reload")
    print("  systemctl enable --now postier")
    print(f"  postier doctor -c {conf} {domain}")
    return 0


def _records(config: Config, domain: str, dkim_dir: Path) -> str:
    from postier.ops.records import zone_snippet

    return zone_snippet(config, domain, dkim_keys=dkim_dir)
