"""Overlay addresses: which WireGuard address each host gets.

An explicit `overlay_ip`, or one derived from a hash of the host's name, so
that adding or removing other hosts does not renumber it (renumbering would
force new certificates, a WireGuard change and an agent restart on every
host). A collision is resolved by probing past taken addresses; addresses
the hosts had at the last deploy are honoured first, so a host that is
already deployed never moves.
"""

from __future__ import annotations

import hashlib
import ipaddress
from collections.abc import Collection, Mapping, Sequence
from typing import Any

from flctl.core.yamlsrc import Spot
from flctl.errors import ConfigError

# (host entry, its merged variables, its groups) as the inventory parser
# resolves them; each variable has .value, .line and .field.
Resolved = Sequence[tuple[Any, Mapping[str, Any], Any]]


def overlay_capacity(subnet: ipaddress.IPv4Network) -> int:
    """Host addresses left once network, broadcast and hub are set aside."""
    return max(subnet.num_addresses - 3, 0)


def assign_overlay_addresses(names: Collection[str], subnet: ipaddress.IPv4Network,
                             taken: Collection[ipaddress.IPv4Address] = (),
                             previous: Mapping[str, ipaddress.IPv4Address] | None = None,
                             ) -> dict[str, ipaddress.IPv4Address]:
    """Give each name an address derived from its hash, probing past used ones.

    A name's first choice depends on the name alone, and names are placed in
    sorted order, so file order never matters and a host only moves if a
    newly added name collides with its slot and sorts before it. Addresses
    in `previous` are honoured first (when free and inside the subnet), so a
    caller that remembers past assignments never sees a host move.
    """
    first = int(subnet.network_address) + 2      # skip network address and hub
    size = overlay_capacity(subnet)
    used = {int(a) for a in taken}
    result: dict[str, ipaddress.IPv4Address] = {}
    pending = sorted(set(names))
    if previous:
        for name in pending:
            old = previous.get(name)
            if old is not None and first <= int(old) < first + size and int(old) not in used:
                result[name] = ipaddress.IPv4Address(int(old))
                used.add(int(old))
        pending = [n for n in pending if n not in result]
    for name in pending:
        slot = overlay_home_slot(name, size)
        for step in range(size):
            candidate = first + (slot + step) % size
            if candidate not in used:
                used.add(candidate)
                result[name] = ipaddress.IPv4Address(candidate)
                break
        else:
            raise ConfigError(f"overlay subnet {subnet} is full: no address left for {name!r}")
    return result


def overlay_home_slot(name: str, size: int) -> int:
    """The slot a name asks for first: a hash, so it ignores every other host."""
    digest = hashlib.sha256(name.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % size if size > 0 else 0


def check_ssh_outside_overlay(source: str, subnet: ipaddress.IPv4Network,
                               resolved: Resolved) -> None:
    """An SSH address inside the overlay would be routed into the tunnel once it
    is up: SSH to that host (and deploy's rollback confirmation) would be cut."""
    for _entry, merged, _groups in resolved:
        var = merged.get("ssh_host")
        if var is None:
            continue
        try:
            address = ipaddress.ip_address(str(var.value).strip("[]"))
        except ValueError:
            continue   # a name: resolved at connect time, not here
        if address.version == 4 and address in subnet:
            raise Spot(source, var.line, var.field).error(
                f"{address} is inside the overlay subnet {subnet} (overlay.subnet in "
                f"flctl.yaml): the tunnel would capture SSH to this host; choose another "
                f"overlay subnet")

def check_explicit_overlay(source: str, subnet: ipaddress.IPv4Network,
                            resolved: Resolved,
                            ) -> dict[str, ipaddress.IPv4Address]:
    hub = subnet.network_address + 1
    owners: dict[ipaddress.IPv4Address, tuple[str, int]] = {}
    explicit: dict[str, ipaddress.IPv4Address] = {}
    for entry, merged, _ in resolved:
        if "overlay_ip" not in merged:
            continue
        var = merged["overlay_ip"]
        address = var.value
        spot = Spot(source, var.line, var.field)
        if address not in subnet:
            raise spot.error(f"{address} is outside the overlay subnet {subnet}")
        if address == subnet.network_address:
            raise spot.error(f"{address} is the network address of {subnet}")
        if address == subnet.broadcast_address:
            raise spot.error(f"{address} is the broadcast address of {subnet}")
        if address == hub:
            raise spot.error(f"{address} is reserved for the hub (the coordinator)")
        if address in owners:
            other, other_line = owners[address]
            raise spot.error(f"{address} is already used by host {other!r} (line {other_line})")
        owners[address] = (entry.name, var.line)
        explicit[entry.name] = address
    return explicit

def _wider(subnet: ipaddress.IPv4Network, hosts: int) -> str:
    """The fix for a subnet too small for `hosts`: the smallest supernet that fits."""
    prefix = subnet.prefixlen
    while prefix > 0 and overlay_capacity(subnet.supernet(new_prefix=prefix)) < hosts:
        prefix -= 1
    wider = subnet.supernet(new_prefix=prefix)
    if overlay_capacity(wider) < hosts:
        return ""
    return f" (set overlay.subnet in flctl.yaml to {wider} or wider)"


def assign_or_explain(source: str, subnet: ipaddress.IPv4Network, names: Sequence[str],
                       explicit: Mapping[str, ipaddress.IPv4Address],
                       previous: Mapping[str, ipaddress.IPv4Address] | None,
                       line: int) -> dict[str, ipaddress.IPv4Address]:
    free = overlay_capacity(subnet) - len(explicit)
    if len(names) > free:
        total = len(names) + len(explicit)
        raise ConfigError(f"overlay subnet {subnet} has room for {overlay_capacity(subnet)} "
                          f"hosts, the inventory has {total}{_wider(subnet, total)}",
                          file=source, line=line)
    return assign_overlay_addresses(names, subnet, taken=explicit.values(), previous=previous)
