"""An agent's resource limits: their syntax, and which mechanism enforces each.

`cpu_quota` ("50%", "200%": systemd's CPUQuota= syntax, 100% = one CPU),
`memory_max` ("512M", "2G": bytes with a binary suffix, as MemoryMax=) and
`nice` (-20..19) are set in flctl.yaml's `agent:` section and per host or
group in the inventory (`agent_cpu_quota`, `agent_memory_max`,
`agent_nice`). Settings keep the text as written; agent.json carries the
numbers (percent, bytes, niceness).

Who enforces them (`enforcement`): systemd where it runs (CPUQuota=,
MemoryMax=, Nice=); else a cgroup (v2 or v1, whichever the host lets root
write) that the supervisor and agent run in; else rlimits, which cannot
bound a CPU share at all and bound memory only as address space
(RLIMIT_AS: virtual memory, far more than what a process really uses, so a
coarse bound). Nice is setpriority() everywhere but under systemd.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

# The check_* functions validate settings and inventories (yamlsrc, PyYAML);
# the agent and the host helper use only the rest, and start without them.
if TYPE_CHECKING:
    from flctl.core.yamlsrc import Spot

CPU_QUOTA_RE = re.compile(r"\s*([0-9]+)\s*%\s*\Z")
MEMORY_RE = re.compile(r"\s*([0-9]+)\s*([KMGT]?)(?:i?B)?\s*\Z", re.IGNORECASE)
UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
MAX_CPU_PERCENT = 100 * 1024          # 1024 CPUs
MIN_MEMORY_BYTES = 32 << 20           # below this no Python agent starts
NICE_RANGE = (-20, 19)
# The CPU period a cgroup's quota is a share of (cgroup v1 and v2 both take microseconds).
CPU_PERIOD_US = 100_000

# Mechanisms, as deploy reports them.
SYSTEMD = "systemd"
CGROUP_V2 = "cgroup v2"
CGROUP_V1 = "cgroup v1"
RLIMIT = "rlimit"
SETPRIORITY = "setpriority"


def check_cpu_quota(value: Any, spot: Spot) -> str | None:
    """"50%" (half a CPU) .. "200%" (two CPUs); the canonical text, or None."""
    from flctl.core.yamlsrc import describe

    if value is None:
        return None
    match = CPU_QUOTA_RE.match(value) if isinstance(value, str) else None
    if not match:
        raise spot.error(f'expected a CPU share such as "50%" or "200%" (100% = one CPU), '
                         f"got {describe(value)}")
    percent = int(match.group(1))
    if not 1 <= percent <= MAX_CPU_PERCENT:
        raise spot.error(f"{percent}% is out of range (1%..{MAX_CPU_PERCENT}%)")
    return f"{percent}%"


def check_memory_max(value: Any, spot: Spot) -> str | None:
    """"512M", "2G" (binary units, as systemd's MemoryMax=) or bytes; canonical text, or None."""
    from flctl.core.yamlsrc import describe

    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    match = MEMORY_RE.match(value) if isinstance(value, str) else None
    if not match:
        raise spot.error(f'expected a memory size such as "512M" or "2G", got {describe(value)}')
    text = f"{int(match.group(1))}{match.group(2).upper()}"
    if memory_bytes(text) < MIN_MEMORY_BYTES:
        raise spot.error(f"{text} is too little for an agent (at least "
                         f"{MIN_MEMORY_BYTES >> 20}M)")
    return text


def check_nice(value: Any, spot: Spot) -> int | None:
    from flctl.core.yamlsrc import expect_int

    if value is None:
        return None
    return expect_int(value, spot, minimum=NICE_RANGE[0], maximum=NICE_RANGE[1])


def cpu_percent(text: str | None) -> int | None:
    return None if text is None else int(text.rstrip("%"))


def memory_bytes(text: str | None) -> int | None:
    if text is None:
        return None
    match = MEMORY_RE.match(text)
    if not match:
        raise ValueError(f"not a memory size: {text!r}")
    return int(match.group(1)) * UNITS[match.group(2).upper()]


def show_bytes(value: int) -> str:
    """512 MB, 1.5 GB: binary units as the limit was written (M = MiB)."""
    for unit, size in (("TB", 1 << 40), ("GB", 1 << 30), ("MB", 1 << 20), ("KB", 1 << 10)):
        if value >= size:
            return f"{value / size:.3g} {unit}"
    return f"{value} B"


def oom_reason(limit_bytes: int | None) -> str:
    """What the coordinator says of a host whose task ran out of its memory."""
    return f"out of memory (limit {show_bytes(limit_bytes)})" if limit_bytes else "out of memory"


@dataclass(frozen=True)
class AgentLimits:
    cpu_percent: int | None = None
    memory_bytes: int | None = None
    nice: int | None = None

    @property
    def any(self) -> bool:
        return any(v is not None for v in (self.cpu_percent, self.memory_bytes, self.nice))

    def cpu_quota_us(self) -> int | None:
        """Microseconds per CPU_PERIOD_US (cpu.max / cpu.cfs_quota_us)."""
        return None if self.cpu_percent is None else self.cpu_percent * CPU_PERIOD_US // 100

    def systemd_lines(self) -> list[str]:
        lines = []
        if self.cpu_percent is not None:
            lines.append(f"CPUQuota={self.cpu_percent}%")
        if self.memory_bytes is not None:
            lines.append(f"MemoryMax={self.memory_bytes}")
            lines.append("MemorySwapMax=0")
        if self.nice is not None:
            lines.append(f"Nice={self.nice}")
        return lines


@dataclass(frozen=True)
class HostCapabilities:
    """What a host lets flctl use (its helper's probe, as root)."""

    init_system: str = "none"        # "systemd" | "none"
    cgroup: str | None = None        # "v2" | "v1" | None: a writable hierarchy
    cpu: bool = False                # its cpu controller can be written
    memory: bool = False             # its memory controller can be written

    @classmethod
    def from_facts(cls, facts: Any) -> HostCapabilities:
        data = facts if isinstance(facts, dict) else {}
        cgroup = data.get("cgroup")
        return cls(init_system=str(data.get("init_system") or "none"),
                   cgroup=cgroup if cgroup in ("v1", "v2") else None,
                   cpu=data.get("cpu") is True, memory=data.get("memory") is True)


@dataclass(frozen=True)
class Enforcement:
    """Per limit, the mechanism that enforces it (None: nothing can), and why not."""

    cpu: str | None = None
    memory: str | None = None
    nice: str | None = None
    problems: tuple[str, ...] = ()

    def detail(self, limits: AgentLimits) -> str:
        parts = []
        if limits.cpu_percent is not None:
            parts.append(f"cpu_quota {limits.cpu_percent}% by {self.cpu or 'nothing'}")
        if limits.memory_bytes is not None:
            how = self.memory or "nothing"
            if self.memory == RLIMIT:
                how = "rlimit (address space)"
            parts.append(f"memory_max {show_bytes(limits.memory_bytes)} by {how}")
        if limits.nice is not None:
            parts.append(f"nice {limits.nice} by {self.nice or 'nothing'}")
        return "; ".join(parts) or "none set"


def enforcement(limits: AgentLimits, caps: HostCapabilities) -> Enforcement:
    """Which mechanism enforces each limit on a host with these capabilities."""
    if caps.init_system == "systemd":
        return Enforcement(
            cpu=SYSTEMD + " CPUQuota=" if limits.cpu_percent is not None else None,
            memory=SYSTEMD + " MemoryMax=" if limits.memory_bytes is not None else None,
            nice=SYSTEMD + " Nice=" if limits.nice is not None else None)
    group = {"v2": CGROUP_V2, "v1": CGROUP_V1}.get(caps.cgroup or "")
    problems = []
    cpu = memory = None
    if limits.cpu_percent is not None:
        cpu = group if group and caps.cpu else None
        if cpu is None:
            problems.append(f"cpu_quota {limits.cpu_percent}% cannot be enforced: no writable "
                            "cgroup cpu controller on the host (rlimits cannot bound a CPU "
                            "share)")
    if limits.memory_bytes is not None:
        memory = group if group and caps.memory else RLIMIT
        if memory == RLIMIT:
            problems.append(f"memory_max {show_bytes(limits.memory_bytes)} is only an "
                            "address-space rlimit: no writable cgroup memory controller on "
                            "the host (RLIMIT_AS bounds virtual memory, which is coarse)")
    nice = SETPRIORITY if limits.nice is not None else None
    return Enforcement(cpu=cpu, memory=memory, nice=nice, problems=tuple(problems))
