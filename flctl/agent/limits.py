"""Resource limits where there is no systemd: cgroups, else rlimits.

The host helper (root) makes one cgroup per agent, writes its limits, and
starts the supervisor inside it (it joins the cgroup itself for the spawn
and leaves again, so no process ever runs outside it: nothing to race), so
the supervisor and every agent it restarts are bounded together. cgroup v2
gets /sys/fs/cgroup/flctl/<name> (cpu.max, memory.max); cgroup v1 gets a
child of the helper's own cgroup in the cpu and memory hierarchies
(cpu.cfs_quota_us, memory.limit_in_bytes), so a machine that already bounds
its sessions keeps bounding the agent. Which directories were made is kept
in the state root (cgroups.json) so stop and teardown remove exactly those.

Where no cgroup can be written, memory falls back to RLIMIT_AS (virtual
memory: a coarse bound) and a CPU share cannot be bounded at all. Nice is
setpriority() either way. `probe` answers what a host allows, for deploy to
report per limit (flctl.core.limits.enforcement).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import resource
import time
from collections.abc import Iterator
from pathlib import Path

from flctl.core.fsutil import atomic_write
from flctl.core.limits import CPU_PERIOD_US, AgentLimits, HostCapabilities
from flctl.errors import FlctlError

CGROUP_FS = Path("/sys/fs/cgroup")
RECORD = "cgroups.json"
# Tests force the path without cgroups (the rlimit fallback) with this set to 1.
NO_CGROUP_ENV = "FLCTL_NO_CGROUP"


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def _mounts() -> list[tuple[str, str, set[str]]]:
    """(mount point, fstype, options) of every cgroup filesystem."""
    found = []
    for line in _read(Path("/proc/self/mounts")).splitlines():
        parts = line.split()
        if len(parts) >= 4 and parts[2] in ("cgroup", "cgroup2"):
            found.append((parts[1], parts[2], set(parts[3].split(","))))
    return found


def _own_paths() -> dict[str, str]:
    """Controller (or "" for v2) -> this process's cgroup path."""
    paths = {}
    for line in _read(Path("/proc/self/cgroup")).splitlines():
        _, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        for controller in controllers.split(",") if controllers else [""]:
            paths[controller] = path
    return paths


def _v2_root() -> Path | None:
    """The unified hierarchy when it has the cpu and memory controllers."""
    for point, fstype, _ in _mounts():
        if fstype == "cgroup2" and {"cpu", "memory"} & set(
                _read(Path(point) / "cgroup.controllers").split()):
            return Path(point)
    return None


def _v1_base(controller: str) -> Path | None:
    """Where this process's cgroup of a v1 controller is; children go there."""
    for point, fstype, options in _mounts():
        if fstype == "cgroup" and controller in options:
            own = _own_paths().get(controller, "/")
            return Path(point) / own.lstrip("/")
    return None


def _writable(base: Path) -> bool:
    probe = base / f"flctl-probe-{os.getpid()}"
    try:
        probe.mkdir()
    except OSError:
        return False
    with contextlib.suppress(OSError):
        probe.rmdir()
    return True


def probe() -> dict[str, object]:
    """What this host lets us write: {"cgroup": "v2"|"v1"|None, "cpu", "memory"}."""
    if os.environ.get(NO_CGROUP_ENV) == "1":
        return {"cgroup": None, "cpu": False, "memory": False}
    root = _v2_root()
    if root is not None:
        have = set(_read(root / "cgroup.controllers").split())
        ok = os.geteuid() == 0 and _writable(root)
        return {"cgroup": "v2" if ok else None, "cpu": ok and "cpu" in have,
                "memory": ok and "memory" in have}
    cpu, memory = _v1_base("cpu"), _v1_base("memory")
    can_cpu = cpu is not None and _writable(cpu)
    can_memory = memory is not None and _writable(memory)
    return {"cgroup": "v1" if can_cpu or can_memory else None, "cpu": can_cpu,
            "memory": can_memory}


def capabilities(init_system: str) -> HostCapabilities:
    return HostCapabilities.from_facts({**probe(), "init_system": init_system})


def cgroup_name(project: str, host: str, root: Path) -> str:
    """Unique per state root: two workspaces' hosts of one name never share."""
    tag = hashlib.sha256(str(root).encode()).hexdigest()[:8]
    return f"flctl-{project}-{host}-{tag}"


def _write(path: Path, value: str) -> None:
    path.write_text(value)


