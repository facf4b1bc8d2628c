"""The round loop against in-process agents (real TLS sockets, threads)."""

from __future__ import annotations

import json
import math
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from flctl.agent.requests import RequestHandler
from flctl.coordinator.budget import MemoryBudget
from flctl.coordinator.progress import TransferProgress
from flctl.coordinator.records import create_run_dir, load_weights
from flctl.coordinator.rounds import Coordinator
from flctl.coordinator.summary import RunSummary
from flctl.core import pki
from flctl.core.agentconfig import AgentConfig
from flctl.core.data import Dataset, save_dataset
from flctl.core.layout import Endpoint
from flctl.core.messages import DEFAULT_LIMITS, Limits, Message
from flctl.core.settings import TrainingSettings
from flctl.errors import FlctlError, TrainingError
from flctl.net.agent_client import AgentClient
from flctl.net.server import FrameServer
from flctl.net.tls import client_context, server_context

MEAN_TASK = '''
import os
import time
import numpy as np

class MeanTask:
    """The update is the host's data mean; hosts named in `slow` sleep first
    (only while the file `slow_while` exists, when it is given)."""

    def __init__(self, slow=(), delay=0.0, slow_while=""):
        self.slow = set(slow)
        self.delay = float(delay)
        self.slow_while = slow_while

    def init(self, seed):
        return [np.zeros(3, dtype=np.float32)]

    def fit(self, weights, data, config):
        if int(data.x_train[0, 0]) in self.slow and (
                not self.slow_while or os.path.exists(self.slow_while)):
            time.sleep(self.delay)
        mean = data.x_train.mean(axis=0).astype(np.float32)
        return [mean], len(data.x_train), {"train_loss": float(mean.sum())}

    def evaluate(self, weights, data, config):
        return 0.5, len(data.x_train), {"accuracy": 1.0}
'''


class FrozenServer(FrameServer):
    """An agent whose process stopped mid-request: it neither answers nor sends
    heartbeats (what SIGSTOP or a dead link looks like from the coordinator)."""

    def _handle_with_heartbeats(self, tls, request, peer):
        return self._handle(request, peer)


def gone_before_unmask(service: RequestHandler):
    """A host that sends its masked update and then drops out of the round."""
    def handle(request, peer):
        if request.kind == "secagg_unmask":
            raise TrainingError("host went away")
        return service.handle(request, peer)
    return handle


def tampered(handle, change):
    """A host that answers `change(request, honest reply)` instead of the honest reply."""
    def handler(request, peer):
        return change(request, handle(request, peer))
    return handler


class Federation:
    def __init__(self, root: Path, sizes: list[int], frozen: tuple[int, ...] = (),
                 leaves: tuple[int, ...] = (), spread: float = 1.0,
                 task: str = "meantask:MeanTask", tamper: dict | None = None,
                 limits: Limits = DEFAULT_LIMITS, tasks: dict[str, str] | None = None,
                 frozen_parts: dict[int, Path] | None = None) -> None:
        self.root = root
        self.limits = limits
        ca_key, ca_cert = pki.make_ca("test CA")
        (root / "ca.crt").write_bytes(ca_cert)
        (root / "tasks").mkdir()
        (root / "tasks" / "meantask.py").write_text(MEAN_TASK)
        for module, source in (tasks or {}).items():
            (root / "tasks" / f"{module}.py").write_text(source)
        key, cert = pki.coordinator_certificate(ca_key, ca_cert)
        (root / "c.key").write_bytes(key)
        (root / "c.crt").write_bytes(cert)
        self.context = client_context(root / "ca.crt", root / "c.crt", root / "c.key")
        self.servers: list[FrameServer] = []
        self.services: list[RequestHandler] = []
        self.endpoints: list[Endpoint] = []
        self.means: list[np.ndarray] = []
        for index, size in enumerate(sizes):
            name = f"h{index}"
            key, cert = pki.issue_certificate(ca_key, ca_cert, name, [name], ["127.0.0.1"])
            (root / f"{name}.key").write_bytes(key)
            (root / f"{name}.crt").write_bytes(cert)
            x = np.full((size, 3), spread * index, dtype=np.float32)
            x[:, 1] = np.arange(size) / size  # update coordinates stay below 1
            save_dataset(Dataset(x, np.zeros(size, dtype=np.int64)), root / f"{name}.npz")
            self.means.append(x.mean(axis=0))
            config = AgentConfig(name=name, project="t", bind_address="127.0.0.1", port=0,
                                 ca_cert=str(root / "ca.crt"), cert=str(root / f"{name}.crt"),
                                 key=str(root / f"{name}.key"), data_path=str(root / f"{name}.npz"),
                                 state_file=str(root / f"{name}.state"),
                                 task=task, tasks_dir=str(root / "tasks"),
                                 frozen_path=str((frozen_parts or {})[index])
                                 if index in (frozen_parts or {}) else None)
            server_class = FrozenServer if index in frozen else FrameServer
            service = RequestHandler(config)
            self.services.append(service)
            handler = gone_before_unmask(service) if index in leaves else service.handle
            if tamper and index in tamper:
                handler = tampered(handler, tamper[index])
            server = server_class("127.0.0.1", 0, server_context(root / "ca.crt",
                                 root / f"{name}.crt", root / f"{name}.key"), handler,
                                 limits=limits, receiver=service.transfers.receiver)
            server.start()
            self.servers.append(server)
            self.endpoints.append(Endpoint(name, "127.0.0.1", "127.0.0.1", server.address[1], name))

    def coordinator(self, training: TrainingSettings, **kwargs) -> Coordinator:
        clients = [AgentClient(e, self.context, timeout=30, limits=self.limits)
                   for e in self.endpoints]
        return Coordinator(clients, training, create_run_dir(self.root / "runs"),
                           tasks_dir=self.root / "tasks",
                           ca_pem=(self.root / "ca.crt").read_bytes(), **kwargs)

    def close(self) -> None:
        for server in self.servers:
            server.stop()


