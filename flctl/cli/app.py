"""flctl's command line. Thin: parse options, call an engine, render.

Exit codes: 0 ok; 1 unexpected error; 2 invalid configuration or input;
3 workspace missing, would be overwritten, or busy with another command;
4 protocol error; 5 one or more hosts failed or were unreachable; 6 training
could not complete; 7 the WireGuard hub needs root; 130 interrupted.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Any, Optional

import typer
from rich.markup import escape

import flctl as flctl_package
from flctl import __version__
from flctl.cli import render
from flctl.cli.audit_commands import audit_command
from flctl.cli.auditing import audit_block, audit_note, audit_run_start, audited, note_hosts
from flctl.cli.common import (
    AcceptNewOpt,
    ForksOpt,
    JsonOpt,
    LimitOpt,
    WorkspaceOpt,
    deploy_hosts,
    holding,
    host_failures,
    refuse_members_alongside,
    selected,
)
from flctl.cli.detach import start_detached
from flctl.cli.doctor_command import doctor
from flctl.cli.pki_commands import pki_app
from flctl.cli.progress import HostProgress, TrainView
from flctl.cli.report_command import report
from flctl.cli.runs_commands import runs_app
from flctl.cli.top import top
from flctl.coordinator.progress import TransferProgress
from flctl.coordinator.session import info_probe, stats_workspace, train_workspace
from flctl.coordinator.stats import describe_findings
from flctl.coordinator.summary import RunSummary
from flctl.core.ansible_inventory import translate_file
from flctl.core.fedstats import DEFAULT_BINS, MAX_BINS, MIN_COUNT
from flctl.core.settings import AgentSettings, Settings
from flctl.core.text import clean_text
from flctl.deploy import engine
from flctl.deploy.logs import agent_log
from flctl.deploy.status import gather_status
from flctl.errors import EXIT_INTERRUPTED, ConfigError, FlctlError, HostError, WorkspaceError
from flctl.net.ports import free_port_block
from flctl.service.liveness import latest_live_run
from flctl.workspace import (
    Workspace,
    WorkspacePaths,
    existing_workspace_files,
    init_workspace,
    load_workspace,
)
from flctl.workspace_lock import ALONGSIDE

app = typer.Typer(
    add_completion=False,
    pretty_exceptions_show_locals=False,
    no_args_is_help=True,
    help="Deploy and run federated learning on hosts you can reach over SSH.",
    epilog="Exit codes: 0 ok, 2 bad configuration, 3 workspace problem, 4 protocol error, "
           "5 host failures, 6 training failed, 7 the WireGuard hub needs root, 130 interrupted.",
)
app.add_typer(runs_app, name="runs")
app.add_typer(pki_app, name="pki")
app.command("doctor")(doctor)


@app.command()
@audited("init", workspace_param="directory")
def init(
    directory: Path = typer.Argument(Path("."), help="Where to create the workspace."),
    local: Optional[int] = typer.Option(
        None, "--local", min=1, max=64,
        help="Make N local hosts (agents on this machine) with demo data shards."),
    project: Optional[str] = typer.Option(None, "--project", help="Project name."),
    force: bool = typer.Option(
        False, "--force",
        help="Overwrite an existing workspace (its pki/ is moved to pki.backup-<UTC time>)."),
    seed: int = typer.Option(0, "--seed", help="Seed for the demo data split."),
    from_ansible: Optional[Path] = typer.Option(
        None, "--from-ansible", metavar="FILE",
        help="Write inventory.yaml from an Ansible inventory (INI or YAML): groups, "
             "ansible_host/user/port/ssh_private_key_file/become; flctl_<var> for flctl's "
             "own host variables such as flctl_data_path."),
    json_output: bool = JsonOpt,
) -> None:
    """Create a workspace: flctl.yaml, inventory.yaml and a project CA under pki/."""
    if local and from_ansible:
        raise ConfigError("--local and --from-ansible do not go together")
    translated, notes = translate_file(from_ansible, Settings().overlay.subnet) \
        if from_ansible else (None, [])
    made = init_workspace(directory, local_hosts=local, force=force, project=project, seed=seed,
                          inventory_text=translated)
    paths, backup = made.paths, made.pki_backup
    audit_note(pki_backup=None if backup is None else str(backup))
    if json_output:
        render.emit_json({"workspace": str(paths.root), "settings": str(paths.settings),
                          "inventory": str(paths.inventory), "ca_cert": str(paths.ca_cert),
                          "local_hosts": local or 0, "notes": notes,
                          "pki_backup": None if backup is None else str(backup)})
        return
    render.out.print(f"[green]workspace ready[/] at {paths.root}")
    for note in notes:
        render.out.print(f"[yellow]note:[/] {escape(clean_text(note))}")
    render.out.print(f"  settings  {paths.settings}\n  inventory {paths.inventory}\n"
                     f"  CA        {paths.ca_cert}")
    if backup is not None:
        render.out.print(f"[yellow]the old pki/ (CA key included) is kept in {backup}[/]; "
                         "hosts deployed with it need `flctl deploy` to trust the new CA")
    render.out.print("next: edit inventory.yaml, then `flctl deploy`" if not local
                     else "next: `flctl deploy`, then `flctl train`")


@app.command()
@audited("deploy")
def deploy(
    workspace_dir: Path = WorkspaceOpt,
    limit: Optional[list[str]] = LimitOpt,
    check: bool = typer.Option(False, "--check", help="Show what would change; change nothing."),
    forks: int = ForksOpt,
    accept_new: bool = AcceptNewOpt,
    strict: bool = typer.Option(
        False, "--strict", help="Fail a host that cannot enforce a resource limit "
                                "(agent.cpu_quota, memory_max, nice) instead of warning."),
    json_output: bool = JsonOpt,
) -> None:
    """Install and start the agent on every host; idempotent."""
    workspace = load_workspace(workspace_dir)
    with holding(workspace, "deploy", membership=bool(limit)) as mode:
        if mode == ALONGSIDE:
            refuse_members_alongside(workspace, selected(workspace, limit))
        results = deploy_hosts(workspace, limit, check, forks, json_output, accept_new, strict)
    if json_output:
        render.emit_json({"check": check, "hosts": [r.as_dict() for r in results]})
    else:
        render.out.print(render.recap_table(results, "deploy (check mode)" if check else "deploy"))
        render.warn([f"{r.host}: {w}" for r in results for w in r.warnings])
    host_failures(results, "deploy")


@app.command()
def status(
    workspace_dir: Path = WorkspaceOpt,
    limit: Optional[list[str]] = LimitOpt,
    json_output: bool = JsonOpt,
    every: bool = typer.Option(False, "--all", help="A row for every host, however many "
                                                     f"(past {render.HOSTS_LISTED} hosts: a "
                                                     "summary and the hosts needing attention)."),
    forks: int = ForksOpt,
) -> None:
    """Show every host's agent, load, memory and disk at a glance."""
    workspace = load_workspace(workspace_dir)
    hosts = selected(workspace, limit)
    with HostProgress([h.name for h in hosts], "status", enabled=not json_output) as view:
        rows = gather_status(workspace, hosts, info_probe(workspace, 5.0), forks=forks,
                             progress=view.update)
    latest = latest_live_run(workspace.paths.runs)
    render.warn(latest.warnings if latest else ())
    if json_output:
        render.emit_json({"hosts": rows, "latest_run": latest.as_dict() if latest else None})
    elif every or len(rows) <= render.HOSTS_LISTED:
        render.out.print(render.status_table(rows))
    else:
        render.out.print(render.status_overview(rows))
        attention = [r for r in rows if render.needs_attention(r)]
        if attention:
            shown = attention[:render.HOSTS_LISTED]
            render.out.print(render.status_table(
                shown, f"hosts needing attention ({len(shown)} of {len(attention)})"))
        render.out.print(f"{len(rows)} hosts, {len(attention)} needing attention: "
                         "`flctl status --all` for every row, --json for everything")
    if not json_output and latest is not None:
        render.out.print(render.latest_run_line(latest))
    down = [r["host"] for r in rows if not r["reachable"]]
    if down:
        raise HostError(f"unreachable: {render.names_line(down)}"
                        + (" (--json lists them all)" if len(down) > 10 else ""))


