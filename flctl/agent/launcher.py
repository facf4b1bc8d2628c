"""How the agent is kept running on a host: systemd where it runs, else our
own supervisor (pidfile, restart with backoff). The host helper picks one;
deploy never needs to know which.

Either way the agent runs as its own unprivileged user when the agent
config names one (deployed hosts: `flctl`): systemd through `User=`, the
supervisor by being started as that user (it and the agent it restarts
never hold root). Either way the host's firewall table and tunnel come up
before the agent at boot: systemd through ordered units, a host without
systemd through `host_helper boot` (run from cron's @reboot where there is
cron, or by hand).
"""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path, PurePosixPath
from typing import Protocol

from flctl.agent import gpu, limits, proc
from flctl.core.agentconfig import AgentConfig, parse_agent_config
from flctl.core.facts import parse_listening_ports
from flctl.core.fsutil import atomic_write
from flctl.core.layout import HostPaths
from flctl.core.renderers import (
    UnitSpec,
    cron_file_name,
    firewall_unit_name,
    render_boot_cron,
    render_firewall_unit,
    render_systemd_unit,
    render_tunnel_unit,
    tunnel_unit_name,
    unit_name,
)
from flctl.errors import FlctlError

SUPERVISOR_MODULE = "flctl.agent.supervise"
AGENT_MODULE = "flctl.agent.main"
SYSTEMD_DIR = Path("/etc/systemd/system")
CRON_DIR = Path("/etc/cron.d")
LOG_MODE = 0o600


