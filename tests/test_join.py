"""Hosts join and leave a running federation: `deploy --limit NEW` and
`teardown --limit H` beside a running `flctl train`, with real local agents."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from flctl.coordinator.membership import MembershipChanges, MemberWatch
from flctl.core.layout import Endpoint
from flctl.core.members import Members, parse_members, read_members, record_members
from flctl.core.settings import TrainingSettings
from flctl.net.client import TransportError
from flctl.workspace_lock import ALONE, ALONGSIDE, WorkspaceBusy, workspace_lock

from helpers import flctl_command, local_workspace, run_cli, set_training

# the task, copied into tasks/ as slow.py
SLOW_TASK = Path(__file__).resolve().parents[1] / "scripts" / "slow_task.py"


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory):
    """Three local hosts in the inventory, two of them deployed."""
    for root in local_workspace(tmp_path_factory.mktemp("join"), 3):
        (root / "tasks" / "slow.py").write_text(SLOW_TASK.read_text())
        set_training(root, task="slow:Slow", task_params={"delay": 0.5}, deadline_s=30.0)
        done = run_cli("deploy", "-w", str(root), "--limit", "local1", "--limit", "local2")
        assert done.returncode == 0, done.stderr
        yield root


def metrics(root: Path, run_id: str) -> list[dict]:
    path = root / "runs" / run_id / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def start_train(root: Path, run_id: str, *flags: str) -> subprocess.Popen:
    return subprocess.Popen(
        [*flctl_command(), "train", "-w", str(root), "--run-id", run_id, "--json", *flags],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)


def wait_for(condition, process: subprocess.Popen, what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, f"the run ended before {what}: {process.stderr.read()}"
        assert time.monotonic() < deadline, f"no {what} in {timeout:g} s"
        time.sleep(0.05)


def test_a_host_joins_and_another_leaves_a_running_train(workspace: Path) -> None:
    root, run_id = workspace, "joined"
    process = start_train(root, run_id, "--rounds", "30")
    try:
        wait_for(lambda: len(metrics(root, run_id)) >= 1, process, "first round")
        before_deploy = len(metrics(root, run_id))
        deployed = run_cli("deploy", "-w", str(root), "--limit", "local3", "--json")
        assert deployed.returncode == 0, deployed.stderr   # beside the running train
        wait_for(lambda: any("local3" in r["participants"] for r in metrics(root, run_id)),
                 process, "round with local3")
        before_teardown = len(metrics(root, run_id))
        gone = run_cli("teardown", "-w", str(root), "--limit", "local2", "--json")
        assert gone.returncode == 0, gone.stderr
        after_teardown = len(metrics(root, run_id))
        out, err = process.communicate(timeout=180)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, err
    summary = json.loads(out)
    history = summary["history"]
    assert [r["round"] for r in history] == list(range(1, 31))
    assert after_teardown < 28, "the run was nearly over before local2 left: inconclusive"
    assert metrics(root, run_id) == history   # what the records say is what the run did
    # local3: never before its deploy, then a member answering every round
    joined = next(r["round"] for r in history if "local3" in r["members"])
    assert joined > before_deploy
    for record in history:
        has3 = record["round"] >= joined
        assert ("local3" in record["members"]) == has3, record
        assert ("local3" in record["participants"]) == has3, record
        assert ("local3" in record["hosts"]) == has3, record
    # local2: a member until it was torn down, gone from the round after the
    # one under way when its teardown returned (that one it may drop out of)
    left = next(r["round"] for r in history if "local2" not in r["members"])
    assert before_teardown < left <= after_teardown + 2
    for record in history:
        if record["round"] < left:
            assert "local2" in record["members"], record
        else:
            assert "local2" not in record["members"] and "local2" not in record["hosts"], record
            assert record["participants"] == ["local1", "local3"], record
    assert all(r["members"] for r in history)
    told = " ".join(err.split())
    assert f"local3: joined the federation; it trains from round {joined}" in told
    assert f"local2: left the federation (torn down); the run goes on without it from round " \
           f"{left}" in told
    assert sorted(summary["hosts"]) == ["local1", "local2", "local3"]


def test_resume_follows_the_members_changed_while_it_was_stopped(workspace: Path) -> None:
    """A run killed after local2 joined it; local3 torn down meanwhile: the
    resumed run goes on with local1 and local2 (follows the previous test)."""
    root, run_id = workspace, "resumed"
    assert read_members(root / ".flctl" / "members.json").hosts.keys() == {"local1", "local3"}
    process = start_train(root, run_id, "--rounds", "40")
    try:
        wait_for(lambda: len(metrics(root, run_id)) >= 1, process, "first round")
        assert run_cli("deploy", "-w", str(root), "--limit", "local2").returncode == 0
        state = root / "runs" / run_id / "state.json"
        wait_for(lambda: state.exists() and "local2" in json.loads(state.read_text())["hosts"],
                 process, "checkpoint with local2")
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
    finally:
        if process.poll() is None:
            process.kill()
    stopped = json.loads(state.read_text())
    assert sorted(stopped["hosts"]) == ["local1", "local2", "local3"]
    assert run_cli("teardown", "-w", str(root), "--limit", "local3").returncode == 0
    resumed = run_cli("train", "--resume", run_id, "-w", str(root), "--json",
                      "--rounds", str(stopped["round"] + 3), timeout=180)
    assert resumed.returncode == 0, resumed.stderr
    after = [r for r in metrics(root, run_id) if r["round"] > stopped["round"]]
    assert [r["round"] for r in after] == [stopped["round"] + i for i in (1, 2, 3)]
    for record in after:
        assert record["members"] == ["local1", "local2"], record
        assert record["participants"] == ["local1", "local2"], record
    assert "local3: left the federation" in " ".join(resumed.stderr.split())


def test_beside_a_train_only_one_membership_change_at_a_time(workspace: Path) -> None:
    state = workspace / ".flctl"
    w = str(workspace)
    with workspace_lock(state, "flctl train", shares_membership=True) as mode:
        assert mode == ALONE
        # a full deploy or teardown, or another train, would touch the run's hosts
        for args in (["deploy"], ["teardown"], ["train"]):
            refused = run_cli(*args, "-w", w)
            assert refused.returncode == 3 and "`flctl train`" in refused.stderr, refused
        again = run_cli("deploy", "-w", w, "--limit", "local1")   # a member: refused
        assert again.returncode == 3 and "already deployed" in again.stderr, again.stderr
        assert "Traceback" not in again.stderr and len(again.stderr.strip().splitlines()) == 1
        with workspace_lock(state, "flctl deploy", membership=True) as beside:
            assert beside == ALONGSIDE
            second = run_cli("teardown", "-w", w, "--limit", "local1")
            assert second.returncode == 3 and "`flctl deploy`" in second.stderr, second.stderr
    with workspace_lock(state, "flctl teardown", membership=True) as alone:
        assert alone == ALONE   # no train: the change holds the workspace itself
        with pytest.raises(WorkspaceBusy, match="flctl teardown"):
            with workspace_lock(state, "flctl train", shares_membership=True):
                pass
    with workspace_lock(state, "flctl deploy"):   # not a train: nothing goes beside it
        with pytest.raises(WorkspaceBusy, match="flctl deploy"):
            with workspace_lock(state, "flctl deploy", membership=True):
                pass


def endpoint(name: str, port: int = 9000) -> Endpoint:
    return Endpoint(name, "127.0.0.1", "127.0.0.1", port, name)


def test_the_members_file_says_who_joined_and_left_after_a_serial(tmp_path: Path) -> None:
    path = tmp_path / "members.json"
    first = record_members(path, {"a": endpoint("a"), "b": endpoint("b")}, seed=["old"])
    assert first.serial == 1 and first.hosts["old"] == (0, None)
    again = record_members(path, {"a": endpoint("a")})   # a redeploy is no news
    assert again.serial == 1 and path.read_text() == first.render()
    second = record_members(path, {"c": endpoint("c", 9002)}, torn_down=["b"])
    assert second.serial == 2
    assert second.joined_after(1) == {"c": endpoint("c", 9002)}
    assert second.left_after(1) == {"b"} and second.left_after(2) == set()
    assert second.joined_after(0).keys() == {"a", "c"}   # "old" has no endpoint
    back = record_members(path, {"b": endpoint("b")})
    assert back.serial == 3 and "b" not in back.removed and back.joined_after(2).keys() == {"b"}
    assert parse_members(path.read_text()) == back
    for junk in ("", "[]", '{"serial": -1}', '{"serial": true}', "{"):
        assert parse_members(junk) is None
    odd = parse_members('{"serial": 4, "hosts": {"x": {"serial": 4, "endpoint": '
                        '{"host": "y", "port": 1}}, "y": 3}, "removed": {"z": "1"}}')
    assert odd == Members(4, {"x": (4, None)}, {})   # unusable parts are left out


class FakeClient:
    def __init__(self, name: str) -> None:
        self.name = name
        self.closed = False

    def abort(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True


@pytest.mark.parametrize("training,why", [
    (TrainingSettings(secure_aggregation=True), "secure_aggregation"),
    (TrainingSettings(privacy="central", noise_multiplier=1.0, clip_norm=1.0),
     "central differential privacy"),
])
def test_a_mode_that_cannot_change_members_refuses_with_one_line(
        tmp_path: Path, training: TrainingSettings, why: str) -> None:
    path = tmp_path / "members.json"
    record_members(path, {"a": endpoint("a"), "b": endpoint("b")})
    made: list[str] = []
    told: list[str] = []
    watch = MemberWatch.start(path, lambda e: made.append(e.host) or FakeClient(e.host))
    a, b = FakeClient("a"), FakeClient("b")
    run = SimpleNamespace(clients=[a, b], training=training, members=watch, former=[],
                          on_message=told.append)
    record_members(path, {"c": endpoint("c")}, torn_down=["b"])
    available = MembershipChanges.follow_members(run, [a, b], 3, [])
    assert available == [a, b] and run.clients == [a, b] and not made   # nothing changed
    assert len(told) == 2 and all(why in line for line in told), told
    assert told[0].startswith("b: torn down; it stays in this run's sampling pool as a dropout")
    assert told[1].startswith("c: deployed during the run but not used by it")
    assert MembershipChanges.follow_members(run, available, 4, []) == [a, b]
    assert len(told) == 2   # told once: the file did not change since


class Newcomer(FakeClient):
    """A joining host whose info answer is `info`, or whose info call fails."""

    def __init__(self, name: str, info: object) -> None:
        super().__init__(name)
        self._info = info

    def info(self) -> object:
        if isinstance(self._info, Exception):
            raise self._info
        return self._info


def test_a_newcomer_that_fails_admission_is_left_out_with_one_line(tmp_path: Path) -> None:
    path = tmp_path / "members.json"
    record_members(path, {"a": endpoint("a")})
    answers = {"b": {"name": "someone-else"}, "c": TransportError("cannot connect to c")}
    made: list[Newcomer] = []

    def make(e: Endpoint) -> Newcomer:
        made.append(Newcomer(e.host, answers[e.host]))
        return made[-1]

    told: list[str] = []
    a = FakeClient("a")
    run = SimpleNamespace(clients=[a], training=TrainingSettings(), members=MemberWatch.start(
        path, make), former=[], on_message=told.append, profiles={}, refused=set(),
        task_params={})
    run._admit = lambda client, weights: MembershipChanges._admit(run, client, weights)
    record_members(path, {"b": endpoint("b"), "c": endpoint("c")})
    assert MembershipChanges.follow_members(run, [a], 5, []) == [a]
    assert run.clients == [a] and all(c.closed for c in made) and len(made) == 2
    assert told[0] == "deployed during the run but not admitted: b: its agent answers as 'someone-else'"
    assert told[1].startswith("c: deployed during the run but not answering (cannot connect")
    assert len(told) == 2