@pytest.fixture
def federation(tmp_path: Path):
    fed = Federation(tmp_path, [10, 30, 60])
    yield fed
    fed.close()


def test_round_result_is_the_example_weighted_mean(federation: Federation) -> None:
    training = TrainingSettings(task="meantask:MeanTask", rounds=2)
    summary = federation.coordinator(training).train()
    weights = np.array([10, 30, 60], dtype=np.float64)
    expected = sum(w * m for w, m in zip(weights, federation.means)) / weights.sum()
    [result] = load_weights(summary.final_weights)
    np.testing.assert_allclose(result, expected, rtol=1e-6)
    record = summary.history[-1]
    assert record.participants == ["h0", "h1", "h2"] and record.dropped == {}
    expected_loss = sum(w * m.sum() for w, m in zip(weights, federation.means)) / weights.sum()
    assert record.train_loss == pytest.approx(expected_loss, rel=1e-5)
    assert record.accuracy == 1.0 and record.eval_loss == 0.5


def test_a_straggler_misses_the_deadline_and_the_round_goes_on(federation: Federation) -> None:
    training = TrainingSettings(task="meantask:MeanTask", task_params={"slow": [2], "delay": 3.0},
                                rounds=1, deadline_s=1.0, min_hosts=2)
    started = time.monotonic()
    summary = federation.coordinator(training).train()
    record = summary.history[0]
    assert record.participants == ["h0", "h1"]
    assert record.dropped == {"h2": "deadline exceeded"}
    assert record.fit_seconds < 2.0  # did not wait for the 3 s straggler
    expected = (10 * federation.means[0] + 30 * federation.means[1]) / 40
    np.testing.assert_allclose(load_weights(summary.final_weights)[0], expected, rtol=1e-6)
    assert time.monotonic() - started < 10


def test_too_few_replies_stop_the_run_with_a_reason(federation: Federation) -> None:
    federation.servers[0].stop()
    federation.servers[1].stop()
    training = TrainingSettings(task="meantask:MeanTask", rounds=1, min_hosts=2)
    with pytest.raises(TrainingError, match="only 1 of 3 hosts answer"):
        federation.coordinator(training).train()


def test_metrics_and_checkpoint_each_round(federation: Federation) -> None:
    training = TrainingSettings(task="meantask:MeanTask", rounds=3)
    seen = []
    summary = federation.coordinator(training, on_round=seen.append).train()
    lines = (summary.run_dir / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["round"] for line in lines] == [1, 2, 3]
    assert [r.round for r in seen] == [1, 2, 3]
    assert json.loads((summary.run_dir / "state.json").read_text())["round"] == 3


def test_memory_budget_bounds_updates_held_at_once() -> None:
    budget = MemoryBudget(2)
    inside = 0
    peak = 0
    lock = threading.Lock()

    def worker() -> None:
        nonlocal inside, peak
        held: list[bool] = []
        budget.allocator(held)([])
        with lock:
            inside += 1
            peak = max(peak, inside)
        time.sleep(0.05)
        with lock:
            inside -= 1
        budget.release(held)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert peak == 2


def test_an_update_beyond_the_norm_bound_is_rejected_and_the_round_goes_on(
        federation: Federation) -> None:
    # the MeanTask update is the host's data mean: hosts 0, 1, 2 have means (0, 0.45, 0),
    # (1, 0.483, 1), (2, 0.492, 2): distances from the zero model 0.45, ~1.50, ~2.06
    training = TrainingSettings(task="meantask:MeanTask", rounds=1, max_update_norm=1.8)
    summary = federation.coordinator(training).train()
    record = summary.history[0]
    assert record.participants == ["h0", "h1"]
    assert "exceeds training.max_update_norm 1.8" in record.dropped["h2"]
    expected = (10 * federation.means[0] + 30 * federation.means[1]) / 40
    np.testing.assert_allclose(load_weights(summary.final_weights)[0], expected, rtol=1e-6)


def test_update_distance_is_the_l2_norm() -> None:
    from flctl.core.aggregation import CHUNK, update_distance

    rng = np.random.default_rng(0)
    a = [rng.standard_normal(3 * CHUNK + 5).astype(np.float32), rng.standard_normal((4, 3))]
    b = [np.zeros_like(a[0]), np.ones((4, 3))]
    expected = np.sqrt(sum(float(np.sum((x.astype(np.float64) - y) ** 2)) for x, y in zip(a, b)))
    assert update_distance(a, b) == pytest.approx(expected, rel=1e-12)


