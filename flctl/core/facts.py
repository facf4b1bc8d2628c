"""Pure parsers for what host-side commands report (pyinfra's fact idea:
one command, one parser, tested on captured text)."""

from __future__ import annotations

import json
import math
import re
import shlex
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from flctl.core.layout import AGENT_USER

TCP_LISTEN_STATE = "0A"


def parse_listening_ports(proc_net_tcp: str) -> set[int]:
    """Ports in LISTEN state from /proc/net/tcp or /proc/net/tcp6 text."""
    ports: set[int] = set()
    for line in proc_net_tcp.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 4 or fields[3] != TCP_LISTEN_STATE:
            continue
        _, _, port_hex = fields[1].rpartition(":")
        try:
            ports.add(int(port_hex, 16))
        except ValueError:
            continue
    return ports


def parse_meminfo(text: str) -> dict[str, int]:
    """/proc/meminfo as bytes per field."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        name, _, rest = line.partition(":")
        parts = rest.split()
        if not parts:
            continue
        try:
            value = int(parts[0])
        except ValueError:
            continue
        out[name.strip()] = value * 1024 if len(parts) > 1 and parts[1] == "kB" else value
    return out


def parse_loadavg(text: str) -> tuple[float, float, float]:
    first = text.split()[:3]
    return (float(first[0]), float(first[1]), float(first[2]))


@dataclass(frozen=True)
class CpuTicks:
    """The whole machine's CPU time since boot, from /proc/stat's `cpu` line, in
    clock ticks: two samples give the utilisation between them (`cpu_percent`),
    so the host never has to wait to measure it."""

    busy: int
    total: int


def parse_proc_stat_cpu(text: str) -> CpuTicks:
    """/proc/stat's aggregate `cpu` line: user nice system idle iowait irq
    softirq steal (guest time is already counted in user and nice). Idle and
    iowait are idle; the rest is busy. ValueError if there is no such line."""
    for line in text.splitlines():
        fields = line.split()
        if fields and fields[0] == "cpu":
            ticks = [int(f) for f in fields[1:9]]
            if len(ticks) < 4:
                break
            total = sum(ticks)
            return CpuTicks(busy=total - ticks[3] - (ticks[4] if len(ticks) > 4 else 0),
                            total=total)
    raise ValueError("no aggregate `cpu` line in /proc/stat")


def cpu_percent(before: CpuTicks | None, after: CpuTicks | None) -> float | None:
    """Busy share of the CPU time between two samples, 0..100; None without two
    samples, or when the counters did not advance (or went back: a reboot)."""
    if before is None or after is None:
        return None
    total = after.total - before.total
    busy = after.busy - before.busy
    if total <= 0 or busy < 0:
        return None
    return min(100.0, 100.0 * busy / total)


def parse_os_release(text: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            out[key.strip()] = value.strip().strip('"')
    return out


@dataclass(frozen=True)
class ProcStat:
    """The fields of /proc/PID/stat flctl uses."""

    state: str          # R, S, D, Z (zombie), X (dead), ...
    ppid: int
    start_ticks: int    # since boot, in clock ticks

    @property
    def alive(self) -> bool:
        """Running or sleeping: a zombie (Z) or dead (X) process is gone, even
        while its pid can still be signalled (PID 1 may reap it late)."""
        return self.state not in ("Z", "X")


def parse_proc_stat(text: str) -> ProcStat:
    """/proc/PID/stat; the command name (field 2) may hold spaces and ')' so
    the fields are counted from the last ')'."""
    after_comm = text.rsplit(")", 1)[1].split()
    return ProcStat(after_comm[0], int(after_comm[1]), int(after_comm[19]))


def process_uptime_s(proc_stat: str, system_uptime_s: float, clock_ticks: int) -> float:
    """Seconds a process has run, from /proc/PID/stat and /proc/uptime."""
    start_ticks = parse_proc_stat(proc_stat).start_ticks
    return max(0.0, system_uptime_s - start_ticks / clock_ticks)


# ------------------------------------------------------------ before install
# Gathered with plain sh before flctl exists on the host. Each line is
# key=value; the parser below is the only reader.

MIN_PYTHON = (3, 9)   # pyproject.toml's requires-python: the oldest a host may run
MIN_DISK_FREE_BYTES = 512 * 1024 * 1024
SUPPORTED_ARCHES = ("x86_64", "aarch64")


def provided_key(project: str) -> str:
    """The fact naming a project's version in the host interpreter ("provided_pyyaml")."""
    return "provided_" + re.sub(r"[^A-Za-z0-9]", "_", project.lower())


