"""Listening sockets: bound in the parent (port 25 may need root) before the workers fork.

Each worker gets its own socket per address (SO_REUSEPORT), or a duplicate of a socket that
systemd passed (socket activation), so the kernel spreads connections among the workers.
"""

from __future__ import annotations

import socket

from postier.config import Config
from postier.errors import ConfigError
from postier.netaddr import ListenSpec, resolve_bind_addresses

Bound = list[tuple[str, list[socket.socket]]]  # (role, one listening socket per worker)


def _listen_socket(family: int, addr: tuple, reuse_port: bool) -> socket.socket:  # type: ignore[type-arg]
    s = socket.socket(family, socket.SOCK_STREAM)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        s.bind(addr)
        s.listen(1024)
        s.setblocking(False)
    except OSError:
        s.close()
        raise
    return s


def bind_sockets(spec: ListenSpec, copies: int = 1) -> list[list[socket.socket]]:
    """Create, bind and listen; IPv6 sockets are IPv6-only so both families can share a port.

    With several workers each gets its own socket on the same address (SO_REUSEPORT): the
    kernel spreads new connections among them, instead of waking every worker for each
    connection on one shared socket. All are bound here, before privileges are dropped.
    """
    groups: list[list[socket.socket]] = []
    try:
        for host in resolve_bind_addresses(spec):
            infos = socket.getaddrinfo(
                host, spec.port, socket.AF_UNSPEC, socket.SOCK_STREAM, 0, socket.AI_PASSIVE
            )
            seen = set()
            for family, _, _, _, addr in infos:
                if (family, addr) in seen:
                    continue
                seen.add((family, addr))
                first = _listen_socket(family, addr, copies > 1)
                group = [first]
                groups.append(group)
                actual = first.getsockname()  # port 0 becomes a real port: copies share it
                for _ in range(copies - 1):
                    group.append(_listen_socket(family, actual, True))
    except OSError as exc:
        for group in groups:
            for s in group:
                s.close()
        raise ConfigError(f"cannot listen on {spec}: {exc.strerror}") from None
    return groups


def bind_all(config: Config, activated: list[tuple[str, socket.socket]] | None = None) -> Bound:
    """Our own sockets, or those systemd passed (socket activation: they replace the
    configured listeners; each worker gets a duplicate of the descriptor)."""
    if activated:
        return [
            (role, [sock] + [sock.dup() for _ in range(config.workers - 1)])
            for role, sock in activated
        ]
    bound: Bound = []
    for role, specs in config.listeners.items():
        for spec in specs:
            bound += [(role, group) for group in bind_sockets(spec, config.workers)]
    return bound
