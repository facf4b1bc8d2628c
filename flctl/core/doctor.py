"""`flctl doctor`: what would make deploy or training fail on a host, found
before either runs, each with the fix.

A fact is one command and a pure parser (pyinfra's rule): `doctor_script`
is the one POSIX sh script a host runs (no flctl needed there: doctor runs
before the first deploy), `parse_key_values` reads its answer, and
`diagnose` turns the answer into checks. Everything here is pure, so every
check is tested on text, and the lab tests break a real host per check.
"""

from __future__ import annotations

import shlex
from collections.abc import Mapping
from dataclasses import dataclass

from flctl.core.facts import (
    MIN_DISK_FREE_BYTES,
    MIN_PYTHON,
    SUPPORTED_ARCHES,
    bootstrap_script,
    resolve_gpus,
)
from flctl.core.layout import AGENT_USER

# Certificates are issued valid from 5 minutes ago (core.pki.CLOCK_SKEW); a
# host a minute off is already drifting and will not stay within that.
MAX_CLOCK_SKEW_S = 60.0
# A WireGuard packet carries 60 bytes of IPv4 + UDP + WireGuard headers; an
# ICMP echo payload of (size - 28) makes an IPv4 packet of `size` bytes.
WG_OVERHEAD = 60
ICMP_OVERHEAD = 28
OVERLAY_MTU = 1420   # wg-quick's default on a 1500-byte link

CHECKS = ("ssh", "sudo", "python", "disk", "clock", "ports", "nftables", "wireguard",
          "mtu", "data", "gpus")


@dataclass(frozen=True)
class Check:
    name: str           # one of CHECKS
    ok: bool | None     # None: could not be told (not a problem, said why)
    detail: str
    fix: str = ""

    def as_dict(self) -> dict[str, object]:
        return {"check": self.name, "ok": self.ok, "detail": self.detail, "fix": self.fix}


@dataclass(frozen=True)
class Probe:
    """What doctor asks a host about, from the inventory and settings."""
    python: str
    install_dir: str
    state_dir: str
    data_path: str
    tcp_port: int                  # the agent's port
    udp_port: int | None           # the overlay's, where the host runs the tunnel
    mtu_target: str | None         # the operator's address as the host sees it
    gpus: str = "all"
    become: bool = False
    remote: bool = True            # an SSH host (sudo, nftables, WireGuard apply)


def _listening(proto_files: str, state: str, key: str) -> str:
    """sh printing `key=` and the hex ports in `state` in /proc/net files."""
    return (f"echo \"{key}=$(awk 'NR>1 && $4==\"{state}\" {{n=split($2,a,\":\"); print a[n]}}' "
            f"{proto_files} 2>/dev/null | sort -u | tr '\\n' ' ')\"")


def doctor_script(probe: Probe) -> str:
    """The host's half: bootstrap facts (arch, Python, venv, uid, sudo, free
    disk under the install dir) and the rest of what doctor checks."""
    q = shlex.quote
    state, data = q(probe.state_dir), q(probe.data_path)
    lines = ["echo \"clock=$(date +%s.%N)\"",   # first: the least time after the send
             bootstrap_script(probe.python, probe.install_dir).rstrip("\n"),
             f"d={state}; while [ ! -d \"$d\" ]; do d=$(dirname \"$d\"); done",
             "echo \"state_disk_free_kb=$(df -Pk \"$d\" | awk 'NR==2 {print $4}')\"",
             _listening("/proc/net/tcp /proc/net/tcp6", "0A", "tcp_listen"),
             _listening("/proc/net/udp /proc/net/udp6", "07", "udp_bound"),
             # flctl's own agent or tunnel holding its ports is no conflict
             f"p=$(cat {state}/run/agent.pid 2>/dev/null) && [ -n \"$p\" ] && "
             "kill -0 \"$p\" 2>/dev/null && echo agent_running=yes",
             f"[ -e {state}/wg ] && echo tunnel_deployed=yes",
             "S=; [ \"$(id -u)\" != 0 ] && S='sudo -n'",
             "if command -v nft >/dev/null 2>&1; then $S nft list tables >/dev/null 2>&1 "
             "&& echo nft=yes || echo nft=unusable; else echo nft=missing; fi",
             "command -v wg >/dev/null 2>&1 && echo wg_tools=yes",
             "{ [ -d /sys/module/wireguard ] || modprobe -n wireguard 2>/dev/null; } "
             "&& echo wg_kernel=yes",
             "command -v wireguard-go >/dev/null 2>&1 && echo wg_go=yes",
             f"if id {AGENT_USER} >/dev/null 2>&1; then A={AGENT_USER}; else A=$(id -un); fi",
             "echo \"data_user=$A\"",
             f"if [ ! -e {data} ]; then echo data=missing; "
             f"elif [ \"$A\" = \"$(id -un)\" ]; then test -r {data} && echo data=readable "
             "|| echo data=unreadable; "
             f"elif [ \"$(id -u)\" = 0 ]; then su -s /bin/sh \"$A\" -c 'test -r \"$1\"' "
             f"-- {data} 2>/dev/null && echo data=readable || echo data=unreadable; "
             f"else sudo -n -u \"$A\" test -r {data} 2>/dev/null && echo data=readable "
             "|| echo data=unreadable; fi"]
    if probe.gpus != "none":
        lines.append("command -v nvidia-smi >/dev/null 2>&1 && "
                     "echo \"gpu_count=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ')\"")
    if probe.mtu_target is not None:
        big = OVERLAY_MTU + WG_OVERHEAD - ICMP_OVERHEAD
        target = q(probe.mtu_target)
        lines.append(
            "if command -v ping >/dev/null 2>&1; then "
            f"if ping -n -c 1 -W 1 {target} >/dev/null 2>&1; then "
            f"ping -n -c 1 -W 1 -M do -s {big} {target} >/dev/null 2>&1 "
            "&& echo mtu=ok || echo mtu=too_small; else echo mtu=no_echo; fi; "
            "else echo mtu=no_ping; fi")
    return "\n".join(lines) + "\n"


