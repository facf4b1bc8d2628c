"""Where each host's agent lives and listens.

The deploy engine (which starts agents) and the coordinator (which dials
them) must agree on addresses, ports and file locations; both ask this
module, so there is one answer. When the WireGuard overlay lands only
`agent_endpoint` changes, not its callers.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import TYPE_CHECKING

if TYPE_CHECKING:   # the host helper reads paths from here and need not load YAML settings
    from flctl.core.inventory import Host
    from flctl.core.settings import Settings

LOOPBACK = "127.0.0.1"
REMOTE_STATE_ROOT = PurePosixPath("/var/lib/flctl")
# The system user agents run as on deployed hosts: not root, owns only the
# agent's key and its run directory.
AGENT_USER = "flctl"
AGENT_VERSION_FILE = "agent.version"  # see HostPaths.agent_version


@dataclass(frozen=True)
class Endpoint:
    """How an agent binds and how the coordinator reaches it."""

    host: str
    bind_address: str
    connect_address: str
    port: int
    server_hostname: str


@dataclass(frozen=True)
class HostPaths:
    """Files flctl keeps on one host (for local hosts: under the workspace).

    The root and what deploy writes (config, certificates, tasks, tunnel and
    firewall state) belong to root; only `run_dir` and the private key belong
    to the unprivileged agent user, so a compromised agent can change none of
    what it is configured with.
    """

    root: PurePosixPath

    @property
    def config(self) -> PurePosixPath:
        return self.root / "agent.json"

    @property
    def key(self) -> PurePosixPath:
        return self.root / "agent.key"

    @property
    def cert(self) -> PurePosixPath:
        return self.root / "agent.crt"

    @property
    def ca_cert(self) -> PurePosixPath:
        return self.root / "ca.crt"

    @property
    def site_cert(self) -> PurePosixPath:
        """A site aggregator's client certificate (flctl.core.pki ROLE_SITE)."""
        return self.root / "site.crt"

    @property
    def site_key(self) -> PurePosixPath:
        """Its key, made on the aggregator host, owned like agent.key."""
        return self.root / "site.key"

    @property
    def log(self) -> PurePosixPath:
        """The agent's own log, rotated by it (agent.log.1 ... beside it):
        in run_dir, the one directory it may write."""
        return self.run_dir / "agent.log"

    @property
    def crash_log(self) -> PurePosixPath:
        """What the agent and its supervisor print before logging starts (or
        as they die): small, opened for them by whoever starts them."""
        return self.root / "agent.out"

    @property
    def tasks(self) -> PurePosixPath:
        return self.root / "tasks"

    @property
    def frozen(self) -> PurePosixPath:
        """Where deploy ships the workspace's frozen/ (flctl.core.frozen)."""
        return self.root / "frozen"

    @property
    def crl(self) -> PurePosixPath:
        return self.root / "ca.crl"

    @property
    def firewall(self) -> PurePosixPath:
        """The nftables file deploy renders for this host."""
        return self.root / "firewall.nft"

    @property
    def firewall_state(self) -> PurePosixPath:
        """Rollback state of firewall changes (flctl.agent.firewall)."""
        return self.root / "firewall"

    @property
    def wg_dir(self) -> PurePosixPath:
        return self.root / "wg"

    @property
    def run_dir(self) -> PurePosixPath:
        """The one directory the agent (and its supervisor) may write."""
        return self.root / "run"

    @property
    def state(self) -> PurePosixPath:
        return self.run_dir / "agent-state.json"

    @property
    def agent_version(self) -> PurePosixPath:
        """The flctl version of the agent running now (written as it starts):
        deploy restarts an agent whose code is older than what is installed."""
        return self.run_dir / AGENT_VERSION_FILE

    @property
    def supervisor_pid(self) -> PurePosixPath:
        return self.run_dir / "supervisor.pid"

    @property
    def agent_pid(self) -> PurePosixPath:
        return self.run_dir / "agent.pid"


def agent_port(host: Host, settings: Settings, index: int) -> int:
    """Local hosts share one machine, so each gets its own port."""
    if host.agent_port is not None:
        return host.agent_port
    if host.connection == "local":
        return settings.agent.port + index
    return settings.agent.port


def agent_endpoint(host: Host, settings: Settings, index: int) -> Endpoint:
    port = agent_port(host, settings, index)
    if host.connection == "local":
        return Endpoint(host.name, LOOPBACK, LOOPBACK, port, host.name)
    if settings.agent.listen == "overlay":
        address = str(host.overlay_ip)
        return Endpoint(host.name, address, address, port, host.name)
    underlay = host.ssh_host or host.name
    return Endpoint(host.name, underlay, underlay, port, host.name)


def host_paths(host: Host, workspace_state: str) -> HostPaths:
    """Local hosts keep state inside the workspace; remote ones under /var/lib."""
    if host.connection == "local":
        return HostPaths(PurePosixPath(workspace_state) / "hosts" / host.name)
    return HostPaths(REMOTE_STATE_ROOT / host.name)


def certificate_names(host: Host, endpoint: Endpoint) -> tuple[list[str], list[str]]:
    """SANs for a host's agent certificate: its name and the address it serves on."""
    dns = [host.name]
    ips = sorted({endpoint.connect_address, str(host.overlay_ip)})
    return dns, ips
