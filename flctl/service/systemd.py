"""A detached run as a systemd user unit, where that works (see
flctl.core.run_unit for the unit). Where it does not (no systemd as PID 1,
no user manager, lingering off), `why_not()` says why and
flctl's own supervisor is used instead."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from flctl.agent.launcher import init_system
from flctl.core.run_unit import RunUnitSpec, render_run_unit, run_unit_name
from flctl.errors import FlctlError
from flctl.workspace_lock import local_user

TIMEOUT_S = 15.0
NOT_INIT = "systemd is not PID 1"


class UnitFailed(FlctlError):
    """systemctl could not start the run's unit."""


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=TIMEOUT_S,
                          stdin=subprocess.DEVNULL)


def why_not() -> str | None:
    """None when a user unit can run the run past logout; else the reason."""
    if init_system() != "systemd":
        return NOT_INIT
    if not shutil.which("systemctl") or not shutil.which("loginctl"):
        return "systemctl or loginctl is missing"
    try:
        if _run("systemctl", "--user", "show-environment").returncode != 0:
            return "`systemctl --user` does not answer (no user manager)"
        user = local_user()
        # Lingering is the account's setting: used where it is on, never turned on
        # behind the operator's back (the supervisor runs the run otherwise).
        linger = _run("loginctl", "show-user", user, "--property=Linger", "--value")
        if linger.stdout.strip() != "yes":
            return (f"lingering is off for {user}, so a user unit would stop at logout "
                    f"(`loginctl enable-linger {user}` turns it on)")
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"systemctl: {exc}"
    return None


def unit_dir() -> Path:
    config = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(config) / "systemd" / "user"


def start_unit(spec: RunUnitSpec) -> str:
    """Write the run's unit and start it; the unit's name."""
    name = run_unit_name(spec.run_id)
    directory = unit_dir()
    directory.mkdir(parents=True, exist_ok=True)
    (directory / name).write_text(render_run_unit(spec))
    for argv in (("systemctl", "--user", "daemon-reload"),
                 ("systemctl", "--user", "start", name)):
        done = _run(*argv)
        if done.returncode != 0:
            raise UnitFailed(f"{' '.join(argv)}: {done.stderr.strip() or 'failed'}")
    return name
