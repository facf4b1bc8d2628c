"""Shared test plumbing: run the CLI as a user would, pick free ports."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from flctl.core.settings import Settings, render_settings
from flctl.net.ports import free_port_block


@dataclass
class CliResult:
    returncode: int
    stdout: str
    stderr: str

    def json(self) -> Any:
        return json.loads(self.stdout)


def flctl_command() -> list[str]:
    """The installed `flctl` script beside this interpreter, as a user runs it
    (`python -m flctl` from this checkout would import the checkout instead)."""
    script = Path(sys.executable).parent / "flctl"
    return [str(script)] if script.exists() else [sys.executable, "-m", "flctl"]


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 180) -> CliResult:
    env = dict(os.environ, COLUMNS="200", NO_COLOR="1")
    done = subprocess.run([*flctl_command(), *args], capture_output=True,
                          text=True, cwd=cwd, timeout=timeout, env=env,
                          stdin=subprocess.DEVNULL)
    return CliResult(done.returncode, done.stdout, done.stderr)


def use_ports(workspace: Path, count: int) -> int:
    """Point a workspace's agents at free loopback ports."""
    from flctl.core.settings import load_settings

    settings = load_settings(workspace / "flctl.yaml")
    base = free_port_block(count)
    updated = Settings(project=settings.project, overlay=settings.overlay,
                       agent=dataclasses.replace(settings.agent, port=base),
                       training=settings.training, limits=settings.limits)
    (workspace / "flctl.yaml").write_text(render_settings(updated))
    return base


def set_training(workspace: Path, **values: Any) -> None:
    """Change training settings in a workspace's flctl.yaml (validated like the file).
    The task itself is fixed at deploy: change it before deploying."""
    from flctl.core.settings import load_settings

    path = workspace / "flctl.yaml"
    path.write_text(render_settings(load_settings(path).with_training(**values)))


def deploy_json(root: Path, *extra: str) -> dict[str, Any]:
    """`flctl deploy --json`, with its exit code under "code"."""
    result = run_cli("deploy", "-w", str(root), "--json", *extra, timeout=600)
    assert "Traceback" not in result.stderr, result.stderr
    return {"code": result.returncode, **result.json()}


def by_host(document: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {h["host"]: h for h in document["hosts"]}


def local_workspace(root: Path, hosts: int, ports: int | None = None) -> Iterator[Path]:
    """A workspace of `hosts` local hosts on free ports (`ports` of them: room to
    add hosts), not deployed; torn down when the generator ends."""
    assert run_cli("init", str(root), "--local", str(hosts)).returncode == 0
    use_ports(root, ports or hosts)
    try:
        yield root
    finally:
        run_cli("teardown", "-w", str(root))


def deployed_local_workspace(root: Path, hosts: int,
                             prepare: Callable[[Path], None] = lambda root: None,
                             ) -> Iterator[Path]:
    """A workspace of `hosts` local agents, `prepare`d and deployed; torn down when
    the generator ends. Module fixtures `yield from` it."""
    assert run_cli("init", str(root), "--local", str(hosts)).returncode == 0
    use_ports(root, hosts)
    prepare(root)
    assert run_cli("deploy", "-w", str(root)).returncode == 0
    try:
        yield root
    finally:
        run_cli("teardown", "-w", str(root))
