"""The WireGuard hub on the operator's machine, and what hosts need from it.

Hub and spoke: the hub is the machine that runs `flctl train`. Its private
key is made here and never leaves; each host's is made on the host and only
its public key comes back. One preshared key per hub-host pair, and one per
aggregator-member pair of a site, is made here and uploaded 0600 to the
hosts of the pair (the hub's own copy stays here). The hub's interface is
driven by the same host-side commands as a host's, through a local
connector.
"""

from __future__ import annotations

import json
import os
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from flctl.core.fsutil import atomic_write, write_secret
from flctl.core.renderers import (
    SitePeer,
    WgPeer,
    interface_name,
    render_wg_config,
    site_wg_peers,
)
from flctl.deploy.local import LocalConnector
from flctl.deploy.remote import StepFailed, call_helper
from flctl.errors import FlctlError
from flctl.workspace import Workspace

KEEPALIVE_S = 25


class HubNotRoot(FlctlError):
    """Bringing up the hub interface needs root; say exactly what to run."""

    exit_code = 7


@dataclass(frozen=True)
class HubPaths:
    root: Path

    @property
    def psk_dir(self) -> Path:
        return self.root / "psk"

    def site_psk(self, aggregator: str, member: str) -> Path:
        """The aggregator-member pair's PSK (host names hold no '/')."""
        return self.psk_dir / "site" / aggregator / f"{member}.psk"

    @property
    def peers(self) -> Path:
        return self.root / "peers.json"

    def config(self, interface: str) -> Path:
        return self.root / f"{interface}.conf"

    @property
    def private_key(self) -> Path:
        return self.root / "private.key"


