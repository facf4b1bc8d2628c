"""Wire a workspace to the coordinator: credentials, endpoints, run dir."""

from __future__ import annotations

import json
import ssl
import threading
from collections.abc import Sequence
from typing import Any, Callable

from flctl.coordinator.control import live_run
from flctl.coordinator.membership import MemberWatch
from flctl.coordinator.openfiles import ensure_open_files
from flctl.coordinator.progress import TransferProgress
from flctl.coordinator.records import (
    MANIFEST,
    Checkpoint,
    RunDir,
    create_run_dir,
    load_checkpoint,
    load_weights,
    read_metrics,
    resumable_run,
)
from flctl.coordinator.rounds import Coordinator
from flctl.coordinator.secure_stats import secure_federated_stats
from flctl.coordinator.stats import federated_stats
from flctl.coordinator.summary import (
    MessageCallback,
    RoundCallback,
    RoundRecord,
    RunSummary,
    plain_settings,
)
from flctl.core.data import load_dataset
from flctl.core.fedstats import FederatedStats
from flctl.core.inventory import Host
from flctl.core.layout import Endpoint, agent_endpoint
from flctl.core.members import read_members
from flctl.core.messages import Limits
from flctl.core.pki import revoked_serials
from flctl.core.settings import TrainingSettings
from flctl.errors import ConfigError, TrainingError
from flctl.net.agent_client import AgentClient, coordinator_context
from flctl.tracking.feed import open_tracking
from flctl.workspace import Workspace

# A reply's arrays must arrive at 1 MiB/s at least (after a 10 s grace) once the
# coordinator has reserved memory for them: far below any real link (the lab's
# wireguard-go moves ~40 MB/s), far above a host that trickles bytes to hold a slot.
MIN_BODY_RATE = float(1 << 20)
SOCKET_GRACE_S = 5.0


def workspace_context(workspace: Workspace) -> ssl.SSLContext:
    p = workspace.paths
    return coordinator_context(p.ca_cert, p.coordinator_cert, p.coordinator_key,
                               p.crl if p.crl.exists() else None)


def workspace_revocations(workspace: Workspace) -> frozenset[int]:
    """The serials the workspace's CA has revoked (for secure-aggregation peers)."""
    p = workspace.paths
    if not p.crl.exists():
        return frozenset()
    return revoked_serials(p.crl.read_bytes(), p.ca_cert.read_bytes())


def endpoints_for(workspace: Workspace, hosts: Sequence[Host]) -> list[Endpoint]:
    order = {h.name: i for i, h in enumerate(workspace.inventory.hosts)}
    return [agent_endpoint(h, workspace.settings, order[h.name]) for h in hosts]


def info_probe(workspace: Workspace, timeout: float = 10.0) -> Callable[[Endpoint], dict[str, Any]]:
    """A function that asks one agent for its info over mutual TLS.

    The TLS context is made at the first call, not now: deploy may renew the
    coordinator's certificate (and the revocation list) before it verifies."""
    contexts: list[ssl.SSLContext] = []
    lock = threading.Lock()

    def probe(endpoint: Endpoint) -> dict[str, Any]:
        with lock:
            if not contexts:
                contexts.append(workspace_context(workspace))
        with AgentClient(endpoint, contexts[0], timeout=timeout) as client:
            return client.info()

    return probe