@app.command()
def stats(
    workspace_dir: Path = WorkspaceOpt,
    limit: Optional[list[str]] = LimitOpt,
    min_count: int = typer.Option(MIN_COUNT, "--min-count", min=1,
                                  help="A host with fewer rows contributes nothing."),
    bins: int = typer.Option(DEFAULT_BINS, "--bins", min=2, max=MAX_BINS,
                             help="Histogram bins per feature (for the quantiles)."),
    secure: Optional[bool] = typer.Option(
        None, "--secure/--no-secure",
        help="Learn only the federation's sums (secure aggregation): no min, max or per-host "
             "labels, approximate quantiles. Default: training.secure_aggregation."),
    json_output: bool = JsonOpt,
) -> None:
    """Statistics of every host's data without moving a row: per feature count,
    missing values, mean, std, min, max and quantiles; labels per host and how
    skewed each host is. Min, max and quantiles show values of real rows
    (with --secure they are not computed, or approximate)."""
    workspace = load_workspace(workspace_dir)

    def note(text: str) -> None:
        render.err.print(render.literal(text, "yellow"))

    found = stats_workspace(workspace, selected(workspace, limit), min_count=min_count,
                            bins=bins, secure=secure, tell=note)
    for line in describe_findings(found):
        note(line)
    if json_output:
        render.emit_json(found.as_dict())
    else:
        render.out.print(render.feature_table(found))
        render.out.print(render.label_table(found))


