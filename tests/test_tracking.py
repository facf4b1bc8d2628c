"""TensorBoard, MLflow and Prometheus beside real local runs, read back with
the libraries' own readers; a failing sink never stops training."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from flctl.coordinator.records import load_weights
from flctl.coordinator.session import train_workspace
from flctl.core.settings import parse_settings
from flctl.errors import ConfigError
from flctl.net.ports import free_port_block
from flctl.workspace import load_workspace

from helpers import deployed_local_workspace, flctl_command, run_cli, set_training

HOSTS = 3
ROUNDS = 4
SEED = 3


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory):
    yield from deployed_local_workspace(tmp_path_factory.mktemp("tracking"), HOSTS)


def train(root: Path, run_id: str, messages: list[str] | None = None, on_round=None,
          rounds: int = ROUNDS, metrics_port: int | None = None, **values: Any):
    """A run in this process (through train_workspace, like `flctl train`)."""
    workspace = load_workspace(root)
    training = workspace.settings.with_training(rounds=rounds, seed=SEED, **values).training
    return train_workspace(workspace, training, workspace.inventory.hosts, run_id=run_id,
                           on_message=(messages if messages is not None else []).append,
                           on_round=on_round or (lambda record: None),
                           metrics_port=metrics_port)


@pytest.fixture(scope="module")
def untracked(workspace: Path):
    """The same run with no sink: tracking must not change a single weight."""
    return train(workspace, "untracked")


def notes(messages: list[str]) -> list[str]:
    """The tracking sinks' warnings among the run's messages."""
    return [m for m in messages if m.startswith("tracking")]


def same_weights(a: Path, b: Path) -> bool:
    x, y = load_weights(a), load_weights(b)
    return len(x) == len(y) and all(np.array_equal(p, q) for p, q in zip(x, y))


def test_tensorboard_holds_settings_and_every_round(workspace: Path, untracked,
                                                    tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    messages: list[str] = []
    summary = train(workspace, "tb", messages, tracking="tensorboard",
                    tracking_dir=str(tmp_path / "tb"))
    assert notes(messages) == []
    assert same_weights(summary.final_weights, untracked.final_weights)
    events = EventAccumulator(str(tmp_path / "tb" / "tb"), size_guidance={"tensors": 0})
    events.Reload()
    accuracy = events.Scalars("accuracy")
    assert [e.step for e in accuracy] == list(range(1, ROUNDS + 1))
    assert [e.value for e in accuracy] == pytest.approx(
        [r.accuracy for r in summary.history], rel=1e-6)
    assert [e.value for e in events.Scalars("bytes_sent")] == [
        float(r.bytes_sent) for r in summary.history]
    assert [e.value for e in events.Scalars("hosts_answered")] == [float(HOSTS)] * ROUNDS
    assert "train_loss" in events.Tags()["scalars"] and "seconds" in events.Tags()["scalars"]
    settings = events.Tensors("settings")[0].tensor_proto.string_val[0].decode()
    assert "| rounds | 4 |" in settings and '| task | "logreg" |' in settings
    assert "_hparams_/session_start_info" in events.Tags()["tensors"]
    manifest = events.Tensors("manifest")[0]
    assert manifest.step == ROUNDS and summary.weights_sha256 in \
        manifest.tensor_proto.string_val[0].decode()


def test_tensorboard_defaults_to_one_logdir_per_workspace(workspace: Path) -> None:
    summary = train(workspace, "tb-default", rounds=2, tracking="tensorboard")
    assert list((workspace / "tensorboard" / "tb-default").glob("events.out.tfevents.*"))
    state = json.loads((summary.run_dir / "tracking.json").read_text())
    assert state["tensorboard"] == {"logdir": str(workspace / "tensorboard" / "tb-default"),
                                    "last_round": 2}


def mlflow_client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def test_mlflow_holds_params_metrics_and_the_final_weights(
        workspace: Path, untracked, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # a sqlite store's artifacts go to MLflow's ./mlruns
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    messages: list[str] = []
    summary = train(workspace, "ml", messages, tracking="mlflow", tracking_uri=uri,
                    tracking_experiment="digits")
    assert notes(messages) == []
    assert same_weights(summary.final_weights, untracked.final_weights)
    client = mlflow_client(uri)
    experiment = client.get_experiment_by_name("digits")
    [run] = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == "ml" and run.info.status == "FINISHED"
    assert run.data.params["rounds"] == "4" and run.data.params["task"] == "logreg"
    assert run.data.params["seed"] == str(SEED)
    history = client.get_metric_history(run.info.run_id, "accuracy")
    assert sorted(m.step for m in history) == list(range(1, ROUNDS + 1))
    assert [m.value for m in sorted(history, key=lambda m: m.step)] == pytest.approx(
        [r.accuracy for r in summary.history])
    assert {a.path for a in client.list_artifacts(run.info.run_id)} == {
        "final.npz", "manifest.json"}
    local = client.download_artifacts(run.info.run_id, "final.npz", str(tmp_path))
    assert same_weights(Path(local), summary.final_weights)
    manifest = json.loads(Path(client.download_artifacts(
        run.info.run_id, "manifest.json", str(tmp_path))).read_text())
    assert manifest["weights_sha256"] == summary.weights_sha256
    state = json.loads((summary.run_dir / "tracking.json").read_text())["mlflow"]
    assert state["run_id"] == run.info.run_id and state["last_round"] == ROUNDS


def test_mlflow_without_a_uri_uses_its_own_default_store(
        workspace: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capfd: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    summary = train(workspace, "ml-default", rounds=2, tracking="mlflow")
    out, err = capfd.readouterr()
    assert "mlflow" not in (out + err).lower()  # its INFO lines (a new store's tables) kept quiet
    state = json.loads((summary.run_dir / "tracking.json").read_text())["mlflow"]
    assert str(tmp_path) in state["tracking_uri"]  # MLflow's local store, in the cwd
    client = mlflow_client(state["tracking_uri"])
    experiment = client.get_experiment_by_name(load_workspace(workspace).settings.project)
    [run] = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == "ml-default" and run.info.status == "FINISHED"
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "seconds")) == [1, 2]


def metrics_lines(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.mark.parametrize("sink", ["mlflow", "tensorboard"])
def test_a_resumed_run_continues_the_same_tracking_run(workspace: Path, tmp_path: Path,
                                                       sink: str) -> None:
    """kill -9 after round 3 or so, `flctl train --resume`: one MLflow run / one
    TensorBoard log dir with every step exactly once."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow_client(uri).search_experiments()  # the store's tables, made before the kill
    rounds = 30
    set_training(workspace, tracking=sink, tracking_uri=uri, tracking_dir=str(tmp_path / "tb"))
    try:
        run_dir = workspace / "runs" / f"cut-{sink}"
        process = subprocess.Popen(  # in tmp_path: MLflow's artifacts go to ./mlruns
            [*flctl_command(), "train", "-w", str(workspace), "--rounds", str(rounds), "--json",
             "--run-id", run_dir.name], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            stdin=subprocess.DEVNULL, cwd=tmp_path)
        deadline = time.monotonic() + 120
        while len(metrics_lines(run_dir)) < 3 and time.monotonic() < deadline \
                and process.poll() is None:
            time.sleep(0.005)
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
        assert not (run_dir / "final.npz").exists(), "the run finished before it was killed"
        resumed = run_cli("train", "--resume", run_dir.name, "-w", str(workspace), "--json",
                          timeout=300, cwd=tmp_path)
        assert resumed.returncode == 0, resumed.stderr
        assert "tracking" not in resumed.stderr
    finally:
        set_training(workspace, tracking="none", tracking_uri="", tracking_dir="")
    steps = list(range(1, rounds + 1))
    if sink == "mlflow":
        client = mlflow_client(uri)
        experiment = client.get_experiment_by_name(load_workspace(workspace).settings.project)
        [run] = client.search_runs([experiment.experiment_id])
        assert run.info.run_name == run_dir.name and run.info.status == "FINISHED"
        history = client.get_metric_history(run.info.run_id, "seconds")
        assert sorted(m.step for m in history) == steps
        assert {a.path for a in client.list_artifacts(run.info.run_id)} == {
            "final.npz", "manifest.json"}
    else:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        events = EventAccumulator(str(tmp_path / "tb" / run_dir.name))
        events.Reload()
        assert [e.step for e in events.Scalars("seconds")] == steps
    assert [m["round"] for m in metrics_lines(run_dir)] == steps


