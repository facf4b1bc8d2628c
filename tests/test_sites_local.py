"""Sites on this machine, end to end: real agent processes behind mutual TLS,
two sites of three local hosts and one host in no site.

The coordinator runs in this process (so the same deployed agents serve a
flat run and a site run, and central DP's noise seed can be fixed): a run
through the sites ends with the weights a flat run ends with, within float
tolerance, for FedAvg, FedAdam and central DP; every member is in the
records; an aggregator that dies drops its site for the round, not the run;
settings a site cannot serve, and a site_fit naming a non-member, are refused.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from flctl.agent.proc import is_alive
from flctl.coordinator.records import create_run_dir, load_weights
from flctl.coordinator.rounds import Coordinator
from flctl.coordinator.session import SOCKET_GRACE_S, endpoints_for, workspace_context
from flctl.coordinator.summary import RoundRecord
from flctl.core import pki
from flctl.core.agentconfig import parse_agent_config
from flctl.core.layout import Endpoint
from flctl.core.sitefold import FoldSpec
from flctl.errors import TrainingError
from flctl.net.agent_client import AgentClient
from flctl.net.client import RemoteError, TransportError
from flctl.net.tls import client_context
from flctl.workspace import load_workspace

from helpers import deployed_local_workspace, run_cli, set_training, use_ports

HOSTS = 7
INVENTORY = """\
all:
  vars:
    connection: local
  children:
    berlin:
      aggregator: local2
      hosts:
        local1: {data_path: data/local1.npz}
        local2: {data_path: data/local2.npz}
        local3: {data_path: data/local3.npz}
    paris:
      aggregator: local4
      hosts:
        local4: {data_path: data/local4.npz}
        local5: {data_path: data/local5.npz}
        local6: {data_path: data/local6.npz}
    loose:
      hosts:
        local7: {data_path: data/local7.npz}