@app.command()
@audited("teardown")
def teardown(
    workspace_dir: Path = WorkspaceOpt,
    limit: Optional[list[str]] = LimitOpt,
    forks: int = ForksOpt,
    accept_new: bool = AcceptNewOpt,
    json_output: bool = JsonOpt,
) -> None:
    """Stop agents and remove everything deploy put on the hosts."""
    workspace = load_workspace(workspace_dir)
    hosts = selected(workspace, limit)
    with holding(workspace, "teardown", membership=bool(limit)), \
            HostProgress([h.name for h in hosts], "teardown", enabled=not json_output) as view:
        results = engine.teardown(workspace, hosts, forks=forks, accept_new_host_keys=accept_new,
                                  progress=view.update)
        note_hosts(results)
    if json_output:
        render.emit_json({"hosts": [r.as_dict() for r in results]})
    else:
        render.out.print(render.recap_table(results, "teardown"))
    host_failures(results, "teardown")


def _training_overrides(**values: Any) -> dict[str, Any]:
    return {k: v for k, v in values.items() if v is not None}


def _run_training(workspace: Workspace, overrides: dict[str, Any], limit: Optional[list[str]],
                  run_id: Optional[str], json_output: bool, resume: bool = False,
                  metrics: Optional[tuple[str, int]] = None) -> RunSummary:
    settings = workspace.settings.with_training(**overrides)
    hosts = selected(workspace, limit)
    run_args: dict[str, Any] = {"resume": resume, "resume_rounds": overrides.get("rounds")}
    if metrics is not None:
        run_args.update(metrics_address=metrics[0], metrics_port=metrics[1])
    table = render.round_table(privacy=settings.training.privacy != "none")
    run_id = audit_run_start(workspace, run_id, resume)

    def note(text: str) -> None:
        render.err.print(render.literal(text, "yellow"))

    if json_output:
        return train_workspace(workspace, settings.training, hosts, run_id=run_id,
                               on_message=note, **run_args)
    transfers = TransferProgress()
    with TrainView(table, transfers) as view:
        return train_workspace(workspace, settings.training, hosts, run_id=run_id,
                               on_round=view.round_done, on_message=note,
                               progress=transfers, **run_args)


