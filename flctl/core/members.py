"""Which hosts are deployed, as a running `flctl train` learns it.

`flctl deploy` and `flctl teardown` keep `.flctl/members.json`: every
deployed host with the endpoint its agent serves on, and a tombstone for
each host torn down. Every change takes the next serial, and each entry
remembers the serial it came with, so a run that noted the serial when it
started (or at its last checkpoint) knows exactly which hosts joined or
left since: those entries have a larger serial. The file is replaced
atomically (a reader sees the old or the new one, never half), and only one
writer exists at a time (the workspace lock, flctl.workspace_lock).

The file is the operator's own, on their disk; it is still read defensively
(a hand-edited or truncated one is "no changes", never a crash mid-run).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flctl.core.fsutil import atomic_write
from flctl.core.layout import Endpoint

MEMBERS_FILE = "members.json"


@dataclass(frozen=True)
class Members:
    """The file's content: deployed hosts, tombstones, the latest serial."""

    serial: int = 0
    hosts: Mapping[str, tuple[int, Endpoint | None]] = field(default_factory=dict)
    removed: Mapping[str, int] = field(default_factory=dict)

    def joined_after(self, serial: int) -> dict[str, Endpoint]:
        """Hosts deployed after `serial` whose endpoint is known."""
        return {name: endpoint for name, (since, endpoint) in self.hosts.items()
                if since > serial and endpoint is not None}

    def left_after(self, serial: int) -> set[str]:
        """Hosts torn down after `serial`."""
        return {name for name, since in self.removed.items() if since > serial}

    def changed(self, deployed: Mapping[str, Endpoint | None] = {},
                torn_down: Iterable[str] = ()) -> Members:
        """The next version: `deployed` hosts (re)added, `torn_down` ones removed."""
        gone = set(torn_down)
        serial = self.serial + 1
        hosts = {n: v for n, v in self.hosts.items() if n not in gone}
        removed = {n: s for n, s in self.removed.items() if n not in deployed}
        for name, endpoint in deployed.items():
            old = self.hosts.get(name)
            # a redeploy of a member is no news to a run: it keeps its serial
            hosts[name] = (old[0], endpoint) if old and old[1] == endpoint else (serial, endpoint)
        for name in gone:
            if name in self.hosts or name not in self.removed:
                removed[name] = serial
        if hosts == dict(self.hosts) and removed == dict(self.removed):
            return self   # nothing new: the serial stays
        return Members(serial, hosts, removed)

    def render(self) -> str:
        return json.dumps({
            "serial": self.serial,
            "hosts": {name: {"serial": since, "endpoint": _endpoint_dict(endpoint)}
                      for name, (since, endpoint) in sorted(self.hosts.items())},
            "removed": dict(sorted(self.removed.items())),
        }, indent=2)


def _endpoint_dict(endpoint: Endpoint | None) -> dict[str, Any] | None:
    if endpoint is None:
        return None
    return {"host": endpoint.host, "bind_address": endpoint.bind_address,
            "connect_address": endpoint.connect_address, "port": endpoint.port,
            "server_hostname": endpoint.server_hostname}


def _endpoint(name: str, raw: Any) -> Endpoint | None:
    if not isinstance(raw, dict):
        return None
    text = ("bind_address", "connect_address", "server_hostname")
    port = raw.get("port")
    if (raw.get("host") != name or not all(isinstance(raw.get(k), str) for k in text)
            or not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536):
        return None
    return Endpoint(name, raw["bind_address"], raw["connect_address"], port,
                    raw["server_hostname"])


def _serial(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 \
        else None


def parse_members(text: str) -> Members | None:
    """The file's content; None when it is not a members file at all."""
    try:
        document = json.loads(text)
    except ValueError:
        return None
    if not isinstance(document, dict) or _serial(document.get("serial")) is None:
        return None
    hosts: dict[str, tuple[int, Endpoint | None]] = {}
    raw_hosts = document.get("hosts")
    for name, entry in (raw_hosts.items() if isinstance(raw_hosts, dict) else ()):
        since = _serial(entry.get("serial")) if isinstance(entry, dict) else None
        if since is not None:
            hosts[str(name)] = (since, _endpoint(str(name), entry.get("endpoint")))
    raw_removed = document.get("removed")
    removed = {str(name): since for name, value in
               (raw_removed.items() if isinstance(raw_removed, dict) else ())
               if (since := _serial(value)) is not None}
    return Members(int(document["serial"]), hosts, removed)


def read_members(path: Path) -> Members | None:
    """The members file; None when there is none (a workspace deployed by an
    older flctl) or it cannot be read."""
    try:
        return parse_members(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError):
        return None


def record_members(path: Path, deployed: Mapping[str, Endpoint | None] = {},
                   torn_down: Iterable[str] = (), seed: Iterable[str] = ()) -> Members:
    """Record a deploy's or teardown's hosts (the caller holds the workspace
    lock). A new file starts from `seed`: hosts deployed before flctl kept it
    (serial 0, so no run takes them for newcomers)."""
    current = read_members(path)
    if current is None:
        current = Members(0, {name: (0, None) for name in seed}, {})
    updated = current.changed(deployed, torn_down)
    if updated is not current or not path.exists():
        atomic_write(path, updated.render())
    return updated
