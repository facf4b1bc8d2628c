"""A host's part in its site at deploy: its agent config's site fields, and for
a local aggregator its site certificate.

Members name their site and aggregator (whose site certificate they obey,
for `fit` only); the aggregator also lists where it reaches each member's
agent: the overlay address for SSH hosts, loopback for local ones (a site
is all one or the other, flctl.core.sites). A local aggregator's site key is
made here, on the machine that uses it; an SSH aggregator's is made on its
host (the network steps' CSR flow).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flctl.core.fsutil import atomic_write
from flctl.core.inventory import Host, Inventory
from flctl.core.layout import HostPaths, agent_port
from flctl.core.settings import Settings
from flctl.core.sites import Site
from flctl.deploy.certificates import CertificateStore


def member_address(host: Host, settings: Settings, index: int) -> str:
    """"ADDRESS:PORT" at which a site's aggregator reaches this member's agent."""
    address = "127.0.0.1" if host.connection == "local" else str(host.overlay_ip)
    return f"{address}:{agent_port(host, settings, index)}"


def site_fields(inventory: Inventory, settings: Settings, host: Host,
                paths: HostPaths) -> dict[str, Any]:
    """The AgentConfig site fields for `host` ({} when it is in no site)."""
    site = inventory.site_of(host.name)
    if site is None:
        return {}
    fields: dict[str, Any] = {"site": site.name, "site_aggregator": site.aggregator}
    if site.aggregator == host.name:
        order = {h.name: i for i, h in enumerate(inventory.hosts)}
        hosts = {h.name: h for h in inventory.hosts}
        fields.update(
            site_members={m: member_address(hosts[m], settings, order[m]) for m in site.members},
            site_cert=str(paths.site_cert), site_key=str(paths.site_key))
    return fields


def local_site_certificate(store: CertificateStore, site: Site, paths: HostPaths,
                           check: bool) -> tuple[bool, str]:
    """Issue a local aggregator's site key and certificate if it has none fit for
    its site; (changed, detail)."""
    cert_path, key_path = Path(paths.site_cert), Path(paths.site_key)
    current = cert_path.read_bytes() if cert_path.exists() else None
    reissue = store.site_reissue(site.aggregator, site.name, current, key_path.exists())
    if reissue is None:
        return False, f"site {site.name}"
    if check:
        return True, f"would issue for site {site.name} ({reissue.reason})"
    key, cert = store.issue_site(site.aggregator, site.name)
    atomic_write(key_path, key, 0o600)
    atomic_write(cert_path, cert, 0o644)
    return True, f"issued for site {site.name}: {reissue.reason}"
