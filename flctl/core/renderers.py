"""Desired state as text: files deploy writes on hosts.

Pure functions so they can be checked against golden files, and so deploy
can compare the rendered text with what a host has to decide "changed".
"""

from __future__ import annotations

import ipaddress
import re
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from flctl.core.limits import AgentLimits


@dataclass(frozen=True)
class UnitSpec:
    """What a host's units need: the agent's files, its user, and the tunnel
    and firewall it depends on (None where the host has none)."""

    project: str
    host: str
    python: str
    config: str
    state_dir: str
    run_dir: str
    log: str
    user: str | None = None
    tunnel_config: str | None = None
    firewall: str | None = None
    nft: str = "/usr/sbin/nft"
    # The agent may use GPUs: it needs the device nodes (no PrivateDevices)
    # and the groups that own them.
    gpus: bool = False
    gpu_groups: tuple[str, ...] = ()
    # The agent's own log (it rotates it); `log` only takes what it prints
    # before logging starts. Empty: everything goes to `log` (an old agent).
    agent_log: str = ""
    limits: AgentLimits = field(default_factory=AgentLimits)


def unit_name(project: str) -> str:
    return f"flctl-agent-{project}.service"


def tunnel_unit_name(project: str) -> str:
    return f"flctl-tunnel-{project}.service"


def firewall_unit_name(project: str) -> str:
    return f"flctl-firewall-{project}.service"


def render_systemd_unit(spec: UnitSpec) -> str:
    """The agent: after its firewall table and tunnel, bound to the tunnel (the
    address it listens on lives there), as its own user, writing only run_dir."""
    after = ["network-online.target"]
    needs = []
    if spec.firewall:
        after.append(firewall_unit_name(spec.project))
        needs.append(f"Requires={firewall_unit_name(spec.project)}")
    if spec.tunnel_config:
        after.append(tunnel_unit_name(spec.project))
        needs.append(f"BindsTo={tunnel_unit_name(spec.project)}")
    user = [f"User={spec.user}", f"Group={spec.user}"] if spec.user else []
    lines = [
        "# Managed by flctl: changes are overwritten by `flctl deploy`.",
        "[Unit]",
        f"Description=flctl training agent ({spec.project}/{spec.host})",
        f"After={' '.join(after)}",
        "Wants=network-online.target",
        *needs,
        "StartLimitIntervalSec=300",
        "StartLimitBurst=20",
        "",
        "[Service]",
        "Type=simple",
        *user,
        f"ExecStart={spec.python} -m flctl.agent.main --config {spec.config}"
        + (f" --log {spec.agent_log}" if spec.agent_log else ""),
        # why the last agent stopped (out of memory), for the next one to report
        *([f"ExecStopPost={spec.python} -m flctl.agent.exits --config {spec.config}"]
          if spec.limits.memory_bytes is not None else []),
        f"WorkingDirectory={spec.run_dir}",
        "Restart=on-failure",
        "RestartSec=2",
        f"StandardOutput=append:{spec.log}",
        f"StandardError=append:{spec.log}",
        "UMask=0077",
        *spec.limits.systemd_lines(),
        "NoNewPrivileges=yes",
        "PrivateTmp=yes",
        *(([f"SupplementaryGroups={' '.join(spec.gpu_groups)}"] if spec.gpu_groups else [])
          if spec.gpus else ["PrivateDevices=yes"]),
        "ProtectSystem=strict",
        "ProtectHome=read-only",
        f"ReadWritePaths={spec.run_dir}",
        "ProtectKernelTunables=yes",
        "ProtectKernelModules=yes",
        "ProtectKernelLogs=yes",
        "ProtectControlGroups=yes",
        "ProtectClock=yes",
        "ProtectHostname=yes",
        "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6",
        "RestrictNamespaces=yes",
        "RestrictRealtime=yes",
        "RestrictSUIDSGID=yes",
        "LockPersonality=yes",
        "SystemCallArchitectures=native",
        "CapabilityBoundingSet=",
        "",
        "[Install]",
        "WantedBy=multi-user.target",
    ]
    return "\n".join(lines) + "\n"


def render_firewall_unit(spec: UnitSpec) -> str:
    """flctl's nftables table, loaded before the network comes up (so the agent
    port is never open unguarded). Loading is idempotent: the file replaces
    only the table inet flctl."""
    return f"""\
# Managed by flctl: changes are overwritten by `flctl deploy`.
[Unit]
Description=flctl firewall table inet flctl ({spec.project})
DefaultDependencies=no
After=local-fs.target
Before=network-pre.target
Wants=network-pre.target

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart={spec.nft} -f {spec.firewall}

[Install]
WantedBy=multi-user.target
"""


