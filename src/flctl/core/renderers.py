"""Desired state as text: files deploy writes on hosts.

Pure functions so they can be checked against golden files, and so deploy
can compare the rendered text with what a host has to decide "changed".
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class UnitSpec:
    project: str
    host: str
    python: str
    config: str
    state_dir: str
    log: str


def unit_name(project: str) -> str:
    return f"flctl-agent-{project}.service"


def render_systemd_unit(spec: UnitSpec) -> str:
    """A hardened unit: restarts on failure, writes only its own state dir."""
    return f"""\
# Managed by flctl: changes are overwritten by `flctl deploy`.
[Unit]
Description=flctl training agent ({spec.project}/{spec.host})
After=network-online.target
Wants=network-online.target
StartLimitIntervalSec=300
StartLimitBurst=20

[Service]
Type=simple
ExecStart={spec.python} -m flctl.agent.main --config {spec.config}
WorkingDirectory={spec.state_dir}
Restart=on-failure
RestartSec=2
StandardOutput=append:{spec.log}
StandardError=append:{spec.log}
UMask=0077
NoNewPrivileges=yes
PrivateTmp=yes
PrivateDevices=yes
ProtectSystem=strict
ProtectHome=read-only
ReadWritePaths={spec.state_dir}
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectClock=yes
ProtectHostname=yes
RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6
RestrictNamespaces=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
LockPersonality=yes
SystemCallArchitectures=native
CapabilityBoundingSet=

[Install]
WantedBy=multi-user.target
"""