def _ports(text: str) -> set[int]:
    ports = set()
    for word in text.split():
        try:
            ports.add(int(word, 16))
        except ValueError:
            continue
    return ports


def _kb(facts: Mapping[str, str], key: str) -> int:
    try:
        return int(facts.get(key, "0")) * 1024
    except ValueError:
        return 0


def _python(facts: Mapping[str, str]) -> Check:
    version = facts.get("python", "")
    need = f"{MIN_PYTHON[0]}.{MIN_PYTHON[1]}"
    fix = f"install Python {need}+ with its venv module (Debian: apt install python3-venv), " \
          "or set `python:` for this host in the inventory"
    if not version:
        return Check("python", False, "no Python interpreter found", fix)
    try:
        major, minor = (int(part) for part in version.split(".")[:2])
    except ValueError:
        return Check("python", False, f"cannot read the Python version ({version!r})", fix)
    if (major, minor) < MIN_PYTHON:
        return Check("python", False, f"Python {version} is too old (need {need})", fix)
    if facts.get("python_venv") != "yes":
        return Check("python", False, f"Python {version} has no venv module", fix)
    arch = facts.get("arch", "")
    if arch not in SUPPORTED_ARCHES:
        return Check("python", False, f"unsupported architecture {arch or 'unknown'!r}",
                     f"flctl ships wheels for {' and '.join(SUPPORTED_ARCHES)}")
    return Check("python", True, f"Python {version} with venv, {arch}")


def _sudo(facts: Mapping[str, str], probe: Probe) -> Check:
    if facts.get("uid") == "0":
        return Check("sudo", True, "logged in as root")
    if not probe.become:
        return Check("sudo", False, "not root and `become` is not set",
                     "set `become: true` for this host (with passwordless sudo) or log in as root")
    if facts.get("sudo") != "yes":
        return Check("sudo", False, "`sudo -n true` asks for a password",
                     "allow passwordless sudo for this user (a sudoers.d NOPASSWD line)")
    return Check("sudo", True, "passwordless sudo works")


def _disk(facts: Mapping[str, str], probe: Probe) -> Check:
    need = MIN_DISK_FREE_BYTES
    short = [(where, free) for where, free in
             ((probe.install_dir, _kb(facts, "disk_free_kb")),
              (probe.state_dir, _kb(facts, "state_disk_free_kb"))) if free < need]
    if short:
        where, free = short[0]
        return Check("disk", False, f"{free >> 20} MB free for {where} (need {need >> 20} MB)",
                     f"free space on the file system holding {where}")
    least = min(_kb(facts, "disk_free_kb"), _kb(facts, "state_disk_free_kb"))
    return Check("disk", True, f"{least >> 20} MB free where deploy writes")


def clock_check(skew_s: float | None, uncertainty_s: float) -> Check:
    """`skew_s`: host clock minus this machine's, measured mid round trip."""
    if skew_s is None:
        return Check("clock", None, "the host did not say its time")
    told = f"{skew_s:+.1f} s against this machine (+-{uncertainty_s:.1f} s)"
    if abs(skew_s) - uncertainty_s > MAX_CLOCK_SKEW_S:
        return Check("clock", False, told,
                     "sync the clock (timedatectl set-ntp true, or chrony/ntpd): TLS "
                     "certificates fail on a host more than 5 minutes behind")
    return Check("clock", True, told)