def render_tunnel_unit(spec: UnitSpec) -> str:
    """The WireGuard overlay, after the firewall table; the host helper's wg-up
    is idempotent, so starting the unit when deploy has already brought the
    tunnel up changes nothing."""
    helper = f"{spec.python} -m flctl.agent.host_helper"
    return f"""\
# Managed by flctl: changes are overwritten by `flctl deploy`.
[Unit]
Description=flctl WireGuard overlay ({spec.project})
After=network-online.target {firewall_unit_name(spec.project)}
Wants=network-online.target
{"Requires=" + firewall_unit_name(spec.project) if spec.firewall else "# no firewall table"}

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart={helper} wg-up --config {spec.tunnel_config}
ExecStop={helper} wg-down --config {spec.tunnel_config}

[Install]
WantedBy=multi-user.target
"""


def cron_file_name(project: str) -> str:
    """cron ignores /etc/cron.d files whose names hold a dot."""
    return "flctl-" + re.sub(r"[^A-Za-z0-9_-]", "-", project)


def render_boot_cron(spec: UnitSpec) -> str:
    """/etc/cron.d entry for hosts without systemd: at boot, the host helper
    loads the table, brings the tunnel up and starts the agent, in that order."""
    return (f"# Managed by flctl: changes are overwritten by `flctl deploy`.\n"
            f"@reboot root {spec.python} -m flctl.agent.host_helper boot --root "
            f"{spec.state_dir} >> {spec.state_dir}/boot.log 2>&1\n")


# ------------------------------------------------------------------ WireGuard
# wg-quick(8) files. Secrets never appear in them: the private key and the
# preshared keys stay in their own 0600 files and are loaded by PostUp
# commands (wg-quick's documented idiom), so a config can be diffed, logged
# and compared freely.

IFNAME_MAX = 15            # Linux IFNAMSIZ - 1
IFNAME_PREFIX = "fl-"
_IFNAME_CHARS = re.compile(r"[^A-Za-z0-9_=+.-]")   # wg-quick's own file-name rule
_WG_KEY = re.compile(r"[A-Za-z0-9+/]{42}[AEIMQUYcgkosw048]=\Z")  # base64 of 32 bytes
_UNSAFE_PATH = re.compile(r"[#%\n\r\0]")          # wg-quick: comment, %i, line breaks


@dataclass(frozen=True)
class WgPeer:
    public_key: str
    allowed_ips: tuple[str, ...]
    preshared_key_file: str | None = None
    endpoint: str | None = None
    keepalive: int | None = None
    comment: str = ""


@dataclass(frozen=True)
class SitePeer:
    """A host of the same site, as another host's tunnel sees it: its key, its
    overlay address, and where its WireGuard listens on the underlay."""

    name: str
    public_key: str
    overlay_ip: str
    endpoint: str        # underlay host:port
    # the pair's preshared key, in its own 0600 file on the host (like hub.psk)
    preshared_key_file: str | None = None


def site_wg_peers(peers: Sequence[SitePeer]) -> list[WgPeer]:
    """Direct peers between a site's aggregator and its members, beside the
    hub: each reaches only its own address (/32), dialled at its underlay
    endpoint, so the aggregator talks to its members without the hub relaying
    and no member gains a route to any other overlay host."""
    return [WgPeer(public_key=p.public_key,
                   allowed_ips=(f"{ipaddress.ip_address(p.overlay_ip)}/32",),
                   preshared_key_file=p.preshared_key_file,
                   endpoint=p.endpoint, comment=f"site peer {p.name}")
            for p in peers]


def is_wg_key(text: str) -> bool:
    """A WireGuard key as wg prints it (base64 of 32 bytes)."""
    return bool(_WG_KEY.match(text))


def interface_name(project: str) -> str:
    """The overlay interface of a project: stable, a valid Linux interface
    name and a valid wg-quick config stem (so `<name>.conf` works)."""
    cleaned = _IFNAME_CHARS.sub("-", project)[: IFNAME_MAX - len(IFNAME_PREFIX)]
    return IFNAME_PREFIX + (cleaned or "x")


