"""A deployed host's network: the WireGuard tunnel and flctl's nftables table,
changed under one armed rollback so no change can lock the operator out.

Plan first (what differs from the host's facts), then, if anything does:
arm the rollback on the host (it saves the table, and notes a tunnel
interface that is about to be created), bring the tunnel in line, load the
table, and only then prove SSH still works with a *new* connection, which
disarms the rollback. Should SSH be cut, nothing confirms and the host
restores its previous table and drops the new interface by itself.

With the overlay the agent port is open only through the tunnel from the
hub; with `agent.listen: underlay` only from the coordinator's address.

Sites: a site's aggregator and its members are also direct WireGuard peers,
and a member's table admits its own aggregator beside the hub; each such
pair has its own preshared key, made by the hub like its own pairs'. A peer's
public key is made on that peer, so a fresh deploy renders each site host's
tunnel with the keys known so far (the hub's record of earlier deploys) and
the engine brings the site's tunnels in line again once every key is known
(`site_peers_stale`); a second deploy finds them current and changes nothing.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from flctl.core.fsutil import sha256_hex
from flctl.core.renderers import SitePeer, is_wg_key, render_nft_ruleset
from flctl.core.schema import Maybe, count
from flctl.deploy.connector import Connector
from flctl.deploy.remote import StepFailed, call_helper
from flctl.errors import FlctlError

if TYPE_CHECKING:
    from flctl.deploy.host_deploy import HostDeploy

ARMED_SPEC = {"armed": count()}
APPLIED_SPEC = {"changed": bool, "armed": Maybe(count())}


def site_psk_file(peer: str) -> str:
    """The file in a host's wg/ holding its pair's PSK with site peer `peer`."""
    return f"site-{peer}.psk"


@dataclass
class NetworkPlan:
    uploads: list[tuple[str, bytes, int]] = field(default_factory=list)
    tunnel_changed: bool = False   # the tunnel must be brought in line (wg-up)
    tunnel_new: bool = False       # ... and its interface does not exist yet
    firewall_changed: bool = False


class NetworkSteps:
    def __init__(self, deploy: HostDeploy) -> None:
        self.deploy = deploy
        self.ctx = deploy.ctx
        self.overlay = self.ctx.workspace.settings.agent.listen == "overlay"
        self.wg_public_key: str | None = None
        # the site peers this host's tunnel was rendered with (None: not rendered)
        self.rendered_site_peers: tuple[SitePeer, ...] | None = None

    def site_peers(self, known: Mapping[str, Mapping[str, Any]]) -> tuple[SitePeer, ...]:
        """This host's direct peers in its site, as far as their keys are known
        (`known`: the hub's record, name -> public_key, endpoint): the
        aggregator has every other member, a member its aggregator only."""
        site, me = self.deploy.site, self.deploy.host.name
        if site is None or not self.overlay:
            return ()
        names = [m for m in site.members if m != me] if site.aggregator == me \
            else [site.aggregator]
        hosts = {h.name: h for h in self.ctx.workspace.inventory.hosts}
        peers = []
        for name in names:
            entry = known.get(name) or {}
            key, endpoint = entry.get("public_key"), entry.get("endpoint")
            if isinstance(key, str) and is_wg_key(key) and isinstance(endpoint, str) \
                    and endpoint and name in hosts:
                peers.append(SitePeer(name, key, str(hosts[name].overlay_ip), endpoint,
                                      str(self.deploy.paths.wg_dir / site_psk_file(name))))
        return tuple(peers)

    def _site_psk(self, peer: SitePeer) -> bytes:
        """The preshared key of this host's pair with `peer` (one end is the aggregator)."""
        site, me = self.deploy.site, self.deploy.host.name
        assert site is not None
        member = peer.name if site.aggregator == me else me
        return self.ctx.hub.site_preshared_key(site.aggregator, member)

    def site_peers_stale(self, known: Mapping[str, Mapping[str, Any]]) -> bool:
        """True when the tunnel was rendered with other site peers than `known` gives."""
        return self.rendered_site_peers is not None and \
            self.rendered_site_peers != self.site_peers(known)

    def apply(self, connector: Connector, facts: dict[str, Any], step: str = "tunnel") -> None:
        """Bring tunnel and table in line; `step` names the tunnel's step (a
        second pass for site peers reports the table only if it changed)."""
        d, hub, paths = self.deploy, self.ctx.hub, self.deploy.paths
        plan = NetworkPlan()

        def firewall_step(changed: bool, detail: str) -> None:
            if changed or step == "tunnel":
                d.step("firewall", changed, detail)

        if self.overlay and not self._tunnel_plan(connector, facts, plan):
            return   # check mode, and the host has no tunnel key yet
        self._firewall_plan(connector, facts, plan)
        interface = f"{hub.interface} {d.host.overlay_ip}" if self.overlay else None
        if not (plan.tunnel_changed or plan.firewall_changed):
            if interface:
                d.step(step, False, interface)
            firewall_step(False, "inet flctl")
            return
        if self.ctx.check:
            if interface:
                d.step(step, plan.tunnel_changed,
                       f"would bring up {hub.interface}" if plan.tunnel_changed else interface)
            firewall_step(plan.firewall_changed,
                          "would apply table inet flctl" if plan.firewall_changed else "inet flctl")
            return
        state = str(paths.firewall_state)
        # armed before anything changes: a tunnel can cut SSH as surely as a table
        arm = ["fw-arm", "--state", state, "--timeout", f"{self.ctx.rollback_after_s:g}"]
        if plan.tunnel_new:
            arm += ["--new-interface", hub.interface]
        call_helper(connector, *arm, spec=ARMED_SPEC)
        for path, data, mode in plan.uploads:
            connector.put(path, data, mode)
        if interface:
            if plan.tunnel_changed:
                answer = call_helper(connector, "wg-up", "--config", self._config_path(),
                                     spec={"result": str, "implementation": Maybe(str)})
                d.step(step, True, f"{interface}: {answer['result']} "
                                   f"({answer['implementation'] or 'wireguard'})")
            else:
                d.step(step, False, interface)
        call_helper(connector, "fw-apply", "--ruleset", str(paths.firewall), "--state", state,
                    "--timeout", f"{self.ctx.rollback_after_s:g}", spec=APPLIED_SPEC)
        try:
            self.ctx.confirm_new_connection(d.host, self.ctx.options, state)
        except FlctlError as exc:
            raise StepFailed(
                f"network: no new SSH connection after the change ({exc.message}); the host "
                f"restores its previous firewall table (and removes a new tunnel) within "
                f"{self.ctx.rollback_after_s:.0f} s") from None
        firewall_step(plan.firewall_changed,
                      "applied table inet flctl, confirmed over a new SSH connection"
                      if plan.firewall_changed else "inet flctl; change confirmed over a new "
                                                    "SSH connection")

    def _aggregator_ip(self) -> str | None:
        """A site member's aggregator, on the overlay (None: no site, or this
        host is the aggregator: only the hub commands it)."""
        site = self.deploy.site
        if site is None or not self.overlay or site.aggregator == self.deploy.host.name:
            return None
        aggregator = next(h for h in self.ctx.workspace.inventory.hosts
                          if h.name == site.aggregator)
        return str(aggregator.overlay_ip)

    def _own_ip_if_aggregator(self) -> str | None:
        """An aggregator reaches its own agent (itself a member) at its overlay address."""
        site = self.deploy.site
        if site is None or not self.overlay or site.aggregator != self.deploy.host.name:
            return None
        return str(self.deploy.host.overlay_ip)

    def _config_path(self) -> str:
        return str(self.deploy.paths.wg_dir / f"{self.ctx.hub.interface}.conf")

    def _tunnel_plan(self, connector: Connector, facts: dict[str, Any],
                     plan: NetworkPlan) -> bool:
        """What the host end of the overlay needs; its private key is made here, on
        the host, and only the public key comes back. False when check mode cannot
        go further (no key yet)."""
        d, hub = self.deploy, self.ctx.hub
        wg_dir = d.paths.wg_dir
        have: dict[str, Any] = facts.get("wg_files") or {}
        known = hub.known_peers().get(d.host.name, {})
        if "private.key" in have and known.get("public_key"):
            self.wg_public_key = known["public_key"]
        elif self.ctx.check:
            d.step("tunnel", True, "would make the host's WireGuard key and bring it up")
            d.step("firewall", True, "would apply table inet flctl")
            return False
        else:
            self.wg_public_key = call_helper(connector, "wg-key", "--dir", str(wg_dir),
                                             spec={"public_key": str})["public_key"]
        psk = hub.preshared_key(d.host.name)
        if have.get("hub.psk") != sha256_hex(psk):
            plan.uploads.append((str(wg_dir / "hub.psk"), psk, 0o600))
        site_peers = self.site_peers(hub.known_peers())
        for peer in site_peers:
            pair_psk = self._site_psk(peer)
            if have.get(site_psk_file(peer.name)) != sha256_hex(pair_psk):
                plan.uploads.append((str(wg_dir / site_psk_file(peer.name)), pair_psk, 0o600))
        config = hub.host_config(str(d.host.overlay_ip), str(wg_dir / "private.key"),
                                 str(wg_dir / "hub.psk"), connector.local_address(),
                                 site_peers).encode()
        self.rendered_site_peers = site_peers
        if have.get(f"{hub.interface}.conf") != sha256_hex(config):
            plan.uploads.append((self._config_path(), config, 0o600))
        plan.tunnel_new = hub.interface not in facts.get("net_interfaces", [])
        plan.tunnel_changed = bool(plan.uploads) or plan.tunnel_new
        return True

    def _firewall_plan(self, connector: Connector, facts: dict[str, Any],
                       plan: NetworkPlan) -> None:
        d, settings = self.deploy, self.ctx.workspace.settings
        if self.overlay:
            source, interface, wg_port = str(self.ctx.hub.overlay_ip), self.ctx.hub.interface, \
                settings.overlay.port
        else:
            # the coordinator reaches the agent from where it reaches SSH
            source, interface, wg_port = connector.local_address(), None, None
        ruleset = render_nft_ruleset(interface=interface, hub_overlay_ip=source,
                                     agent_port=d.endpoint.port, wg_port=wg_port,
                                     ssh_port=d.host.ssh_port,
                                     site_aggregator_ip=self._aggregator_ip(),
                                     aggregator_self_ip=self._own_ip_if_aggregator()).encode()
        loaded = facts.get("firewall") or {}
        current = (facts["files"].get("firewall.nft") == sha256_hex(ruleset)
                   and loaded.get("present") and loaded.get("as_applied")
                   and not loaded.get("armed"))
        if not current:
            plan.firewall_changed = True
            plan.uploads.append((str(d.paths.firewall), ruleset, 0o600))
