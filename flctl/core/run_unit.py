"""A detached run as a systemd user unit: the text of the unit file.

Where systemd is PID 1 and the user's manager answers (`systemctl --user`),
`flctl train --detach` runs flctl's supervisor (flctl.service.supervisor)
under a user unit rather than in a session of its own: with lingering on,
the unit outlives the login, and `systemctl --user status` shows it. The
supervisor restarts the coordinator with `--resume` itself, so the unit has
Restart=no. Pure, so the text is checked as text.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

SAFE_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


@dataclass(frozen=True)
class RunUnitSpec:
    run_id: str
    workspace: str          # absolute: the unit's working directory
    argv: Sequence[str]     # the supervisor's command line
    log: str                # the run's detach.log: stdout and stderr go there
    environment: Mapping[str, str] = field(default_factory=dict)


def run_unit_name(run_id: str) -> str:
    if not SAFE_RUN_ID.match(run_id):
        raise ValueError(f"run id {run_id!r} cannot name a systemd unit")
    return f"flctl-run-{run_id}.service"


def systemd_quote(word: str) -> str:
    """One word of an Exec line or Environment= value, as systemd reads it:
    in double quotes, with backslash and double quote escaped, `%` (a unit
    specifier) doubled and `$` (a variable) doubled."""
    if any(c in word for c in "\n\r\0"):
        raise ValueError(f"{word!r}: a line break cannot be part of a unit file")
    escaped = word.replace("\\", "\\\\").replace('"', '\\"').replace("%", "%%")
    return '"' + escaped.replace("$", "$$") + '"'


def _path(value: str) -> str:
    """A path in a setting that takes one bare path (no quotes): specifiers escaped."""
    if any(c in value for c in "\n\r\0") or not value.startswith("/"):
        raise ValueError(f"{value!r}: an absolute path on one line is needed")
    return value.replace("%", "%%")


def render_run_unit(spec: RunUnitSpec) -> str:
    environment = "".join(f"Environment={systemd_quote(f'{k}={v}')}\n"
                          for k, v in sorted(spec.environment.items()))
    return (
        "# written by `flctl train --detach`; flctl's supervisor restarts the run itself\n"
        "[Unit]\n"
        f"Description=flctl run {spec.run_id}\n"
        "\n"
        "[Service]\n"
        "Type=exec\n"
        f"WorkingDirectory={_path(spec.workspace)}\n"
        f"{environment}"
        f"ExecStart={' '.join(systemd_quote(w) for w in spec.argv)}\n"
        "StandardInput=null\n"
        f"StandardOutput=append:{_path(spec.log)}\n"
        f"StandardError=append:{_path(spec.log)}\n"
        "Restart=no\n"
        # SIGTERM to the supervisor alone: it ends the coordinator with SIGINT
        # (resumable) and waits for it; what is left after the timeout is killed
        "KillMode=mixed\n"
        "TimeoutStopSec=60\n"
    )