def read_text(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def listening_ports() -> set[int]:
    ports: set[int] = set()
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        text = read_text(Path(name))
        if text:
            ports |= parse_listening_ports(text)
    return ports


def init_system() -> str:
    comm = (read_text(Path("/proc/1/comm")) or "").strip()
    return "systemd" if comm == "systemd" and Path("/run/systemd/system").is_dir() else "none"


def log_tail(path: Path, lines: int = 5) -> str:
    text = read_text(path) or ""
    return " | ".join(text.strip().splitlines()[-lines:])


def start_failure(paths: HostPaths) -> str:
    """The last lines of the agent's log, else of what it printed before logging began."""
    return log_tail(Path(paths.crash_log)) or log_tail(Path(paths.log))


def read_config(root: Path) -> AgentConfig | None:
    path = root / "agent.json"
    text = read_text(path)
    return parse_agent_config(text, str(path)) if text is not None else None


def user_ids(user: str) -> tuple[int, int]:
    """(uid, gid) of a system user; FlctlError if there is none."""
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        raise FlctlError(f"there is no user {user!r} on this host (deploy creates it)") from None
    return entry.pw_uid, entry.pw_gid


def ensure_user(name: str) -> bool:
    """Create the agent's system user (and group) unless it exists; True if made.

    No home, no login shell, no password: it only runs the agent.
    """
    try:
        pwd.getpwnam(name)
        return False
    except KeyError:
        pass
    useradd = shutil.which("useradd") or "/usr/sbin/useradd"
    nologin = next((p for p in ("/usr/sbin/nologin", "/sbin/nologin", "/bin/false")
                    if Path(p).exists()), "/bin/false")
    try:
        grp.getgrnam(name)
        group_args = ["--gid", name]
    except KeyError:
        group_args = ["--user-group"]
    done = subprocess.run([useradd, "--system", *group_args, "--no-create-home",
                           "--home-dir", "/nonexistent", "--shell", nologin,
                           "--comment", "flctl agent", name],
                          capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        raise FlctlError(f"useradd {name}: {done.stderr.strip() or 'failed'}")
    return True


def prepare_run_dir(paths: HostPaths, user: str | None) -> None:
    """The agent's one writable directory, owned by its user; the state root
    must let it through (an flctl from before the agent user made it 0700).
    Nothing secret lies open there: the key is 0600, wg/ and firewall/ 0700."""
    run_dir = Path(paths.run_dir)
    run_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    if user is not None and os.geteuid() == 0:
        uid, gid = user_ids(user)
        os.chown(run_dir, uid, gid)
        os.chmod(run_dir, 0o700)
        os.chmod(paths.root, 0o755)


class Service(Protocol):
    kind: str

    def pid(self) -> int | None: ...

    def agent_pid(self) -> int | None: ...

    def start(self, port: int, timeout: float) -> bool: ...

    def stop(self, timeout: float) -> bool: ...

    def remove(self, timeout: float) -> bool: ...

    def boot_current(self) -> bool: ...

    def install_boot(self) -> str: ...


def wait_listening(port: int, timeout: float, alive: object) -> bool:
    """Poll for the agent's socket; never a fixed sleep. `alive()` false = give up."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if port in listening_ports():
            return True
        if callable(alive) and not alive():
            return False
        time.sleep(0.05)
    return False


class SupervisorService:
    """Our own supervisor process, for hosts without systemd."""

    kind = "supervisor"

    def __init__(self, root: Path) -> None:
        self.root = root
        self.paths = HostPaths(PurePosixPath(root))
        self.config = read_config(root)
        self.user = self.config.user if self.config else None
        self.crash_log = Path(self.paths.crash_log)
        # where an flctl from before the agent user kept its pidfiles (run by root)
        self._legacy = (root / "supervisor.pid", root / "agent.pid")

    def _uid(self) -> int | None:
        if self.user is None:
            return None
        try:
            return user_ids(self.user)[0]
        except FlctlError:
            return None

    def _live(self, pidfile: Path, module: str, uid: int | None) -> int | None:
        pid = proc.pid_from_file(pidfile)
        if pid is None or not proc.matching_pid(pid, [module.encode()], uid=uid):
            return None
        return pid

    def pid(self) -> int | None:
        return (self._live(Path(self.paths.supervisor_pid), SUPERVISOR_MODULE, self._uid())
                or self._live(self._legacy[0], SUPERVISOR_MODULE, 0))

    def agent_pid(self) -> int | None:
        return (self._live(Path(self.paths.agent_pid), AGENT_MODULE, self._uid())
                or self._live(self._legacy[1], AGENT_MODULE, 0))

    def start(self, port: int, timeout: float) -> bool:
        if self.pid() is not None:
            return False
        prepare_run_dir(self.paths, self.user)
        as_user: dict[str, object] = {}
        if self.user is not None and os.geteuid() == 0:
            uid, gid = user_ids(self.user)
            groups = gpu.device_groups() if self.config and self.config.gpus is not None else ()
            as_user = {"user": uid, "group": gid, "extra_groups": list(groups)}
        wanted = self.config.limits if self.config else limits.AgentLimits()
        cgroups = self._cgroups(wanted)
        memory_cgroup = ["--memory-cgroup", cgroups["memory"]] if "memory" in cgroups else []
        # a fresh crash file per start: it only holds what came before logging
        fd = os.open(self.crash_log, os.O_WRONLY | os.O_TRUNC | os.O_CREAT, LOG_MODE)
        with open(fd, "ab") as out, limits.joined(cgroups), limits.niced(wanted.nice):
            process = subprocess.Popen(
                [sys.executable, "-m", SUPERVISOR_MODULE, "--config", str(self.root / "agent.json"),
                 "--pidfile", str(self.paths.supervisor_pid),
                 "--agent-pidfile", str(self.paths.agent_pid),
                 "--log", str(self.paths.log), *memory_cgroup],
                stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True,
                close_fds=True, cwd=str(self.paths.run_dir),
                preexec_fn=limits.rlimit_preexec(wanted, "memory" in cgroups),
                **as_user,  # type: ignore[arg-type]
            )
        if not wait_listening(port, timeout, lambda: process.poll() is None):
            raise FlctlError(f"agent did not start listening on port {port}: "
                             f"{start_failure(self.paths)}")
        return True

    def _cgroups(self, wanted: limits.AgentLimits) -> dict[str, str]:
        """The agent's cgroups with its limits (none where none is wanted or writable)."""
        limits.remove(self.root)   # a stale one from a supervisor that was killed
        if wanted.cpu_percent is None and wanted.memory_bytes is None:
            return {}
        caps = limits.capabilities("none")
        name = limits.cgroup_name(self.config.project if self.config else "unknown",
                                  self.config.name if self.config else "", self.root)
        made = limits.create(name, wanted, caps)
        if made:
            limits.save_record(self.root, made)
        return made

    def stop(self, timeout: float) -> bool:
        pid = self.pid()
        stopped = False
        if pid is not None:
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and self.pid() == pid:
                time.sleep(0.05)
            if self.pid() == pid:
                os.kill(pid, signal.SIGKILL)
            stopped = True
        agent = self.agent_pid()
        if agent is not None:
            os.kill(agent, signal.SIGKILL)
            stopped = True
        for legacy in self._legacy:
            legacy.unlink(missing_ok=True)
        limits.remove(self.root, timeout)
        return stopped

    def remove(self, timeout: float) -> bool:
        stopped = self.stop(timeout)
        cron = self._cron_path()
        if cron is not None and cron.exists():
            cron.unlink()
            return True
        return stopped

    def _cron_path(self) -> Path | None:
        """Where the boot hook goes: cron's @reboot, on hosts that have cron."""
        if not CRON_DIR.is_dir() or self.config is None:
            return None
        return CRON_DIR / cron_file_name(self.config.project)

    def boot_current(self) -> bool:
        cron = self._cron_path()
        return cron is None or read_text(cron) == render_boot_cron(unit_spec(self.root,
                                                                             self.config))

    def install_boot(self) -> str:
        """"changed", "unchanged", or "none" where there is no cron (then only a
        deploy, or `host_helper boot`, brings the agent back after a reboot)."""
        cron = self._cron_path()
        if cron is None:
            return "none"
        if self.boot_current():
            return "unchanged"
        atomic_write(cron, render_boot_cron(unit_spec(self.root, self.config)), 0o644)
        return "changed"


def unit_spec(root: Path, config: AgentConfig | None) -> UnitSpec:
    """The units of this host's agent, with the tunnel and firewall it has."""
    paths = HostPaths(PurePosixPath(root))
    project = config.project if config else "unknown"
    uses_gpus = config is not None and config.gpus is not None
    tunnels = sorted(Path(paths.wg_dir).glob("*.conf"))
    firewall = Path(paths.firewall)
    return UnitSpec(project=project, host=config.name if config else "",
                    python=sys.executable, config=str(root / "agent.json"),
                    state_dir=str(root), run_dir=str(paths.run_dir), log=str(paths.crash_log),
                    agent_log=str(paths.log),
                    limits=config.limits if config else limits.AgentLimits(),
                    user=config.user if config else None,
                    tunnel_config=str(tunnels[0]) if tunnels else None,
                    firewall=str(firewall) if firewall.exists() else None,
                    nft=shutil.which("nft") or "/usr/sbin/nft",
                    gpus=uses_gpus,
                    gpu_groups=gpu.device_groups() if uses_gpus else ())


class SystemdService:
    """Hardened units; systemd restarts the agent when it dies and brings the
    firewall table, then the tunnel, then the agent up at boot."""

    kind = "systemd"

    def __init__(self, root: Path) -> None:
        self.root = root
        self.config = read_config(root)
        self.spec = unit_spec(root, self.config)
        self.unit = unit_name(self.spec.project)
        self.unit_path = SYSTEMD_DIR / self.unit

    def _systemctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["systemctl", *args], capture_output=True, text=True, timeout=60)

    def _units(self) -> dict[str, str]:
        units = {self.unit: render_systemd_unit(self.spec)}
        if self.spec.firewall:
            units[firewall_unit_name(self.spec.project)] = render_firewall_unit(self.spec)
        if self.spec.tunnel_config:
            units[tunnel_unit_name(self.spec.project)] = render_tunnel_unit(self.spec)
        return units

    def pid(self) -> int | None:
        shown = self._systemctl("show", "-p", "MainPID", "--value", self.unit).stdout.strip()
        return int(shown) if shown.isdigit() and int(shown) > 0 else None

    def agent_pid(self) -> int | None:
        return self.pid()

    def boot_current(self) -> bool:
        return all(read_text(SYSTEMD_DIR / name) == text for name, text in self._units().items())

    def install_boot(self) -> str:
        """Write the units (the agent's, and its firewall's and tunnel's) if they
        differ; they are enabled, so boot brings all three up in order."""
        changed = False
        for name, text in self._units().items():
            if read_text(SYSTEMD_DIR / name) != text:
                atomic_write(SYSTEMD_DIR / name, text)
                changed = True
        if changed:
            self._systemctl("daemon-reload")
        return "changed" if changed else "unchanged"

    def start(self, port: int, timeout: float) -> bool:
        prepare_run_dir(HostPaths(PurePosixPath(self.root)), self.spec.user)
        changed = self.install_boot() == "changed"
        if self.pid() is not None and not changed:
            return False
        # the firewall and tunnel units are idempotent: starting them when deploy
        # has already brought both up only marks them active for BindsTo=
        order = [name for name in self._units() if name != self.unit] + [self.unit]
        for name in order:
            done = self._systemctl("enable", "--now", name)
            if done.returncode != 0:
                raise FlctlError(f"systemctl enable {name}: {done.stderr.strip()}")
        if changed:
            self._systemctl("restart", self.unit)
        if not wait_listening(port, timeout, lambda: True):
            raise FlctlError(f"agent did not start listening on port {port}: "
                             f"{start_failure(HostPaths(PurePosixPath(self.root)))}")
        return True

    def stop(self, timeout: float) -> bool:
        running = self.pid() is not None
        self._systemctl("stop", self.unit)
        return running

    def remove(self, timeout: float) -> bool:
        names = [self.unit, tunnel_unit_name(self.spec.project),
                 firewall_unit_name(self.spec.project)]
        existed = any((SYSTEMD_DIR / name).exists() for name in names)
        running = self.pid() is not None
        for name in names:
            self._systemctl("disable", "--now", name)
            (SYSTEMD_DIR / name).unlink(missing_ok=True)
        if existed:
            self._systemctl("daemon-reload")
        return existed or running


def service_for(root: Path) -> Service:
    return SystemdService(root) if init_system() == "systemd" else SupervisorService(root)
