"""Configuration: frozen dataclasses, a TOML file (`-c`) and flags that override it.

Every setting has one name. In TOML it is the long flag with `-` written as `_` (`mail_root`,
`queue_dir`, `tls_cert`); repeatable flags are lists (`domain = ["a.example", "b.example"]`,
`mx = ["eth0:25"]`). Errors name the file or flag and the key, and say what is wrong, because
the operator reading them is usually in the middle of an outage.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import tomllib
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from postier.errors import ConfigError
from postier.netaddr import ListenSpec, is_loopback, parse_listen, parse_networks

MAILBOX_FORMATS = ("maildir", "mbox", "spool", "lmtp")
DEFAULT_QUEUE_DIR = "/var/spool/postier"
# Implicit TLS (submissions) cannot be served on stdin: the role list says so.
INETD_ROLES = ("mx", "local", "submission")


@dataclass(frozen=True, slots=True)
class Config:
    hostname: str = ""
    domain: tuple[str, ...] = ()
    mail_root: Path = Path("/var/spool/mail")
    mailbox_format: str = "maildir"
    mailbox_template: str = ""  # e.g. "/home/{user}/Maildir"; empty: <mail_root>/<mailbox>
    lmtp: str = ""  # LMTP target for mailbox_format = "lmtp": HOST:PORT or a socket path
    users: Path | None = None
    aliases: Path | None = None
    passwords: Path | None = None  # flag -P/--pass, TOML key "pass"
    queue_dir: Path = Path(DEFAULT_QUEUE_DIR)
    mx: tuple[ListenSpec, ...] = ()
    local: tuple[ListenSpec, ...] = ()
    submission: tuple[ListenSpec, ...] = ()
    submissions: tuple[ListenSpec, ...] = ()
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_cert_dir: Path | None = None
    tls_self_signed: bool = False  # create a self-signed pair at tls_cert/tls_key if missing
    dns_server: str = ""
    public_ip: tuple[str, ...] = ()  # our public addresses, for `doctor`; empty: the listeners'
    remote_port: int = 25
    smarthost: str = ""
    smarthost_user: str = ""
    smarthost_password: str = ""
    dkim_keys: Path | None = None  # DIR/<domain>/<selector>.pem, loaded by the daemon
    workers: int = 1  # build() makes the default "auto": one per core the process may use
    user: str = ""  # drop privileges to this user after binding; default "postier" if it exists
    recipient_delimiter: str = "+"  # alice+tag@ goes to alice; "" turns sub-addressing off
    vrfy_mx: bool = False  # answer VRFY truthfully on mx too: leaks which users exist
    expn_local: bool = False  # answer EXPN on the local listener (lists alias members)
    inetd: str = ""  # serve one session on stdin/stdout in this role (mx, local, submission)
    reverse_dns: bool = True
    received_auth_user: bool = False  # name the AUTH user in Received: (off: privacy)
    dmarc_reject: bool = True  # answer 550 5.7.1 to DMARC failures under p=reject
    log_level: str = "info"
    log_format: str = "text"  # or "json": one object a line, the same keys
    metrics: str = ""  # ADDR:PORT of the Prometheus endpoint (/metrics, /healthz); empty: off
    reload_interval: float = 30.0  # seconds between checks of the users/aliases/pass files
    # limits
    max_message_size: int = 35 * 1024 * 1024
    max_recipients: int = 100
    # per authenticated user, shared by all workers (checks/sending_limits.py); 0: no limit
    max_messages_per_hour: int = 1000
    max_recipients_per_hour: int = 5000
    max_errors: int = 10
    max_connections: int = 1000
    max_connections_per_ip: int = 50
    # Clients here skip the per-IP caps (like Postfix's $mynetworks); never a relay permission.
    exempt_networks: tuple[str, ...] = ("127.0.0.0/8", "::1/128")
    min_free_space: int = 100 * 1024 * 1024
    # timeouts, seconds (RFC 5321 §4.5.3.2: the server waits 5 minutes for a command)
    command_timeout: float = 300.0
    data_timeout: float = 300.0
    min_data_rate: int = 0  # bytes/s during DATA, checked after the first data_timeout/10
    session_timeout: float = 3600.0
    shutdown_grace: float = 30.0
    greet_pause: float = 0.0
    # queue
    retry_schedule: tuple[float, ...] = (60.0, 300.0, 900.0, 1800.0, 3600.0, 7200.0)
    max_queue_age: float = 5 * 86400.0
    delay_warning_after: float = 4 * 3600.0
    per_destination_limit: int = 4
    # outbound TLS (postier.outbound): CA bundle, MTA-STS, DANE, per-domain levels
    tls_ca_file: Path | None = None
    mta_sts_port: int = 443
    mta_sts: bool = True  # flag --no-mta-sts
    dane: bool = True  # flag --no-dane
    tls_policy: tuple[tuple[str, str], ...] = ()  # TOML table domain -> level
    # routing (postier.outbound.routes, next_hop): fixed next hops, backup MX
    routes: tuple[tuple[str, str], ...] = ()  # TOML table domain or .subdomain -> transport
    relay_domain: tuple[str, ...] = ()  # we are a backup MX for these (--relay-domain)
    relay_recipients: Path | None = None  # valid recipients of the relay domains; None: all
    outbound_family: str = "both"  # ipv4, ipv6 or both: families for outbound SMTP
    outbound_bind: tuple[str, ...] = ()  # source address per family; empty: the kernel's
    srs_secret_file: Path | None = None  # SRS for forwarded mail (outbound/srs.py); None: off
    # inbound protection (checks run in this order: limits, DNSBL, RCPT policy, greylist,
    # end-of-data verdicts, rspamd); each is off until configured
    rspamd: str = ""  # rspamd's HTTP address, e.g. "http://127.0.0.1:11333"
    rspamd_fail_open: bool = False  # rspamd down: accept with a header instead of 451
    rspamd_listeners: tuple[str, ...] = ("mx", "submission", "submissions")
    dnsbl: tuple[str, ...] = ()  # "zone[=127.0.0.x,...][*weight]", as postscreen writes them
    dnsbl_threshold: int = 1
    greylist: bool = False
    greylist_delay: float = 300.0
    greylist_expire: float = 86400.0
    greylist_allow_domains: tuple[str, ...] = ()
    client_connections_per_minute: int = 0  # per client IP (IPv6: per /64); 0 = no limit
    client_messages_per_minute: int = 0
    client_recipients_per_minute: int = 0

    @property
    def listeners(self) -> dict[str, tuple[ListenSpec, ...]]:
        return {
            "mx": self.mx,
            "local": self.local,
            "submission": self.submission,
            "submissions": self.submissions,
        }


DEFAULT_MX = (ListenSpec("", 25, "all"),)
DEFAULT_LOCAL = (ListenSpec("127.0.0.1", 2525, "ip"),)

# TOML key -> dataclass field, where they differ.
_KEY_ALIASES = {"pass": "passwords", "domains": "domain", "relay_domains": "relay_domain"}
_LISTENER_KEYS = ("mx", "local", "submission", "submissions")
_STRING_LIST_KEYS = {"rspamd_listeners", "dnsbl", "greylist_allow_domains", "outbound_bind"}
_PATH_KEYS = {
    "mail_root",
    "users",
    "aliases",
    "passwords",
    "queue_dir",
    "tls_cert",
    "tls_key",
    "tls_cert_dir",
    "dkim_keys",
    "tls_ca_file",
    "relay_recipients",
    "srs_secret_file",
}
# TOML tables that are values, not groups of keys.
_TABLE_KEYS = {"tls_policy", "routes"}


def _field_types() -> dict[str, Any]:
    return {f.name: f.type for f in fields(Config)}


def _coerce(key: str, value: Any, source: str, base_dir: Path | None) -> Any:
    """Turn one raw value (TOML or flag) into the field's type, or say what is wrong."""
    where = f"{source}: {key}"
    types = _field_types()
    ftype = types[key]
    if key in _LISTENER_KEYS:
        items = value if isinstance(value, list | tuple) else [value]
        return tuple(parse_listen(str(v), where) for v in items)
    if key in ("domain", "relay_domain"):
        items = value if isinstance(value, list | tuple) else [value]
        out = []
        for v in items:
            if not isinstance(v, str) or not v.strip() or " " in v.strip():
                raise ConfigError(f"{where}: {v!r} is not a domain name")
            out.append(v.strip().lower().rstrip("."))
        return tuple(dict.fromkeys(out))
    if key == "workers" and str(value).strip().lower() == "auto":
        return auto_workers()
    if key == "exempt_networks":
        items = value if isinstance(value, list | tuple) else [value]
        return tuple(str(n) for n in parse_networks(items, where))
    if key == "public_ip":
        items = value if isinstance(value, list | tuple) else [value]
        try:
            return tuple(dict.fromkeys(str(ipaddress.ip_address(str(v).strip())) for v in items))
        except ValueError as exc:
            raise ConfigError(f"{where}: {exc}") from None
    if key == "tls_policy":
        from postier.outbound.tls_policy import parse_policy_table

        return tuple((k, v.value) for k, v in parse_policy_table(value, where).items())
    if key == "routes":
        from postier.outbound.routes import parse_routes_table

        try:
            return tuple((k, str(v)) for k, v in parse_routes_table(value, where).items())
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    if key in _STRING_LIST_KEYS:
        items = value if isinstance(value, list | tuple) else [value]
        if not all(isinstance(v, str) and v.strip() for v in items):
            raise ConfigError(f"{where}: expected a list of non-empty strings")
        return tuple(v.strip() for v in items)
    if key == "retry_schedule":
        if not isinstance(value, list | tuple) or not value:
            raise ConfigError(f"{where}: expected a non-empty list of seconds")
        try:
            return tuple(float(v) for v in value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected numbers of seconds") from None
    if key in _PATH_KEYS:
        if not isinstance(value, str | Path) or not str(value):
            raise ConfigError(f"{where}: expected a path")
        p = Path(value)
        if base_dir is not None and not p.is_absolute():
            p = base_dir / p
        return p
    if ftype in ("int", int):
        if isinstance(value, bool) or not isinstance(value, int | str):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        try:
            return int(value)
        except ValueError:
            raise ConfigError(f"{where}: expected an integer, got {value!r}") from None
    if ftype in ("float", float):
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected a number of seconds, got {value!r}") from None
    if ftype in ("bool", bool):
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("yes", "true", "1", "no", "false", "0"):
            return value.lower() in ("yes", "true", "1")
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if not isinstance(value, str):
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    return value


def auto_workers() -> int:
    """One worker per core this process may run on (its CPU affinity, as in a container)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return max(1, min(cores, 64))


def load_toml(path: Path) -> dict[str, Any]:
    """Read a TOML file into field values (relative paths are relative to the file)."""
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    flat: dict[str, Any] = {}
    for key, value in raw.items():
        # Tables are only for grouping ([limits], [timeouts] ...), except value tables.
        if isinstance(value, dict) and key not in _TABLE_KEYS:
            for sub, subval in value.items():
                flat[sub] = subval
        else:
            flat[key] = value
    valid = _field_types()
    out: dict[str, Any] = {}
    for key, value in flat.items():
        name = _KEY_ALIASES.get(key, key)
        if name not in valid:
            raise ConfigError(f"{path}: unknown key {key!r}")
        out[name] = _coerce(name, value, str(path), path.parent)
    return out


def build(file_values: dict[str, Any], flag_values: dict[str, Any]) -> Config:
    """Merge file values and flags (flags win), apply defaults, then validate."""
    merged: dict[str, Any] = {}
    merged.update(file_values)
    for key, value in flag_values.items():
        if value is None or value == [] or value == ():
            continue
        merged[key] = _coerce(key, value, f"--{key.replace('_', '-')}", None)
    cfg = Config(**merged)
    if "workers" not in merged:
        cfg = replace(cfg, workers=auto_workers())
    if not cfg.hostname:
        cfg = replace(cfg, hostname=socket.getfqdn() or "localhost")
    if "mx" not in merged:
        cfg = replace(cfg, mx=DEFAULT_MX)
    if "local" not in merged:
        cfg = replace(cfg, local=DEFAULT_LOCAL)
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    if cfg.mailbox_format not in MAILBOX_FORMATS:
        raise ConfigError(
            f"mailbox_format: {cfg.mailbox_format!r} is not one of {', '.join(MAILBOX_FORMATS)}"
        )
    if cfg.log_format not in ("text", "json"):
        raise ConfigError(f"log_format: {cfg.log_format!r} is not one of text, json")
    if cfg.metrics:
        parse_listen(cfg.metrics, "metrics")
    if cfg.mailbox_format == "lmtp" and not cfg.lmtp:
        raise ConfigError("lmtp: mailbox_format = lmtp needs an lmtp target (HOST:PORT or path)")
    for spec in cfg.local:
        if not is_loopback(spec):
            raise ConfigError(
                f"--local: {spec} is not a loopback address; the local listener relays without "
                "authentication, so it may only listen on 127.0.0.0/8, [::1] or lo"
            )
    if (cfg.tls_cert is None) != (cfg.tls_key is None):
        raise ConfigError("tls_cert and tls_key: give both or neither")
    if (cfg.submission or cfg.submissions) and cfg.tls_cert is None:
        raise ConfigError("submission/submissions need a certificate: set --tls-cert and --tls-key")
    if (cfg.submission or cfg.submissions) and cfg.passwords is None:
        raise ConfigError("submission/submissions need a password file: set -P/--pass")
    for name in ("max_message_size", "max_recipients", "max_errors", "max_connections"):
        if getattr(cfg, name) < 1:
            raise ConfigError(f"{name}: must be at least 1")
    if cfg.workers < 1 or cfg.workers > 64:
        raise ConfigError("workers: must be between 1 and 64")
    if not 0 < cfg.mta_sts_port < 65536:
        raise ConfigError("mta_sts_port: must be a port number (1-65535)")
    for name in ("command_timeout", "data_timeout", "session_timeout", "reload_interval"):
        if getattr(cfg, name) <= 0:
            raise ConfigError(f"{name}: must be a positive number of seconds")
    _validate_protection(cfg)
    from postier.outbound.source import parse_binds

    try:
        parse_binds(cfg.outbound_bind, cfg.outbound_family, "outbound_family/outbound_bind")
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if len(cfg.recipient_delimiter) > 1:
        raise ConfigError("recipient_delimiter: must be one character or empty")
    if cfg.inetd and cfg.inetd not in INETD_ROLES:
        raise ConfigError(f"--inetd: {cfg.inetd!r} is not one of {', '.join(INETD_ROLES)}")
    if cfg.inetd == "submission" and (cfg.tls_cert is None or cfg.passwords is None):
        raise ConfigError("--inetd submission needs --tls-cert, --tls-key and -P/--pass")
    file_keys = ["users", "aliases", "passwords", "tls_ca_file", "relay_recipients"]
    if not cfg.tls_self_signed:
        file_keys += ["tls_cert", "tls_key"]
    for path_key in file_keys:
        p = getattr(cfg, path_key)
        if p is not None and not Path(p).is_file():
            flag = "pass" if path_key == "passwords" else path_key
            raise ConfigError(f"{flag}: {p}: no such file")
    if cfg.dkim_keys is not None and not Path(cfg.dkim_keys).is_dir():
        raise ConfigError(f"dkim_keys: {cfg.dkim_keys}: no such directory")


def _validate_protection(cfg: Config) -> None:
    from postier.checks.dnsbl import DnsblSite  # the entry syntax lives with its parser

    if cfg.rspamd and not cfg.rspamd.startswith("http://"):
        raise ConfigError(f"rspamd: {cfg.rspamd!r} must be an http:// URL (rspamd's /checkv2)")
    for name in cfg.rspamd_listeners:
        if name not in _LISTENER_KEYS:
            raise ConfigError(
                f"rspamd_listeners: {name!r} is not one of {', '.join(_LISTENER_KEYS)}"
            )
    for entry in cfg.dnsbl:
        try:
            DnsblSite.parse(entry)
        except ValueError as exc:
            raise ConfigError(f"dnsbl: {exc}") from None
    if cfg.dnsbl_threshold < 1:
        raise ConfigError("dnsbl_threshold: must be at least 1")
    if cfg.greylist_delay < 0 or cfg.greylist_expire <= cfg.greylist_delay:
        raise ConfigError("greylist_expire: must be longer than greylist_delay")
    for name in (
        "max_messages_per_hour",
        "max_recipients_per_hour",
        "client_connections_per_minute",
        "client_messages_per_minute",
        "client_recipients_per_minute",
    ):
        if getattr(cfg, name) < 0:
            raise ConfigError(f"{name}: must be 0 (no limit) or more")


def describe(cfg: Config) -> str:
    """The effective settings as TOML-like lines (for `check-config`)."""
    lines = []
    for f in fields(Config):
        value = getattr(cfg, f.name)
        key = "pass" if f.name == "passwords" else f.name
        if f.name == "smarthost_password" and value:
            value = "********"
        if f.name in ("tls_policy", "routes"):  # a TOML inline table, as it is written
            shown = "{ " + ", ".join(f'"{k}" = "{v}"' for k, v in value) + " }"
        elif isinstance(value, tuple):
            shown = (
                "["
                + ", ".join(f'"{v}"' if not isinstance(v, float) else f"{v:g}" for v in value)
                + "]"
            )
        elif isinstance(value, bool):
            shown = "true" if value else "false"
        elif isinstance(value, int | float):
            shown = f"{value:g}" if isinstance(value, float) else str(value)
        elif value is None:
            shown = '""  # not set'
        else:
            shown = f'"{value}"'
        lines.append(f"{key} = {shown}")
    return "\n".join(lines)
