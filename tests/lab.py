"""Pytest helper for the multi-host lab (scripts/lab.sh): lab hosts are
network namespaces on this machine, each with its own address, sshd and
hostname, private /run and /tmp, and copy-on-write /etc, /opt, /var/lib,
/root and /home (nothing a host writes reaches the real filesystem).

Only one lab can exist on a machine (namespace and bridge names are fixed).
`lab_up` therefore waits while another live test run holds the lab (a lock
from lab_up to Lab.down, plus the owner recorded in the lab folder), and
clears a lab whose owning test run died; a lab started by hand is never
touched: it is reported instead.

    lab = lab_up(3, workspace=tmp_path)   # lab1..lab3, DIR a flctl workspace
    lab.exec("lab1", "hostname").stdout   # "lab1\\n"
    lab.stop_host("lab2"); lab.start_host("lab2")
    lab.down()
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import os
import re
import shutil
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flctl.agent.proc import proc_stat

LAB_SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "lab.sh"
DEFAULT_LAB_DIR = Path("/tmp/flctl-lab")
LAB_EXISTS_EXIT = 3
UP_TIMEOUT_S = 120.0
_PROBE = ("import socket, sys\n"
          "s = socket.socket(); s.settimeout(2)\n"
          "try:\n"
          "    s.connect((sys.argv[1], int(sys.argv[2]))); print('open')\n"
          "except OSError as e:\n"
          "    print('closed', e)\n")
_REQUIRED_COMMANDS = ("bash", "ip", "unshare", "nsenter", "setsid", "flock", "ssh", "ssh-keygen",
                      "mount", "umount", "find", "awk")


class LabError(RuntimeError):
    """The lab could not be brought up, changed or taken down."""


class LabCommandError(subprocess.CalledProcessError):
    """A command inside a lab host failed; the message carries its output."""

    def __str__(self) -> str:
        return (f"{super().__str__()}\nstdout: {str(self.stdout or '')[-2000:]}"
                f"\nstderr: {str(self.stderr or '')[-2000:]}")


def lab_dir() -> Path:
    return Path(os.environ.get("FLCTL_LAB_DIR", str(DEFAULT_LAB_DIR)))


@functools.lru_cache(maxsize=1)
def lab_available() -> str | None:
    """None if the lab can run here, else why not (the reason a test skips with)."""
    if not sys.platform.startswith("linux"):
        return "the lab needs Linux network and mount namespaces"
    if os.geteuid() != 0:
        return "the lab needs root"
    missing = [cmd for cmd in _REQUIRED_COMMANDS if shutil.which(cmd) is None]
    if not Path("/usr/sbin/sshd").exists():
        missing.append("/usr/sbin/sshd (openssh-server)")
    if missing:
        return f"missing for the lab: {', '.join(missing)}"
    try:
        filesystems = Path("/proc/filesystems").read_text()
    except OSError as exc:
        return f"cannot read /proc/filesystems: {exc}"
    if "overlay" not in filesystems.split():
        return "the kernel has no overlayfs"
    probe = subprocess.run(["unshare", "--net", "--mount", "--uts", "true"],
                           capture_output=True, text=True, timeout=10)
    if probe.returncode != 0:
        return f"cannot create namespaces here: {probe.stderr.strip()}"
    return None


@dataclass
class Lab:
    dir: Path
    hosts: list[str]
    addresses: dict[str, str]
    workspace: Path | None
    key: Path
    known_hosts: Path
    holds_lock: bool = field(default=False, repr=False, compare=False)

    def exec(self, host: str, *cmd: str, check: bool = True,
             timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """Run `cmd` in `host`'s network, mount and UTS namespaces, what an SSH
        session sees: cwd /root and sshd's environment for root (PATH without
        the caller's venv or pyenv; pass variables with `env VAR=value cmd`).
        Works while the host is stopped, and for the stranger `labx`."""
        done = _script("exec", host, *cmd, timeout=timeout)
        if check and done.returncode != 0:
            raise LabCommandError(done.returncode, [host, *cmd], done.stdout, done.stderr)
        return done

    def ssh_command(self, host: str, *cmd: str, connect_timeout: int = 5) -> list[str]:
        """An OpenSSH client command for `host` with the lab key and strict host keys."""
        return ["ssh", "-F", "/dev/null", "-i", str(self.key), "-o", "IdentitiesOnly=yes",
                "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes",
                "-o", f"UserKnownHostsFile={self.known_hosts}",
                "-o", "GlobalKnownHostsFile=/dev/null",
                "-o", f"ConnectTimeout={connect_timeout}",
                f"root@{self.addresses[host]}", *cmd]

    def ssh(self, host: str, *cmd: str, timeout: float = 30,
            connect_timeout: int = 5) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.ssh_command(host, *cmd, connect_timeout=connect_timeout),
                              capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)

    def status(self) -> dict[str, Any]:
        return _status()

    def probe(self, host: str, address: str, port: int) -> str:
        """A TCP connect to address:port from inside `host`: 'open' or 'closed ...'."""
        return self.exec(host, "python3", "-c", _PROBE, address, str(port)).stdout.strip()

    def stop_host(self, host: str) -> None:
        _checked("stop-host", host)

    def start_host(self, host: str) -> None:
        _checked("start-host", host)

    def down(self) -> None:
        try:
            _checked("down")
        finally:
            if self.holds_lock:
                self.holds_lock = False
                _drop_lab_lock()


def lab_up(n: int, workspace: Path | None = None) -> Lab:
    """Bring up lab1..labN (and the stranger labx); with `workspace`, make it a flctl workspace."""
    reason = lab_available()
    if reason is not None:
        raise LabError(f"the lab cannot run here: {reason}")
    deadline = time.monotonic() + _wait_s()
    args = ["up", str(n)] + ([str(workspace)] if workspace is not None else [])
    _hold_lab_lock(deadline)
    try:
        seen_debris: list[bool] = []
        while True:
            done = _script(*args, timeout=UP_TIMEOUT_S)
            if done.returncode == 0:
                break
            if done.returncode != LAB_EXISTS_EXIT:
                raise LabError(f"lab up failed:\n{done.stdout}{done.stderr}")
            _clear_or_wait_for_existing_lab(deadline, seen_debris)
        status = _status()
    except BaseException:
        _drop_lab_lock()
        raise
    hosts = [h for h in status["hosts"] if not h["stranger"]]
    return Lab(
        dir=Path(status["dir"]),
        hosts=[h["name"] for h in hosts],
        addresses={h["name"]: h["address"] for h in status["hosts"]},
        workspace=Path(status["workspace"]) if status["workspace"] else None,
        key=Path(status["key"]),
        known_hosts=Path(status["known_hosts"]),
        holds_lock=True,
    )


@contextlib.contextmanager
def lab_lock() -> Iterator[None]:
    """Keep the lab to this test run across several ups and downs (and raw lab.sh calls)."""
    _hold_lab_lock(time.monotonic() + _wait_s())
    try:
        yield
    finally:
        _drop_lab_lock()


def _wait_s() -> float:
    return float(os.environ.get("FLCTL_LAB_WAIT", "600"))


# ------------------------------------------------------------------ internals


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("FLCTL_PYTHON", sys.executable)
    env["FLCTL_LAB_OWNER"] = _owner_token(os.getpid()) or ""
    return env


def _script(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(LAB_SCRIPT), *args], capture_output=True, text=True,
                          timeout=timeout, env=_env(), stdin=subprocess.DEVNULL)


def _checked(*args: str, timeout: float = 60) -> str:
    done = _script(*args, timeout=timeout)
    if done.returncode != 0:
        raise LabError(f"lab {' '.join(args)} failed (exit {done.returncode}):\n"
                       f"{done.stdout}{done.stderr}")
    return done.stdout


def _status() -> dict[str, Any]:
    done = _script("status", "--json")
    if done.returncode != 0:
        raise LabError(f"no lab is up: {done.stdout}{done.stderr}")
    return json.loads(done.stdout)


def _owner_token(pid: int) -> str | None:
    """pid plus its start time, so a recycled pid is not taken for the owner."""
    stat = proc_stat(pid)
    if stat is None or not stat.alive:
        return None
    return f"{pid}:{stat.start_ticks}"


def _read_owner() -> str | None:
    """The lab folder's owner token, "" when it has none, None when there is no folder."""
    for _ in range(10):
        try:
            return (lab_dir() / "owner").read_text().strip()
        except FileNotFoundError:
            if not lab_dir().exists():
                return None
            time.sleep(0.05)   # an `up` between making the folder and writing its owner
        except OSError as exc:
            raise LabError(f"a lab is up and its owner is unreadable ({exc})") from exc
    return ""


