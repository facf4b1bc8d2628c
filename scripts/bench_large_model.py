#!/usr/bin/env python3
"""Large models: training them, the coordinator's memory, and folding speed.

Sections (all by default; pick with --only):

  train   real agents (deployed local agents, separate processes, mutual TLS)
          train a P = 6e8 float32 model (2.4 GB, one array > 2 GiB) for 2
          rounds on 2 hosts, and P = 5e8 for 2 rounds on 4 hosts, with the
          in-place task scripts/big_task.py (an agent holds one model copy).
          Prints round times and the coordinator's peak RSS.
  memory  the coordinator's peak RSS over a FedAvg run at P = 5e8 with 4 and
          with 8 hosts. 8 full agents at that size do not fit next to it in
          24 GiB, so the hosts here are light agent processes that speak the
          real protocol over real TLS, discard the model as it streams in and
          stream back a computed update chunk by chunk (scripts-only; not
          flctl's agent). Targets: peak <= 3x the model's bytes + 300 MB, and
          the 8-host peak within 10% of the 4-host one.
  resume  P = 2.5e8 on 2 real agents, 2 rounds, uncut and then with the
          update of one host reset (`ss -K`, a real TCP reset) when half of
          it has arrived in round 2; the transfer resumes where it stopped.
          Target: the cut round takes at most 1.6x the uncut one.
  partial a model of P = 1e8 float32 whose backbone (90%) is frozen: the
          workspace's frozen/ is shipped to each of 3 deployed local agents
          once, and each round moves only the trainable 1e7. Prints bytes per
          round against the same run with the whole model federated.
          Target: bytes per round = the trainable share (10%) of the full
          run's, within 5% (headers).
  fold    folding one update into the round's sum, finite check included,
          against receiving it at 1 GB/s, at P = 10M (in memory) and P = 5e8
          (from a spool file, as the coordinator does for large updates).
          Also prints, as the hardware reference, a cache-blocked single-pass
          numpy weighted sum over N = 100 updates of P = 10M beside flctl's
          fold of the same inputs.

Peak RSS is the kernel's VmHWM of this process (the coordinator runs here),
reset before each run through /proc/self/clear_refs. Each target is printed
as met or MISSED; the exit status is 1 if one is missed. Only loopback.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
from bench_round_overhead import local_federation  # noqa: E402  (the script's own folder)
from verdict import Target, exit_status  # noqa: E402

from flctl.coordinator.records import create_run_dir
from flctl.coordinator.rounds import Coordinator
from flctl.coordinator.session import endpoints_for, workspace_context
from flctl.core import pki
from flctl.core.aggregation import CHUNK, WeightedAccumulator, all_finite
from flctl.core.layout import Endpoint
from flctl.core.messages import (
    FrameHead,
    Limits,
    Message,
    chunk_size,
    encode_chunk_head,
    encode_head,
)
from flctl.core.settings import TrainingSettings
from flctl.core.spooled import SpoolFile
from flctl.net.agent_client import AgentClient
from flctl.net.framing import ConnectionClosed, recv_message, send_message
from flctl.net.tls import client_context, server_context
from flctl.workspace import load_workspace

BIG_TASK = Path(__file__).with_name("big_task.py")
LOOPBACK = "127.0.0.1"
GB = 1e9
RSS_HEADROOM = 300e6


# ------------------------------------------------------------------ peak RSS

def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")


def peak_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


# ------------------------------------------------------------------ train

def train_real(hosts: int, n_params: int, rounds: int,
               frozen: dict[str, np.ndarray] | None = None) -> dict[str, Any]:
    with local_federation(hosts, BIG_TASK, "big_task:BigTask", frozen) as root:
        workspace = load_workspace(root)
        training = workspace.settings.with_training(
            task="big_task:BigTask", task_params={"n_params": n_params}, rounds=rounds,
            deadline_s=3600.0).training
        limits = Limits(max_body_bytes=workspace.settings.limits.max_message_bytes)
        clients = [AgentClient(e, workspace_context(workspace), timeout=3600, limits=limits)
                   for e in endpoints_for(workspace, workspace.inventory.hosts)]
        records: list[Any] = []
        reset_peak()
        started = time.perf_counter()
        summary = Coordinator(clients, training, create_run_dir(workspace.paths.runs),
                              tasks_dir=workspace.paths.tasks, on_round=records.append,
                              ca_pem=workspace.paths.ca_cert.read_bytes()).train()
        wall = time.perf_counter() - started
        peak = peak_rss()
        with np.load(summary.final_weights) as final:   # every host stepped up from 0
            moved = bool(final[final.files[0]][:1000].min() > 0)
    return {"hosts": hosts, "n_params": n_params, "model_bytes": 4 * n_params,
            "rounds": len(records), "wall_s": wall,
            "round_s": [r.seconds for r in records], "peak_rss": peak,
            "bytes_per_round": [r.bytes_sent + r.bytes_received for r in records],
            "final_weights_moved": moved}


# ------------------------------------------------------------------ resume

def resume_run(n_params: int, cut: bool) -> dict[str, Any]:
    """Round 2's time on 2 real agents, with one update reset half way when `cut`."""
    from flctl.coordinator import budget
    with local_federation(2, BIG_TASK, "big_task:BigTask") as root:
        workspace = load_workspace(root)
        training = workspace.settings.with_training(
            task="big_task:BigTask", task_params={"n_params": n_params}, rounds=2,
            deadline_s=3600.0).training
        limits = Limits(max_body_bytes=workspace.settings.limits.max_message_bytes)
        endpoints = endpoints_for(workspace, workspace.inventory.hosts)
        clients = [AgentClient(e, workspace_context(workspace), timeout=3600, limits=limits)
                   for e in endpoints]
        records: list[Any] = []
        cuts: list[int] = []
        original = budget.UpdateReceiver.received
        half = 2 * n_params

        def received(self: Any, index: int, offset: int, nbytes: int) -> None:
            original(self, index, offset, nbytes)
            if cut and len(records) == 1 and not cuts and offset < half <= offset + nbytes:
                cuts.append(offset + nbytes)
                subprocess.run(["ss", "-K", "dst", endpoints[0].connect_address, "dport", "=",
                                str(endpoints[0].port)], check=True, capture_output=True)

        budget.UpdateReceiver.received = received   # type: ignore[method-assign]
        told: list[str] = []
        try:
            Coordinator(clients, training, create_run_dir(workspace.paths.runs),
                        tasks_dir=workspace.paths.tasks, on_round=records.append,
                        on_message=told.append,
                        ca_pem=workspace.paths.ca_cert.read_bytes()).train()
        finally:
            budget.UpdateReceiver.received = original   # type: ignore[method-assign]
    return {"n_params": n_params, "cut": cut, "cut_at_bytes": cuts[0] if cuts else None,
            "round2_s": records[1].fit_seconds, "participants": records[1].participants,
            "resumed": [line for line in told if "went on from where it stopped" in line]}