def test_target_accuracy_stops_early_and_the_manifest_says_so(federation: Federation) -> None:
    training = TrainingSettings(task="meantask:MeanTask", rounds=5, target_accuracy=0.9)
    summary = federation.coordinator(training).train()
    assert [r.round for r in summary.history] == [1]  # MeanTask evaluates at accuracy 1.0
    manifest = json.loads((summary.run_dir / "manifest.json").read_text())
    assert manifest["stopped_early_at"] == 1 and manifest["rounds_planned"] == 5
    assert manifest["rounds"] == 1


def test_coordinator_side_evaluation_on_a_local_file(federation: Federation) -> None:
    data = Dataset(np.zeros((7, 3), np.float32), np.zeros(7, np.int64))
    training = TrainingSettings(task="meantask:MeanTask", rounds=2)
    summary = federation.coordinator(training, eval_data=data).train()
    assert [(r.central_loss, r.central_accuracy) for r in summary.history] == [(0.5, 1.0)] * 2


def test_heartbeats_keep_a_long_fit_alive(federation: Federation) -> None:
    """A fit 8x longer than the silence window is not cut: the host keeps beating."""
    training = TrainingSettings(task="meantask:MeanTask", task_params={"slow": [2], "delay": 1.2},
                                rounds=1, deadline_s=30.0, heartbeat_s=0.05)
    record = federation.coordinator(training).train().history[0]
    assert record.participants == ["h0", "h1", "h2"] and record.dropped == {}
    assert record.fit_seconds >= 1.2


def test_a_silent_host_is_dropped_long_before_the_deadline(tmp_path: Path) -> None:
    fed = Federation(tmp_path, [10, 30, 60], frozen=(2,))
    try:
        training = TrainingSettings(task="meantask:MeanTask",
                                    task_params={"slow": [2], "delay": 5.0},
                                    rounds=1, deadline_s=60.0, heartbeat_s=0.2)
        started = time.monotonic()
        record = fed.coordinator(training).train().history[0]
        assert record.participants == ["h0", "h1"]
        assert "no heartbeat for 0.6 s" in record.dropped["h2"]
        assert record.fit_seconds < 3.0  # 3 missed heartbeats, not the 60 s deadline
        assert time.monotonic() - started < 30
    finally:
        fed.close()


def test_a_short_round_is_run_again_and_then_accepted(federation: Federation) -> None:
    flag = federation.root / "h2-is-slow"
    flag.write_text("")
    messages: list[str] = []

    def on_message(text: str) -> None:
        messages.append(text)
        if "running it again" in text:
            flag.unlink(missing_ok=True)  # the host "comes back" between attempts

    # the wait lets the agent finish the abandoned 1 s fit (it trains one at a time)
    training = TrainingSettings(task="meantask:MeanTask", rounds=2, min_hosts=3,
                                deadline_s=0.5, retry_wait_s=1.0, heartbeat_s=0.1,
                                task_params={"slow": [2], "delay": 1.0,
                                             "slow_while": str(flag)})
    summary = federation.coordinator(training, on_message=on_message).train()
    first, second = summary.history
    assert first.attempts == 2 and first.participants == ["h0", "h1", "h2"]
    assert second.attempts == 1
    assert any("round 1: 2 updates, training.min_hosts is 3" in m and "retry 1 of 2" in m
               for m in messages)
    weights = np.array([10, 30, 60], dtype=np.float64)
    expected = sum(w * m for w, m in zip(weights, federation.means)) / weights.sum()
    np.testing.assert_allclose(load_weights(summary.final_weights)[0], expected, rtol=1e-6)


def test_a_round_short_after_every_retry_stops_the_run_resumably(federation: Federation) -> None:
    flag = federation.root / "h2-is-slow"
    messages: list[str] = []

    def on_round(record) -> None:
        flag.write_text("")  # from round 2 on, h2 is always too slow

    training = TrainingSettings(task="meantask:MeanTask", rounds=3, min_hosts=3, deadline_s=0.5,
                                round_retries=1, retry_wait_s=0.05, heartbeat_s=0.1,
                                task_params={"slow": [2], "delay": 2.0,
                                             "slow_while": str(flag)})
    coordinator = federation.coordinator(training, on_round=on_round,
                                         on_message=messages.append)
    with pytest.raises(TrainingError) as caught:
        coordinator.train()
    text = caught.value.message
    assert "round 2: 2 updates" in text and "tried 2 time(s)" in text
    assert f"flctl train --resume {coordinator.run.run_id}" in text
    assert sum("running it again" in m for m in messages) == 1
    assert json.loads((coordinator.run.path / "state.json").read_text())["round"] == 1


def test_starting_needs_min_hosts_to_start_but_rounds_only_min_hosts(
        federation: Federation) -> None:
    federation.servers[0].stop()
    strict = TrainingSettings(task="meantask:MeanTask", rounds=1, min_hosts_to_start=3)
    with pytest.raises(TrainingError, match="only 2 of 3 hosts answer and can take part; "
                                            "training.min_hosts_to_start is 3"):
        federation.coordinator(strict).train()
    quorum = TrainingSettings(task="meantask:MeanTask", rounds=1, min_hosts_to_start=2,
                              min_hosts=2, round_retries=0)
    record = federation.coordinator(quorum).train().history[0]
    assert record.participants == ["h1", "h2"] and "h0" in record.dropped


