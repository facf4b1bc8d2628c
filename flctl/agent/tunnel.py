"""The WireGuard end of a machine (host or hub), driven through wg-quick.

wg-quick picks the implementation by itself: the kernel module where it
exists, wireguard-go otherwise. Redeploying must not restart a tunnel that
only changed peers (its handshakes would be lost), so a live interface is
brought in line with `wg syncconf`; only a new Address or ListenPort costs a
down and up.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import subprocess
import time
from pathlib import Path
from typing import Any

from flctl.agent.proc import command_line, matching_pid
from flctl.core.facts import WgQuickConfig, parse_wg_dump, parse_wg_quick_config
from flctl.core.fsutil import sha256_hex, write_secret
from flctl.core.renderers import is_wg_key, render_wg_sync_config
from flctl.errors import FlctlError

PRIVATE_KEY_NAME = "private.key"
USERSPACE_COMM = "wireguard-go"
COMMAND_TIMEOUT_S = 30.0
EXIT_WAIT_S = 5.0
_IFNAME = re.compile(r"[A-Za-z0-9_=+.-]{1,15}\Z")


class TunnelError(FlctlError):
    """A WireGuard command failed on this machine."""


def _run(*cmd: str, input_text: str | None = None) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(list(cmd), capture_output=True, text=True, input=input_text,
                              timeout=COMMAND_TIMEOUT_S)
    except FileNotFoundError as exc:
        raise TunnelError(f"{cmd[0]} not found: install wireguard-tools") from exc


def _checked(*cmd: str, input_text: str | None = None) -> str:
    done = _run(*cmd, input_text=input_text)
    if done.returncode != 0:
        raise TunnelError(f"{' '.join(cmd[:3])}: {_last_lines(done.stderr or done.stdout)}")
    return done.stdout


def _last_lines(text: str, count: int = 3) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return " | ".join(lines[-count:]) or "failed"


# ------------------------------------------------------------------ keys


def ensure_keypair(directory: Path) -> str:
    """This machine's WireGuard key, made here (it never travels); returns
    the public key. An existing key is kept: peers already trust it."""
    old_umask = os.umask(0o077)
    try:
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        key_path = directory / PRIVATE_KEY_NAME
        if not key_path.exists():
            write_secret(key_path, _checked("wg", "genkey"))
    finally:
        os.umask(old_umask)
    private_key = key_path.read_text().strip()
    if not is_wg_key(private_key):
        raise TunnelError(f"{key_path} does not hold a WireGuard key: remove it to make a new one")
    return _checked("wg", "pubkey", input_text=private_key + "\n").strip()


def write_preshared_key(path: Path, key: str) -> bool:
    """Store the hub-host pair's PSK 0600; True if the file changed."""
    key = key.strip()
    if not is_wg_key(key):
        raise TunnelError("the preshared key is not a WireGuard key (wg genpsk output)")
    current = path.read_text().strip() if path.exists() else None
    if current == key and (path.stat().st_mode & 0o077) == 0:
        return False
    old_umask = os.umask(0o077)
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        write_secret(path, key + "\n")
    finally:
        os.umask(old_umask)
    return True


# ------------------------------------------------------------------ interface state


def interface_of(config_path: Path) -> str:
    """wg-quick names the interface after the file: `<name>.conf`."""
    if config_path.suffix != ".conf" or not _IFNAME.match(config_path.stem):
        raise TunnelError(f"{config_path}: a wg-quick file must be named <interface>.conf "
                          "with an interface name of at most 15 characters")
    return config_path.stem


def interface_exists(interface: str) -> bool:
    return _run("ip", "link", "show", "dev", interface).returncode == 0


def implementation(interface: str) -> str | None:
    """"kernel" or "userspace" (wireguard-go), read from the link's kind:
    the kernel's is `wireguard`, wireguard-go's a `tun`."""
    done = _run("ip", "-d", "-j", "link", "show", "dev", interface)
    if done.returncode != 0:
        return None
    links = json.loads(done.stdout or "[]")
    kind = links[0].get("linkinfo", {}).get("info_kind") if links else None
    return "kernel" if kind == "wireguard" else "userspace"


def userspace_pid(interface: str) -> int | None:
    """The wireguard-go serving `interface` in this network namespace.

    The PID namespace may be shared with other network namespaces (the lab),
    each with a wireguard-go of the same interface name: match the namespace.
    """
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/comm") as handle:
                if handle.read().strip() != USERSPACE_COMM:
                    continue
        except OSError:
            continue
        pid = int(entry.name)
        if matching_pid(pid, [interface.encode()], same_netns=True) and \
                interface.encode() in command_line(pid)[1:]:
            return pid
    return None


def _addresses(interface: str) -> set[str]:
    done = _run("ip", "-j", "addr", "show", "dev", interface)
    if done.returncode != 0:
        return set()
    out: set[str] = set()
    for link in json.loads(done.stdout or "[]"):
        for info in link.get("addr_info", []):
            if info.get("scope") != "link":
                out.add(f"{info['local']}/{info['prefixlen']}")
    return out


def _dump(interface: str) -> str:
    return _checked("wg", "show", interface, "dump")