def _clear_or_wait_for_existing_lab(deadline: float, seen_debris: list[bool]) -> None:
    """`up` found a lab. We hold the lab lock, so no test run of this checkout
    uses it: it is a leak of ours, debris of a dead run, a lab of a run from
    another checkout (wait for it) or one started by hand (refuse)."""
    owner = _read_owner()
    if owner is None:
        # Namespaces or bridge without a folder: debris, unless a `down`
        # elsewhere was just finishing. Clear it only when seen twice.
        if seen_debris:
            _checked("down")
        else:
            seen_debris.append(True)
            time.sleep(0.5)
        return
    if not re.fullmatch(r"\d+:\d+", owner):
        raise LabError(f"a lab started by hand is up ({lab_dir()}): "
                       f"run `{LAB_SCRIPT} down` first")
    if owner == _owner_token(os.getpid()):
        warnings.warn("a lab left up earlier by this test run was taken down", stacklevel=3)
        _checked("down")
        return
    if _owner_token(int(owner.split(":")[0])) != owner:
        _checked("down")     # its test run died
        return
    if time.monotonic() > deadline:
        raise LabError(f"another test run (pid {owner.split(':')[0]}) kept the lab "
                       "for too long (FLCTL_LAB_WAIT)")
    time.sleep(1.0)


# Test runs of this checkout take turns: a lock (on this very file, so no
# file is made; lab.sh locks itself for its own commands) is held from lab_up
# to Lab.down, or over a `with lab_lock():` block, and the kernel drops it
# when a run dies.
_lock_fd: int | None = None
_lock_users = 0


def _hold_lab_lock(deadline: float) -> None:
    global _lock_fd, _lock_users
    if _lock_users == 0:
        fd = os.open(__file__, os.O_RDONLY | os.O_CLOEXEC)
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    os.close(fd)
                    raise LabError("another test run kept the lab for too long "
                                   "(FLCTL_LAB_WAIT)") from None
                time.sleep(0.5)
        _lock_fd = fd
    _lock_users += 1


def _drop_lab_lock() -> None:
    global _lock_fd, _lock_users
    _lock_users = max(0, _lock_users - 1)
    if _lock_users == 0 and _lock_fd is not None:
        os.close(_lock_fd)
        _lock_fd = None
