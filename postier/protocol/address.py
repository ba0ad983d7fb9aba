"""RFC 5321 paths and ESMTP parameters (INTERFACE STUB — being completed in parallel).

Public interface, relied on by server.py:
- `Address(local, domain)`: frozen; `local` unquoted content, `domain` lowercased ("" only for
  the bare `postmaster`); `str()` gives the wire form (local part quoted when needed).
- `AddressError(reply)`: raised by the parsers, carries the exact Reply to send.
- `split_path_and_params(arg) -> (path_text, params_text)`: arg is what follows `FROM:`/`TO:`.
- `parse_path(path_text, *, utf8, null_ok, bare_postmaster_ok, sender) -> Address | None`.
- `parse_params(params_text) -> dict[str, str | None]` (keys upper-cased).
"""

from __future__ import annotations

from dataclasses import dataclass

from postier.protocol.replies import Reply


class AddressError(Exception):
    def __init__(self, reply: Reply) -> None:
        super().__init__(str(reply))
        self.reply = reply


@dataclass(frozen=True, slots=True)
class Address:
    local: str
    domain: str

    def __str__(self) -> str:
        return f"{self.local}@{self.domain}" if self.domain else self.local


def split_path_and_params(arg: str) -> tuple[str, str]:
    arg = arg.strip()
    if not arg.startswith("<"):
        raise AddressError(Reply(501, "5.5.4", "Path must be enclosed in <>"))
    end = arg.find(">")
    if end < 0:
        raise AddressError(Reply(501, "5.5.4", "Path must be enclosed in <>"))
    return arg[: end + 1], arg[end + 1 :].strip()


def parse_path(
    path_text: str, *, utf8: bool, null_ok: bool, bare_postmaster_ok: bool, sender: bool
) -> Address | None:
    inner = path_text[1:-1]
    if inner == "":
        if null_ok:
            return None
        raise AddressError(Reply(501, "5.1.3", "Null path not allowed here"))
    if ":" in inner and inner.startswith("@"):
        inner = inner.split(":", 1)[1]
    if "@" not in inner:
        if bare_postmaster_ok and inner.lower() == "postmaster":
            return Address("postmaster", "")
        raise AddressError(Reply(501, "5.1.3", "Bad address syntax"))
    local, domain = inner.rsplit("@", 1)
    return Address(local, domain.lower())


def parse_params(params_text: str) -> dict[str, str | None]:
    params: dict[str, str | None] = {}
    for word in params_text.split():
        key, sep, value = word.partition("=")
        params[key.upper()] = value if sep else None
    return params
