"""Transfers that survive a cut connection: real TCP resets (`ss -K` kills the
coordinator's socket to an agent) at random points of the model going down
and the update coming up; the run must end with the uncut run's weights."""

from __future__ import annotations

import random
import shutil
import subprocess
from pathlib import Path

import pytest

from flctl.agent.transfers import TransferReceiver
from flctl.coordinator import budget as budget_module
from flctl.coordinator.records import load_weights
from flctl.core.messages import Limits
from flctl.core.settings import TrainingSettings
from flctl.net.agent_client import AgentClient
from test_coordinator import Federation
from test_streams import BLOCK_TASK

pytestmark = pytest.mark.skipif(shutil.which("ss") is None, reason="needs ss (iproute2)")

# Bigger than what loopback's socket buffers hold in flight (a reset drops
# those bytes, and a model that fits in them would always arrive whole).
SIZE = 4_000_000
MODEL_BYTES = 4 * SIZE + 4 * 12
TRAINING = TrainingSettings(task="blocktask:BlockTask", task_params={"size": SIZE}, rounds=2)
FRAMES = Limits(max_body_bytes=64 << 10)


def _federation(root: Path) -> Federation:
    root.mkdir()
    return Federation(root, [10, 30, 60], task="blocktask:BlockTask", limits=FRAMES,
                      tasks={"blocktask": BLOCK_TASK})


def kill_flows(port: int) -> None:
    """Reset every TCP connection to 127.0.0.1:port (the coordinator's end is
    destroyed; the agent's end gets a RST)."""
    subprocess.run(["ss", "-K", "dst", "127.0.0.1", "dport", "=", str(port)], check=True,
                   capture_output=True)


@pytest.fixture(scope="module")
def uncut(tmp_path_factory) -> list:
    fed = _federation(tmp_path_factory.mktemp("uncut") / "fed")
    try:
        return [w.tobytes() for w in load_weights(fed.coordinator(TRAINING).train()
                                                  .final_weights)]
    finally:
        fed.close()


def _cut_when(monkeypatch, cls, fraction: float, total: int, cut, log: list,
              only=lambda receiver: True) -> None:
    """Cut when a `cls` receiver (`only` those it accepts) passes `fraction` of
    `total` bytes (a stream resumed beyond that point does not cut again)."""
    original = cls.received

    def received(self, index, offset, nbytes):
        original(self, index, offset, nbytes)
        if index == 0 and offset < fraction * total <= offset + nbytes and only(self):
            log.append((cls.__name__, offset + nbytes))
            cut()

    monkeypatch.setattr(cls, "received", received)


@pytest.mark.parametrize("seed", range(3))
def test_cuts_at_random_points_leave_the_result_unchanged(tmp_path: Path, monkeypatch,
                                                          uncut: list, seed: int) -> None:
    rng = random.Random(seed)
    monkeypatch.setattr(budget_module, "IN_MEMORY_BYTES", rng.choice([0, 1 << 30]))
    fed = _federation(tmp_path / "fed")
    victim = fed.endpoints[rng.randrange(3)].port
    cuts: list = []
    _cut_when(monkeypatch, budget_module.UpdateReceiver, rng.uniform(0.05, 0.95), MODEL_BYTES,
              lambda: kill_flows(victim), cuts)
    _cut_when(monkeypatch, TransferReceiver, rng.uniform(0.05, 0.95), MODEL_BYTES,
              lambda: kill_flows(victim), cuts)
    resumed_at: list = []
    for cls in (budget_module.UpdateReceiver, TransferReceiver):
        monkeypatch.setattr(cls, "begin", _logging_begin(cls.begin, cls.__name__, resumed_at))
    told: list[str] = []
    try:
        summary = fed.coordinator(TRAINING, on_message=told.append).train()
    finally:
        fed.close()
    assert [w.tobytes() for w in load_weights(summary.final_weights)] == uncut
    assert all(r.participants == ["h0", "h1", "h2"] for r in summary.history)
    assert len(cuts) >= 2 * 3   # every host's update and model (and evaluations), every round
    resumed = [line for line in told if "the transfer went on from where it stopped" in line]
    assert resumed, told
    # streams went on from where they stopped, in both directions, not from the start
    assert {name for name, _ in resumed_at} == {"UpdateReceiver", "TransferReceiver"}, (
        resumed_at, cuts, told)
    assert all(position != (0, 0) for _, position in resumed_at)


def _logging_begin(original, name: str, log: list):
    def begin(self, head):
        if head.resume is not None:
            log.append((name, head.resume))
        return original(self, head)
    return begin


