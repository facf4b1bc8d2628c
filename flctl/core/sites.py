"""Sites: inventory groups whose hosts report to one of their own, the aggregator.

A group may name one of its hosts as `aggregator:`. In a round that host
collects the updates of the group's sampled hosts, folds them, and forwards
one weighted partial result, so one update per site crosses the WAN to the
coordinator. A host belongs to at most one site: two aggregators over one host
(a site group nested in another, or overlapping groups) would make it unclear
whom it answers to, and it is refused here, where file and line are known.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from flctl.core.yamlsrc import Spot, did_you_mean


@dataclass(frozen=True)
class Site:
    name: str                  # the group's name
    aggregator: str            # the host that folds the site's updates
    members: tuple[str, ...]   # every host of the group, the aggregator included, file order
    line: int                  # where `aggregator:` is written

    def __contains__(self, host: object) -> bool:
        return host in self.members


def find_sites(source: str, aggregators: Mapping[str, tuple[str, int]],
               members: Mapping[str, Sequence[str]],
               local_hosts: frozenset[str]) -> dict[str, Site]:
    """Validate each group's `aggregator` against its hosts; the sites by name.

    `aggregators` maps group -> (aggregator name, line); `members` group ->
    its host names (transitive, file order); `local_hosts` the hosts with
    `connection: local`, which are not on the overlay.
    """
    sites: dict[str, Site] = {}
    site_of: dict[str, str] = {}
    for group, (aggregator, line) in sorted(aggregators.items(), key=lambda kv: kv[1][1]):
        spot = Spot(source, line, f"groups.{group}.aggregator")
        hosts = tuple(members.get(group, ()))
        if aggregator not in hosts:
            shown = ", ".join(hosts[:8]) + (", ..." if len(hosts) > 8 else "")
            raise spot.error(f"{aggregator!r} is not one of group {group!r}'s hosts "
                             f"({shown or 'it has none'}){did_you_mean(aggregator, hosts)}")
        for host in hosts:
            if host in site_of:
                other = sites[site_of[host]]
                raise spot.error(
                    f"host {host!r} would have two aggregators: {aggregator!r} (site {group!r}) "
                    f"and {other.aggregator!r} (site {other.name!r}, line {other.line}); "
                    f"name one aggregator per host")
        sides = {host in local_hosts for host in hosts}
        if len(sides) > 1:
            odd = next(h for h in hosts if (h in local_hosts) != (aggregator in local_hosts))
            where = "a local host" if odd in local_hosts else "an SSH host on the overlay"
            agg_side = "local" if aggregator in local_hosts else "reached over the overlay"
            raise spot.error(f"site {group!r} mixes sides of the overlay: its aggregator "
                             f"{aggregator!r} is {agg_side}, but {odd!r} is {where}; "
                             f"a site's hosts must all be local or all SSH hosts")
        sites[group] = Site(group, aggregator, hosts, line)
        for host in hosts:
            site_of[host] = group
    return sites


def refuse_sites_off_the_overlay(source: str, sites: Mapping[str, Site],
                                 local_hosts: frozenset[str], listen: str) -> None:
    """An SSH site's members must be reachable over the overlay: its aggregator
    dials them through its direct WireGuard peers, and their firewall admits it
    there. With `agent.listen: underlay` agents bind the underlay, where only
    the coordinator's address is admitted, so such a site is refused (file,
    line and field of its `aggregator:`). Local sites live on loopback either way."""
    if listen == "overlay":
        return
    for site in sorted(sites.values(), key=lambda s: s.line):
        if any(host not in local_hosts for host in site.members):
            raise Spot(source, site.line, f"groups.{site.name}.aggregator").error(
                f"site {site.name!r} has SSH hosts, whose agents its aggregator reaches over "
                f"the overlay, but flctl.yaml sets agent.listen: {listen} (agents on the "
                f"underlay admit the coordinator only); set agent.listen: overlay or drop "
                f"this aggregator")
