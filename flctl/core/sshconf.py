"""OpenSSH client conventions: where a host really is, and through which jump hosts.

The parsing of ~/.ssh/config itself is paramiko's (flctl.deploy.ssh_jump
hands in its `lookup` results as plain dicts); what is decided here is
flctl's part, kept pure so it is tested without a network:

* precedence: what the inventory sets explicitly (at any level) wins over
  ssh_config, and ssh_config wins over flctl's defaults (root, port 22);
* `ProxyJump a,b`: the target is reached through a then b, each hop itself
  looked up (its HostName, User, Port, IdentityFile, and for the first hop
  its own ProxyJump, as OpenSSH does);
* a loop (a host that jumps through itself, directly or through other
  hops) is refused before anything connects, naming the config line.
"""

from __future__ import annotations

import os
import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Callable

from flctl.errors import ConfigError

Lookup = Callable[[str], Mapping[str, Any]]
# [user@]host[:port], the form ProxyJump takes (ssh:// URIs too).
_JUMP_RE = re.compile(r"(?:ssh://)?(?:(?P<user>[^@\s]+)@)?(?P<host>\[[^\]]+\]|[^:\s]+)"
                      r"(?::(?P<port>\d+))?/?\Z")
_DIRECTIVE_RE = re.compile(r"\s*(?P<key>[A-Za-z]+)\s*(?:=\s*|\s+)(?P<value>.*?)\s*\Z")


@dataclass(frozen=True)
class Endpoint:
    """One SSH server to log in to: the target or a jump host."""

    alias: str                      # as written (inventory ssh_host, ProxyJump entry)
    hostname: str                   # where to connect (HostName, or the alias)
    port: int
    user: str
    key_files: tuple[str, ...]      # tried in order; empty: ssh-agent and default keys

    @property
    def where(self) -> str:
        address = f"[{self.hostname}]" if ":" in self.hostname else self.hostname
        named = "" if self.alias == self.hostname else f"{self.alias} "
        return f"{named}({address}:{self.port})" if named else f"{address}:{self.port}"


@dataclass(frozen=True)
class Route:
    target: Endpoint
    hops: tuple[Endpoint, ...] = ()   # first hop first; empty: connect directly


@dataclass(frozen=True)
class SSHConfigText:
    """The config's source, for errors that name a line."""

    path: str
    text: str

    def line_of(self, keyword: str, mentioning: str | None = None) -> int | None:
        """First line setting `keyword` (to a value naming `mentioning`, when given)."""
        for number, raw in enumerate(self.text.splitlines(), 1):
            match = _DIRECTIVE_RE.match(raw.split("#", 1)[0])
            if not match or match["key"].lower() != keyword.lower():
                continue
            value = match["value"]
            if mentioning is None or mentioning == value or (
                    keyword.lower() == "proxyjump" and mentioning in _jump_hosts(value)):
                return number
        return None

    def error(self, message: str, keyword: str, mentioning: str | None = None) -> ConfigError:
        return ConfigError(message, file=self.path, line=self.line_of(keyword, mentioning),
                           field=keyword)


def _jump_hosts(value: str) -> list[str]:
    hosts = []
    for spec in value.split(","):
        match = _JUMP_RE.match(spec.strip())
        if match:
            hosts.append(match["host"].strip("[]"))
    return hosts


def plan_route(alias: str, lookup: Lookup, source: SSHConfigText, *, user: str, port: int,
               key_files: Sequence[str], explicit: Collection[str],
               local_user: str) -> Route:
    """The endpoint for an inventory host whose ssh_host is `alias`, and its jump hosts.

    `user`, `port` and `key_files` are the host's values from the inventory;
    `explicit` names those the inventory set (ssh_user, ssh_port, ssh_key),
    which ssh_config cannot override. Jump hosts default to `local_user`, as
    with OpenSSH, and to the target's key when their config names none.
    """
    found = lookup(alias)
    target = Endpoint(
        alias=alias,
        hostname=_hostname(found, alias),
        port=port if "ssh_port" in explicit else _port(found, port, source, alias),
        user=user if "ssh_user" in explicit else str(found.get("user") or user),
        key_files=tuple(key_files) if "ssh_key" in explicit or not found.get("identityfile")
        else _keys(found),
    )
    hops = _hops(alias, found, lookup, source, [alias], local_user, target.key_files)
    return Route(target, tuple(hops))


def _hops(alias: str, found: Mapping[str, Any], lookup: Lookup, source: SSHConfigText,
          chain: list[str], local_user: str, fallback_keys: tuple[str, ...]) -> list[Endpoint]:
    """The jump hosts in front of `alias`, first hop first (its own jumps before it)."""
    value = str(found.get("proxyjump") or "").strip()
    if not value or value.lower() == "none":
        return []
    specs = []
    for spec in value.split(","):
        match = _JUMP_RE.match(spec.strip())
        if not match:
            raise source.error(f"{alias}: cannot read jump host {spec.strip()!r} "
                               "(expected [user@]host[:port])", "ProxyJump")
        specs.append(match)
    hops: list[Endpoint] = []
    for index, match in enumerate(specs):
        name = match["host"].strip("[]")
        if name in chain:
            loop = " -> ".join([*chain, name])
            raise source.error(f"ProxyJump loop: {loop}", "ProxyJump", name)
        config = lookup(name)
        if index == 0:  # only the first hop's own ProxyJump applies (the rest go through it)
            hops += _hops(name, config, lookup, source, [*chain, name], local_user,
                          fallback_keys)
        chain = [*chain, name]
        hops.append(Endpoint(
            alias=name,
            hostname=_hostname(config, name),
            port=int(match["port"]) if match["port"] else _port(config, 22, source, name),
            user=match["user"] or str(config.get("user") or local_user),
            key_files=_keys(config) or fallback_keys,
        ))
    return hops


def _hostname(found: Mapping[str, Any], alias: str) -> str:
    return str(found.get("hostname") or alias).strip("[]")


def _port(found: Mapping[str, Any], default: int, source: SSHConfigText, alias: str) -> int:
    text = found.get("port")
    if text is None:
        return default
    try:
        port = int(str(text))
    except ValueError:
        port = 0
    if not 1 <= port <= 65535:
        raise source.error(f"{alias}: not a port: {text!r}", "Port", str(text))
    return port


def _keys(found: Mapping[str, Any]) -> tuple[str, ...]:
    files = found.get("identityfile") or ()
    if isinstance(files, str):
        files = (files,)
    return tuple(os.path.expanduser(str(f)) for f in files)