# The bootstrap line that carries the host helper's `facts` answer (see bootstrap_script).
HELPER_FACTS_KEY = "helper_facts"


def bootstrap_script(python: str, install_dir: str, agent_user: str = AGENT_USER,
                     projects: Sequence[str] = (), facts_argv: Sequence[str] = ()) -> str:
    """POSIX sh that reports what deploy must know before installing; with
    `projects`, also which of them the interpreter has, and their versions.

    With `facts_argv` (the host helper's `facts` command, argv[0] the
    installed venv's Python): when a bundle is installed and that venv runs
    the very interpreter `python` names, the helper's answer comes back on
    one `helper_facts=` line instead of the interpreter's version and venv
    check. A redeploy that changes nothing then costs the host one SSH
    command and one Python start (the helper's) instead of two and three;
    the answer carries the version (its "python"), and a venv that runs
    proves the venv module works.
    """
    query = ""
    if projects:
        names = " ".join(shlex.quote(p) for p in projects)
        query = f"""
command -v "$PY" >/dev/null 2>&1 && "$PY" - {names} 2>/dev/null <<'FLCTL_PY' || true
import re, sys
from importlib import metadata
for name in sys.argv[1:]:
    try:
        print("provided_" + re.sub(r"[^A-Za-z0-9]", "_", name.lower()) + "=" + metadata.version(name))
    except Exception:
        pass
FLCTL_PY"""
    fast = ""
    if facts_argv:
        venv_python = shlex.quote(facts_argv[0])
        fast = f"""
if [ -r {install_dir}/bundle.digest ] && [ -x {venv_python} ] && P=$(command -v "$PY") && \\
   [ "$(readlink -f "$P")" = "$(readlink -f {venv_python})" ] && \\
   out=$({shlex.join(facts_argv)} 2>/dev/null); then
  helper=1
  printf '{HELPER_FACTS_KEY}=%s\\n' "$(printf '%s\\n' "$out" | tail -n 1)"
fi"""
    return f"""\
helper=
PY={python}{query}
id -u {agent_user} >/dev/null 2>&1 && echo "agent_user=yes" || echo "agent_user=no"
echo "arch=$(uname -m)"{fast}
if [ -n "$helper" ]; then
  :
elif command -v "$PY" >/dev/null 2>&1; then
  echo "python=$("$PY" -c 'import sys; print("%d.%d.%d" % sys.version_info[:3])')"
  "$PY" -c 'import venv' >/dev/null 2>&1 && echo "python_venv=yes" || echo "python_venv=no"
else
  echo "python="
fi
echo "uid=$(id -u)"
if [ "$(id -u)" != 0 ]; then
  sudo -n true >/dev/null 2>&1 && echo "sudo=yes" || echo "sudo=no"
fi
d={install_dir}; while [ ! -d "$d" ]; do d=$(dirname "$d"); done
echo "disk_free_kb=$(df -Pk "$d" | awk 'NR==2 {{print $4}}')"
if [ -d /run/systemd/system ]; then echo "init=systemd"; else echo "init=none"; fi
if [ -r /etc/os-release ]; then . /etc/os-release; echo "os=$PRETTY_NAME"; fi
if [ -r {install_dir}/bundle.digest ]; then echo "bundle=$(cat {install_dir}/bundle.digest)"; fi
"""