"""
SITE_OF = {"local1": "berlin", "local2": "berlin", "local3": "berlin",
           "local4": "paris", "local5": "paris", "local6": "paris"}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("sites")
    assert run_cli("init", str(root), "--local", str(HOSTS)).returncode == 0
    (root / "inventory.yaml").write_text(INVENTORY)
    use_ports(root, HOSTS)
    deployed = run_cli("deploy", "-w", str(root))
    assert deployed.returncode == 0, deployed.stdout + deployed.stderr
    yield root
    run_cli("teardown", "-w", str(root))


def host_dir(root: Path, name: str) -> Path:
    return root / ".flctl" / "hosts" / name


def run(root: Path, *, sites: bool, rounds: int = 3, noise_seed: int | None = None,
        after_round: Any = None, **training: Any) -> tuple[Coordinator, list[np.ndarray],
                                                          list[RoundRecord]]:
    workspace = load_workspace(root)
    settings = workspace.settings.with_training(**{"rounds": rounds, "fraction": 0.75, "seed": 7,
                                                   "deadline_s": 30.0, **training})
    t = settings.training
    context = workspace_context(workspace)
    clients = [AgentClient(e, context, timeout=t.deadline_s + SOCKET_GRACE_S)
               for e in endpoints_for(workspace, workspace.inventory.hosts)]
    records: list[RoundRecord] = []

    def on_round(record: RoundRecord) -> None:
        records.append(record)
        if after_round is not None:
            after_round(record)

    coordinator = Coordinator(clients, t, create_run_dir(workspace.paths.runs),
                              tasks_dir=workspace.paths.tasks, on_round=on_round,
                              ca_pem=workspace.paths.ca_cert.read_bytes(),
                              sites=workspace.inventory.sites if sites else None)
    if noise_seed is not None:
        coordinator.strategy.noise_seed = noise_seed   # type: ignore[attr-defined]
    summary = coordinator.train()
    return coordinator, load_weights(summary.final_weights), records


def test_deploy_writes_site_fields_and_a_site_certificate(workspace: Path) -> None:
    member = parse_agent_config((host_dir(workspace, "local1") / "agent.json").read_text(), "m")
    assert (member.site, member.site_aggregator, member.site_members) == ("berlin", "local2", {})
    aggregator = parse_agent_config((host_dir(workspace, "local2") / "agent.json").read_text(),
                                    "a")
    assert sorted(aggregator.site_members) == ["local1", "local2", "local3"]
    assert all(v.startswith("127.0.0.1:") for v in aggregator.site_members.values())
    cert = Path(aggregator.site_cert or "").read_bytes()
    assert pki.site_identity(cert) == ("berlin", "local2")
    assert Path(aggregator.site_key or "").stat().st_mode & 0o777 == 0o600
    loose = parse_agent_config((host_dir(workspace, "local7") / "agent.json").read_text(), "l")
    assert loose.site is None and not loose.site_members
    again = run_cli("deploy", "-w", str(workspace), "--json").json()
    assert all(h["status"] == "ok" for h in again["hosts"]), again


@pytest.mark.parametrize("training", [
    {"strategy": "fedavg"},
    {"strategy": "fedadam", "strategy_params": {"eta": 0.05}},
    {"strategy": "fedavg", "privacy": "central", "clip_norm": 0.5, "noise_multiplier": 0.3},
], ids=["fedavg", "fedadam", "central-dp"])
def test_a_run_through_sites_ends_where_a_flat_run_does(workspace: Path,
                                                        training: dict[str, Any]) -> None:
    _, flat, flat_records = run(workspace, sites=False, noise_seed=1234, **training)
    coordinator, sited, records = run(workspace, sites=True, noise_seed=1234, **training)
    assert len(flat) == len(sited)
    for a, b in zip(flat, sited):
        assert a.dtype == b.dtype and np.allclose(a, b, rtol=1e-5, atol=1e-7), \
            float(np.max(np.abs(a - b)))
    assert not np.allclose(flat[0], 0)   # it trained
    for f, s in zip(flat_records, records):
        # the same hosts sampled, each member in the records by itself
        assert s.participants == f.participants and len(s.participants) == 6
        assert sorted(s.hosts) == sorted(f.hosts)
        assert all(s.hosts[h]["status"] == "answered" for h in s.participants)
        assert s.hosts[s.participants[0]]["examples"] == f.hosts[f.participants[0]]["examples"]
        assert s.train_loss == pytest.approx(f.train_loss, rel=1e-5)
        # only aggregators (and the loose host) received the model for the fit
        sampled_sites = {SITE_OF[h] for h in s.participants if h in SITE_OF}
        assert len(sampled_sites) == 2
    if training.get("privacy") == "central":
        assert records[-1].epsilon == pytest.approx(flat_records[-1].epsilon)


def test_flctl_train_goes_through_the_sites(workspace: Path) -> None:
    done = run_cli("train", "-w", str(workspace), "--json", "--rounds", "2", timeout=300)
    assert done.returncode == 0, done.stderr
    history = done.json()["history"]
    assert [sorted(r["participants"]) for r in history] == [[f"local{i}" for i in
                                                             range(1, HOSTS + 1)]] * 2
    metrics = (Path(done.json()["run_dir"]) / "metrics.jsonl").read_text().splitlines()
    for line in metrics:
        hosts = json.loads(line)["hosts"]
        assert sorted(hosts) == [f"local{i}" for i in range(1, HOSTS + 1)]
        assert all(h["status"] == "answered" and h["examples"] > 0 for h in hosts.values())


def test_settings_a_site_cannot_serve_are_refused_in_one_line(workspace: Path) -> None:
    for values, setting in [({"strategy": "fedmedian"}, "training.strategy fedmedian"),
                            ({"secure_aggregation": True}, "training.secure_aggregation"),
                            ({"compression": "float16"}, "training.compression float16")]:
        with pytest.raises(TrainingError) as info:
            run(workspace, sites=True, **values)
        message = info.value.message
        assert message.startswith(setting) and "site 'berlin'" in message \
            and "line 6" in message and "\n" not in message, message
    # through the CLI: one red line, no traceback
    done = run_cli("train", "-w", str(workspace), "--strategy", "fedmedian", "--rounds", "1")
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert "training.strategy fedmedian cannot run with the inventory's site 'berlin'" in \
        done.stdout + done.stderr


def aggregator_client(root: Path, name: str, port: int) -> AgentClient:
    pki_dir = root / "pki"
    context = client_context(pki_dir / "ca.crt", pki_dir / "coordinator.crt",
                             pki_dir / "coordinator.key")
    return AgentClient(Endpoint(name, "127.0.0.1", "127.0.0.1", port, name), context,
                       timeout=30)


def agent_port(root: Path, name: str) -> int:
    return parse_agent_config((host_dir(root, name) / "agent.json").read_text(), "a").port


def test_site_fit_naming_a_non_member_is_refused(workspace: Path) -> None:
    with aggregator_client(workspace, "local2", agent_port(workspace, "local2")) as client:
        weights = [np.zeros((4, 3), np.float32), np.zeros(3, np.float32)]
        with pytest.raises(RemoteError, match="'local4' is not a member of site berlin"):
            client.site_fit(weights, "logreg", {}, {"round": 1}, members=["local1", "local4"],
                            fold=FoldSpec("mean").as_meta(), deadline_s=10)
    # a host that is no aggregator serves no site_fit
    with aggregator_client(workspace, "local1", agent_port(workspace, "local1")) as client:
        with pytest.raises(RemoteError, match="local1 is not a site aggregator"):
            client.site_fit(weights, "logreg", {}, {"round": 1}, members=["local1"],
                            fold=FoldSpec("mean").as_meta(), deadline_s=10)


def test_a_dead_aggregator_drops_its_site_for_the_round_not_the_run(workspace: Path) -> None:
    run_dir = host_dir(workspace, "local4") / "run"

    def kill_paris(record: RoundRecord) -> None:
        if record.round != 1:
            return
        pids = [int((run_dir / f).read_text()) for f in ("supervisor.pid", "agent.pid")]
        for pid in pids:   # the supervisor first, or it starts the agent again
            os.kill(pid, signal.SIGKILL)
        for pid in pids:
            while is_alive(pid):
                pass

    try:
        _, weights, records = run(workspace, sites=True, rounds=3, min_hosts=2,
                                  after_round=kill_paris)
    finally:
        assert run_cli("deploy", "-w", str(workspace)).returncode == 0   # back for the others
    assert [r.round for r in records] == [1, 2, 3] and all(np.isfinite(w).all() for w in weights)
    later = records[1]
    paris = [h for h in later.hosts if SITE_OF.get(h) == "paris"]
    assert paris, later.hosts
    for host in paris:
        assert later.hosts[host]["status"] == "dropped"
        assert later.hosts[host]["reason"].startswith("site paris: aggregator local4: ")
    assert any(SITE_OF.get(h) == "berlin" or h == "local7" for h in later.participants)


def site_client(root: Path, aggregator: str, member: str) -> AgentClient:
    """`member`'s agent, reached with `aggregator`'s site certificate."""
    config = parse_agent_config((host_dir(root, aggregator) / "agent.json").read_text(), "a")
    context = client_context(root / "pki" / "ca.crt", Path(config.site_cert or ""),
                             Path(config.site_key or ""))
    return AgentClient(Endpoint(member, "127.0.0.1", "127.0.0.1", agent_port(root, member),
                                member), context, timeout=30)


def test_an_aggregator_may_only_fit_its_own_members(workspace: Path) -> None:
    settings = load_workspace(workspace).settings.training
    params = dict(settings.task_params)
    with aggregator_client(workspace, "local1", agent_port(workspace, "local1")) as coordinator:
        weights, _ = coordinator.init_weights(settings.task, params, 0)
    # its own member: a fit is served
    with site_client(workspace, "local2", "local1") as own:
        reply = own.fit(weights, settings.task, params, {"round": 1, "epochs": 1, "lr": 0.1,
                                                         "batch_size": 32, "seed": 0})
        assert reply.num_examples > 0 and len(reply.weights) == len(weights)
        # ... and nothing else
        for call, kind in [(lambda: own.info(), "info"),
                           (lambda: own.evaluate(weights, settings.task, params, {}), "evaluate"),
                           (lambda: own.init_weights(settings.task, params, 0), "init")]:
            with pytest.raises(RemoteError, match=f"may only ask for fit, not '{kind}'"):
                call()
    # another site's member, and a host in no site: refused at the connection,
    # before any request is read (a fit's model meets a closed connection)
    for aggregator, member, why in [("local2", "local4", "it obeys site paris's aggregator local4"),
                                    ("local4", "local1", "it obeys site berlin's aggregator local2"),
                                    ("local2", "local7", "it is in no site")]:
        with site_client(workspace, aggregator, member) as other:
            with pytest.raises(RemoteError, match=f"may not command {member}: {why}"):
                other.info()
        with site_client(workspace, aggregator, member) as other:
            with pytest.raises((RemoteError, TransportError)):
                other.fit(weights, settings.task, params, {"round": 1})


SLOW_TASK = Path(__file__).resolve().parents[1] / "scripts" / "slow_task.py"
SLOW_S = 1.5   # each fit: long enough to kill the aggregator while its members train
MID_ROUND = """\
all:
  vars:
    connection: local
  children:
    berlin:
      aggregator: local2
      hosts:
        local1: {data_path: data/local1.npz}
        local2: {data_path: data/local2.npz}
        local3: {data_path: data/local3.npz}
    loose:
      hosts:
        local4: {data_path: data/local4.npz}