def _settings_digest(dump: str, config: WgQuickConfig) -> str:
    """A digest of what the interface is configured with, not what it did:
    handshakes and byte counts are left out, and so are endpoints the config
    does not set (they roam with the peer). Secrets only enter the digest."""
    configured_endpoints = {p["public_key"] for p in config.peers if p["endpoint"]}
    rows = [line.split("\t") for line in dump.splitlines() if line.strip()]
    settings: list[list[str]] = []
    for fields in rows:
        if len(fields) == 4:
            settings.append(fields)                   # private key, public key, port, fwmark
        elif len(fields) == 8:
            endpoint = fields[2] if fields[0] in configured_endpoints else ""
            settings.append([fields[0], fields[1], endpoint,
                             ",".join(sorted(fields[3].split(","))), fields[7]])
    return sha256_hex(json.dumps(sorted(settings)))


def _normalised(addresses: tuple[str, ...]) -> set[str]:
    return {str(ipaddress.ip_interface(a)) for a in addresses}


# ------------------------------------------------------------------ up, down, show


def tunnel_up(config_path: Path) -> str:
    """Bring the interface in line with `config_path`: "created", "updated"
    or "unchanged". Peers, keys and keepalives change live (no restart)."""
    interface = interface_of(config_path)
    config = parse_wg_quick_config(config_path.read_text())
    if not interface_exists(interface):
        _wg_quick("up", config_path)
        return "created"
    dump = _dump(interface)
    current = parse_wg_dump(dump)["interface"] or {}
    if (_normalised(config.addresses) != _addresses(interface)
            or (config.listen_port is not None and config.listen_port != current.get("listen_port"))):
        tunnel_down(config_path)
        _wg_quick("up", config_path)
        return "updated"
    before = _settings_digest(dump, config)
    sync = render_wg_sync_config(
        _checked("wg-quick", "strip", str(config_path)),
        private_key=_read_key(config.private_key_file, "private key"),
        preshared_keys={pub: _read_key(path, f"preshared key of peer {pub}")
                        for pub, path in config.preshared_key_files.items()},
        listen_port=int(current.get("listen_port") or 0),
    )
    _checked("wg", "syncconf", interface, "/dev/stdin", input_text=sync)
    _add_missing_routes(interface, config)
    return "unchanged" if _settings_digest(_dump(interface), config) == before else "updated"


def _read_key(path: str | None, what: str) -> str:
    if path is None:
        raise TunnelError(f"the config loads no {what} (expected a `PostUp = wg set %i ...` line)")
    try:
        key = Path(path).read_text().strip()
    except OSError as exc:
        raise TunnelError(f"cannot read the {what} at {path}: {exc.strerror}") from exc
    if not is_wg_key(key):
        raise TunnelError(f"{path} does not hold a WireGuard key")
    return key


def _add_missing_routes(interface: str, config: WgQuickConfig) -> None:
    """What `wg-quick up` does for each allowed IP, for peers added live
    (usually a no-op: the Address's subnet already routes to the interface)."""
    for peer in config.peers:
        for network in peer["allowed_ips"]:
            if network.endswith("/0"):
                continue    # wg-quick's default-route handling is not ours to redo
            family = "-6" if ":" in network else "-4"
            shown = _run("ip", family, "route", "show", "dev", interface, "match", network)
            if shown.returncode == 0 and not shown.stdout.strip():
                _checked("ip", family, "route", "add", network, "dev", interface)


def _wg_quick(action: str, config_path: Path) -> None:
    done = _run("wg-quick", action, str(config_path))
    if done.returncode != 0:
        raise TunnelError(f"wg-quick {action} {config_path.name}: {_last_lines(done.stderr)}")


def tunnel_down(config_path: Path) -> bool:
    """Remove the interface (and with it any wireguard-go); False if absent.
    Waits for wireguard-go to exit so an immediate `up` finds its socket free."""
    interface = interface_of(config_path)
    if not interface_exists(interface):
        return False
    pid = userspace_pid(interface)
    if config_path.exists():
        _wg_quick("down", config_path)
    else:
        _checked("ip", "link", "delete", "dev", interface)
    deadline = time.monotonic() + EXIT_WAIT_S
    while pid is not None and userspace_pid(interface) == pid and time.monotonic() < deadline:
        time.sleep(0.02)
    return True


def tunnel_show(interface: str) -> list[dict[str, Any]]:
    """The interface's peers (parse_wg_dump); [] if the interface is absent."""
    if not interface_exists(interface):
        return []
    return list(parse_wg_dump(_dump(interface))["peers"])


def tunnel_state(interface: str) -> dict[str, Any]:
    """Everything `flctl status` needs, ages computed with this host's clock."""
    if not interface_exists(interface):
        return {"present": False, "implementation": None, "pid": None, "interface": None,
                "peers": [], "now": int(time.time())}
    parsed = parse_wg_dump(_dump(interface))
    now = int(time.time())
    for peer in parsed["peers"]:
        peer["handshake_age_s"] = (now - peer["latest_handshake"]
                                   if peer["latest_handshake"] else None)
    return {"present": True, "implementation": implementation(interface),
            "pid": userspace_pid(interface), "interface": parsed["interface"],
            "peers": parsed["peers"], "now": now}