def test_central_dp_averages_clipped_updates_uniformly(federation: Federation) -> None:
    """Noise 0 and a clip no update reaches: DP-FedAvg's fixed-denominator mean,
    not the example-weighted one (the sensitivity argument needs it)."""
    training = TrainingSettings(task="meantask:MeanTask", rounds=1, privacy="central",
                                clip_norm=1e6, noise_multiplier=0.0)
    summary = federation.coordinator(training).train()
    expected = sum(federation.means) / 3
    np.testing.assert_allclose(load_weights(summary.final_weights)[0], expected, rtol=1e-6)
    assert summary.history[0].epsilon is None  # no noise: no finite guarantee


def test_central_dp_reports_epsilon_and_stops_before_the_target(federation: Federation) -> None:
    from flctl.core.privacy import RdpAccountant

    sigma, delta = 1.5, 1e-5
    after = [RdpAccountant.after_rounds(1.0, sigma, r).epsilon(delta) for r in (1, 2, 3)]
    target = (after[1] + after[2]) / 2  # two rounds fit, a third would exceed
    training = TrainingSettings(task="meantask:MeanTask", rounds=5, privacy="central",
                                clip_norm=0.5, noise_multiplier=sigma, dp_delta=delta,
                                target_epsilon=target)
    messages: list[str] = []
    summary = federation.coordinator(training, on_message=messages.append).train()
    assert [r.round for r in summary.history] == [1, 2]
    assert [r.epsilon for r in summary.history] == pytest.approx(after[:2])
    manifest = json.loads((summary.run_dir / "manifest.json").read_text())
    assert manifest["epsilon"] == pytest.approx(after[1]) and manifest["epsilon"] <= target
    assert manifest["stopped_early_at"] == 2 and manifest["delta"] == delta
    assert any("stopping before round 3" in m for m in messages)
    # the noise is real: the model is not the mean of the clipped updates
    clipped_mean = sum(m * min(1.0, 0.5 / np.linalg.norm(m)) for m in federation.means) / 3
    assert np.linalg.norm(load_weights(summary.final_weights)[0] - clipped_mean) > 1e-3


def test_local_dp_hosts_clip_their_own_updates(federation: Federation) -> None:
    training = TrainingSettings(task="meantask:MeanTask", rounds=1, privacy="local",
                                clip_norm=0.25, noise_multiplier=0.0)
    summary = federation.coordinator(training).train()
    [result] = load_weights(summary.final_weights)
    weights = np.array([10, 30, 60], dtype=np.float64)
    clipped = [m * 0.25 / np.linalg.norm(m) for m in federation.means]
    expected = sum(w * c for w, c in zip(weights, clipped)) / weights.sum()
    np.testing.assert_allclose(result, expected, rtol=1e-5)
    assert summary.history[0].epsilon is None


def test_central_dp_refuses_a_robust_strategy(federation: Federation) -> None:
    training = TrainingSettings(task="meantask:MeanTask", strategy="fedmedian",
                                privacy="central")
    with pytest.raises(FlctlError, match="central DP needs a FedAvg-family strategy"):
        federation.coordinator(training)


def test_compressed_updates_rebuild_the_hosts_models(federation: Federation) -> None:
    plain = federation.coordinator(TrainingSettings(task="meantask:MeanTask", rounds=1)).train()
    half = federation.coordinator(TrainingSettings(task="meantask:MeanTask", rounds=1,
                                                   compression="float16")).train()
    np.testing.assert_allclose(load_weights(half.final_weights)[0],
                               load_weights(plain.final_weights)[0], rtol=2e-3)
    assert half.history[0].participants == ["h0", "h1", "h2"]


def weighted_mean(federation: Federation, hosts: list[int]) -> np.ndarray:
    sizes = np.array([10, 30, 60], dtype=np.float64)[hosts]
    return sum(n * federation.means[h] for n, h in zip(sizes, hosts)) / sizes.sum()


def test_secure_aggregation_equals_fedavg_within_fixed_point_error(
        federation: Federation, monkeypatch: pytest.MonkeyPatch) -> None:
    replies = []
    secure_fit = AgentClient.secure_fit

    def spy(self, *args, **kwargs):
        replies.append(secure_fit(self, *args, **kwargs))
        return replies[-1]

    monkeypatch.setattr(AgentClient, "secure_fit", spy)
    training = TrainingSettings(task="meantask:MeanTask", rounds=2, secure_aggregation=True)
    summary = federation.coordinator(training).train()
    # what the coordinator got from each host: one masked vector, no per-host metrics
    assert len(replies) == 6
    assert all(len(r.weights) == 1 and r.weights[0].dtype == np.uint32 for r in replies)
    assert all(r.metrics == {"secagg_clipped": 0} for r in replies)
    [result] = load_weights(summary.final_weights)
    # 2^-21 per host and coordinate, divided by the summed weight (100/128)
    np.testing.assert_allclose(result, weighted_mean(federation, [0, 1, 2]), atol=1e-5)
    record = summary.history[-1]
    assert record.participants == ["h0", "h1", "h2"]
    # the loss travels inside the masked vector too: only its weighted mean is learnt
    assert record.train_loss == pytest.approx(weighted_mean(federation, [0, 1, 2]).sum(), abs=1e-5)