def render_wg_config(*, address: str, listen_port: int | None, private_key_file: str,
                     peers: Sequence[WgPeer], comment: str = "") -> str:
    """A wg-quick file with no secret and no SaveConfig (wg-quick must never
    write back into a file deploy owns). Peers sorted by comment, then key, so
    the same inventory always renders the same bytes."""
    interface_address = ipaddress.ip_interface(address)
    if listen_port is not None:
        _check_port(listen_port, "listen_port")
    ordered = sorted(peers, key=lambda p: (p.comment, p.public_key))
    keys = [p.public_key for p in ordered]
    if len(set(keys)) != len(keys):
        raise ValueError("two peers have the same public key")
    lines = ["# Managed by flctl: changes are overwritten by `flctl deploy`."]
    if comment:
        lines.append(f"# {_one_line(comment)}")
    lines += ["[Interface]", f"Address = {interface_address}"]
    if listen_port is not None:
        lines.append(f"ListenPort = {listen_port}")
    lines.append("# Keys are loaded from their own 0600 files, never copied here.")
    lines.append(f"PostUp = wg set %i private-key {_shell_path(private_key_file)}")
    for peer in ordered:
        _check_peer(peer)
        if peer.preshared_key_file is not None:
            lines.append(f"PostUp = wg set %i peer {peer.public_key} "
                         f"preshared-key {_shell_path(peer.preshared_key_file)}")
    for peer in ordered:
        lines += ["", "[Peer]"]
        if peer.comment:
            lines.append(f"# {_one_line(peer.comment)}")
        lines.append(f"PublicKey = {peer.public_key}")
        lines.append("AllowedIPs = " + ", ".join(
            str(ipaddress.ip_network(ip, strict=False)) for ip in peer.allowed_ips))
        if peer.endpoint is not None:
            lines.append(f"Endpoint = {peer.endpoint}")
        if peer.keepalive is not None:
            lines.append(f"PersistentKeepalive = {peer.keepalive}")
    return "\n".join(lines) + "\n"


def render_wg_sync_config(stripped: str, *, private_key: str,
                          preshared_keys: Mapping[str, str], listen_port: int) -> str:
    """What `wg syncconf` must read for a live interface: the output of
    `wg-quick strip` plus the secrets the PostUp lines load from files.

    syncconf treats a missing PrivateKey as "no key" and a missing ListenPort
    as "pick a random port", so both are always given (the port as the
    interface has it when the config names none). Peers' PresharedKeys are
    added so a new peer gets its PSK in the same step. The result holds
    secrets: it is only ever piped to `wg`, never written to disk.
    """
    out: list[str] = []
    section = ""
    has_port = any(_wg_key_of(line) == "listenport" for line in stripped.splitlines())
    for line in stripped.splitlines():
        key = _wg_key_of(line)
        if line.strip().startswith("["):
            section = line.strip().lower()
            out.append(line)
            if section == "[interface]":
                out.append(f"PrivateKey = {private_key}")
                if not has_port:
                    out.append(f"ListenPort = {listen_port}")
            continue
        if section == "[interface]" and key == "privatekey":
            continue
        if section == "[peer]" and key == "presharedkey":
            continue
        out.append(line)
        if section == "[peer]" and key == "publickey":
            public_key = line.split("=", 1)[1].strip()
            if public_key in preshared_keys:
                out.append(f"PresharedKey = {preshared_keys[public_key]}")
    return "\n".join(out) + "\n"


def _wg_key_of(line: str) -> str:
    key, sep, _ = line.partition("=")
    return key.strip().lower() if sep else ""


def _check_peer(peer: WgPeer) -> None:
    if not is_wg_key(peer.public_key):
        raise ValueError(f"peer {peer.comment or '?'}: not a WireGuard public key: "
                         f"{peer.public_key!r}")
    if not peer.allowed_ips:
        raise ValueError(f"peer {peer.comment or peer.public_key}: no AllowedIPs")
    if peer.endpoint is not None:
        host, sep, port = peer.endpoint.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ValueError(f"peer {peer.comment or peer.public_key}: endpoint "
                             f"{peer.endpoint!r} is not host:port")
        _check_port(int(port), "endpoint port")
    if peer.keepalive is not None and not 1 <= peer.keepalive <= 65535:
        raise ValueError(f"peer {peer.comment or peer.public_key}: keepalive "
                         f"{peer.keepalive} out of 1..65535")


def _shell_path(path: str) -> str:
    """wg-quick runs PostUp through bash after cutting at '#' and replacing %i."""
    if not path.startswith("/") or _UNSAFE_PATH.search(path):
        raise ValueError(f"key file path must be absolute, without '#', '%' or "
                         f"line breaks: {path!r}")
    return shlex.quote(path)


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _check_port(port: int, what: str) -> None:
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise ValueError(f"{what} {port!r} is not a port (1..65535)")


# ------------------------------------------------------------------ nftables

NFT_TABLE = "flctl"
NFT_FAMILY = "inet"
NFT_DROP_COUNTER = "agent_dropped"