"""


@pytest.fixture(scope="module")
def slow_sites(tmp_path_factory: pytest.TempPathFactory):
    def prepare(root: Path) -> None:
        (root / "inventory.yaml").write_text(MID_ROUND)
        (root / "tasks" / "slow.py").write_text(SLOW_TASK.read_text())
        set_training(root, task="slow:Slow", task_params={"delay": SLOW_S})

    yield from deployed_local_workspace(tmp_path_factory.mktemp("slow-sites"), 4, prepare)


def test_an_aggregator_killed_mid_round_drops_its_site_for_that_round(slow_sites: Path) -> None:
    """Killed while its members train (round 2 under way, its site_fit in flight):
    that round goes on without the site, and so does the run."""
    run_dir = host_dir(slow_sites, "local2") / "run"
    killed: list[float] = []

    def kill_later() -> None:
        pids = [int((run_dir / f).read_text()) for f in ("supervisor.pid", "agent.pid")]
        for pid in pids:   # the supervisor first, or it starts the agent again
            os.kill(pid, signal.SIGKILL)
        killed.append(time.monotonic())

    def during_round_2(record: RoundRecord) -> None:
        if record.round == 1:   # round 2 starts now; its fits take SLOW_S
            threading.Timer(SLOW_S / 3, kill_later).start()

    try:
        _, weights, records = run(slow_sites, sites=True, rounds=3, min_hosts=1,
                                  fraction=1.0, after_round=during_round_2)
    finally:
        assert run_cli("deploy", "-w", str(slow_sites)).returncode == 0
    assert killed, "the aggregator was not killed"
    assert [r.round for r in records] == [1, 2, 3] and all(np.isfinite(w).all() for w in weights)
    assert set(records[0].participants) == {"local1", "local2", "local3", "local4"}
    second = records[1]
    for host in ("local1", "local2", "local3"):
        assert second.hosts[host]["status"] == "dropped", second.hosts
        assert second.hosts[host]["reason"].startswith("site berlin: aggregator local2: ")
    assert second.participants == ["local4"]
    # the kill came while round 2 ran: after round 1's record, before round 2's
    assert second.seconds >= SLOW_S * 0.9