def _summary_document(summary: RunSummary) -> dict[str, Any]:
    return {
        "run_id": summary.run_id,
        "run_dir": str(summary.run_dir),
        "final_weights": str(summary.final_weights),
        "weights_sha256": summary.weights_sha256,
        "rounds": summary.rounds,
        "hosts": summary.hosts,
        "accuracy": summary.accuracy,
        "eval_loss": summary.eval_loss,
        "epsilon": summary.epsilon,
        "delta": summary.delta,
        "seconds": round(summary.seconds, 3),
        "history": [r.as_dict() for r in summary.history],
    }


def _print_summary(summary: RunSummary) -> None:
    accuracy = "-" if summary.accuracy is None else f"{100 * summary.accuracy:.2f}%"
    render.out.print(
        f"[green]trained[/] {summary.rounds} rounds on {len(summary.hosts)} hosts in "
        f"{summary.seconds:.1f}s, federated accuracy {accuracy}")
    if summary.epsilon is not None:
        render.out.print(f"privacy spent: epsilon {summary.epsilon:.3g} at delta "
                         f"{summary.delta:g}")
    render.out.print(f"weights: {summary.final_weights}")


@app.command()
@audited("train")
def train(
    ctx: typer.Context,
    run: Optional[str] = typer.Argument(
        None, help="With --resume: the run to continue (default: the newest interrupted one)."),
    resume: bool = typer.Option(
        False, "--resume", help="Continue an interrupted run from its last checkpoint, with "
                                "its own settings and hosts (--rounds may change)."),
    workspace_dir: Path = WorkspaceOpt,
    limit: Optional[list[str]] = LimitOpt,
    rounds: Optional[int] = typer.Option(None, "--rounds", "-r", help="Number of rounds."),
    epochs: Optional[int] = typer.Option(None, "--epochs", help="Local epochs per round."),
    lr: Optional[float] = typer.Option(None, "--lr", help="Local learning rate."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Local batch size."),
    fraction: Optional[float] = typer.Option(None, "--fraction", help="Hosts sampled per round."),
    min_hosts: Optional[int] = typer.Option(None, "--min-hosts", help="Replies to accept a round."),
    min_hosts_to_start: Optional[int] = typer.Option(
        None, "--min-hosts-to-start", help="Hosts that must answer before round 1."),
    deadline: Optional[float] = typer.Option(None, "--deadline", help="Seconds per round."),
    round_retries: Optional[int] = typer.Option(
        None, "--round-retries", help="Re-runs of a round short of --min-hosts before stopping."),
    heartbeat: Optional[float] = typer.Option(
        None, "--heartbeat", help="Seconds between agent heartbeats; 3 missed = host down."),
    strategy: Optional[str] = typer.Option(None, "--strategy", help="Aggregation strategy."),
    task: Optional[str] = typer.Option(
        None, "--task", help="Must be the task deployed (training.task at the last deploy)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed for init and sampling."),
    compression: Optional[str] = typer.Option(
        None, "--compression", help="Update encoding: float32, float16, int8 or topk."),
    secure_aggregation: Optional[bool] = typer.Option(
        None, "--secure-aggregation/--no-secure-aggregation",
        help="The coordinator learns only the sum of each round's updates (SecAgg+)."),
    privacy: Optional[str] = typer.Option(
        None, "--privacy", help="Differential privacy: none, central or local (DP-FedAvg)."),
    noise_multiplier: Optional[float] = typer.Option(
        None, "--noise-multiplier", help="DP noise std as a multiple of --clip-norm."),
    clip_norm: Optional[float] = typer.Option(
        None, "--clip-norm", help="DP: L2 bound on each host's update."),
    target_epsilon: Optional[float] = typer.Option(
        None, "--target-epsilon", help="DP: stop before epsilon would exceed this."),
    run_id: Optional[str] = typer.Option(None, "--run-id", help="Name of the run directory."),
    metrics_port: Optional[int] = typer.Option(
        None, "--metrics-port", min=1, max=65535,
        help="Serve live metrics in Prometheus text format on this port while training "
             "(needs `pip install 'flctl\\[prometheus]'`)."),
    metrics_address: str = typer.Option(
        "127.0.0.1", "--metrics-address", help="Address the --metrics-port server binds to."),
    detach: bool = typer.Option(
        False, "--detach", help="Run in the background, past logout and the terminal's end "
                                "(supervised; `flctl runs attach|stop RUN`); print the run's id."),
    json_output: bool = JsonOpt,
) -> None:
    """Run federated rounds against the deployed agents; save the weights locally.

    `flctl train --resume [RUN]` continues an interrupted run after its last
    checkpoint; with the same hosts answering, the result is bit for bit what
    an uninterrupted run would have produced.

    training.tracking (tensorboard | mlflow) also sends the settings and every
    round there; --metrics-port serves live Prometheus metrics meanwhile.
    """
    workspace = load_workspace(workspace_dir)
    overrides = _training_overrides(rounds=rounds, epochs=epochs, lr=lr, batch_size=batch_size,
                                    fraction=fraction, min_hosts=min_hosts,
                                    min_hosts_to_start=min_hosts_to_start, deadline_s=deadline,
                                    round_retries=round_retries, heartbeat_s=heartbeat,
                                    strategy=strategy, task=task, seed=seed,
                                    compression=compression,
                                    secure_aggregation=secure_aggregation, privacy=privacy,
                                    noise_multiplier=noise_multiplier, clip_norm=clip_norm,
                                    target_epsilon=target_epsilon)
    if run is not None and not resume:
        raise ConfigError(f"a run name ({run}) is only taken with --resume")
    if resume and set(overrides) - {"rounds"}:
        raise ConfigError("--resume continues a run with its own settings; only --rounds "
                          "may be given with it")
    if detach:
        start_detached(ctx, workspace, resume=resume, run=run, run_id=run_id,
                       json_output=json_output)
        return
    with holding(workspace, "train", shares_membership=True):
        summary = _run_training(
            workspace, overrides, limit, run if resume else run_id, json_output, resume=resume,
            metrics=None if metrics_port is None else (metrics_address, metrics_port))
    if json_output:
        render.emit_json(_summary_document(summary))
    else:
        _print_summary(summary)


@app.command()
@audited("demo", workspace_param=None)  # its steps write their own lines, below
def demo(
    hosts: int = typer.Option(4, "--hosts", "-n", min=2, max=32, help="Local hosts to start."),
    rounds: Optional[int] = typer.Option(None, "--rounds", "-r", help="Number of rounds."),
    seed: int = typer.Option(0, "--seed", help="Seed for data split, init and sampling."),
    directory: Optional[Path] = typer.Option(
        None, "--dir", help="Keep the workspace here: a new or empty directory (default: a new "
                            "temp directory)."),
    json_output: bool = JsonOpt,
) -> None:
    """Train on the UCI digits split non-IID across local agents, end to end."""
    root = directory or Path(tempfile.mkdtemp(prefix="flctl-demo-"))
    existing = existing_workspace_files(WorkspacePaths(root.resolve()))
    if existing:  # a demo must never replace a real workspace's CA key or inventory
        raise WorkspaceError(f"{root} already holds a workspace ({existing[0].name}); "
                             "`flctl demo --dir` needs a new or empty directory")
    settings = Settings(agent=AgentSettings(port=free_port_block(hosts)))
    init_workspace(root, local_hosts=hosts, seed=seed, settings=settings)
    workspace = load_workspace(root)
    if not json_output:
        render.err.print(f"workspace {root}: starting {hosts} local agents (mutual TLS)")
    with holding(workspace, "demo"):
        try:
            with audit_block("demo deploy", workspace.paths):
                results = deploy_hosts(workspace, None, False, hosts, json_output=True)
                host_failures(results, "deploy")
            overrides = _training_overrides(rounds=rounds, seed=seed)
            with audit_block("demo train", workspace.paths):
                summary = _run_training(workspace, overrides, None, None, json_output)
        finally:
            with audit_block("demo teardown", workspace.paths):
                note_hosts(engine.teardown(workspace, list(workspace.inventory.hosts)))
    if json_output:
        render.emit_json({"workspace": str(root), **_summary_document(summary)})
    else:
        _print_summary(summary)


@app.command()
def logs(
    host: str = typer.Argument(..., help="Host name from the inventory."),
    workspace_dir: Path = WorkspaceOpt,
    lines: int = typer.Option(100, "--lines", "-n", min=0, help="Lines of history."),
    follow: bool = typer.Option(False, "--follow", "-f", help="Keep printing new lines."),
) -> None:
    """Show a host's agent log."""
    workspace = load_workspace(workspace_dir)
    target = workspace.inventory.host(host)

    def show(line: str) -> None:
        # the host's log, as text: escape sequences in it never reach the terminal
        sys.stdout.write(clean_text(line) + "\n")
        sys.stdout.flush()

    code = agent_log(target, str(workspace.paths.state), engine.connect_options(workspace),
                     lines=lines, follow=follow, on_line=show)
    if code not in (0, None):
        raise HostError(f"{host}: could not read the agent log (tail exited with {code})")


app.command("report")(report)


@app.command()
def version(json_output: bool = JsonOpt) -> None:
    """Print the flctl version (with --json: also where it is installed)."""
    if json_output:
        render.emit_json({"version": __version__, "python": sys.version.split()[0],
                          "location": str(Path(flctl_package.__file__).resolve().parent)})
        return
    render.out.print(__version__)


app.command()(top)
app.command("audit")(audit_command)


def _usage_error(exc: BaseException) -> tuple[str, int] | None:
    """A command-line usage error as (one line, exit code); None for anything else.

    Typer raises click's exceptions, or since 0.26 those of its own copy of
    click (no `click` module at all): both carry `exit_code` and
    `format_message()`, so they are told apart by that, not by an import.
    """
    format_message = getattr(exc, "format_message", None)
    exit_code = getattr(exc, "exit_code", None)
    if not callable(format_message) or not isinstance(exit_code, int):
        return None
    message = " ".join(str(format_message()).split())
    command = getattr(getattr(exc, "ctx", None), "command_path", None) or "flctl"
    return f"{message} (see `{command} --help`)", exit_code


def main() -> None:
    """Entry point: expected errors and usage errors become one red line and an exit code."""
    try:
        code = app(standalone_mode=False)
    except FlctlError as exc:
        render.err.print(f"[red]error:[/] {escape(clean_text(exc.message))}", soft_wrap=True)
        sys.exit(exc.exit_code)
    except (KeyboardInterrupt, typer.Abort):
        render.err.print("[red]interrupted[/]")
        sys.exit(EXIT_INTERRUPTED)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except Exception as exc:
        if type(exc).__name__ == "NoArgsIsHelpError":  # bare `flctl`: the help is the answer
            sys.stdout.write(str(exc.format_message()) + "\n")  # type: ignore[attr-defined]
            sys.exit(0)
        usage = _usage_error(exc)
        if usage is None:
            raise
        line, exit_code = usage
        render.err.print(f"[red]error:[/] {escape(line)}", soft_wrap=True)
        sys.exit(exit_code)
    sys.exit(code if isinstance(code, int) else 0)
