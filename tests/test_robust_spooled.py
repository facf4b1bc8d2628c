"""Robust strategies with spooled updates: each host's copy is held on disk, read
back block by block, and the round's result is bit for bit the in-memory one."""

from __future__ import annotations

import gc
import os
import tracemalloc
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from flctl.core.dtypes import bfloat16
from flctl.core.spooled import FileArray, SpoolFile
from flctl.core.strategies import StrategyError, make_strategy, robust

HOSTS = 9
PIECE = 4096   # what one wire chunk writes; whole elements of every dtype here
ROBUST = [("fedmedian", {}), ("fedtrimmedavg", {}), ("fedtrimmedavg", {"beta": 0.3}),
          ("krum", {"num_malicious": 1}), ("multikrum", {"num_malicious": 1}),
          ("multikrum", {"num_malicious": 2, "to_keep": 2})]
IDS = [f"{name}{'-' + '-'.join(f'{k}={v}' for k, v in params.items()) if params else ''}"
       for name, params in ROBUST]


def spool(arrays: list[np.ndarray], directory: Path) -> SpoolFile:
    """`arrays` written into a SpoolFile piece by piece, as the coordinator's receiver does."""
    handle = SpoolFile(directory, [(a.dtype, a.shape) for a in arrays])
    for index, array in enumerate(arrays):
        data = memoryview(np.ascontiguousarray(array).reshape(-1).view(np.uint8))
        for offset in range(0, data.nbytes, PIECE):
            piece = data[offset:offset + PIECE]
            handle.buffer(piece.nbytes)[:] = piece
            handle.write(index, offset, piece.nbytes)
    return handle


