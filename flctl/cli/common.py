"""What flctl's commands share: common options, host selection, naming a run,
the workspace lock, deploying with a progress view, and turning host failures
into one line."""

from __future__ import annotations

from contextlib import AbstractContextManager
from pathlib import Path
from typing import Optional

import typer

from flctl.cli.auditing import note_hosts
from flctl.cli.progress import HostProgress
from flctl.coordinator.records import RunDir
from flctl.coordinator.session import info_probe
from flctl.core.members import read_members
from flctl.deploy import engine
from flctl.deploy.overlay import HubNotRoot
from flctl.deploy.results import HostResult
from flctl.errors import HostError, WorkspaceError
from flctl.workspace import Workspace
from flctl.workspace_lock import WorkspaceBusy, workspace_lock

WorkspaceOpt = typer.Option(Path("."), "--workspace", "-w", help="Workspace directory.")
JsonOpt = typer.Option(False, "--json", help="Print one JSON document on stdout.")
LimitOpt = typer.Option(None, "--limit", "-l", help="Only these hosts or groups (repeatable).")
ForksOpt = typer.Option(16, "--forks", "-f", min=1, help="Hosts handled in parallel.")
AcceptNewOpt = typer.Option(
    False, "--accept-new-host-keys",
    help="Trust SSH host keys not yet in the workspace's known_hosts (a changed key is "
         "always refused).")


def selected(workspace: Workspace, limit: Optional[list[str]]) -> list:
    return workspace.inventory.select(limit) if limit else list(workspace.inventory.hosts)


def named_run(runs_root: Path, run_id: str) -> RunDir:
    """The run called `run_id` in `runs_root` (a plain name: no path tricks)."""
    run = RunDir(runs_root / run_id)
    if "/" in run_id or run_id in ("", ".", "..") or not run.path.is_dir():
        raise WorkspaceError(f"no run {run_id!r} in {runs_root}")
    return run


def holding(workspace: Workspace, command: str, *, membership: bool = False,
            shares_membership: bool = False) -> AbstractContextManager[str]:
    """The workspace lock for a command that changes the workspace or its hosts
    (flctl.workspace_lock: a `membership` change may run beside a train)."""
    return workspace_lock(workspace.paths.state, f"flctl {command}", membership=membership,
                          shares_membership=shares_membership)


def refuse_members_alongside(workspace: Workspace, hosts: list) -> None:
    """Beside a running train, deploy only hosts that are not deployed yet:
    deploying a member again could restart the agent the run trains on."""
    members = read_members(workspace.paths.members)
    deployed = sorted(h.name for h in hosts if members is not None and h.name in members.hosts)
    if deployed:
        raise WorkspaceBusy(
            f"a `flctl train` is running and {', '.join(deployed)} already deployed: deploying "
            "it again could restart an agent under the run; while it runs, deploy only new "
            "hosts (they join it) or tear hosts down (they leave it)")


def host_failures(results: list[HostResult], verb: str) -> None:
    bad = [r for r in results if r.status in ("failed", "unreachable")]
    hub = next((r for r in bad if r.host == "hub" and r.exit_code == HubNotRoot.exit_code), None)
    if hub is not None and hub.error:
        raise HubNotRoot(hub.error)  # the one thing to do, with its own exit code
    if bad:
        names = ", ".join(f"{r.host} ({r.status})" for r in bad)
        raise HostError(f"{verb} failed on {len(bad)} of {len(results)} hosts: {names}")


def deploy_hosts(workspace: Workspace, limit: Optional[list[str]], check: bool, forks: int,
            json_output: bool, accept_new: bool = False, strict: bool = False,
            ) -> list[HostResult]:
    hosts = selected(workspace, limit)
    probe = info_probe(workspace)
    with HostProgress([h.name for h in hosts], "deploy", enabled=not json_output) as view:
        results = engine.deploy(workspace, hosts, check=check, forks=forks,
                                verify=lambda host, endpoint: probe(endpoint),
                                accept_new_host_keys=accept_new, progress=view.update,
                                strict=strict)
    note_hosts(results)  # for the audit line of the command deploying
    return results
