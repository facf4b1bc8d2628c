"""A host joins a running federation over the real overlay: lab1 and lab2
train, `flctl deploy --limit lab3` runs beside the train, the hub gains a
WireGuard peer without its interface being restarted, and lab3 trains from
a later round."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from flctl.core.renderers import interface_name
from flctl.workspace import load_workspace
from test_join import SLOW_TASK, metrics, wait_for

from helpers import deploy_json, flctl_command, run_cli, set_training
from lab import lab_available, lab_up

pytestmark = [pytest.mark.lab, pytest.mark.skipif(lab_available() is not None,
                                                  reason=str(lab_available()))]


def hub_peers(interface: str) -> dict[str, tuple[int, int]]:
    """The hub's peers: public key -> (received, sent) bytes (`wg show dump`)."""
    dump = subprocess.run(["wg", "show", interface, "dump"], capture_output=True, text=True,
                          check=True).stdout.splitlines()[1:]
    return {f[0]: (int(f[5]), int(f[6])) for f in (line.split("\t") for line in dump)}


def test_a_host_deployed_during_a_train_joins_it_through_a_live_hub(
        tmp_path_factory: pytest.TempPathFactory) -> None:
    workspace = tmp_path_factory.mktemp("joinws")
    lab = lab_up(3, workspace)
    process: subprocess.Popen | None = None
    try:
        (workspace / "tasks" / "slow.py").write_text(SLOW_TASK.read_text())
        set_training(workspace, task="slow:Slow", task_params={"delay": 1.0}, deadline_s=60.0)
        first = deploy_json(workspace, "--limit", "lab1", "--limit", "lab2")
        assert first["code"] == 0, first
        interface = interface_name(load_workspace(workspace).settings.project)
        ifindex = Path(f"/sys/class/net/{interface}/ifindex")
        index_before = ifindex.read_text()
        process = subprocess.Popen(
            [*flctl_command(), "train", "-w", str(workspace), "--run-id", "joined",
             "--rounds", "40", "--json"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
        wait_for(lambda: len(metrics(workspace, "joined")) >= 1, process, "first round", 300)
        peers_before = hub_peers(interface)
        assert len(peers_before) == 2 and all(rx > 0 for rx, _ in peers_before.values())
        before_deploy = len(metrics(workspace, "joined"))
        joined = deploy_json(workspace, "--limit", "lab3")
        assert joined["code"] == 0, joined   # beside the running train
        hub = next(h for h in joined["hosts"] if h["host"] == "hub")
        assert hub["status"] == "changed", hub
        # the same interface, its old peers' counters still counting: not restarted
        assert ifindex.read_text() == index_before
        peers_after = hub_peers(interface)
        assert set(peers_before) < set(peers_after) and len(peers_after) == 3
        for key, (rx, tx) in peers_before.items():
            assert peers_after[key][0] >= rx and peers_after[key][1] >= tx, (key, peers_after)
        wait_for(lambda: any("lab3" in r["participants"] for r in metrics(workspace, "joined")),
                 process, "round with lab3", 300)
        process.terminate()   # the join is proven; no need for the other rounds
        _, err = process.communicate(timeout=120)
    finally:
        if process is not None and process.poll() is None:
            process.kill()
        run_cli("teardown", "-w", str(workspace), timeout=300)
        lab.down()
    history = metrics(workspace, "joined")
    first_round = next(r["round"] for r in history if "lab3" in r["members"])
    assert first_round > before_deploy
    for record in history:
        assert record["members"] == (["lab1", "lab2", "lab3"] if record["round"] >= first_round
                                     else ["lab1", "lab2"]), record
        if record["round"] >= first_round:
            assert record["participants"] == ["lab1", "lab2", "lab3"], record
    assert "lab3: joined the federation" in " ".join(err.split())
    assert ifindex.exists() is False   # teardown took the hub down again
    assert json.loads((workspace / ".flctl" / "members.json").read_text())["hosts"] == {}