def test_secure_aggregation_recovers_a_host_that_left_after_its_masked_update(
        tmp_path: Path) -> None:
    fed = Federation(tmp_path, [10, 30, 60], leaves=(1,))
    try:
        training = TrainingSettings(task="meantask:MeanTask", rounds=1, secure_aggregation=True)
        record = fed.coordinator(training).train().history[0]
        [result] = load_weights(fed.root / "runs" / record_run(fed) / "final.npz")
        np.testing.assert_allclose(result, weighted_mean(fed, [0, 1, 2]), atol=1e-5)
        assert record.participants == ["h0", "h1", "h2"]  # its update counts
    finally:
        fed.close()


def record_run(fed: Federation) -> str:
    [run] = [p.name for p in (fed.root / "runs").iterdir()]
    return run


def test_secure_aggregation_drops_a_straggler_and_unmasks_the_rest(
        federation: Federation) -> None:
    training = TrainingSettings(task="meantask:MeanTask", rounds=1, secure_aggregation=True,
                                task_params={"slow": [2], "delay": 3.0}, deadline_s=1.0,
                                heartbeat_s=0.2)
    summary = federation.coordinator(training).train()
    record = summary.history[0]
    assert record.participants == ["h0", "h1"] and record.dropped == {"h2": "deadline exceeded"}
    np.testing.assert_allclose(load_weights(summary.final_weights)[0],
                               weighted_mean(federation, [0, 1]), atol=1e-5)
    # per host: who answered or straggled, and bytes; nothing of a single host's update
    assert {name: entry["status"] for name, entry in record.hosts.items()} == {
        "h0": "answered", "h1": "answered", "h2": "straggled"}
    for entry in record.hosts.values():
        assert set(entry) <= {"status", "reason", "bytes_sent", "bytes_received"}
        assert entry["bytes_sent"] > 0
    written = json.loads((summary.run_dir / "metrics.jsonl").read_text().splitlines()[0])
    assert written["hosts"] == record.hosts


def test_secure_aggregation_below_the_threshold_fails_and_reveals_nothing(
        federation: Federation) -> None:
    training = TrainingSettings(task="meantask:MeanTask", rounds=1, secure_aggregation=True,
                                task_params={"slow": [1, 2], "delay": 3.0}, deadline_s=1.0,
                                heartbeat_s=0.2, round_retries=0)
    coordinator = federation.coordinator(training)
    with pytest.raises(TrainingError, match="only 1 of 3 hosts sent masked input; "
                                            "the threshold is 2"):
        coordinator.train()
    assert not (coordinator.run.path / "final.npz").exists()
    assert not list(coordinator.run.path.glob("checkpoint-*"))


def test_secure_aggregation_refuses_settings_that_need_single_updates(
        federation: Federation) -> None:
    for extra, reason in [({"strategy": "krum"}, "needs every single update"),
                          ({"privacy": "central"}, "central DP clips single updates"),
                          ({"compression": "int8"}, "cannot be compressed"),
                          ({"max_update_norm": 5.0}, "max_update_norm")]:
        training = TrainingSettings(task="meantask:MeanTask", secure_aggregation=True, **extra)
        with pytest.raises(TrainingError, match=reason):
            federation.coordinator(training)


def test_a_central_dp_run_resumed_from_its_checkpoint_draws_the_same_noise(
        federation: Federation) -> None:
    """The noise seed is secret (not training.seed) and lives in the checkpoint, so
    a run killed after round 2 and resumed ends bit for bit where it would have."""
    import shutil

    from flctl.coordinator.records import RunDir, load_checkpoint

    training = TrainingSettings(task="meantask:MeanTask", rounds=3, privacy="central",
                                clip_norm=0.5, noise_multiplier=1.0, eval_every=10)
    snapshot = federation.root / "runs" / "killed-after-2"

    def keep_round_two(record) -> None:
        if record.round == 2:
            shutil.copytree(coordinator.run.path, snapshot)  # what kill -9 would leave

    coordinator = federation.coordinator(training, on_round=keep_round_two)
    full = coordinator.train()
    run = RunDir(snapshot)
    clients = [AgentClient(e, federation.context, timeout=30) for e in federation.endpoints]
    resumed = Coordinator(clients, training, run, tasks_dir=federation.root / "tasks",
                          resume_from=load_checkpoint(run),
                          ca_pem=(federation.root / "ca.crt").read_bytes()).train()
    a, b = load_weights(full.final_weights), load_weights(resumed.final_weights)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert resumed.epsilon == pytest.approx(full.epsilon) and full.epsilon is not None
    # and a fresh run draws other noise: the seed is not derived from settings
    other = federation.coordinator(training).train()
    assert not np.array_equal(load_weights(other.final_weights)[0], a[0])


