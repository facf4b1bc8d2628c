"""How the agent is kept running on a host: systemd where it runs, else our
own supervisor (pidfile, restart with backoff). hostctl picks one; deploy
never needs to know which."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Protocol

from flctl.core.agentconfig import parse_agent_config
from flctl.core.facts import parse_listening_ports
from flctl.core.fsutil import atomic_write
from flctl.core.renderers import UnitSpec, render_systemd_unit, unit_name
from flctl.errors import FlctlError

SUPERVISOR_MODULE = "flctl.agent.supervise"
AGENT_MODULE = "flctl.agent.main"
SYSTEMD_DIR = Path("/etc/systemd/system")


def read_text(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def live_pid(pidfile: Path, module: str) -> int | None:
    """The pid in `pidfile` if that process is alive and really ours.

    Checking the command line guards against pid reuse: a stale pidfile
    must never make us signal an unrelated process.
    """
    text = read_text(pidfile)
    if not text or not text.strip().isdigit():
        return None
    pid = int(text.strip())
    stat = read_text(Path(f"/proc/{pid}/stat"))
    cmdline = read_text(Path(f"/proc/{pid}/cmdline")) or ""
    if stat is None or module not in cmdline.replace("\0", " "):
        return None
    state = stat.rsplit(")", 1)[1].split()[0]
    return None if state == "Z" else pid


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


class Service(Protocol):
    kind: str

    def pid(self) -> int | None: ...

    def agent_pid(self) -> int | None: ...

    def start(self, port: int, timeout: float) -> bool: ...

    def stop(self, timeout: float) -> bool: ...

    def remove(self, timeout: float) -> bool: ...


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
        self.pidfile = root / "supervisor.pid"
        self.agent_pidfile = root / "agent.pid"
        self.log = root / "agent.log"

    def pid(self) -> int | None:
        return live_pid(self.pidfile, SUPERVISOR_MODULE)

    def agent_pid(self) -> int | None:
        return live_pid(self.agent_pidfile, AGENT_MODULE)

    def start(self, port: int, timeout: float) -> bool:
        if self.pid() is not None:
            return False
        with open(self.log, "ab") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", SUPERVISOR_MODULE, "--config", str(self.root / "agent.json"),
                 "--pidfile", str(self.pidfile), "--agent-pidfile", str(self.agent_pidfile)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                start_new_session=True, close_fds=True, cwd=str(self.root),
            )
        if not wait_listening(port, timeout, lambda: process.poll() is None):
            raise FlctlError(f"agent did not start listening on port {port}: {log_tail(self.log)}")
        return True

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
        return stopped

    def remove(self, timeout: float) -> bool:
        return self.stop(timeout)


class SystemdService:
    """A hardened unit; systemd restarts the agent when it dies."""

    kind = "systemd"

    def __init__(self, root: Path) -> None:
        self.root = root
        config = parse_agent_config((root / "agent.json").read_text(), str(root / "agent.json")) \
            if (root / "agent.json").exists() else None
        self.project = config.project if config else "unknown"
        self.unit = unit_name(self.project)
        self.unit_path = SYSTEMD_DIR / self.unit
        self.spec = UnitSpec(project=self.project, host=config.name if config else "",
                             python=sys.executable, config=str(root / "agent.json"),
                             state_dir=str(root), log=str(root / "agent.log"))

    def _systemctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["systemctl", *args], capture_output=True, text=True, timeout=60)

    def pid(self) -> int | None:
        shown = self._systemctl("show", "-p", "MainPID", "--value", self.unit).stdout.strip()
        return int(shown) if shown.isdigit() and int(shown) > 0 else None

    def agent_pid(self) -> int | None:
        return self.pid()

    def start(self, port: int, timeout: float) -> bool:
        unit = render_systemd_unit(self.spec)
        changed = read_text(self.unit_path) != unit
        if changed:
            atomic_write(self.unit_path, unit)
            self._systemctl("daemon-reload")
        if self.pid() is not None and not changed:
            return False
        done = self._systemctl("enable", "--now", self.unit)
        if done.returncode != 0:
            raise FlctlError(f"systemctl enable {self.unit}: {done.stderr.strip()}")
        if not wait_listening(port, timeout, lambda: True):
            raise FlctlError(f"agent did not start listening on port {port}: "
                             f"{log_tail(self.root / 'agent.log')}")
        return True

    def stop(self, timeout: float) -> bool:
        running = self.pid() is not None
        self._systemctl("stop", self.unit)
        return running

    def remove(self, timeout: float) -> bool:
        existed = self.unit_path.exists()
        running = self.pid() is not None
        self._systemctl("disable", "--now", self.unit)
        if existed:
            self.unit_path.unlink()
            self._systemctl("daemon-reload")
        return existed or running


def service_for(root: Path) -> Service:
    return SystemdService(root) if init_system() == "systemd" else SupervisorService(root)