def parse_key_values(text: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep and key.strip().isidentifier():
            out[key.strip()] = value.strip()
    return out


def host_unfit_reason(facts: dict[str, str], become: bool) -> str | None:
    """Why flctl cannot run on a host, in one line; None if it can."""
    arch = facts.get("arch", "")
    if arch not in SUPPORTED_ARCHES:
        return f"unsupported architecture {arch or 'unknown'!r} (need {' or '.join(SUPPORTED_ARCHES)})"
    version = facts.get("python", "")
    if not version:
        return "no Python interpreter found (set `python:` for this host in the inventory)"
    try:
        major, minor = (int(part) for part in version.split(".")[:2])
    except ValueError:
        return f"cannot read the Python version ({version!r})"
    if (major, minor) < MIN_PYTHON:
        return f"Python {version} is too old (need {MIN_PYTHON[0]}.{MIN_PYTHON[1]} or newer)"
    if facts.get("python_venv") != "yes":
        return f"Python {version} has no venv module"
    if facts.get("uid") != "0":
        if not become:
            return "not root: set `become: true` for this host (needs passwordless sudo)"
        if facts.get("sudo") != "yes":
            return "`become` is set but `sudo -n` asks for a password"
    try:
        free = int(facts.get("disk_free_kb", "0")) * 1024
    except ValueError:
        free = 0
    if free < MIN_DISK_FREE_BYTES:
        return f"only {free // (1024 * 1024)} MB free for /opt/flctl (need {MIN_DISK_FREE_BYTES // (1024 * 1024)} MB)"
    return None


# ------------------------------------------------------------------ GPUs

def parse_nvidia_smi_list(text: str) -> int:
    """How many GPUs `nvidia-smi -L` lists ("GPU 0: NVIDIA A100 (UUID: ...)")."""
    return sum(1 for line in text.splitlines() if re.match(r"GPU \d+:", line.strip()))


# One line per GPU: "0, 35, 1024, 40960, NVIDIA A100-SXM4-40GB". The name comes
# last so a comma in it cannot shift the numbers.
NVIDIA_SMI_QUERY = ("nvidia-smi", "--query-gpu=index,utilization.gpu,memory.used,memory.total,name",
                    "--format=csv,noheader,nounits")
_MIB = 1024 * 1024


def parse_nvidia_smi_query(text: str) -> list[dict[str, Any]]:
    """NVIDIA_SMI_QUERY's output as one dict per GPU: index, utilization_pct,
    memory_used_bytes, memory_total_bytes, name. A value nvidia-smi cannot
    give ("[N/A]", "[Not Supported]") is None; a line that is not a GPU's is
    skipped (a driver warning, say), so one odd line costs only itself."""
    gpus = []
    for line in text.splitlines():
        fields = [f.strip() for f in line.split(",", 4)]
        if len(fields) != 5 or not fields[0].isdigit():
            continue
        utilization, used, total = (_number_or_none(f) for f in fields[1:4])
        gpus.append({
            "index": int(fields[0]),
            "utilization_pct": None if utilization is None else min(100.0, max(0.0, utilization)),
            "memory_used_bytes": None if used is None else int(used * _MIB),
            "memory_total_bytes": None if total is None else int(total * _MIB),
            "name": fields[4],
        })
    return gpus


def _number_or_none(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) and value >= 0 else None


def resolve_gpus(wanted: str, available: int) -> str | None:
    """The inventory's `gpus` ("all", "none", "0,2") on a host with `available`
    GPUs, as the agent config's `gpus` (None: the CPU only). ValueError says
    what to fix when an index does not exist there."""
    if wanted == "none" or (wanted == "all" and available == 0):
        return None
    if wanted == "all":
        return "all"
    indices = [int(i) for i in wanted.split(",")]
    if available == 0:
        raise ValueError(f"gpus: [{wanted}] but nvidia-smi lists no GPU on this host "
                         "(set gpus: none, or install the NVIDIA driver)")
    missing = [i for i in indices if i >= available]
    if missing:
        raise ValueError(f"gpus: no GPU {', '.join(map(str, missing))} on this host "
                         f"(nvidia-smi lists {available}: 0..{available - 1})")
    return wanted


# ------------------------------------------------------------------ WireGuard

def parse_wg_dump(text: str) -> dict[str, Any]:
    """`wg show IF dump`: the interface line, then one line per peer.

    Tab-separated; the interface's private key and the peers' preshared keys
    are in the text and are deliberately dropped here (only whether a PSK is
    set is kept), so the result can be shown and logged.
    latest_handshake is the host's epoch seconds, 0 = never.
    """
    lines = [line.split("\t") for line in text.splitlines() if line.strip()]
    interface: dict[str, Any] | None = None
    peers: list[dict[str, Any]] = []
    for fields in lines:
        if len(fields) == 4 and interface is None and not peers:
            interface = {"public_key": _none_if(fields[1]),
                         "listen_port": _int_or_none(fields[2]),
                         "fwmark": _int_or_none(fields[3])}
        elif len(fields) == 8:
            peers.append({
                "public_key": fields[0],
                "preshared_key": _none_if(fields[1]) is not None,
                "endpoint": _none_if(fields[2]),
                "allowed_ips": [ip for ip in fields[3].split(",") if ip and ip != "(none)"],
                "latest_handshake": int(fields[4]),
                "rx_bytes": int(fields[5]),
                "tx_bytes": int(fields[6]),
                "keepalive": _int_or_none(fields[7]),
            })
        else:
            raise ValueError(f"unexpected line in `wg show dump` output: {len(fields)} fields")
    return {"interface": interface, "peers": peers}


def _none_if(value: str) -> str | None:
    return None if value in ("(none)", "") else value


def _int_or_none(value: str) -> int | None:
    """`off` and `(none)` mean unset in wg's dump."""
    return int(value) if value.isdigit() else None


@dataclass(frozen=True)
class WgQuickConfig:
    """What a wg-quick file asks for, as far as flctl's tunnel code cares."""

    addresses: tuple[str, ...]
    listen_port: int | None
    private_key_file: str | None
    preshared_key_files: dict[str, str]     # peer public key -> file
    peers: tuple[dict[str, Any], ...]       # public_key, allowed_ips, endpoint, keepalive


def parse_wg_quick_config(text: str) -> WgQuickConfig:
    """Parse a wg-quick file the way wg-quick does: case-insensitive keys,
    `#` starts a comment, Address may repeat or hold a list. Key files come
    from the `PostUp = wg set %i ...` lines render_wg_config writes."""
    addresses: list[str] = []
    listen_port: int | None = None
    private_key_file: str | None = None
    psk_files: dict[str, str] = {}
    peers: list[dict[str, Any]] = []
    section = ""
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        if line.startswith("["):
            section = line.lower()
            if section == "[peer]":
                peers.append({"public_key": None, "allowed_ips": [], "endpoint": None,
                              "keepalive": None})
            continue
        key, sep, value = line.partition("=")
        if not sep:
            continue
        key, value = key.strip().lower(), value.strip()
        if section == "[interface]":
            if key == "address":
                addresses += [a.strip() for a in value.split(",") if a.strip()]
            elif key == "listenport":
                listen_port = int(value)
            elif key == "postup":
                words = shlex.split(value)
                if words[:4] == ["wg", "set", "%i", "private-key"] and len(words) == 5:
                    private_key_file = words[4]
                elif (words[:3] == ["wg", "set", "%i"] and len(words) == 7
                      and words[3] == "peer" and words[5] == "preshared-key"):
                    psk_files[words[4]] = words[6]
        elif section == "[peer]" and peers:
            peer = peers[-1]
            if key == "publickey":
                peer["public_key"] = value
            elif key == "allowedips":
                peer["allowed_ips"] += [a.strip() for a in value.split(",") if a.strip()]
            elif key == "endpoint":
                peer["endpoint"] = value
            elif key == "persistentkeepalive":
                peer["keepalive"] = None if value == "off" else int(value)
    return WgQuickConfig(tuple(addresses), listen_port, private_key_file, psk_files,
                         tuple(peers))


# ------------------------------------------------------------------ nftables

_NFT_COUNTS = re.compile(r"packets \d+ bytes \d+")


def normalise_nft_listing(text: str) -> str:
    """`nft list table` text with counter values zeroed: two listings are
    equal when the rules are, however much traffic was counted meanwhile."""
    return _NFT_COUNTS.sub("packets 0 bytes 0", text).strip() + "\n"


def parse_nft_counter(listing_json: str, name: str) -> dict[str, int] | None:
    """One named counter from `nft -j list ...` output; None if absent."""
    for item in json.loads(listing_json).get("nftables", []):
        counter = item.get("counter") if isinstance(item, dict) else None
        if counter and counter.get("name") == name:
            return {"packets": int(counter.get("packets", 0)),
                    "bytes": int(counter.get("bytes", 0))}
    return None