def test_an_agent_that_lost_the_reply_fails_its_round_in_one_line(tmp_path: Path,
                                                                  monkeypatch) -> None:
    fed = _federation(tmp_path / "fed")
    victim = fed.endpoints[1].port
    service = fed.services[1]

    def restart_and_cut() -> None:   # as if the agent had restarted: its outbox is gone
        service.transfers._outbox = None
        kill_flows(victim)

    # Cut only in the middle of the victim's own reply: another host's update
    # passing half way could cut the victim while it still computes, which
    # (its outbox emptied) is a different failure than the one under test.
    original_request = AgentClient._request

    def mark_victim(self, request, receive, heartbeat_s, transfer):
        if self.endpoint.port == victim and receive is not None:
            receive.victim = True
        return original_request(self, request, receive, heartbeat_s, transfer)

    monkeypatch.setattr(AgentClient, "_request", mark_victim)
    cuts: list = []
    _cut_when(monkeypatch, budget_module.UpdateReceiver, 0.5, MODEL_BYTES, restart_and_cut,
              cuts, only=lambda receiver: getattr(receiver, "victim", False))
    training = TrainingSettings(task="blocktask:BlockTask", task_params={"size": SIZE},
                                rounds=1, min_hosts=2)
    try:
        summary = fed.coordinator(training).train()
    finally:
        fed.close()
    record = summary.history[0]
    assert "h1" in record.dropped and len(record.participants) == 2
    assert "nothing to resend for transfer" in record.dropped["h1"]
    assert "\n" not in record.dropped["h1"]


def test_a_connection_cut_while_idle_costs_nothing(tmp_path: Path, uncut: list) -> None:
    """A reset between rounds (the kept connection idle): the next request
    finds it dead before any of it arrives, and goes again in full."""
    fed = _federation(tmp_path / "fed")
    victim = fed.endpoints[2].port
    told: list[str] = []
    try:
        summary = fed.coordinator(TRAINING, on_message=told.append,
                                  on_round=lambda record: kill_flows(victim)).train()
    finally:
        fed.close()
    assert [w.tobytes() for w in load_weights(summary.final_weights)] == uncut
    assert all(r.participants == ["h0", "h1", "h2"] for r in summary.history), told
    assert any(line.startswith("h2: the connection dropped") for line in told), told


def test_the_first_model_survives_a_cut_too(tmp_path: Path, monkeypatch, uncut: list) -> None:
    """The initial weights come from a host (its framework makes them): a reset
    half way through that reply asks for it again, and the run goes on."""
    from flctl.net.framing import KeptReceiver

    fed = _federation(tmp_path / "fed")
    first = fed.endpoints[0].port   # the host asked first (by name)
    cuts: list = []
    original = KeptReceiver.received

    def received(self, index, offset, nbytes):
        original(self, index, offset, nbytes)
        if not cuts and index == 0 and offset < MODEL_BYTES // 2 <= offset + nbytes:
            cuts.append(offset + nbytes)
            kill_flows(first)

    monkeypatch.setattr(KeptReceiver, "received", received)
    resumed_at: list = []
    monkeypatch.setattr(KeptReceiver, "begin",
                        _logging_begin(KeptReceiver.begin, "KeptReceiver", resumed_at))
    told: list[str] = []
    try:
        summary = fed.coordinator(TRAINING, on_message=told.append).train()
    finally:
        fed.close()
    assert cuts, "the first model was not cut"
    # the reply went on from where it stopped, not from its start
    assert resumed_at and resumed_at[0][1] != (0, 0) and resumed_at[0][1][1] > 0, resumed_at
    assert any(line.startswith("h0: the connection dropped") for line in told), told
    assert any(line.startswith("initial weights from h0") for line in told), told
    assert [w.tobytes() for w in load_weights(summary.final_weights)] == uncut


def test_the_next_model_is_received_into_the_last_one_once_nothing_holds_it() -> None:
    """The agent receives a round's model into the previous round's buffers
    (pages already backed), unless anything still holds them: a task that
    kept the weights (or a view of them) gets fresh ones, and so does a
    model of another layout."""
    import socket
    import threading

    import numpy as np

    from flctl.agent.transfers import Transfers
    from flctl.core.messages import Message
    from flctl.net.framing import recv_message, send_message

    transfers = Transfers()
    layout = [np.zeros((300, 7), np.float32), np.zeros(5, np.int64)]

    def receive(round_number: int, model: list[np.ndarray]) -> list[np.ndarray]:
        key = f"run/{round_number}/1/fit"
        a, b = socket.socketpair()
        with a, b:
            sender = threading.Thread(target=send_message,
                                      args=(a, Message("fit", {"transfer": key}, model)))
            sender.start()
            got, _ = recv_message(b, receive=transfers.receiver())
            sender.join()
        transfers.start(key)   # handed to the handler
        for want, have in zip(model, got.arrays):
            assert have.tobytes() == want.tobytes()
        return got.arrays

    first = receive(1, [x + 1 for x in layout])
    first_data = [a.ctypes.data for a in first]
    del first
    second = receive(2, [x + 2 for x in layout])
    assert [a.ctypes.data for a in second] == first_data    # written over in place
    kept = second[0].reshape(-1)                            # a task keeps a view
    del second
    third = receive(3, [x + 3 for x in layout])
    assert third[0].ctypes.data != kept.ctypes.data         # fresh: the view is untouched
    assert kept[0] == 2
    del third
    other = receive(4, [np.ones(9, np.float32)])        # another layout: fresh too
    assert other[0].shape == (9,)