def train_workspace(
    workspace: Workspace,
    training: TrainingSettings,
    hosts: Sequence[Host],
    *,
    run_id: str | None = None,
    resume: bool = False,
    resume_rounds: int | None = None,
    on_round: RoundCallback = lambda record: None,
    on_message: MessageCallback = lambda text: None,
    progress: TransferProgress | None = None,
    metrics_port: int | None = None,
    metrics_address: str = "127.0.0.1",
) -> RunSummary:
    """Start a run, or with `resume` continue an interrupted one exactly where
    its last checkpoint left it, with the settings and hosts it had then
    (`resume_rounds` may change the number of rounds, nothing else). Hosts
    deployed or torn down meanwhile join or leave it (coordinator.membership);
    hosts of the inventory that are not deployed are not members.

    The run's settings and rounds also go to the tracking sinks it asks for
    (training.tracking; Prometheus on `metrics_port`), which never stop it."""
    checkpoint = None
    serial = None
    if resume:
        run = resumable_run(workspace.paths.runs, run_id)
        checkpoint = load_checkpoint(run)
        saved = dict(checkpoint.state["training"])
        if resume_rounds is not None:
            saved["rounds"] = resume_rounds
        training = TrainingSettings(**saved)
        names = set(checkpoint.state["hosts"])
        hosts = [h for h in workspace.inventory.hosts if h.name in names]
        serial = checkpoint.state.get("members_serial")
        serial = serial if isinstance(serial, int) and not isinstance(serial, bool) else None
    else:
        deployed = read_members(workspace.paths.members)
        serial = 0 if deployed is None else deployed.serial   # later changes join in
        if deployed is not None:   # none: deployed by an older flctl, all are members
            in_file = [h for h in hosts if h.name in deployed.hosts]
            if hosts and not in_file:
                raise TrainingError(f"none of {', '.join(h.name for h in hosts)} is deployed: "
                                    "run `flctl deploy` first")
            hosts = in_file
    # before the run dir exists: a port in use or a missing package is one line
    tracking = open_tracking(plain_settings(training), root=workspace.root,
                             project=workspace.settings.project, metrics_port=metrics_port,
                             metrics_address=metrics_address, resumed=resume, tell=on_message)
    try:
        if checkpoint is None:
            run = create_run_dir(workspace.paths.runs, run_id)
            done = []
        else:
            done = [r for r in read_metrics(run).records if r["round"] <= checkpoint.round]
        # `flctl runs` shows the run running once its coordinator is built (live.running);
        # `flctl runs stop` asks it to end after a round (live.after_round)
        with live_run(run, training.rounds) as live:
            tracking.start(run.path, run.run_id, plain_settings(training), resumed=resume,
                           done=done)

            def tracked(record: RoundRecord) -> None:
                tracking.round(record.as_dict())
                on_round(record)
                live.after_round(record.round)   # checkpointed: a stop asked for ends it here

            summary = _train(workspace, training, hosts, run, checkpoint, serial, tracked,
                             on_message, progress, live.running)
            tracking.finish(summary.final_weights,
                            json.loads((summary.run_dir / MANIFEST).read_text()))
            return summary
    finally:
        tracking.close()


def _train(workspace: Workspace, training: TrainingSettings, hosts: Sequence[Host],
           run: RunDir, checkpoint: Checkpoint | None, serial: int | None,
           on_round: RoundCallback, on_message: MessageCallback,
           progress: TransferProgress | None,
           running: Callable[[], None] = lambda: None) -> RunSummary:
    context = workspace_context(workspace)
    limits = Limits(max_body_bytes=workspace.settings.limits.max_message_bytes,
                    min_body_rate=MIN_BODY_RATE)
    # The round's deadline is the coordinator's to enforce (it aborts late hosts
    # and names the reason); a socket timeout a little past it is only a backstop.

    def make_client(endpoint: Endpoint) -> AgentClient:
        return AgentClient(endpoint, context, timeout=training.deadline_s + SOCKET_GRACE_S,
                           limits=limits)

    members = MemberWatch.start(workspace.paths.members, make_client, serial)
    clients = [make_client(e) for e in endpoints_for(workspace, hosts)]
    eval_data = load_dataset(workspace.root / training.eval_file) if training.eval_file else None
    initial = None
    if training.initial_weights and checkpoint is None:
        path = workspace.root / training.initial_weights
        try:
            initial = load_weights(path)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot read it: {exc}", field="training.initial_weights",
                              file=str(path)) from None
    coordinator = Coordinator(clients, training, run,
                              tasks_dir=workspace.paths.tasks,
                              on_round=on_round, on_message=on_message,
                              resume_from=checkpoint, eval_data=eval_data,
                              ca_pem=workspace.paths.ca_cert.read_bytes(),
                              revoked=workspace_revocations(workspace), initial=initial,
                              progress=progress, members=members,
                              sites=workspace.inventory.sites)
    running()   # its settings are accepted: from here on it is a running run
    return coordinator.train()


def stats_workspace(workspace: Workspace, hosts: Sequence[Host], *, min_count: int,
                    bins: int, secure: bool | None = None,
                    tell: MessageCallback = lambda text: None) -> FederatedStats:
    """`flctl stats`: the federation's statistics over `hosts` (no row moves);
    `secure` (default: training.secure_aggregation) learns only their sums."""
    training = workspace.settings.training
    secure = training.secure_aggregation if secure is None else secure
    context = workspace_context(workspace)
    short = ensure_open_files(len(hosts))
    if short is not None:
        tell(short)
    clients = [AgentClient(e, context, timeout=120.0)
               for e in endpoints_for(workspace, hosts)]
    try:
        if secure:
            return secure_federated_stats(
                clients, ca_pem=workspace.paths.ca_cert.read_bytes(),
                revoked=workspace_revocations(workspace), min_count=min_count, bins=bins,
                threshold=training.secagg_threshold, neighbours=training.secagg_neighbours,
                tell=tell)
        return federated_stats(clients, min_count=min_count, bins=bins, tell=tell)
    finally:
        for client in clients:
            client.close()