def test_secure_aggregation_on_a_sparse_secagg_plus_graph(tmp_path: Path) -> None:
    """16 hosts, 6 neighbours each: masks and shares stay inside neighbourhoods
    of 7, and the sum is still the weighted mean of all 16 updates."""
    sizes = [10 + 5 * i for i in range(16)]
    fed = Federation(tmp_path, sizes, spread=0.1)  # updates inside the fixed-point range
    try:
        training = TrainingSettings(task="meantask:MeanTask", rounds=1, secure_aggregation=True,
                                    secagg_neighbours=6)
        summary = fed.coordinator(training).train()
        weights = np.array(sizes, dtype=np.float64)
        expected = sum(n * m for n, m in zip(weights, fed.means)) / weights.sum()
        np.testing.assert_allclose(load_weights(summary.final_weights)[0], expected, atol=1e-5)
        assert len(summary.history[0].participants) == 16
    finally:
        fed.close()


# ---------------------------------------------------------------- hostile hosts


def _meta(reply: Message, **changes) -> Message:
    return Message(reply.kind, {**reply.meta, **changes}, reply.arrays)


def test_a_host_cannot_set_the_model_size(tmp_path: Path) -> None:
    """An info claiming two billion classes leaves that host out; the model's shape
    is the operator's (the built-in task needs it in settings)."""
    def huge(request, reply):
        if request.kind == "info" and reply.meta.get("data"):
            return _meta(reply, data={**reply.meta["data"], "n_classes": 2_000_000_000})
        return reply

    fed = Federation(tmp_path, [10, 30, 60], task="logreg", tamper={1: huge})
    messages: list[str] = []
    try:
        with pytest.raises(TrainingError, match="task_params needs n_features and n_classes"):
            fed.coordinator(TrainingSettings(task="logreg", rounds=1)).train()
        training = TrainingSettings(task="logreg", rounds=1, min_hosts=2,
                                    task_params={"n_features": 3, "n_classes": 1})
        summary = fed.coordinator(training, on_message=messages.append).train()
    finally:
        fed.close()
    assert summary.hosts == ["h0", "h1", "h2"] and summary.history[0].participants == ["h0", "h2"]
    assert any("h1: its labels go up to 1999999999" in m for m in messages)
    assert [list(s) for s in json.loads((summary.run_dir / "manifest.json").read_text())[
        "shapes"]] == [[3, 1], [1]]


def train_tampered(tmp_path: Path, tamper: dict, **training: Any
                   ) -> tuple[RunSummary, list[str], Federation]:
    """A MeanTask run over hosts of 10, 30 and 60 examples whose replies pass
    through `tamper` (host index -> change); its summary and messages."""
    fed = Federation(tmp_path, [10, 30, 60], tamper=tamper)
    messages: list[str] = []
    try:
        summary = fed.coordinator(TrainingSettings(task="meantask:MeanTask", **training),
                                  on_message=messages.append).train()
    finally:
        fed.close()
    return summary, messages, fed


def test_counts_and_metrics_are_held_to_what_discovery_saw(tmp_path: Path) -> None:
    """One host inflating its example count (to dominate FedAvg) or reporting an
    impossible accuracy (to trigger target_accuracy) is refused, not believed."""
    def inflate(request, reply):
        if reply.kind == "fit_result":
            return _meta(reply, num_examples=10**9)
        if reply.kind == "eval_result":
            return _meta(reply, metrics={"accuracy": 5.0})
        return reply

    summary, messages, fed = train_tampered(tmp_path, {2: inflate}, rounds=2)
    for record in summary.history:
        assert record.participants == ["h0", "h1"]
        assert "claims 1000000000 examples" in record.dropped["h2"]
    assert summary.accuracy == 1.0      # the honest hosts' figure; h2's 5.0 would make it 3.4
    assert any("h2: evaluation rejected: accuracy 5.0" in m for m in messages)
    # the result is the honest hosts' weighted mean
    expected = (fed.means[0] * 10 + fed.means[1] * 30) / 40
    with np.load(summary.final_weights) as final:
        np.testing.assert_allclose(final[final.files[0]], expected, rtol=1e-5)


def scored(accuracy: float, examples: int | None = None):
    """A host whose evaluation reports `accuracy` (and, if given, `examples`)."""
    def change(request, reply):
        if reply.kind != "eval_result":
            return reply
        changes = {"metrics": {**reply.meta.get("metrics", {}), "accuracy": accuracy}}
        if examples is not None:
            changes["num_examples"] = examples
        return _meta(reply, **changes)
    return change


@pytest.mark.parametrize("claimed", [61, 10**9])
def test_an_evaluation_counts_no_more_than_discovery_saw_and_cannot_stop_the_run(
        tmp_path: Path, claimed: int) -> None:
    """h2 (60 examples) claims a perfect score over more examples than it has:
    believed, its 1.0 would lift the federation's accuracy past target_accuracy
    (0.75) in round 1; refused, the honest 0.5 runs all three rounds."""
    fed = Federation(tmp_path, [10, 30, 60],
                     tamper={0: scored(0.5), 1: scored(0.5), 2: scored(1.0, claimed)})
    messages: list[str] = []
    try:
        training = TrainingSettings(task="meantask:MeanTask", rounds=3, target_accuracy=0.75)
        summary = fed.coordinator(training, on_message=messages.append).train()
        # the same federation does stop early when the target is honestly met
        honest = fed.coordinator(TrainingSettings(task="meantask:MeanTask", rounds=3,
                                                  target_accuracy=0.5)).train()
    finally:
        fed.close()
    assert len(summary.history) == 3 and len(honest.history) == 1
    assert not any("target_accuracy" in m for m in messages), messages
    assert summary.accuracy == pytest.approx(0.5)
    assert any(m.startswith(f"h2: evaluation rejected: it claims {claimed} examples, the host "
                            f"has 60") for m in messages), messages
    # only its evaluation is refused; its update still counts
    assert all(r.participants == ["h0", "h1", "h2"] for r in summary.history)