def render_nft_ruleset(*, interface: str | None, hub_overlay_ip: str, agent_port: int,
                       wg_port: int | None, ssh_port: int = 22,
                       site_aggregator_ip: str | None = None,
                       aggregator_self_ip: str | None = None) -> str:
    """flctl's own table, loaded with `nft -f` in one transaction.

    Only `inet flctl` is ever named: no `flush ruleset`, so the host's other
    tables (its own firewall, Docker's, ...) are left exactly as they are.
    With the overlay (`interface` and `wg_port` set) the agent port is open
    only through the tunnel from the hub's overlay address; without it
    (agent.listen: underlay) only from the coordinator's address. A site
    member also admits its own aggregator through the tunnel
    (`site_aggregator_ip`), and no other overlay host; WireGuard from its site
    peers is covered by the rule that admits the tunnel's port from anywhere.
    An aggregator fits itself as one of its members, through its own overlay
    address (`aggregator_self_ip`): admitted from this host only (loopback).
    """
    if interface is not None and (_IFNAME_CHARS.search(interface)
                                  or not 1 <= len(interface) <= IFNAME_MAX):
        raise ValueError(f"not an interface name: {interface!r}")
    hub = ipaddress.ip_address(hub_overlay_ip)
    ports = [(agent_port, "agent_port"), (ssh_port, "ssh_port")]
    if wg_port is not None:
        ports.append((wg_port, "wg_port"))
    for port, what in ports:
        _check_port(port, what)
    if agent_port == ssh_port:
        raise ValueError(f"the agent port {agent_port} is the SSH port")
    family = "ip" if hub.version == 4 else "ip6"
    aggregator = None if site_aggregator_ip is None else ipaddress.ip_address(site_aggregator_ip)
    if aggregator is not None and (interface is None or aggregator.version != hub.version
                                   or aggregator == hub):
        raise ValueError(f"a site aggregator ({aggregator}) is admitted only through the "
                         f"tunnel, from an overlay address other than the hub's")
    own = None if aggregator_self_ip is None else ipaddress.ip_address(aggregator_self_ip)
    if own is not None and (interface is None or own.version != hub.version or own == hub
                            or aggregator is not None):
        raise ValueError(f"an aggregator's own address ({own}) is admitted only on the "
                         f"overlay, on an aggregator (not a member of another's site)")
    if interface is not None:
        tunnel = (f"\t\t# WireGuard from anywhere: the tunnel authenticates its peers itself.\n"
                  f"\t\tudp dport {wg_port} accept\n")
        agent = (f"\t\t# The agent: only through the tunnel, only from the hub (the coordinator).\n"
                 f'\t\tiifname "{interface}" {family} saddr {hub} tcp dport {agent_port} accept\n')
        if aggregator is not None:
            agent += (f"\t\t# ... and from this host's site aggregator, through the tunnel too.\n"
                      f'\t\tiifname "{interface}" {family} saddr {aggregator} '
                      f"tcp dport {agent_port} accept\n")
        if own is not None:
            agent += (f"\t\t# ... and from this host itself: the site aggregator fits itself "
                      f"as a member.\n"
                      f'\t\tiifname "lo" {family} daddr {own} tcp dport {agent_port} accept\n')
    else:
        tunnel = ""
        agent = (f"\t\t# The agent: only from the coordinator's address (no overlay).\n"
                 f"\t\t{family} saddr {hub} tcp dport {agent_port} accept\n")
    return f"""\
# Managed by flctl: changes are overwritten by `flctl deploy`.
# Loaded with `nft -f`: the whole file is one transaction. Only the table
# {NFT_FAMILY} {NFT_TABLE} is named (never `flush ruleset`): other tables stay as they are.

# Replace the table atomically: create it empty if it is missing, so that
# the delete cannot fail, delete it, and define it anew below.
table {NFT_FAMILY} {NFT_TABLE} {{}}
delete table {NFT_FAMILY} {NFT_TABLE}

table {NFT_FAMILY} {NFT_TABLE} {{
\t# Packets to the agent port dropped by the last rule.
\tcounter {NFT_DROP_COUNTER} {{
\t}}

\tchain input {{
\t\t# Policy accept: traffic that is not flctl's is left to the host's own rules.
\t\ttype filter hook input priority filter; policy accept;

\t\t# SSH first, always: deploy must never lock the operator out.
\t\ttcp dport {ssh_port} accept
\t\t# Packets of connections already admitted, and replies to this host's own.
\t\tct state established,related accept
{tunnel}{agent}\t\t# The agent port from anywhere else: dropped, and counted.
\t\ttcp dport {agent_port} counter name "{NFT_DROP_COUNTER}" drop
\t}}
}}
"""