def open_spools(directory: Path) -> int:
    """Open file descriptors of this process on (unlinked) files under `directory`."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            count += os.readlink(f"/proc/self/fd/{fd}").startswith(str(directory))
        except OSError:
            pass
    return count


def model() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.standard_normal((13, 40)).astype(np.float32),
            rng.standard_normal(257),                                   # float64
            rng.standard_normal((6, 7)).astype(np.float32).astype(bfloat16()),
            np.array([5, 9, 2], np.int64),                              # a counter buffer
            np.zeros((0, 3), np.float32),
            np.array(1.5, np.float32)]


def updates(count: int = HOSTS, seed: int = 1) -> dict[str, list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    result = {}
    for i in range(count):
        result[f"h{i}"] = [(w + rng.standard_normal(w.shape)).astype(w.dtype)
                           if w.dtype != np.int64 else w + rng.integers(0, 50, w.shape)
                           for w in model()]
    return result


def aggregate(name: str, params: dict, hosts: dict[str, list[np.ndarray]],
              spooled: set[str], directory: Path, order: list[str] | None = None):
    """The round's result with the hosts in `spooled` handed over as FileArrays;
    each spool is released right after add(), as the coordinator does."""
    round_ = make_strategy(name, params).start_round(model(), 3)
    for host in order or sorted(hosts):
        if host in spooled:
            handle = spool(hosts[host], directory)
            try:
                round_.add(host, handle.arrays(), 10)
            finally:
                handle.close()
        else:
            round_.add(host, hosts[host], 10)
    return round_, round_.result()


def same(a: list[np.ndarray], b: list[np.ndarray]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.dtype == y.dtype and x.shape == y.shape
        assert x.tobytes() == y.tobytes()


# ----------------------------------------------------------------- same result


@pytest.mark.parametrize("block", [50, robust.BLOCK_ELEMENTS])
@pytest.mark.parametrize(("name", "params"), ROBUST, ids=IDS)
def test_spooled_updates_give_the_in_memory_result_bit_for_bit(
        name: str, params: dict, block: int, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(robust, "BLOCK_ELEMENTS", block)  # 50: many blocks, ragged ones
    hosts = updates()
    memory_round, from_memory = aggregate(name, params, hosts, set(), tmp_path)
    shuffled = [f"h{i}" for i in np.random.default_rng(block).permutation(HOSTS)]
    disk_round, from_disk = aggregate(name, params, hosts, set(hosts), tmp_path, shuffled)
    mixed_round, mixed = aggregate(name, params, hosts, {"h0", "h3", "h4"}, tmp_path)
    same(from_memory, from_disk)
    same(from_memory, mixed)
    assert [a.dtype for a in from_disk] == [a.dtype for a in model()]
    assert not any(isinstance(a, FileArray) for a in from_disk)
    if name in ("krum", "multikrum"):
        assert disk_round.scores == memory_round.scores == mixed_round.scores
        assert disk_round.selected == memory_round.selected == mixed_round.selected
    assert open_spools(tmp_path) == 0 and os.listdir(tmp_path) == []


def test_the_held_copies_are_files_closed_once_the_round_is_done(tmp_path: Path) -> None:
    hosts = updates()
    round_ = make_strategy("fedmedian").start_round(model(), 1)
    for host in sorted(hosts):
        handle = spool(hosts[host], tmp_path)
        round_.add(host, handle.arrays(), 10)
        handle.close()   # the receiver's file is gone: the round kept its own
    assert open_spools(tmp_path) == HOSTS
    assert os.listdir(tmp_path) == []   # unlinked: a crash leaves nothing behind
    held = round_._updates["h0"]
    assert all(isinstance(a, FileArray) for a in held)
    assert [a.dtype for a in held] == [np.float32, np.float64, np.float32, np.float64,
                                       np.float32, np.float32]   # the held dtypes
    round_.result()
    assert open_spools(tmp_path) == 0 and round_._updates == {}


def test_an_abandoned_round_closes_its_files(tmp_path: Path) -> None:
    hosts = updates(3)
    for end in ("close", "drop"):
        round_ = make_strategy("krum").start_round(model(), 1)
        for host in sorted(hosts):
            handle = spool(hosts[host], tmp_path)
            round_.add(host, handle.arrays(), 10)
            handle.close()
        assert open_spools(tmp_path) == 3
        if end == "close":
            round_.close()
            with pytest.raises(StrategyError, match="after the round was closed"):
                round_.add("h9", hosts["h0"], 10)
        else:   # too few hosts: the coordinator drops the round without result()
            del round_
            gc.collect()
        assert open_spools(tmp_path) == 0


# ----------------------------------------------------------------- refusals


@pytest.mark.parametrize(("name", "params"), ROBUST, ids=IDS)
def test_a_spooled_nan_is_refused_and_the_others_aggregate(
        name: str, params: dict, tmp_path: Path) -> None:
    hosts = updates()
    bad = [a.copy() for a in hosts["h3"]]
    bad[2][4, 5] = np.nan   # the bfloat16 array: seen while it was spooled
    overflow = [a.copy() for a in hosts["h5"]]
    overflow[0] = overflow[0].astype(np.float64)
    overflow[0][12, 39] = 1e300   # finite in its file, infinite in the float32 copy
    round_ = make_strategy(name, params).start_round(model(), 4)
    for host in sorted(hosts):
        handle = spool({"h3": bad, "h5": overflow}.get(host, hosts[host]), tmp_path)
        try:
            if host in ("h3", "h5"):
                array = 2 if host == "h3" else 0
                with pytest.raises(StrategyError, match=f"round 4: update from {host}: array "
                                                        f"{array}: contains NaN or infinite"):
                    round_.add(host, handle.arrays(), 10)
                assert open_spools(tmp_path) == round_.count + 1   # its own, not a copy
            else:
                round_.add(host, handle.arrays(), 10)
        finally:
            handle.close()
    assert round_.count == HOSTS - 2 and round_.hosts == set(hosts) - {"h3", "h5"}
    result = round_.result()
    others = {h: u for h, u in hosts.items() if h not in ("h3", "h5")}
    same(result, aggregate(name, params, others, set(), tmp_path)[1])
    assert open_spools(tmp_path) == 0


def test_a_spooled_update_of_the_wrong_shape_is_refused_before_any_copy(
        tmp_path: Path) -> None:
    round_ = make_strategy("fedmedian").start_round(model(), 2)
    wrong = updates(1)["h0"]
    wrong[1] = wrong[1][:-1]
    handle = spool(wrong, tmp_path)
    with pytest.raises(StrategyError, match="array 1: expected shape"):
        round_.add("h0", handle.arrays(), 10)
    assert open_spools(tmp_path) == 1 and round_.count == 0
    handle.close()


def test_an_update_the_disk_cannot_hold_is_refused_and_leaves_no_file(
        tmp_path: Path, monkeypatch) -> None:
    round_ = make_strategy("fedmedian").start_round(model(), 2)
    handle = spool(updates(1)["h0"], tmp_path)
    monkeypatch.setattr(robust.shutil, "disk_usage", lambda path: SimpleNamespace(free=100))
    with pytest.raises(StrategyError, match=r"round 2: update from h0: holding it on disk "
                                            r"needs 0.00 GB, 0.00 GB are free under"):
        round_.add("h0", handle.arrays(), 10)
    assert open_spools(tmp_path) == 1 and round_.count == 0
    handle.close()


# ----------------------------------------------------------------- memory


def traced_peak(run) -> int:
    """Peak bytes numpy (and Python) allocated while `run()` ran."""
    gc.collect()
    tracemalloc.start()
    try:
        base, _ = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        run()
        return tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()


# One per way a result is made: merged per coordinate (FedTrimmedAvg's is the
# median's), one update read back whole, a float64 mean of several.
@pytest.mark.parametrize(("name", "params"), [("fedmedian", {}),
                                              ("krum", {"num_malicious": 1}),
                                              ("multikrum", {"num_malicious": 1})])
def test_spooled_rounds_hold_about_one_model_not_one_per_host(
        name: str, params: dict, tmp_path: Path) -> None:
    size, count = 8 << 20, 6   # 32 MB of float32 per update
    global_weights = [np.zeros(size, np.float32)]
    nbytes = size * 4

    def update(i: int) -> list[np.ndarray]:
        return [np.random.default_rng(i).standard_normal(size, np.float32)]

    handles = []
    for i in range(count):
        handles.append(spool(update(i), tmp_path))
    results = {}

    def from_disk() -> None:
        round_ = make_strategy(name, params).start_round(global_weights, 1)
        for i, handle in enumerate(handles):
            round_.add(f"h{i}", handle.arrays(), 10)
            handle.close()
        results["disk"] = round_.result()

    disk_peak = traced_peak(from_disk)
    assert open_spools(tmp_path) == 0
    in_memory = [update(i) for i in range(count)]

    def from_memory() -> None:
        round_ = make_strategy(name, params).start_round(global_weights, 1)
        for i, arrays in enumerate(in_memory):
            round_.add(f"h{i}", arrays, 10)
        results["memory"] = round_.result()

    memory_peak = traced_peak(from_memory)
    same(results["disk"], results["memory"])
    # Measured: 7.3x / 6.3x / 8.0x in memory, 1.3x / 1.0x / 2.0x spooled.
    assert memory_peak > count * nbytes   # the measure sees the copies where they are
    assert disk_peak < 2.5 * nbytes, f"{disk_peak / nbytes:.2f}x the model"
