"""Listener addresses: `ADDR:PORT` where ADDR is IPv4, `[IPv6]`, an interface name, or empty.

The seeds bind the MX only to the Internet-facing interface, so `--mx eth0:25` binds every
IPv4 and IPv6 address of eth0 (read from the kernel at start-up, not guessed).
"""

from __future__ import annotations

import fcntl
import ipaddress
import socket
import struct
from collections.abc import Iterable
from dataclasses import dataclass

from postier.errors import ConfigError


@dataclass(frozen=True, slots=True)
class ListenSpec:
    host: str  # "" (all), an IP address, or an interface name
    port: int
    kind: str  # "all", "ip" or "interface"

    def __str__(self) -> str:
        if self.kind == "ip" and ":" in self.host:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"


def parse_listen(text: str, what: str) -> ListenSpec:
    """Parse one listener address; `what` names the flag or key for the error message."""
    text = text.strip()
    if text.startswith("["):
        end = text.find("]")
        if end < 0 or text[end + 1 : end + 2] != ":":
            raise ConfigError(f"{what}: {text!r}: expected [IPv6]:PORT")
        host, port_text = text[1:end], text[end + 2 :]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ConfigError(f"{what}: {text!r}: {host!r} is not an IPv6 address") from None
        kind = "ip"
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep:
            raise ConfigError(f"{what}: {text!r}: expected ADDR:PORT (ADDR may be empty)")
        if not host:
            kind = "all"
        else:
            try:
                ipaddress.ip_address(host)
                kind = "ip"
            except ValueError:
                if ":" in host:
                    raise ConfigError(f"{what}: {text!r}: put IPv6 addresses in brackets") from None
                kind = "interface"
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ConfigError(f"{what}: {text!r}: port must be a number from 0 to 65535")
    return ListenSpec(host, int(port_text), kind)


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(values: Iterable[object], what: str) -> tuple[Network, ...]:
    """CIDRs (`192.0.2.0/24`, `2001:db8::/32`; a bare address is a /32 or /128)."""
    out: list[Network] = []
    for value in values:
        try:
            out.append(ipaddress.ip_network(str(value).strip(), strict=False))
        except ValueError:
            raise ConfigError(
                f"{what}: {value!r} is not a network (CIDR, e.g. 10.0.0.0/8)"
            ) from None
    return tuple(out)


def in_networks(ip: str, networks: tuple[Network, ...]) -> bool:
    """Whether a peer address falls in one of `networks`; IPv4-mapped IPv6 counts as IPv4."""
    if not networks:
        return False
    try:
        addr = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return any(addr in net for net in networks)


def is_loopback(spec: ListenSpec) -> bool:
    if spec.kind == "ip":
        return ipaddress.ip_address(spec.host).is_loopback
    if spec.kind == "interface":
        return spec.host == "lo"
    return False


def interface_addresses(name: str) -> list[str]:
    """IPv4 and global IPv6 addresses of a network interface, IPv6 first."""
    addrs: list[str] = []
    try:
        with open("/proc/net/if_inet6", encoding="ascii") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 6 and parts[5] == name:
                    scope = int(parts[3], 16)
                    if scope == 0x20:  # link-local needs a scope id; not useful for an MX
                        continue
                    raw = bytes.fromhex(parts[0])
                    addrs.append(str(ipaddress.IPv6Address(raw)))
    except OSError:
        pass
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            packed = struct.pack("256s", name.encode()[:15])
            res = fcntl.ioctl(s.fileno(), 0x8915, packed)  # SIOCGIFADDR
            addrs.append(socket.inet_ntoa(res[20:24]))
    except OSError:
        pass
    return addrs


def resolve_bind_addresses(spec: ListenSpec) -> list[str | None]:
    """Addresses to bind for a spec; None means every address of every family."""
    if spec.kind == "all":
        return [None]
    if spec.kind == "ip":
        return [spec.host]
    addrs = interface_addresses(spec.host)
    if not addrs:
        raise ConfigError(f"interface {spec.host!r} does not exist or has no usable address")
    return list(addrs)


def client_network(ip: str, ipv4_prefix: int) -> str:
    """The unit a client is judged by: its IPv6 /64 (one site gets a /64), or its IPv4
    address within `ipv4_prefix` (32: the address itself). IPv4-mapped IPv6 counts as IPv4."""
    addr = ipaddress.ip_address(ip)
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.ipv4_mapped is None:
            return str(ipaddress.IPv6Network((addr, 64), strict=False))
        addr = addr.ipv4_mapped
    if ipv4_prefix >= 32:
        return str(addr)
    return str(ipaddress.IPv4Network((addr, ipv4_prefix), strict=False))