# ------------------------------------------------------------------ light agents

class Discard:
    """framing.Receiver that keeps nothing (the model streams through a 4 MiB buffer)."""

    def __init__(self) -> None:
        self.piece = np.empty(0, np.uint8)

    def begin(self, head: FrameHead) -> None:
        pass

    def buffer(self, index: int, offset: int, nbytes: int) -> memoryview:
        if self.piece.size < nbytes:
            self.piece = np.empty(nbytes, np.uint8)
        return memoryview(self.piece[:nbytes])

    def received(self, index: int, offset: int, nbytes: int) -> None:
        pass

    def finish(self) -> list[np.ndarray]:
        return []


def stream_computed(tls: socket.socket, kind: str, meta: dict[str, Any], n_params: int,
                    value: float, limits: Limits) -> None:
    """A reply of one float32 array of `value`s, computed chunk by chunk as it is sent."""
    chunk = chunk_size(limits)
    layout = np.broadcast_to(np.float32(0), (n_params,))   # shape and dtype only
    tls.sendall(encode_head(Message(kind, meta, [layout]), chunk))
    block = np.empty(chunk // 4, np.float32)
    for offset in range(0, 4 * n_params, chunk):
        nbytes = min(chunk, 4 * n_params - offset)
        part = block[:nbytes // 4]
        part.fill(value)
        tls.sendall(encode_chunk_head(0, offset, nbytes))
        tls.sendall(memoryview(part.view(np.uint8)))


def light_agent(root: Path, name: str, n_params: int) -> None:
    """Serve one coordinator connection at a time until stdin closes."""
    limits = Limits(max_body_bytes=64 << 20)
    context = server_context(root / "ca.crt", root / f"{name}.crt", root / f"{name}.key")
    listener = socket.create_server((LOOPBACK, 0))
    print(listener.getsockname()[1], flush=True)
    value = 0.001 * (1 + int(name[1:]))

    def serve(raw: socket.socket) -> None:
        with context.wrap_socket(raw, server_side=True) as tls:
            while True:
                try:
                    request, _ = recv_message(tls, limits, Discard())
                except (ConnectionClosed, OSError):
                    return
                if request.kind == "info":
                    send_message(tls, Message("info", {
                        "name": name, "task": "big_task:BigTask", "version": None,
                        "state": "idle", "data": {"n_train": 100, "n_test": 100,
                                                  "n_features": None, "n_classes": None},
                        "data_error": None, "last_round": None, "rounds_served": 0}), limits)
                elif request.kind == "init":
                    stream_computed(tls, "init_result", {}, n_params, 0.0, limits)
                elif request.kind == "fit":
                    stream_computed(tls, "fit_result", {
                        "num_examples": 100, "metrics": {"train_loss": value},
                        "compute_s": 0.0}, n_params, value, limits)
                else:
                    send_message(tls, Message("eval_result", {
                        "loss": 0.0, "num_examples": 100, "metrics": {"accuracy": 0.0},
                        "compute_s": 0.0}), limits)

    def exit_when_stdin_closes() -> None:
        sys.stdin.read()
        os._exit(0)

    threading.Thread(target=exit_when_stdin_closes, daemon=True).start()
    while True:
        raw, _ = listener.accept()
        threading.Thread(target=serve, args=(raw,), daemon=True).start()


def memory_run(hosts: int, n_params: int, rounds: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="flctl-bench-") as tmp:
        root = Path(tmp)
        ca_key, ca_cert = pki.make_ca("bench CA")
        (root / "ca.crt").write_bytes(ca_cert)
        names = [f"h{i}" for i in range(hosts)]
        for name in names:
            key, cert = pki.issue_certificate(ca_key, ca_cert, name, [name], [LOOPBACK])
            (root / f"{name}.key").write_bytes(key)
            (root / f"{name}.crt").write_bytes(cert)
        key, cert = pki.coordinator_certificate(ca_key, ca_cert)
        (root / "c.key").write_bytes(key)
        (root / "c.crt").write_bytes(cert)
        children = [subprocess.Popen([sys.executable, os.path.abspath(__file__), "--light-agent",
                                      str(root), name, str(n_params)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
                    for name in names]
        try:
            ports = [int(child.stdout.readline()) for child in children]  # type: ignore
            context = client_context(root / "ca.crt", root / "c.crt", root / "c.key")
            limits = Limits(max_body_bytes=64 << 20)
            clients = [AgentClient(Endpoint(name, LOOPBACK, LOOPBACK, port, name), context,
                                   timeout=3600, limits=limits)
                       for name, port in zip(names, ports)]
            training = TrainingSettings(task="big_task:BigTask", rounds=rounds,
                                        deadline_s=3600.0)
            records: list[Any] = []
            reset_peak()
            Coordinator(clients, training, create_run_dir(root / "runs"),
                        on_round=records.append).train()
            peak = peak_rss()
        finally:
            for child in children:
                child.stdin.close()  # type: ignore[union-attr]
                child.wait(timeout=30)
    return {"hosts": hosts, "n_params": n_params, "model_bytes": 4 * n_params,
            "peak_rss": peak, "round_s": [r.seconds for r in records]}


# ------------------------------------------------------------------ fold

def blocked_reference(updates: list[np.ndarray], weights: list[float]) -> np.ndarray:
    """sum_i w_i u_i in one pass over the inputs, a cache-sized block at a time."""
    size = updates[0].size
    out = np.empty(size, np.float64)
    scratch = np.empty(CHUNK, np.float64)
    for start in range(0, size, CHUNK):
        stop = min(start + CHUNK, size)
        block, part = out[start:stop], scratch[:stop - start]
        np.multiply(updates[0][start:stop], weights[0], out=block)
        for update, weight in zip(updates[1:], weights[1:]):
            np.multiply(update[start:stop], weight, out=part)
            block += part
    return out


def fold_one(n_params: int, spool: bool, repeats: int = 3) -> dict[str, Any]:
    """Seconds to check and fold one update of n_params float32 (best of repeats)."""
    update = np.random.default_rng(0).standard_normal(n_params, dtype=np.float32)
    source: Any = update
    handle = None
    if spool:
        handle = SpoolFile(Path(tempfile.gettempdir()) / "flctl-bench-spool", [(update.dtype,
                                                                               update.shape)])
        view = memoryview(update.view(np.uint8))
        for offset in range(0, update.nbytes, 4 << 20):
            piece = view[offset:offset + (4 << 20)]
            handle.buffer(piece.nbytes)[:] = piece   # what the socket does
            handle.write(0, offset, piece.nbytes)    # the finite check happens here
        [source] = handle.arrays()
    del update
    best = float("inf")
    for _ in range(repeats):
        accumulator = WeightedAccumulator([source], np.float64, require_finite=True)
        started = time.perf_counter()
        if not spool:
            assert all_finite(source)  # for a spooled update it was done while written
        accumulator.add([source], 37.0)
        best = min(best, time.perf_counter() - started)
        del accumulator
    check = 0.0
    if spool:   # the spool's finite check, per piece, as the coordinator runs it
        probe = np.random.default_rng(0).standard_normal(min(n_params, 1 << 24),
                                                         dtype=np.float32)
        started = time.perf_counter()
        for offset in range(0, probe.size, 1 << 20):
            np.isfinite(probe[offset:offset + (1 << 20)]).all()
        check = (time.perf_counter() - started) * n_params / probe.size
        handle.close()   # type: ignore[union-attr]
    seconds = best + check
    receive = 4 * n_params / GB
    return {"n_params": n_params, "spooled": spool, "fold_s": best, "check_s": check,
            "seconds": seconds, "receive_at_1gb_s": receive, "ratio": seconds / receive}


def fold_many(n: int, n_params: int) -> dict[str, Any]:
    rng = np.random.default_rng(1)
    updates = [rng.standard_normal(n_params, dtype=np.float32) for _ in range(n)]
    counts = [int(c) for c in rng.integers(50, 500, n)]
    weights = [c / sum(counts) for c in counts]
    started = time.perf_counter()
    accumulator = WeightedAccumulator(updates[:1], np.float64, require_finite=True)
    for update, count in zip(updates, counts):
        accumulator.add([update], float(count))
    accumulator.take_mean()
    flctl_s = time.perf_counter() - started
    started = time.perf_counter()
    blocked_reference(updates, weights)
    reference_s = time.perf_counter() - started
    return {"n": n, "n_params": n_params, "flctl_s": flctl_s, "reference_s": reference_s,
            "ratio": flctl_s / reference_s}


# ------------------------------------------------------------------ main

def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=["train", "memory", "resume", "partial", "fold"],
                        action="append")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--light-agent", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.light_agent:
        root, name, n_params = args.light_agent
        light_agent(Path(root), name, int(n_params))
        return 0
    sections = args.only or ["train", "memory", "resume", "partial", "fold"]
    report: dict[str, Any] = {}
    targets: list[Target] = []
    lines: list[str] = []
    if "train" in sections:
        runs = [train_real(2, 600_000_000, 2), train_real(4, 500_000_000, 2)]
        report["train"] = runs
        for run in runs:
            lines.append(f"train: P={run['n_params']:.1e} ({run['model_bytes'] / GB:.1f} GB) on "
                         f"{run['hosts']} agents, {run['rounds']} rounds: rounds "
                         f"{', '.join(f'{s:.1f}' for s in run['round_s'])} s, coordinator peak "
                         f"RSS {run['peak_rss'] / GB:.2f} GB "
                         f"({run['peak_rss'] / run['model_bytes']:.2f}x the model), "
                         f"{run['bytes_per_round'][-1] / GB:.1f} GB moved per round")
            targets.append(Target(f"train P={run['n_params']:.0e} on {run['hosts']} agents: "
                                  f"rounds done with the model moved",
                                  run["rounds"] if run["final_weights_moved"] else 0, ">=", 2))
    if "memory" in sections:
        runs = [memory_run(4, 500_000_000, 2), memory_run(8, 500_000_000, 2)]
        report["memory"] = runs
        for run in runs:
            limit = 3 * run["model_bytes"] + RSS_HEADROOM
            lines.append(f"memory: P=5e8 with {run['hosts']} hosts: coordinator peak RSS "
                         f"{run['peak_rss'] / GB:.2f} GB = "
                         f"{run['peak_rss'] / run['model_bytes']:.2f}x the model "
                         f"(rounds {', '.join(f'{s:.1f}' for s in run['round_s'])} s)")
            targets.append(Target(f"peak RSS with {run['hosts']} hosts", run["peak_rss"] / GB,
                                  "<=", limit / GB, " GB"))
        spread = abs(runs[1]["peak_rss"] / runs[0]["peak_rss"] - 1)
        targets.append(Target("8-host peak against 4-host peak, difference", 100 * spread,
                              "<=", 10.0, "%"))
    if "resume" in sections:
        uncut, cut = resume_run(250_000_000, False), resume_run(250_000_000, True)
        report["resume"] = [uncut, cut]
        ratio = cut["round2_s"] / uncut["round2_s"]
        lines.append(f"resume: P=2.5e8, round 2's fit {uncut['round2_s']:.1f} s uncut, "
                     f"{cut['round2_s']:.1f} s with one update reset at "
                     f"{(cut['cut_at_bytes'] or 0) / 1e9:.2f} GB of 1.0 GB "
                     f"({'; '.join(cut['resumed']) or 'NOT resumed'})")
        ok = bool(cut["resumed"]) and len(cut["participants"]) == 2
        targets.append(Target("cut round / uncut round", ratio if ok else float("inf"), "<=",
                              1.6, "x"))
    if "partial" in sections:
        total, trainable = 100_000_000, 10_000_000
        backbone = np.random.default_rng(0).standard_normal(total - trainable,
                                                             dtype=np.float32)
        full = train_real(3, total, 2)
        partial = train_real(3, trainable, 2, frozen={"backbone": backbone})
        del backbone
        report["partial"] = {"full": full, "partial": partial}
        share = trainable / total
        ratio = partial["bytes_per_round"][-1] / (share * full["bytes_per_round"][-1])
        lines.append(f"partial: P={total:.0e} with {1 - share:.0%} frozen on 3 agents: "
                     f"{partial['bytes_per_round'][-1] / 1e6:.1f} MB per round against "
                     f"{full['bytes_per_round'][-1] / 1e6:.1f} MB with the whole model "
                     f"federated ({ratio:.3f}x the trainable share)")
        targets.append(Target("partial bytes per round / trainable share of the full run",
                              abs(ratio - 1) * 100, "<=", 5.0, "%"))
    if "fold" in sections:
        folds = [fold_one(10_000_000, spool=False), fold_one(500_000_000, spool=True)]
        many = fold_many(100, 10_000_000)
        report["fold"] = {"one": folds, "many": many}
        for fold in folds:
            where = "from a spool file" if fold["spooled"] else "in memory"
            lines.append(f"fold: one update of P={fold['n_params']:.0e} {where}: "
                         f"{fold['seconds']:.3f} s (check {fold['check_s']:.3f} s) against "
                         f"{fold['receive_at_1gb_s']:.3f} s to receive it at 1 GB/s")
            targets.append(Target(f"fold/receive at P={fold['n_params']:.0e}", fold["ratio"],
                                  "<", 1.0, "x"))
        lines.append(f"fold: N={many['n']} updates of P={many['n_params']:.0e}: flctl "
                     f"{many['flctl_s']:.2f} s, cache-blocked single-pass numpy reference "
                     f"{many['reference_s']:.2f} s ({many['ratio']:.2f}x; no target)")
    report["targets"] = [t.as_json() for t in targets]
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print("\n".join(lines))
        for target in targets:
            print(f"  {target.line()}")
    return exit_status(targets)


if __name__ == "__main__":
    sys.exit(main())