def non_finite(where: str, value: float):
    def change(request, reply):
        if where == "eval" and reply.kind == "eval_result":
            return _meta(reply, loss=value)
        if where == "fit" and reply.kind == "fit_result":
            return _meta(reply, metrics={**reply.meta.get("metrics", {}), "train_loss": value})
        return reply
    return change


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("where", ["fit", "eval"])
def test_a_non_finite_loss_is_refused(tmp_path: Path, where: str, value: float) -> None:
    """A NaN or infinite loss (JSON allows NaN and Infinity) would poison the
    round's weighted mean; the host's reply is refused, the figures stay finite."""
    summary, messages, _ = train_tampered(tmp_path, {2: non_finite(where, value)}, rounds=2)
    for record in summary.history:
        assert math.isfinite(record.train_loss) and math.isfinite(record.eval_loss)
        assert record.eval_loss == pytest.approx(0.5)
        if where == "fit":
            assert record.participants == ["h0", "h1"]
            assert f"train_loss {value!r} is not a finite number" in record.dropped["h2"]
        else:
            assert record.participants == ["h0", "h1", "h2"]
    if where == "eval":
        assert any(m.startswith(f"h2: evaluation rejected: loss {value!r} is not a finite")
                   for m in messages), messages


def info_change(path: tuple[str, ...], value):
    """A host whose info answer has `value` at `path`."""
    def change(request, reply):
        if reply.kind != "info":
            return reply
        meta = json.loads(json.dumps(reply.meta))
        target = meta
        for key in path[:-1]:
            target = target.setdefault(key, {})
        target[path[-1]] = value
        return Message(reply.kind, meta, reply.arrays)
    return change


@pytest.mark.parametrize("path, value, field", [
    (("data", "n_train"), "many", "info.data.n_train"),
    (("data", "n_features"), -3, "info.data.n_features"),
    (("data", "n_test"), 1.5, "info.data.n_test"),
    (("memory", "available_bytes"), "x", "info.memory.available_bytes"),
    (("state",), ["training"], "info.state"),
    (("name",), 42, "info.name"),
])
def test_an_info_answer_of_wrong_types_leaves_out_only_that_host(
        tmp_path: Path, path, value, field: str) -> None:
    summary, messages, _ = train_tampered(tmp_path, {1: info_change(path, value)}, rounds=1,
                                          min_hosts=2)
    assert summary.history[0].participants == ["h0", "h2"]
    told = [m for m in messages if "h1" in m]
    assert len(told) == 1 and "\n" not in told[0], messages
    assert told[0].startswith("left out: h1: bad info answer") and field in told[0], told


def test_a_reply_of_the_wrong_layout_takes_no_memory(tmp_path: Path) -> None:
    """Array specs are checked before the coordinator reserves a buffer for them."""
    def oversized(request, reply):
        if reply.kind == "fit_result":
            return Message(reply.kind, reply.meta, [np.zeros(50_000_000, np.uint8)])
        return reply

    fed = Federation(tmp_path, [10, 30, 60], tamper={0: oversized})
    try:
        coordinator = fed.coordinator(TrainingSettings(task="meantask:MeanTask", rounds=1))
        taken: list[list] = []
        real = coordinator.budget.allocator

        def watching(held, expect=None):
            allocate = real(held, expect)

            def spy(specs):
                buffers = allocate(specs)
                taken.append([tuple(s.shape) for s in specs])
                return buffers
            return spy

        coordinator.budget.allocator = watching  # type: ignore[method-assign]
        summary = coordinator.train()
    finally:
        fed.close()
    assert "are not the model's" in summary.history[0].dropped["h0"]
    assert all((50_000_000,) not in shapes for shapes in taken)   # never allocated


class Crash(Exception):
    """What kill -9 or a power cut does to a run, raised from its round callback."""


def files_holding(run_dir: Path, secret: bytes) -> dict[str, int]:
    """Every file in the run directory whose bytes contain `secret`, with its mode."""
    return {p.name: p.stat().st_mode & 0o777 for p in sorted(run_dir.iterdir())
            if p.is_file() and secret in p.read_bytes()}