def _ports_check(facts: Mapping[str, str], probe: Probe) -> Check:
    taken = []
    if probe.tcp_port in _ports(facts.get("tcp_listen", "")) and \
            facts.get("agent_running") != "yes":
        taken.append(f"TCP {probe.tcp_port} (the agent's)")
    if probe.udp_port is not None and probe.udp_port in _ports(facts.get("udp_bound", "")) \
            and facts.get("tunnel_deployed") != "yes":
        taken.append(f"UDP {probe.udp_port} (WireGuard's)")
    if taken:
        return Check("ports", False, f"in use by another program: {', '.join(taken)}",
                     "free it (ss -lntup shows who holds it) or set agent.port / "
                     "agent_port for this host / overlay.port")
    ports = [f"TCP {probe.tcp_port}"] + ([f"UDP {probe.udp_port}"] if probe.udp_port else [])
    return Check("ports", True, f"{' and '.join(ports)} free (or flctl's own)")


def _nftables(facts: Mapping[str, str]) -> Check:
    state = facts.get("nft")
    if state == "yes":
        return Check("nftables", True, "nft works")
    if state == "unusable":
        return Check("nftables", False, "nft is installed but `nft list tables` fails",
                     "run as root or with sudo; a container may need CAP_NET_ADMIN")
    return Check("nftables", False, "nft is not installed", "install nftables (apt install "
                                                            "nftables)")


def _wireguard(facts: Mapping[str, str]) -> Check:
    engine = "kernel" if facts.get("wg_kernel") == "yes" else (
        "wireguard-go" if facts.get("wg_go") == "yes" else None)
    if facts.get("wg_tools") != "yes":
        return Check("wireguard", False, "the wg tool is missing",
                     "install wireguard-tools")
    if engine is None:
        return Check("wireguard", False, "no WireGuard kernel module and no wireguard-go",
                     "load the wireguard module (modprobe wireguard) or install wireguard-go")
    return Check("wireguard", True, f"wg and {engine}")


def _mtu(facts: Mapping[str, str], probe: Probe) -> Check:
    state = facts.get("mtu")
    size = OVERLAY_MTU + WG_OVERHEAD
    if state == "ok":
        return Check("mtu", True, f"{size}-byte packets reach this machine unfragmented "
                                  f"(overlay MTU {OVERLAY_MTU})")
    if state == "too_small":
        return Check("mtu", False, f"{size}-byte packets do not reach this machine "
                                   f"unfragmented: the overlay (MTU {OVERLAY_MTU}) would "
                                   "lose large packets",
                     "raise the path MTU, or lower the tunnel's MTU on both ends")
    why = {"no_echo": "this machine does not answer the host's ping",
           "no_ping": "the host has no ping"}.get(state or "", "not measured")
    return Check("mtu", None, f"cannot tell: {why}")


def _data(facts: Mapping[str, str], probe: Probe) -> Check:
    state, user = facts.get("data"), facts.get("data_user", "?")
    if state == "readable":
        return Check("data", True, f"{probe.data_path} readable by {user}")
    if state == "missing":
        return Check("data", False, f"{probe.data_path} does not exist",
                     "copy the host's data there or fix its data_path in the inventory")
    return Check("data", False, f"{probe.data_path} is not readable by {user}",
                 f"let {user} read it (chmod/chgrp, or an ACL: setfacl -m u:{user}:r)")


def _gpus(facts: Mapping[str, str], probe: Probe) -> Check:
    try:
        count = int(facts.get("gpu_count", "0"))
    except ValueError:
        count = 0
    try:
        chosen = resolve_gpus(probe.gpus, count)
    except ValueError as exc:
        return Check("gpus", False, str(exc), "install the NVIDIA driver, or fix `gpus:`")
    return Check("gpus", True, f"{count} GPU(s) visible" + ("" if chosen else ", CPU only"))


def diagnose(facts: Mapping[str, str], probe: Probe, skew_s: float | None,
             uncertainty_s: float) -> list[Check]:
    """Every check for one host that answered, in CHECKS order."""
    checks = [Check("ssh", True, "reachable, host key known") if probe.remote else
              Check("ssh", True, "a local host (no SSH)")]
    if probe.remote:
        checks.append(_sudo(facts, probe))
    checks += [_python(facts), _disk(facts, probe), clock_check(skew_s, uncertainty_s),
               _ports_check(facts, probe)]
    if probe.remote:
        checks += [_nftables(facts), _wireguard(facts)]
    if probe.mtu_target is not None:
        checks.append(_mtu(facts, probe))
    checks.append(_data(facts, probe))
    if probe.gpus != "none":
        checks.append(_gpus(facts, probe))
    return checks
