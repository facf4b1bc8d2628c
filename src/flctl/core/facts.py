"""Pure parsers for what host-side commands report (pyinfra's fact idea:
one command, one parser, tested on captured text)."""

from __future__ import annotations

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


def parse_os_release(text: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            out[key.strip()] = value.strip().strip('"')
    return out


def process_uptime_s(proc_stat: str, system_uptime_s: float, clock_ticks: int) -> float:
    """Seconds a process has run, from /proc/PID/stat and /proc/uptime."""
    after_comm = proc_stat.rsplit(")", 1)[1].split()
    start_ticks = int(after_comm[19])
    return max(0.0, system_uptime_s - start_ticks / clock_ticks)