def test_the_central_dp_noise_seed_is_0600_while_resumable_and_gone_when_the_run_ends(
        federation: Federation) -> None:
    """Whoever reads the noise seed can subtract the noise from the published model."""
    from flctl.coordinator.records import load_checkpoint

    training = TrainingSettings(task="meantask:MeanTask", rounds=3, privacy="central",
                                clip_norm=0.5, noise_multiplier=1.0, eval_every=10)

    def crash_after_round_two(record) -> None:
        if record.round == 2:
            raise Crash

    coordinator = federation.coordinator(training, on_round=crash_after_round_two)
    with pytest.raises(Crash):
        coordinator.train()
    seed = coordinator.strategy.noise_seed
    words = np.array([(seed >> (32 * i)) & 0xFFFFFFFF for i in range(4)], dtype="<u4")
    secrets = (words.tobytes(), str(seed).encode(), f"{seed:x}".encode())
    run = coordinator.run
    # interrupted: the seed is kept for an exact resume, in one file only its owner reads
    assert files_holding(run.path, secrets[0]) == {"secret-000002.npz": 0o600}
    assert all(files_holding(run.path, s) == {} for s in secrets[1:])

    clients = [AgentClient(e, federation.context, timeout=30) for e in federation.endpoints]
    resumed = Coordinator(clients, training, run, tasks_dir=federation.root / "tasks",
                          resume_from=load_checkpoint(run),
                          ca_pem=(federation.root / "ca.crt").read_bytes())
    assert resumed.strategy.noise_seed != seed  # a fresh strategy draws its own seed ...
    summary = resumed.train()
    assert resumed.strategy.noise_seed == seed  # ... and the checkpoint's replaced it
    assert summary.rounds == 3 and summary.final_weights.exists()
    # finished: nothing may resume it, so nothing in the run directory holds the seed
    assert all(files_holding(run.path, s) == {} for s in secrets)
    assert not list(run.path.glob("secret-*"))


def test_the_first_model_comes_from_a_host_that_can_make_it(tmp_path: Path) -> None:
    """A user's task may need a framework this machine lacks: a host makes the initial
    weights; one whose answer is unusable is passed over."""
    def poisoned(request, reply):
        if reply.kind == "init_result":
            return Message(reply.kind, reply.meta, [np.full(3, np.nan, np.float32)])
        return reply

    summary, messages, _ = train_tampered(tmp_path, {0: poisoned}, rounds=1)
    assert any("h0: cannot make the initial weights (initial weights: array 0 holds NaN"
               in m for m in messages)
    assert "initial weights from h1 (1 arrays)" in messages
    assert summary.rounds == 1


def test_initial_weights_from_a_file(federation: Federation, tmp_path: Path) -> None:
    start = [np.array([5.0, 6.0, 7.0], np.float32)]
    training = TrainingSettings(task="meantask:MeanTask", rounds=1, eval_every=10)
    coordinator = federation.coordinator(training, initial=start)
    seen: list = []
    real = coordinator.fit_round

    def spy(weights, *args, **kwargs):
        seen.append([w.copy() for w in weights])
        return real(weights, *args, **kwargs)

    coordinator.fit_round = spy  # type: ignore[method-assign]
    coordinator.train()
    assert np.array_equal(seen[0][0], start[0])


def test_a_host_whose_evaluation_fails_is_told_once(tmp_path: Path) -> None:
    """A task whose evaluate() raises on a host leaves that host out of the
    federated score and says why, once rather than every round."""
    def broken(request, reply):
        if reply.kind == "eval_result":
            return Message("error", {"error": "KeyError: 'epochs'"})
        return reply

    fed = Federation(tmp_path, [10, 30], tamper={1: broken})
    messages: list[str] = []
    try:
        training = TrainingSettings(task="meantask:MeanTask", rounds=3)
        summary = fed.coordinator(training, on_message=messages.append).train()
    finally:
        fed.close()
    told = [m for m in messages if "evaluation failed" in m]
    assert len(told) == 1 and told[0].startswith("h1: evaluation failed: ") and "epochs" in told[0]
    assert summary.accuracy is not None      # h0's score still counts


def test_each_phase_that_sends_the_model_is_shown_until_every_host_has_it(
        federation: Federation) -> None:
    """The progress view's source: each fit and evaluation phase names its round,
    its hosts and the model's bytes; by its end every host has the whole model."""
    seen: list[tuple[str, int, int, int]] = []

    class Watched(TransferProgress):
        def end(self) -> None:
            now = self.snapshot()
            assert now is not None
            seen.append((now.phase, now.hosts, now.hosts_done, now.expected))
            super().end()

    watched = Watched()
    training = TrainingSettings(task="meantask:MeanTask", rounds=2)
    federation.coordinator(training, progress=watched).train()
    model_bytes = 3 * 4   # MeanTask: three float32 coordinates
    assert seen == [(f"round {r}: model to hosts{what}", 3, 3, 3 * model_bytes)
                    for r in (1, 2) for what in ("", " to evaluate")]
    assert watched.snapshot() is None


def test_a_chunked_send_reports_its_running_total() -> None:
    import socket

    from flctl.core.messages import chunk_size
    from flctl.net.framing import recv_message, send_message

    limits = Limits(max_body_bytes=1 << 16)   # 64 KiB chunks
    array = np.arange(3 * chunk_size(limits) // 4 + 7, dtype=np.float32)
    left, right = socket.socketpair()
    totals: list[int] = []
    received: list[Any] = []
    reader = threading.Thread(target=lambda: received.append(recv_message(right, limits)))
    reader.start()
    sent = send_message(left, Message("fit", {}, [array]), limits, on_sent=totals.append)
    reader.join(30)
    left.close()
    right.close()
    assert len(totals) >= 3 and totals == sorted(totals) and totals[-1] == sent
    np.testing.assert_array_equal(received[0][0].arrays[0], array)
