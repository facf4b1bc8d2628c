"""Models of any size: chunked streams on the wire, updates spooled to disk and
folded from there, and what happens to a host whose stream is bad."""

from __future__ import annotations

import os
import socket
import threading
from pathlib import Path

import numpy as np
import pytest

from flctl.coordinator import budget as budget_module
from flctl.coordinator.budget import MemoryBudget
from flctl.coordinator.records import load_weights
from flctl.coordinator.replies import expect_weights
from flctl.core.aggregation import WeightedAccumulator, flat_blocks, update_distance
from flctl.core.messages import (
    DEFAULT_LIMITS,
    FrameHead,
    Limits,
    Message,
    body_views,
    chunk_size,
    encode_chunk_head,
    encode_head,
)
from flctl.core.settings import TrainingSettings
from flctl.core.spooled import FileArray
from flctl.errors import ProtocolError, TrainingError
from flctl.net import server as server_module
from flctl.net.framing import ConnectionClosed, recv_message, send_message
from test_coordinator import Federation

SMALL = Limits(max_body_bytes=4096)   # 4 KiB frames: every model below streams

BLOCK_TASK = '''
import numpy as np

class BlockTask:
    """A model of `size` float32 plus a small matrix; each host adds its own
    noise (seeded by host and round), and host `poison` puts a NaN in."""

    def __init__(self, size=5000, poison=-1):
        self.size = int(size)
        self.poison = int(poison)

    def init(self, seed):
        return [np.zeros(self.size, np.float32), np.zeros((3, 4), np.float32)]

    def fit(self, weights, data, config):
        host = int(data.x_train[0, 0])
        rng = np.random.default_rng([host, int(config["round"])])
        big = weights[0] + rng.standard_normal(self.size).astype(np.float32)
        if host == self.poison:
            big[self.size // 2] = np.nan
        return [big, weights[1] + host], len(data.x_train), {"train_loss": 1.0}

    def evaluate(self, weights, data, config):
        return 0.5, len(data.x_train), {"accuracy": 1.0}
'''


def _pair_roundtrip(msg: Message, limits: Limits, receive=None) -> tuple[Message, int, int]:
    a, b = socket.socketpair()
    sent: list[int] = []

    def send() -> None:
        try:
            sent.append(send_message(a, msg, limits))
        except OSError:   # the receiver refused and hung up
            pass

    with a, b:
        thread = threading.Thread(target=send)
        thread.start()
        try:
            got, received = recv_message(b, limits, receive)
        finally:
            b.close()
            thread.join()
    return got, sent[0], received


# ------------------------------------------------------------------ the wire


