"""Large federations: a bounded worker pool that keeps the round's deadline,
and evaluation on a seeded sample of hosts (training.eval_hosts)."""

from __future__ import annotations

import io
import ipaddress
import resource
import threading
import time
from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner

from flctl.cli import app as cli_app
from flctl.cli.render import HOSTS_LISTED, add_round_row, round_table
from flctl.coordinator import openfiles, rounds
from flctl.coordinator.summary import RoundRecord
from flctl.core.inventory import parse_inventory, render_local_inventory
from flctl.core.settings import TrainingSettings
from flctl.errors import ConfigError, HostError
from flctl.net import fanout
from flctl.net.fanout import MAX_WORKERS, fan_out, pool_size, worker_pool
from flctl.workspace import init_workspace
from test_coordinator import Federation


class FakeClient:
    """A host for fan_out: a name, and an abort that wakes its call."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.aborted = threading.Event()

    def abort(self) -> None:
        self.aborted.set()


def test_the_pool_is_one_worker_per_host_up_to_the_cap() -> None:
    for hosts, workers in [(0, 1), (3, 3), (MAX_WORKERS, MAX_WORKERS), (1000, MAX_WORKERS)]:
        pool = worker_pool(hosts)
        assert pool._max_workers == workers
        pool.shutdown()


@pytest.mark.parametrize(("hosts", "at_once", "limit", "workers"), [
    (1000, 100, 128, 128),    # 100 sampled: discovery and evaluation use all 128
    (1000, 500, 128, 500),    # a round of 500 trains all 500 at once
    (1000, 1000, 128, 1000),  # fraction 1.0: every host at once, as before
    (50, 0, 128, 50), (50, 500, 128, 50), (0, 0, 128, 1),
])
def test_a_round_never_queues_its_own_sample(hosts: int, at_once: int, limit: int,
                                             workers: int) -> None:
    assert pool_size(hosts, at_once, limit) == workers


def test_hosts_sampled_together_train_together(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """With room for 2 workers per fan-out but a round of all 6 hosts, each
    training 1 s, the round takes about 1 s, not 3 (queued fits would start
    only as others finished)."""
    monkeypatch.setattr(fanout, "MAX_WORKERS", 2)
    fed = Federation(tmp_path, [4] * 6)
    try:
        training = TrainingSettings(task="meantask:MeanTask", rounds=1, eval_every=10,
                                    task_params={"slow": list(range(6)), "delay": 1.0})
        coordinator = fed.coordinator(training)
        assert coordinator._pool._max_workers == 6
        record = coordinator.train().history[0]
        assert len(record.participants) == 6
        assert record.fit_seconds < 2.5
        half = fed.coordinator(TrainingSettings(task="meantask:MeanTask", fraction=0.5))
        assert half._pool._max_workers == 3
    finally:
        fed.close()


def test_queued_calls_keep_the_deadline() -> None:
    """Two workers, six hosts whose calls block until aborted: the two running
    are cut at the deadline, the four queued never start, all six fail as
    past the deadline, and the round is not held up by the queue."""
    clients = [FakeClient(f"h{i}") for i in range(6)]
    started: list[str] = []

    def call(client: FakeClient) -> str:
        started.append(client.name)
        if not client.aborted.wait(10):
            return "late"
        raise ConnectionError("aborted")

    with worker_pool(len(clients), limit=2) as pool:
        began = time.monotonic()
        results, failures = fan_out(pool, clients, call, timeout=0.5)  # type: ignore[arg-type]
        took = time.monotonic() - began
        time.sleep(0.3)   # a queued call that started late would show here
    assert results == {}
    assert sorted(failures) == [c.name for c in clients]
    assert set(failures.values()) == {"deadline exceeded"}
    assert sorted(started) == ["h0", "h1"]
    assert took < 3.0


def test_a_queued_call_whose_turn_comes_late_fails_at_once() -> None:
    """One worker, hosts that take 0.3 s each, a 1 s deadline: those that
    fit in the deadline answer, the rest fail without being asked."""
    clients = [FakeClient(f"h{i}") for i in range(8)]
    asked: list[str] = []

    def call(client: FakeClient) -> str:
        asked.append(client.name)
        client.aborted.wait(0.3)
        return client.name

    with worker_pool(len(clients), limit=1) as pool:
        results, failures = fan_out(pool, clients, call, timeout=1.0)  # type: ignore[arg-type]
    assert 2 <= len(results) <= 4 and len(results) + len(failures) == 8
    assert all(reason.startswith("deadline exceeded") for reason in failures.values())
    assert len(asked) <= len(results) + 1   # at most the one cut at the deadline


def test_eval_hosts_defaults_to_a_hundred() -> None:
    assert TrainingSettings().eval_hosts == 100   # every host of a federation up to 100


def test_evaluation_asks_a_seeded_sample_of_hosts(tmp_path: Path) -> None:
    """With training.eval_hosts 2 of 5 hosts, each round's evaluation goes to
    2 hosts drawn from (seed, round): the same draw in a new coordinator (a
    resumed run), all hosts with eval_hosts 0; every host still trains."""
    evaluated: dict[int, list[str]] = {}

    def counting(index: int):
        def change(request, reply):
            if request.kind == "evaluate":
                evaluated.setdefault(request.meta["config"]["round"], []).append(f"h{index}")
            return reply
        return change

    fed = Federation(tmp_path, [5] * 5, tamper={i: counting(i) for i in range(5)})
    try:
        messages: list[str] = []
        training = TrainingSettings(task="meantask:MeanTask", rounds=4, eval_hosts=2, seed=7)
        coordinator = fed.coordinator(training, on_message=messages.append)
        summary = coordinator.train()
        assert all(len(r.participants) == 5 for r in summary.history)
        assert sorted(evaluated) == [1, 2, 3, 4]
        assert all(len(set(hosts)) == 2 for hosts in evaluated.values())
        assert len({tuple(sorted(h)) for h in evaluated.values()}) > 1  # drawn per round
        assert any("evaluating on a sample of 2 of the 5 hosts" in m for m in messages)
        again = fed.coordinator(training)
        for round_number, hosts in evaluated.items():
            assert sorted(c.name for c in again._eval_sample(again.clients, round_number)) \
                == sorted(hosts)
        evaluated.clear()
        fed.coordinator(TrainingSettings(task="meantask:MeanTask", rounds=1,
                                         eval_hosts=0)).train()
        assert sorted(evaluated[1]) == [f"h{i}" for i in range(5)]
    finally:
        fed.close()


class Limits:
    """resource's RLIMIT_NOFILE calls, on numbers of the test's choosing."""

    RLIMIT_NOFILE = resource.RLIMIT_NOFILE
    RLIM_INFINITY = resource.RLIM_INFINITY

    def __init__(self, soft: int, hard: int, refuse: bool = False) -> None:
        self.soft, self.hard, self.refuse = soft, hard, refuse
        self.set: list[tuple[int, int]] = []

    def getrlimit(self, which: int) -> tuple[int, int]:
        assert which == resource.RLIMIT_NOFILE
        return self.soft, self.hard

    def setrlimit(self, which: int, limits: tuple[int, int]) -> None:
        if self.refuse:
            raise ValueError("not allowed")
        self.set.append(limits)
        self.soft, self.hard = limits


@pytest.mark.parametrize(("soft", "hard", "hosts", "raised", "told"), [
    (1024, 4096, 10, [], False),                 # room enough: untouched
    (1024, 4096, 1000, [(1256, 4096)], False),   # raised to what 1000 hosts need
    (1024, 1024, 1000, [], True),                # the hard limit is short: said once
    (1024, resource.RLIM_INFINITY, 2000, [(2256, resource.RLIM_INFINITY)], False),
])
def test_the_open_file_limit_makes_room_for_every_host(
        monkeypatch: pytest.MonkeyPatch, soft: int, hard: int, hosts: int,
        raised: list[tuple[int, int]], told: bool) -> None:
    limits = Limits(soft, hard)
    monkeypatch.setattr(openfiles, "resource", limits)
    line = openfiles.ensure_open_files(hosts)
    assert limits.set == raised
    assert (line is not None) == told
    if told:
        assert line is not None and f"over {hosts} hosts" in line and "ulimit -n" in line


def test_a_refused_raise_is_said(monkeypatch: pytest.MonkeyPatch) -> None:
    limits = Limits(256, 4096, refuse=True)
    monkeypatch.setattr(openfiles, "resource", limits)
    line = openfiles.ensure_open_files(500)
    assert line is not None and line.startswith("this process may open 256 files")


def _rendered(table) -> str:
    console = Console(file=io.StringIO(), width=400, color_system=None)
    console.print(table)
    return console.file.getvalue()  # type: ignore[attr-defined]


def _status_rows(count: int, down: tuple[int, ...] = (), odd: tuple[int, ...] = ()) -> list:
    rows = []
    for i in range(count):
        row = {"host": f"h{i:04d}", "reachable": i not in down,
               "agent": "down" if i in down else "bad answer" if i in odd else "idle",
               "error": "refused" if i in down else None, "n_train": 10, "n_test": 2}
        rows.append(row)
    return rows


def test_status_of_many_hosts_is_a_summary_and_the_hosts_needing_attention(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    init_workspace(tmp_path, local_hosts=2)
    rows = _status_rows(300, down=tuple(range(10, 22)), odd=(5,))
    monkeypatch.setattr(cli_app, "gather_status", lambda *a, **k: [dict(r) for r in rows])
    result = CliRunner().invoke(cli_app.app, ["status", "-w", str(tmp_path)],
                                terminal_width=300)
    text = result.output
    assert "300 hosts" in text
    overview = {line.split("│")[1].strip(): line.split("│")[2].strip()
                for line in text.splitlines() if line.count("│") >= 4
                and line.split("│")[1].strip() in ("idle", "down", "bad answer")}
    assert overview == {"idle": "287", "down": "12", "bad answer": "1"}
    # the rows that need attention, and no idle host by name
    assert "hosts needing attention (13 of 13)" in text
    assert "h0005" in text and "h0021" in text and "h0100" not in text
    assert "13 needing attention: `flctl status --all`" in text
    assert isinstance(result.exception, HostError)
    assert str(result.exception).startswith("unreachable: h0010, h0011") and \
        "and 2 more (--json lists them all)" in str(result.exception)

    every = CliRunner().invoke(cli_app.app, ["status", "-w", str(tmp_path), "--all"],
                               terminal_width=300)
    assert all(f"h{i:04d}" in every.output for i in range(300))


def test_status_probes_forks_hosts_at_a_time_and_reports_progress(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    init_workspace(tmp_path, local_hosts=2)
    asked: dict = {}

    def gather(workspace, hosts, probe, **kwargs):
        asked.update(kwargs)
        return [dict(r) for r in _status_rows(2)]

    monkeypatch.setattr(cli_app, "gather_status", gather)
    result = CliRunner().invoke(cli_app.app, ["status", "-w", str(tmp_path), "--forks", "64"])
    assert result.exit_code == 0, result.output
    assert asked["forks"] == 64 and callable(asked["progress"])


def test_a_few_hosts_keep_their_rows(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    init_workspace(tmp_path, local_hosts=2)
    rows = _status_rows(HOSTS_LISTED)
    monkeypatch.setattr(cli_app, "gather_status", lambda *a, **k: [dict(r) for r in rows])
    result = CliRunner().invoke(cli_app.app, ["status", "-w", str(tmp_path)],
                                terminal_width=300)
    assert result.exit_code == 0 and "needing attention" not in result.output
    assert all(f"h{i:04d}" in result.output for i in range(HOSTS_LISTED))


def test_a_round_row_names_a_few_dropped_hosts_and_counts_the_rest() -> None:
    dropped = {f"h{i:04d}": "deadline exceeded" for i in range(12)}
    record = RoundRecord(round=3, participants=["h0100"], dropped=dropped, train_loss=0.5,
                         eval_loss=None, accuracy=None, seconds=1.0, fit_seconds=1.0,
                         max_compute_s=0.5, bytes_sent=0, bytes_received=0)
    table = round_table()
    add_round_row(table, record)
    text = _rendered(table)
    assert "h0004: deadline exceeded" in text and "h0005" not in text
    assert "and 7 more" in text


def test_an_overlay_too_small_for_the_inventory_names_one_that_fits(tmp_path: Path) -> None:
    names = [(f"h{i:04d}", "data/x.npz") for i in range(1000)]
    with pytest.raises(ConfigError) as caught:
        parse_inventory(render_local_inventory(names), "inventory.yaml",
                        ipaddress.IPv4Network("10.213.0.0/24"), tmp_path)
    assert "has room for 253 hosts, the inventory has 1000 (set overlay.subnet in " \
        "flctl.yaml to 10.213.0.0/22 or wider)" in caught.value.message


def test_a_round_larger_than_the_pool_queues_and_keeps_its_deadline(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Six hosts through two workers: the five quick ones answer from the
    queue, the slow one (last in line) is cut at the round's deadline."""
    monkeypatch.setattr(rounds, "worker_pool",
                        lambda hosts, at_once=0: worker_pool(hosts, limit=2))
    fed = Federation(tmp_path, [4] * 6)
    try:
        training = TrainingSettings(task="meantask:MeanTask", rounds=1, deadline_s=2.0,
                                    task_params={"slow": [5], "delay": 6.0}, min_hosts=2,
                                    heartbeat_s=0.5)
        coordinator = fed.coordinator(training)
        assert coordinator._pool._max_workers == 2
        began = time.monotonic()
        record = coordinator.train().history[0]
        assert record.participants == [f"h{i}" for i in range(5)]
        assert record.dropped == {"h5": "deadline exceeded"}
        assert time.monotonic() - began < 5.5
    finally:
        fed.close()