class Hub:
    """The operator's end of the overlay for one workspace."""

    def __init__(self, workspace: Workspace) -> None:
        settings = workspace.settings
        self.workspace = workspace
        self.paths = HubPaths(workspace.paths.state / "wg")
        self.interface = interface_name(settings.project)
        self.overlay_ip = settings.overlay.hub_ip
        self.prefix = settings.overlay.subnet.prefixlen
        self.port = settings.overlay.port
        self._lock = threading.Lock()
        self._public_key: str | None = None

    @property
    def config_path(self) -> Path:
        return self.paths.config(self.interface)

    def public_key(self) -> str:
        """Made here on first use (the hub's private key never leaves this machine)."""
        with self._lock:
            if self._public_key is None:
                self.paths.root.mkdir(parents=True, exist_ok=True, mode=0o700)
                answer = call_helper(LocalConnector("hub"), "wg-key", "--dir", str(self.paths.root))
                self._public_key = str(answer["public_key"])
            return self._public_key

    def preshared_key(self, host: str) -> bytes:
        """The hub-host pair's PSK, made here once; the host gets a copy, 0600."""
        return self._preshared_key(self.paths.psk_dir / f"{host}.psk")

    def site_preshared_key(self, aggregator: str, member: str) -> bytes:
        """The aggregator-member pair's PSK, made here once; each end gets a
        copy, 0600 (the two hosts never exchange secrets directly)."""
        return self._preshared_key(self.paths.site_psk(aggregator, member))

    def _preshared_key(self, path: Path) -> bytes:
        with self._lock:
            if not path.exists():
                self.paths.root.mkdir(parents=True, exist_ok=True, mode=0o700)
                directory = self.paths.root
                for part in path.parent.relative_to(self.paths.root).parts:
                    directory = directory / part
                    directory.mkdir(exist_ok=True, mode=0o700)
                made = LocalConnector("hub").run(["wg", "genpsk"])
                if made.returncode != 0:
                    raise StepFailed(f"wg genpsk: {made.stderr.strip()}")
                write_secret(path, made.stdout.strip() + "\n")
            return path.read_bytes()

    def known_peers(self) -> dict[str, dict[str, str]]:
        try:
            return dict(json.loads(self.paths.peers.read_text()))
        except (OSError, ValueError):
            return {}

    def record_peers(self, updates: dict[str, dict[str, str]], removed: set[str] = frozenset()
                     ) -> dict[str, dict[str, str]]:
        with self._lock:
            peers = self.known_peers()
            peers.update(updates)
            for name in removed:
                peers.pop(name, None)
                (self.paths.psk_dir / f"{name}.psk").unlink(missing_ok=True)
                self._forget_site_pairs(name)
            atomic_write(self.paths.peers, json.dumps(peers, indent=2, sort_keys=True), 0o600)
            return peers

    def _forget_site_pairs(self, name: str) -> None:
        """Drop the site PSKs of a host that left the inventory, at either end."""
        site_dir = self.paths.psk_dir / "site"
        for path in [*site_dir.glob(f"{name}/*.psk"), *site_dir.glob(f"*/{name}.psk")]:
            path.unlink(missing_ok=True)
        if (site_dir / name).is_dir() and not any((site_dir / name).iterdir()):
            (site_dir / name).rmdir()

    def host_config(self, host_overlay_ip: str, host_private_key: str, host_psk: str,
                    endpoint: str, site_peers: Sequence[SitePeer] = ()) -> str:
        """The host's wg-quick file: the hub, dialled with keepalive, and for a
        site's aggregator or member the direct peers of its site."""
        hub = WgPeer(public_key=self.public_key(), allowed_ips=(f"{self.overlay_ip}/32",),
                     preshared_key_file=host_psk, endpoint=f"{endpoint}:{self.port}",
                     keepalive=KEEPALIVE_S, comment="hub")
        return render_wg_config(address=f"{host_overlay_ip}/{self.prefix}", listen_port=self.port,
                                private_key_file=host_private_key,
                                peers=[hub, *site_wg_peers(site_peers)],
                                comment="flctl overlay (host side)")

    def hub_config(self, peers: dict[str, dict[str, str]]) -> str:
        # An initial endpoint lets the hub start the first handshake itself
        # instead of waiting up to 5 s for the host's retry; a host behind NAT
        # still works, as WireGuard roams to where its keepalives come from.
        entries = [WgPeer(public_key=p["public_key"], allowed_ips=(f"{p['overlay_ip']}/32",),
                          preshared_key_file=str(self.paths.psk_dir / f"{name}.psk"),
                          endpoint=p.get("endpoint"), comment=name)
                   for name, p in sorted(peers.items())]
        return render_wg_config(address=f"{self.overlay_ip}/{self.prefix}", listen_port=self.port,
                                private_key_file=str(self.paths.private_key), peers=entries,
                                comment="flctl overlay (hub)")

    def apply(self, peers: dict[str, dict[str, str]]) -> str:
        """Write the hub config and bring the interface up or in line.

        Returns "created", "updated", "unchanged" or "removed".
        """
        if not peers:
            return self.remove()
        text = self.hub_config(peers)
        current = self.config_path.read_text() if self.config_path.exists() else None
        up = Path(f"/sys/class/net/{self.interface}").exists()
        if current == text and up:
            return "unchanged"
        if os.geteuid() != 0:
            atomic_write(self.config_path, text, 0o600)
            raise HubNotRoot(
                f"the hub interface {self.interface} needs root: run `sudo {sys.executable} -m "
                f"flctl.agent.host_helper wg-up --config {self.config_path}`, then deploy again")
        atomic_write(self.config_path, text, 0o600)
        answer = call_helper(LocalConnector("hub"), "wg-up", "--config", str(self.config_path))
        return str(answer.get("result", "updated"))

    def remove(self) -> str:
        if not self.config_path.exists():
            return "unchanged"
        call_helper(LocalConnector("hub"), "wg-down", "--config", str(self.config_path))
        self.config_path.unlink(missing_ok=True)
        return "removed"

    def handshakes(self) -> dict[str, dict[str, int]]:
        """Per host: seconds since the latest handshake (-1: never) and bytes."""
        if not Path(f"/sys/class/net/{self.interface}").exists():
            return {}
        answer = call_helper(LocalConnector("hub"), "wg-show", "--interface", self.interface)
        by_key = {p["public_key"]: name for name, p in self.known_peers().items()}
        out: dict[str, dict[str, int]] = {}
        for peer in answer.get("peers", []):
            name = by_key.get(peer.get("public_key", ""))
            if name:
                age = peer.get("handshake_age_s")
                out[name] = {"handshake_age_s": -1 if age is None else int(age),
                             "rx_bytes": int(peer.get("rx_bytes", 0)),
                             "tx_bytes": int(peer.get("tx_bytes", 0))}
        return out