def test_a_message_bigger_than_a_frame_streams_in_chunks_bit_for_bit() -> None:
    rng = np.random.default_rng(0)
    arrays = [rng.standard_normal(5000).astype(np.float32), np.arange(7, dtype=np.int64),
              np.zeros(0, np.float32), rng.standard_normal((40, 33))]
    msg = Message("fit_result", {"n": 3}, arrays)
    got, sent, received = _pair_roundtrip(msg, SMALL)
    assert got.kind == "fit_result" and got.meta == {"n": 3}
    for want, have in zip(arrays, got.arrays):
        assert have.dtype == want.dtype and have.shape == want.shape
        assert have.tobytes() == want.tobytes()
    chunks = sum(-(-a.nbytes // chunk_size(SMALL)) for a in arrays)
    assert chunks == 5 + 1 + 0 + 3
    # each chunk has its own frame head: the byte count includes them all
    heads = len(encode_head(msg, chunk_size(SMALL))) + sum(
        len(encode_chunk_head(i, o, min(4096, a.nbytes - o)))
        for i, a in enumerate(arrays) for o in range(0, a.nbytes, 4096))
    assert sent == received == heads + sum(a.nbytes for a in arrays)


def test_a_frame_bigger_than_the_limit_is_refused_before_allocation() -> None:
    """A peer that ignores chunking (one 8 KiB frame) meets the per-frame bound."""
    a, b = socket.socketpair()
    with a, b:
        msg = Message("m", {}, [np.zeros(2048, np.float32)])
        a.sendall(encode_head(msg) + b"\0" * 8192)
        with pytest.raises(ProtocolError, match="exceeds limit 4096"):
            recv_message(b, SMALL)


class Discard:
    """A Receiver that keeps nothing: one small buffer, reused; counts what came."""

    def __init__(self) -> None:
        self.piece = np.empty(0, np.uint8)
        self.count = 0
        self.nonzero = 0
        self.finished = False

    def begin(self, head: FrameHead) -> None:
        self.specs = head.specs

    def buffer(self, index: int, offset: int, nbytes: int) -> memoryview:
        if self.piece.size < nbytes:
            self.piece = np.empty(nbytes, np.uint8)
        return memoryview(self.piece[:nbytes])

    def received(self, index: int, offset: int, nbytes: int) -> None:
        assert offset == self.count
        self.count += nbytes
        self.nonzero += int(np.count_nonzero(self.piece[:nbytes]))

    def finish(self) -> list[np.ndarray]:
        self.finished = True
        return []


def test_one_array_over_4_gib_streams_with_bounded_buffers() -> None:
    size = (4 << 30) + 24
    big = np.zeros(size, np.uint8)   # untouched zero pages: no memory until written
    big[-1] = 7
    sink = Discard()
    got, sent, received = _pair_roundtrip(Message("m", {}, [big]), Limits(), sink)
    assert sink.specs[0].shape == (size,) and sink.count == size and sink.nonzero == 1
    assert sink.piece.size <= 4 << 20 and sent == received and sink.finished


def _stream_bytes(msg: Message, limits: Limits, change) -> bytes:
    chunk = chunk_size(limits)
    frames = []
    for index, view in enumerate(body_views(msg)):
        for offset in range(0, view.nbytes, chunk):
            piece = bytes(view[offset:offset + chunk])
            frames.append([index, offset, piece])
    frames = change(frames)
    return encode_head(msg, chunk) + b"".join(
        encode_chunk_head(i, o, len(p)) + p for i, o, p in frames)


def _swap(frames):
    frames[1], frames[2] = frames[2], frames[1]
    return frames


def _longer(frames):
    frames[1][2] += b"\0" * 8
    return frames


@pytest.mark.parametrize("change, error", [
    (_swap, "stream chunk 2 of 5: expected array 0 offset 4096 \\(4096 bytes\\), "
            "got array 0 offset 8192"),
    (lambda f: [f[0], f[0]] + f[1:], "stream chunk 2 of 5: expected array 0 offset 4096"),
    (lambda f: [[1, 0, f[0][2]]] + f[1:], "chunk 1 of 5: expected array 0 offset 0 "
                                          "\\(4096 bytes\\), got array 1 offset 0"),
    (_longer, "exceeds limit 4096"),
])
def test_a_bad_chunk_ends_the_stream_before_its_body_is_read(change, error) -> None:
    msg = Message("m", {}, [np.arange(5000, dtype=np.float32)])
    sink = Discard()
    a, b = socket.socketpair()
    with a, b:
        a.sendall(_stream_bytes(msg, SMALL, change))
        a.shutdown(socket.SHUT_WR)
        with pytest.raises(ProtocolError, match=error):
            recv_message(b, SMALL, sink)
    assert not sink.finished


def test_a_stream_that_ends_early_is_a_closed_connection() -> None:
    msg = Message("m", {}, [np.arange(5000, dtype=np.float32)])
    sink = Discard()
    a, b = socket.socketpair()
    with a, b:
        a.sendall(_stream_bytes(msg, SMALL, lambda f: f[:3]))
        a.shutdown(socket.SHUT_WR)
        with pytest.raises(ConnectionClosed, match="mid-frame"):
            recv_message(b, SMALL, sink)
    assert not sink.finished and sink.count == 3 * 4096


# ------------------------------------------------------------------ the spool


_BUDGETS: list[MemoryBudget] = []


@pytest.fixture(autouse=True)
def _close_budgets():
    """A run closes its budget (and the spool files it keeps); so do these tests."""
    yield
    while _BUDGETS:
        _BUDGETS.pop().close()


def _spooled(arrays: list[np.ndarray], tmp_path: Path, monkeypatch) -> tuple:
    monkeypatch.setattr(budget_module, "IN_MEMORY_BYTES", 0)
    _BUDGETS.append(MemoryBudget(1))
    receiver = _BUDGETS[-1].receiver(expect_weights(arrays), tmp_path / "spool")
    got, _, _ = _pair_roundtrip(Message("fit_result", {}, arrays), SMALL, receiver)
    return receiver, got.arrays


def test_a_large_update_goes_to_an_unlinked_file_and_reads_back_exactly(
        tmp_path: Path, monkeypatch) -> None:
    rng = np.random.default_rng(1)
    arrays = [rng.standard_normal((100, 70)).astype(np.float32),
              np.arange(9, dtype=np.int64)]
    receiver, got = _spooled(arrays, tmp_path, monkeypatch)
    assert receiver.spooled and all(isinstance(a, FileArray) for a in got)
    assert os.listdir(tmp_path / "spool") == []   # no name: a crash leaves nothing
    assert (tmp_path / "spool").stat().st_mode & 0o777 == 0o700
    for want, have in zip(arrays, got):
        assert np.asarray(have).tobytes() == want.tobytes() and have.shape == want.shape
        assert have.finite
        assert b"".join(b.tobytes() for _, _, b in flat_blocks(have, 1000)) == want.tobytes()
    reference = [np.zeros_like(a) for a in arrays]
    assert update_distance(got, reference) == update_distance(arrays, reference)
    # folding from the file is folding from memory, bit for bit
    from_file, from_memory = (WeightedAccumulator(arrays, np.float64) for _ in range(2))
    from_file.add(got, 3.0)
    from_memory.add(arrays, 3.0)
    for x, y in zip(from_file.mean(), from_memory.mean()):
        assert x.tobytes() == y.tobytes()
    receiver.release()
    with pytest.raises(OSError):
        got[0].read(0, 10)   # released: the file is gone


def test_the_next_update_overwrites_a_released_spool_file(tmp_path: Path, monkeypatch) -> None:
    """A released spool file is kept for the next update (its pages are reused,
    not taken fresh): the next one reads back exactly, a smaller one leaves no
    stale bytes past its end, the old FileArrays fail rather than read the new
    update, and close() frees the kept files."""
    monkeypatch.setattr(budget_module, "IN_MEMORY_BYTES", 0)
    budget = MemoryBudget(2)
    rng = np.random.default_rng(2)

    def receive(arrays: list[np.ndarray]):
        receiver = budget.receiver(expect_weights(arrays), tmp_path / "spool")
        got, _, _ = _pair_roundtrip(Message("fit_result", {}, arrays), SMALL, receiver)
        return receiver, got.arrays

    big = [rng.standard_normal(5000).astype(np.float32)]
    first, old = receive(big)
    first.release()
    with pytest.raises(OSError):
        old[0].read(0, 10)
    kept = budget._spare[0][1]
    small = [rng.standard_normal(3000).astype(np.float32)]
    second, got = receive(small)
    assert second._spool is not None and second._spool._fd == kept   # the same file
    assert os.fstat(kept).st_size == small[0].nbytes
    assert np.asarray(got[0]).tobytes() == small[0].tobytes()
    with pytest.raises(OSError):
        old[0].read(0, 10)
    # two at once: one reuses, one is new; both come back
    third, _ = receive(big)
    assert third._spool is not None and third._spool._fd != kept
    second.release()
    third.release()
    assert len(budget._spare) == 2
    fds = [fd for _, fd, _ in budget._spare]
    budget.close()
    for fd in fds:
        with pytest.raises(OSError):
            os.fstat(fd)
    late, _ = receive(small)   # a worker that outlives the run: its file is closed
    late_fd = late._spool._fd
    late.release()
    assert budget._spare == []
    with pytest.raises(OSError):
        os.fstat(late_fd)


def test_a_spooled_nan_is_seen_while_it_is_written(tmp_path: Path, monkeypatch) -> None:
    update = np.ones(3000, np.float32)
    update[2999] = np.inf
    receiver, [got] = _spooled([update], tmp_path, monkeypatch)
    assert not got.finite
    accumulator = WeightedAccumulator([update], np.float64, require_finite=True)
    with pytest.raises(ValueError, match="NaN or infinite"):
        accumulator.add([got], 1.0)
    receiver.release()


def test_an_update_of_the_wrong_layout_is_refused_before_any_spool(
        tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(budget_module, "IN_MEMORY_BYTES", 0)
    receiver = MemoryBudget(1).receiver(expect_weights([np.zeros(10, np.float32)]),
                                        tmp_path / "spool")
    with pytest.raises(TrainingError, match="not the model's"):
        _pair_roundtrip(Message("fit_result", {}, [np.zeros(5000, np.float32)]), SMALL,
                        receiver)
    assert not receiver.spooled and not (tmp_path / "spool").exists()


# ------------------------------------------------------------------ whole rounds


def _federation(root: Path, limits: Limits = SMALL, tamper: dict | None = None) -> Federation:
    root.mkdir(exist_ok=True)
    return Federation(root, [10, 30, 60], task="blocktask:BlockTask", tamper=tamper,
                      limits=limits, tasks={"blocktask": BLOCK_TASK})


def _open_spools() -> list[str]:
    links = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            links.append(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            pass
    return [link for link in links if "/spool" in link]


def test_rounds_with_streamed_spooled_updates_equal_rounds_in_memory(
        tmp_path: Path, monkeypatch) -> None:
    training = TrainingSettings(task="blocktask:BlockTask", rounds=3)
    plain = _federation(tmp_path / "plain", Limits())
    try:
        expected = load_weights(plain.coordinator(training).train().final_weights)
    finally:
        plain.close()
    monkeypatch.setattr(budget_module, "IN_MEMORY_BYTES", 0)
    streamed = _federation(tmp_path / "streamed")
    try:
        summary = streamed.coordinator(training).train()
    finally:
        streamed.close()
    result = load_weights(summary.final_weights)
    assert [r.tobytes() for r in result] == [e.tobytes() for e in expected]
    assert summary.history[-1].participants == ["h0", "h1", "h2"]
    assert not _open_spools() and os.listdir(summary.run_dir / "spool") == []


def test_a_nan_in_a_spooled_update_leaves_that_host_out(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(budget_module, "IN_MEMORY_BYTES", 0)
    fed = _federation(tmp_path)
    try:
        training = TrainingSettings(task="blocktask:BlockTask", task_params={"poison": 1},
                                    rounds=2)
        summary = fed.coordinator(training).train()
    finally:
        fed.close()
    for record in summary.history:
        assert record.participants == ["h0", "h2"]
        assert "NaN or infinite" in record.dropped["h1"]
    assert np.isfinite(load_weights(summary.final_weights)[0]).all()
    assert not _open_spools()


def corrupting(how: str):
    """A host whose fit replies go out as a bad stream (marked in the reply)."""
    def change(request, reply):
        if request.kind == "fit" and reply.kind == "fit_result":   # not its resend
            reply.meta["corrupt"] = how
        return reply
    return change


@pytest.fixture
def bad_streams(monkeypatch):
    honest = server_module.send_message

    def send(sock, msg, limits=DEFAULT_LIMITS):
        how = msg.meta.pop("corrupt", None)
        if how is None:
            return honest(sock, msg, limits)
        change = {"reorder": _swap, "duplicate": lambda f: [f[0]] + f,
                  "truncate": lambda f: f[:2]}[how]
        sock.sendall(_stream_bytes(msg, limits, change))
        if how == "truncate":   # then the connection drops
            socket.socket.shutdown(sock, socket.SHUT_RDWR)
        return 0

    monkeypatch.setattr(server_module, "send_message", send)


@pytest.mark.parametrize("how, reason", [
    ("reorder", "stream chunk 2 of"), ("duplicate", "stream chunk 2 of"),
])
def test_a_bad_stream_fails_its_host_for_the_round_and_the_others_carry_on(
        tmp_path: Path, monkeypatch, bad_streams, how: str, reason: str) -> None:
    monkeypatch.setattr(budget_module, "IN_MEMORY_BYTES", 0)
    fed = _federation(tmp_path, tamper={2: corrupting(how)})
    try:
        summary = fed.coordinator(TrainingSettings(task="blocktask:BlockTask",
                                                   rounds=2)).train()
    finally:
        fed.close()
    for record in summary.history:
        assert record.participants == ["h0", "h1"]
        assert reason in record.dropped["h2"]
    state = (summary.run_dir / "state.json").read_text()
    assert '"round": 2' in state
    assert not _open_spools()


def test_a_stream_that_stops_part_way_is_resumed_not_dropped(
        tmp_path: Path, monkeypatch, bad_streams) -> None:
    """The agent keeps its reply: the coordinator reconnects and asks for the rest."""
    monkeypatch.setattr(budget_module, "IN_MEMORY_BYTES", 0)
    training = TrainingSettings(task="blocktask:BlockTask", rounds=2)
    plain = _federation(tmp_path / "plain")
    try:
        expected = load_weights(plain.coordinator(training).train().final_weights)
    finally:
        plain.close()
    cut = _federation(tmp_path / "cut", tamper={2: corrupting("truncate")})
    told: list[str] = []
    try:
        summary = cut.coordinator(training, on_message=told.append).train()
    finally:
        cut.close()
    assert all(r.participants == ["h0", "h1", "h2"] for r in summary.history)
    assert [w.tobytes() for w in load_weights(summary.final_weights)] == \
        [w.tobytes() for w in expected]
    assert told.count("h2: the connection dropped 1 time(s); the transfer went on from "
                      "where it stopped") == 2


@pytest.mark.parametrize("strategy", ["fedavg", "fedadam", "fedmedian", "krum", "dp"])
def test_every_strategy_takes_spooled_updates_as_it_takes_arrays(
        tmp_path: Path, monkeypatch, strategy: str) -> None:
    from flctl.core.privacy.mechanism import CentralDP
    from flctl.core.strategies import FedAvg, make_strategy

    rng = np.random.default_rng(3)
    model = [rng.standard_normal(3000).astype(np.float32), np.zeros((4, 5), np.float32)]
    updates = [[m + rng.standard_normal(m.shape).astype(np.float32) for m in model]
               for _ in range(5)]

    def build():
        if strategy == "dp":
            return CentralDP(FedAvg(), clip_norm=10.0, noise_multiplier=0.5,
                             expected_participants=5, noise_seed=7)
        return make_strategy(strategy, {"num_malicious": 1} if strategy == "krum" else {})

    results = []
    for spool in (False, True):
        aggregator = build().start_round(model, 1)
        receivers = []
        for i, update in enumerate(updates):
            if spool:
                receiver, update = _spooled(update, tmp_path, monkeypatch)
                receivers.append(receiver)
            aggregator.add(f"h{i}", update, 10 + i)
        results.append(aggregator.result())
        for receiver in receivers:
            receiver.release()
    for from_memory, from_file in zip(*results):
        assert from_memory.tobytes() == from_file.tobytes()
