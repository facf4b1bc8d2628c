"""~/.ssh/config and ProxyJump chains, for flctl.deploy.ssh.

Split from ssh.py (which owns one connection's commands, files and host
keys) because it is a different thing: which servers stand between this
machine and a host, and the tunnel through them. paramiko parses the config
(SSHConfig, the same rules as OpenSSH: first match wins, Host patterns,
%h tokens); flctl.core.sshconf decides precedence and refuses loops.

Each hop is a full SSH login, its host key checked against the workspace's
known_hosts exactly like a target's (the caller's `login` does that); the
next hop, or the target, is then reached through a `direct-tcpip` channel
on the previous hop's transport, which is what `ssh -J` does.
"""

from __future__ import annotations

import functools
import getpass
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import paramiko

from flctl.core.inventory import Host
from flctl.core.sshconf import Endpoint, Route, SSHConfigText, plan_route
from flctl.deploy.connector import HostUnreachable
from flctl.errors import ConfigError

ORIGIN = ("127.0.0.1", 0)  # what a direct-tcpip request says it comes from (sshd ignores it)


@dataclass(frozen=True)
class SSHConfig:
    """One parsed ssh_config file."""

    parsed: paramiko.SSHConfig
    source: SSHConfigText

    def lookup(self, alias: str) -> dict[str, Any]:
        try:
            return dict(self.parsed.lookup(alias))
        except Exception as exc:  # Match exec/canonical lines fail in many ways
            raise ConfigError(f"cannot look up {alias!r}: {exc}", file=self.source.path) from None


def load_ssh_config(path: Path) -> SSHConfig:
    """Parse `path` (cached while the file is unchanged: every host of a deploy reads it)."""
    try:
        stat = os.stat(path)
    except OSError as exc:
        raise ConfigError(f"cannot read: {exc.strerror}", file=str(path)) from None
    return _parse(str(path), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=8)
def _parse(path: str, mtime_ns: int, size: int) -> SSHConfig:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read: {exc}", file=path) from None
    try:
        parsed = paramiko.SSHConfig.from_text(text)
    except Exception as exc:  # paramiko raises ConfigParseError, or others from Match lines
        raise ConfigError(f"cannot parse: {exc}", file=path) from None
    return SSHConfig(parsed, SSHConfigText(path, text))


def route_for(host: Host, config: SSHConfig | None) -> Route:
    """Where `host` is and which jump hosts lead there (directly without a config)."""
    assert host.ssh_host is not None
    keys = (host.ssh_key,) if host.ssh_key else ()
    alias = host.ssh_host.strip("[]")
    if config is None:
        return Route(Endpoint(alias, alias, host.ssh_port, host.ssh_user, keys))
    return plan_route(alias, config.lookup, config.source, user=host.ssh_user,
                      port=host.ssh_port, key_files=keys, explicit=host.explicit,
                      local_user=_local_user())


def _local_user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "root"


Login = Callable[[Endpoint, Any], paramiko.SSHClient]


def open_chain(route: Route, login: Login, where: str,
               timeout: float) -> tuple[paramiko.Channel, list[paramiko.SSHClient]]:
    """Log in to each hop in turn; return the channel to the target and the hops' clients.

    `login(endpoint, sock)` connects one hop (sock None: a plain TCP
    connection) and raises HostUnreachable naming it. On failure every hop
    opened so far is closed again.
    """
    clients: list[paramiko.SSHClient] = []
    sock: Any = None
    try:
        for index, hop in enumerate(route.hops):
            clients.append(login(hop, sock))
            onward = route.hops[index + 1] if index + 1 < len(route.hops) else route.target
            sock = _channel(clients[-1], hop, onward, where, timeout)
        return sock, clients
    except BaseException:
        close_all(clients)
        raise


def _channel(client: paramiko.SSHClient, hop: Endpoint, onward: Endpoint, where: str,
             timeout: float) -> paramiko.Channel:
    transport = client.get_transport()
    try:
        if transport is None or not transport.is_active():
            raise paramiko.SSHException("connection lost")
        return transport.open_channel("direct-tcpip", (onward.hostname, onward.port), ORIGIN,
                                      timeout=timeout)
    except paramiko.ChannelException as exc:
        reason = exc.text or f"code {exc.code}"
    except (paramiko.SSHException, OSError, EOFError) as exc:
        reason = str(exc) or type(exc).__name__
    raise HostUnreachable(f"{where}: jump host {hop.where} refused to forward to "
                          f"{onward.where} ({reason.rstrip('.')})")


def close_all(clients: Sequence[paramiko.SSHClient]) -> None:
    """Close hop clients, last hop first."""
    for client in reversed(clients):
        try:
            client.close()
        except (OSError, EOFError, paramiko.SSHException):
            pass