def test_an_unreachable_tracking_server_warns_once_and_training_goes_on(
        workspace: Path, untracked) -> None:
    port = free_port_block(1)  # nothing listens there
    messages: list[str] = []
    started = time.monotonic()
    summary = train(workspace, "unreachable", messages, tracking="mlflow",
                    tracking_uri=f"http://127.0.0.1:{port}")
    assert time.monotonic() - started < 120
    [note] = notes(messages)
    assert f"cannot reach the tracking server at http://127.0.0.1:{port}" in note
    assert "training goes on" in note and "\n" not in note
    assert same_weights(summary.final_weights, untracked.final_weights)


def test_a_sink_that_raises_is_one_warning_and_turned_off(
        workspace: Path, untracked, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from flctl.tracking.tensorboard import TensorBoardTracker

    calls: list[int] = []

    def broken(self, record) -> None:
        calls.append(record["round"])
        raise RuntimeError("disk on fire\nsecond line")

    monkeypatch.setattr(TensorBoardTracker, "round", broken)
    messages: list[str] = []
    summary = train(workspace, "broken", messages, tracking="tensorboard",
                    tracking_dir=str(tmp_path))
    assert calls == [1]  # off after its first failure
    assert notes(messages) == ["tracking: tensorboard: round failed: disk on fire; tensorboard is off "
                        "for the rest of this run, training goes on"]
    assert same_weights(summary.final_weights, untracked.final_weights)


def scrape(port: int) -> dict[str, list[tuple[dict[str, str], float]]]:
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
        text = answer.read().decode()
    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((sample.labels, sample.value))
    return samples


def test_prometheus_metrics_are_scraped_over_http_during_a_run(workspace: Path) -> None:
    port = free_port_block(1)
    scraped: list[dict] = []
    summary = train(workspace, "prom", on_round=lambda record: scraped.append(scrape(port)),
                    metrics_port=port)
    assert [s["flctl_rounds_done"][0][1] for s in scraped] == list(range(1, ROUNDS + 1))
    assert [s["flctl_hosts_answering"][0][1] for s in scraped] == [HOSTS] * ROUNDS
    assert scraped[-1]["flctl_last_accuracy"][0][1] == pytest.approx(summary.accuracy)
    assert scraped[-1]["flctl_bytes_sent_total"][0][1] == sum(r.bytes_sent
                                                               for r in summary.history)
    assert scraped[-1]["flctl_bytes_received_total"][0][1] == sum(
        r.bytes_received for r in summary.history)
    seen = {labels["host"]: value for labels, value in
            scraped[-1]["flctl_host_last_seen_timestamp_seconds"]}
    assert set(seen) == set(summary.hosts)
    assert all(abs(value - time.time()) < 600 for value in seen.values())
    assert scraped[0]["flctl_run_info"][0][0]["run_id"] == "prom"
    with pytest.raises(OSError):  # the server is gone with the run
        scrape(port)


def test_prometheus_shows_each_hosts_last_fit_seconds() -> None:
    """Per-host entries of a record (the metrics.jsonl "hosts" format)."""
    from flctl.tracking.prometheus import PrometheusExporter

    port = free_port_block(1)
    exporter = PrometheusExporter(port)
    try:
        record = {"round": 7, "participants": ["a", "b"], "dropped": {"c": "down"},
                  "accuracy": None, "seconds": 1.5, "bytes_sent": 10, "bytes_received": 20,
                  "hosts": {"a": {"status": "answered", "fit_s": 0.25, "bytes_sent": 5},
                            "b": {"status": "answered", "fit_s": 1.75, "bytes_sent": 5},
                            "c": {"status": "straggled", "reason": "deadline"}}}
        exporter.round(record)
        exporter.round({**record, "round": 8, "hosts": {
            "a": {"status": "answered", "fit_s": 0.5}, "b": {"status": "dropped"}}})
        samples = scrape(port)
    finally:
        exporter.close()
    fit = {labels["host"]: value for labels, value in samples["flctl_host_fit_seconds"]}
    assert fit == {"a": 0.5, "b": 1.75}  # b's last answered round; c never answered
    assert {labels["host"] for labels, _ in
            samples["flctl_host_last_seen_timestamp_seconds"]} == {"a", "b"}
    assert samples["flctl_rounds_done"][0][1] == 8
    assert samples["flctl_hosts_answering"][0][1] == 1
    assert samples["flctl_bytes_received_total"][0][1] == 40
    assert "flctl_last_accuracy" not in {k for k, v in samples.items() if v and v[0][1] != 0}


def test_a_metrics_port_in_use_is_one_line_before_round_1(workspace: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        runs_before = set((workspace / "runs").glob("*"))
        result = run_cli("train", "-w", str(workspace), "--metrics-port", str(port))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and f"127.0.0.1:{port}" in lines[0] and "already in use" in lines[0]
    assert set((workspace / "runs").glob("*")) == runs_before  # no run was started


def test_a_missing_package_names_the_extra(monkeypatch: pytest.MonkeyPatch,
                                           tmp_path: Path) -> None:
    import importlib.util

    from flctl.tracking.feed import open_tracking

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "mlflow" else real(name, *a))
    settings = {"tracking": "mlflow", "tracking_uri": "", "tracking_dir": ""}
    with pytest.raises(ConfigError, match=r"pip install 'flctl\[mlflow\]'"):
        open_tracking(settings, root=tmp_path, project="p", tell=print)
    told: list[str] = []
    open_tracking(settings, root=tmp_path, project="p", resumed=True, tell=told.append).close()
    assert len(told) == 1 and "flctl[mlflow]" in told[0] and "goes on without it" in told[0]
    monkeypatch.setitem(sys.modules, "prometheus_client", None)
    with pytest.raises(ConfigError, match=r"pip install 'flctl\[prometheus\]'"):
        open_tracking({"tracking": "none"}, root=tmp_path, project="p", metrics_port=1,
                      tell=print)


class Recorder:
    """A sink that records what it was given (and may fail on a round)."""

    name = "recorder"

    def __init__(self, fail_at: int = 0) -> None:
        self.calls: list[tuple] = []
        self.fail_at = fail_at

    def start(self, run_id, settings, saved):
        self.calls.append(("start", run_id, saved))
        return {"id": f"tracked-{run_id}"}

    def round(self, record) -> None:
        if record["round"] == self.fail_at:
            raise OSError("no space left on device")
        self.calls.append(("round", record["round"]))

    def finish(self, final_path, manifest) -> None:
        self.calls.append(("finish", manifest["rounds"]))

    def close(self) -> None:
        self.calls.append(("close",))


def test_a_resume_replays_only_the_checkpointed_rounds_a_sink_missed(tmp_path: Path) -> None:
    from flctl.tracking.feed import Tracking

    told: list[str] = []
    first = Recorder()
    tracking = Tracking([], [first], told.append)
    tracking.start(tmp_path, "run", {"rounds": 5}, resumed=False)
    for n in (1, 2):
        tracking.round({"round": n})
    tracking.close()  # killed before round 3 reached the sink
    assert first.calls == [("start", "run", None), ("round", 1), ("round", 2), ("close",)]
    assert json.loads((tmp_path / "tracking.json").read_text()) == {
        "recorder": {"id": "tracked-run", "last_round": 2}}

    again = Recorder()
    tracking = Tracking([], [again], told.append)
    tracking.start(tmp_path, "run", {"rounds": 5}, resumed=True,
                   done=[{"round": n} for n in (1, 2, 3)])
    for n in (4, 5):
        tracking.round({"round": n})
    tracking.finish(tmp_path / "final.npz", {"rounds": 5})
    tracking.close()
    assert again.calls == [("start", "run", {"id": "tracked-run", "last_round": 2}),
                           ("round", 3), ("round", 4), ("round", 5), ("finish", 5), ("close",)]
    assert told == []


def test_tensorboard_resumed_after_a_kill_between_its_write_and_tracking_json(
        tmp_path: Path) -> None:
    """Round 3 reached the event file, tracking.json still says 2: the log dir
    itself says what it holds, so round 3 is not written twice."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from flctl.tracking.feed import Tracking
    from flctl.tracking.tensorboard import TensorBoardTracker

    def record(n: int) -> dict:
        return {"round": n, "seconds": 0.5 + n, "participants": ["a"], "dropped": {}}

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    tracking = Tracking([], [TensorBoardTracker(tmp_path / "tb")], print)
    tracking.start(run_dir, "r", {"rounds": 4}, resumed=False)
    for n in (1, 2, 3):
        tracking.round(record(n))
    tracking.close()
    state = json.loads((run_dir / "tracking.json").read_text())
    state["tensorboard"]["last_round"] = 2
    (run_dir / "tracking.json").write_text(json.dumps(state))
    told: list[str] = []
    tracking = Tracking([], [TensorBoardTracker(tmp_path / "tb")], told.append)
    tracking.start(run_dir, "r", {"rounds": 4}, resumed=True, done=[record(n) for n in (1, 2, 3)])
    tracking.round(record(4))
    tracking.finish(run_dir / "final.npz", {"rounds": 4})
    tracking.close()
    assert told == []
    events = EventAccumulator(str(tmp_path / "tb" / "r"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("seconds")] == [
        (n, 0.5 + n) for n in (1, 2, 3, 4)]


def test_a_sink_failing_mid_run_is_one_warning_and_others_go_on(tmp_path: Path) -> None:
    from flctl.tracking.feed import Tracking

    told: list[str] = []
    failing, live = Recorder(fail_at=2), Recorder()
    tracking = Tracking([live], [failing], told.append)
    tracking.start(tmp_path, "run", {}, resumed=False)
    for n in (1, 2, 3, 4):
        tracking.round({"round": n})
    tracking.finish(tmp_path / "final.npz", {"rounds": 4})
    tracking.close()
    assert told == ["tracking: recorder: round failed: no space left on device; recorder is "
                    "off for the rest of this run, training goes on"]
    assert failing.calls == [("start", "run", None), ("round", 1), ("close",)]
    assert live.calls[-2:] == [("finish", 4), ("close",)]
    assert [c for c in live.calls if c[0] == "round"] == [("round", n) for n in (1, 2, 3, 4)]
    state = json.loads((tmp_path / "tracking.json").read_text())
    assert state["recorder"]["last_round"] == 1  # a resume replays from round 2


def test_tracking_settings_are_checked_with_their_line() -> None:
    with pytest.raises(ConfigError) as error:
        parse_settings("training:\n  rounds: 3\n  tracking: wandb\n", "flctl.yaml")
    assert "flctl.yaml:3: training.tracking:" in str(error.value)
    assert "'tensorboard'" in str(error.value)
    parsed = parse_settings("training:\n  tracking: mlflow\n  tracking_uri: http://h:5000\n",
                            "flctl.yaml").training
    assert (parsed.tracking, parsed.tracking_uri, parsed.tracking_dir) == (
        "mlflow", "http://h:5000", "")