def create(name: str, limits: AgentLimits, caps: HostCapabilities) -> dict[str, str]:
    """Make the agent's cgroup(s) with these limits: {"cpu": dir, "memory": dir}
    for the limits a cgroup enforces (empty: none does)."""
    want_cpu = limits.cpu_percent is not None and caps.cpu
    want_memory = limits.memory_bytes is not None and caps.memory
    made: dict[str, str] = {}
    if not (want_cpu or want_memory):
        return made
    if caps.cgroup == "v2":
        root = _v2_root()
        assert root is not None
        enable = " ".join(f"+{c}" for c, on in (("cpu", want_cpu), ("memory", want_memory))
                          if on)
        _write(root / "cgroup.subtree_control", enable)
        parent = root / "flctl"
        parent.mkdir(exist_ok=True)
        _write(parent / "cgroup.subtree_control", enable)
        leaf = parent / name
        leaf.mkdir(exist_ok=True)
        if want_cpu:
            _write(leaf / "cpu.max", f"{limits.cpu_quota_us()} {CPU_PERIOD_US}")
            made["cpu"] = str(leaf)
        if want_memory:
            _write(leaf / "memory.max", str(limits.memory_bytes))
            if (leaf / "memory.swap.max").exists():
                _write(leaf / "memory.swap.max", "0")
            made["memory"] = str(leaf)
        return made
    if want_cpu:
        cpu = _v1_base("cpu") / name   # type: ignore[operator]
        cpu.mkdir(exist_ok=True)
        _write(cpu / "cpu.cfs_period_us", str(CPU_PERIOD_US))
        _write(cpu / "cpu.cfs_quota_us", str(limits.cpu_quota_us()))
        made["cpu"] = str(cpu)
    if want_memory:
        memory = _v1_base("memory") / name   # type: ignore[operator]
        memory.mkdir(exist_ok=True)
        # memsw >= limit at every step: memsw unlimited, then the limit, then memsw
        swap = memory / "memory.memsw.limit_in_bytes"
        with contextlib.suppress(OSError):
            _write(swap, "-1")
        _write(memory / "memory.limit_in_bytes", str(limits.memory_bytes))
        if swap.exists():   # no swapping past the limit either
            with contextlib.suppress(OSError):
                _write(swap, str(limits.memory_bytes))
        made["memory"] = str(memory)
    return made


@contextlib.contextmanager
def joined(dirs: dict[str, str]) -> Iterator[None]:
    """This process inside `dirs` while the block runs (what it spawns stays
    there), back in its own cgroups afterwards."""
    targets = sorted(set(dirs.values()))
    if not targets:
        yield
        return
    back = []
    for target in targets:
        hierarchy = _hierarchy_root(Path(target))
        key = "" if hierarchy is None else hierarchy[1]
        own = _own_paths().get(key, "/")
        back.append(Path(hierarchy[0]) / own.lstrip("/") if hierarchy else None)
        _write(Path(target) / "cgroup.procs", str(os.getpid()))
    try:
        yield
    finally:
        for home in back:
            if home is not None:
                with contextlib.suppress(OSError):
                    _write(home / "cgroup.procs", str(os.getpid()))


def _hierarchy_root(path: Path) -> tuple[str, str] | None:
    """(mount point, controller key of /proc/self/cgroup) of the hierarchy holding path."""
    best: tuple[str, str] | None = None
    for point, fstype, options in _mounts():
        if str(path).startswith(point.rstrip("/") + "/"):
            key = "" if fstype == "cgroup2" else next(
                (c for c in ("memory", "cpu") if c in options), "")
            if best is None or len(point) > len(best[0]):
                best = (point, key)
    return best


def save_record(root: Path, dirs: dict[str, str]) -> None:
    atomic_write(root / RECORD, json.dumps(dirs, sort_keys=True) + "\n", 0o644)


def load_record(root: Path) -> dict[str, str]:
    try:
        data = json.loads((root / RECORD).read_text())
    except (OSError, ValueError):
        return {}
    return {k: v for k, v in data.items() if isinstance(v, str)} if isinstance(data, dict) else {}


def remove(root: Path, timeout: float = 5.0) -> list[str]:
    """Remove the cgroups recorded for this state root (after its processes
    are gone: a cgroup with members cannot be removed); the removed ones."""
    removed = []
    for target in sorted(set(load_record(root).values())):
        path = Path(target)
        # only ever what create() made: an flctl-named directory in a cgroup fs
        if not path.name.startswith("flctl-") and path.parent.name != "flctl":
            continue
        deadline = time.monotonic() + timeout
        while path.exists():
            try:
                path.rmdir()
                removed.append(target)
            except OSError:
                if time.monotonic() > deadline:
                    break
                time.sleep(0.05)
        if path.parent.name == "flctl":
            with contextlib.suppress(OSError):
                path.parent.rmdir()   # the v2 parent, once no agent is left in it
    with contextlib.suppress(OSError):
        (root / RECORD).unlink()
    return removed


def oom_kills(memory_dir: str | None) -> int:
    """How many times the kernel killed a process of this cgroup for memory."""
    if not memory_dir:
        return 0
    path = Path(memory_dir)
    for name in ("memory.events", "memory.oom_control"):
        for line in _read(path / name).splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill" and value.strip().isdigit():
                return int(value)
    return int(_read(path / "memory.failcnt").strip() or 0)


def memory_limit(memory_dir: str | None) -> int | None:
    if not memory_dir:
        return None
    for name in ("memory.max", "memory.limit_in_bytes"):
        text = _read(Path(memory_dir) / name).strip()
        if text.isdigit():
            return int(text)
    return None


def rlimit_preexec(limits: AgentLimits, memory_by_cgroup: bool):
    """For Popen's preexec_fn: RLIMIT_AS where no cgroup bounds memory (None: nothing to do)."""
    if limits.memory_bytes is None or memory_by_cgroup:
        return None
    bound = limits.memory_bytes

    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (bound, bound))

    return apply


@contextlib.contextmanager
def niced(nice: int | None) -> Iterator[None]:
    """This process at `nice` while the block runs (what it spawns keeps it)."""
    if nice is None:
        yield
        return
    before = os.getpriority(os.PRIO_PROCESS, 0)
    try:
        os.setpriority(os.PRIO_PROCESS, 0, nice)
    except PermissionError:
        raise FlctlError(f"agent nice {nice} needs root (a priority above {before}); "
                         f"use {before}..19") from None
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, 0, before)
