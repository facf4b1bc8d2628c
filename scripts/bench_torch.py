#!/usr/bin/env python3
"""PyTorch overheads (issue 11): a state dict to the wire and back, and a CNN round.

1. Conversion: a model of ~10M parameters (float32, plus a bfloat16 copy of
   the same model) goes the way an update goes: flctl.torch.to_arrays (CPU
   tensors shared, no copy), the wire header and body views
   (flctl.core.messages), the receiver's header parse and buffers, then
   flctl.torch.from_arrays into a model. The socket's own copy is the
   transport's and not counted. Reference: one memcpy of the same bytes
   (numpy.copyto between preallocated arrays). Target: under 2x. For
   context, the same model through the pattern of Flower's PyTorch
   tutorial (`[v.cpu().numpy() for v in state_dict().values()]`, each array
   serialised with np.save as flwr.common.ndarray_to_bytes does, then
   `load_state_dict({k: torch.tensor(v)})`) is timed too.

2. Round: examples/pytorch-digits on 8 local agents (separate processes,
   mutual TLS), FedAvg, one local epoch per round, evaluation only at the
   end. Per round: wall time minus the slowest host's local training time
   (what the host measured around task.fit), median of the steady rounds.
   Target: at most 0.15 s.

    scripts/bench_torch.py [--json] [--hosts 8] [--rounds 8] [--params 10000000]
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import statistics
import sys
import tempfile
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from verdict import Target, exit_status  # noqa: E402  (the script's own folder)

from flctl.coordinator.records import create_run_dir
from flctl.coordinator.rounds import Coordinator
from flctl.coordinator.session import endpoints_for, info_probe, workspace_context
from flctl.core.messages import (
    PRELUDE_SIZE,
    Limits,
    Message,
    body_views,
    encode_head,
    parse_header,
    parse_prelude,
)
from flctl.core.settings import AgentSettings, Settings, render_settings
from flctl.deploy import engine
from flctl.net.agent_client import AgentClient
from flctl.net.ports import free_port_block
from flctl.torch import federated_keys, from_arrays, to_arrays
from flctl.workspace import init_workspace, load_workspace

EXAMPLE_TASKS = Path(__file__).resolve().parents[1] / "examples" / "pytorch-digits" / "tasks"
CONVERSION_TARGET = 2.0     # x a memcpy
ROUND_TARGET_S = 0.15       # s over the slowest host's training
REPEATS = 15
LIMITS = Limits(max_body_bytes=1 << 34)


def big_model(n_params: int, dtype: torch.dtype) -> torch.nn.Module:
    """Linear layers and a BatchNorm (with its int64 counter) of about n_params."""
    width = 1024
    layers = max(1, -(-n_params // (width * width + width)))
    blocks: list[torch.nn.Module] = []
    for _ in range(layers):
        blocks += [torch.nn.Linear(width, width), torch.nn.ReLU()]
    blocks.append(torch.nn.BatchNorm1d(width))
    return torch.nn.Sequential(*blocks).to(dtype)


def best_of(repeats: int, action: Callable[..., float], *args: object) -> float:
    """The fastest of `repeats` runs of `action(*args)`, which returns its own timed seconds."""
    return min(action(*args) for _ in range(repeats))


def flctl_round_trip(sender: torch.nn.Module, receiver: torch.nn.Module,
                     keys: list[str]) -> float:
    """Seconds spent converting, sender and receiver; the socket's fill is not counted."""
    started = time.perf_counter()
    arrays = to_arrays(sender.state_dict(), keys)
    message = Message("fit_result", {"num_examples": 1}, arrays)
    head = encode_head(message)
    views = body_views(message)
    sent = time.perf_counter() - started
    # the transport: buffers as recv_message allocates them, filled from the views
    header_len, body_len = parse_prelude(head[:PRELUDE_SIZE], LIMITS)
    _, _, specs = parse_header(head[PRELUDE_SIZE:], body_len, LIMITS)
    received = [np.empty(s.shape, s.dtype) for s in specs]
    for buffer, view in zip(received, views):
        buffer.reshape(-1).view(np.uint8)[:] = np.frombuffer(view, np.uint8)
    started = time.perf_counter()
    _, _, specs = parse_header(head[PRELUDE_SIZE:PRELUDE_SIZE + header_len], body_len, LIMITS)
    from_arrays(receiver, received, keys)
    return sent + time.perf_counter() - started


def flower_pattern(sender: torch.nn.Module, receiver: torch.nn.Module) -> float:
    """The Flower PyTorch tutorial's get/set_parameters with np.save serialisation."""
    started = time.perf_counter()
    arrays = [value.cpu().numpy() for value in sender.state_dict().values()]
    blobs = []
    for array in arrays:
        buffer = io.BytesIO()
        np.save(buffer, array, allow_pickle=False)
        blobs.append(buffer.getvalue())
    back = [np.load(io.BytesIO(blob), allow_pickle=False) for blob in blobs]
    state = OrderedDict({k: torch.tensor(v) for k, v in zip(receiver.state_dict(), back)})
    receiver.load_state_dict(state, strict=True)
    return time.perf_counter() - started


def memcpy(source: np.ndarray, target: np.ndarray) -> float:
    """One copy between buffers that were touched before (as the model's are)."""
    started = time.perf_counter()
    np.copyto(target, source)
    return time.perf_counter() - started


def conversion(n_params: int) -> list[dict]:
    results = []
    for dtype in (torch.float32, torch.bfloat16):
        sender, receiver = big_model(n_params, dtype), big_model(n_params, dtype)
        keys = federated_keys(sender)
        total = sum(t.numel() * t.element_size() for t in sender.state_dict().values())
        params = sum(t.numel() for t in sender.state_dict().values())
        source, target = np.ones(total, np.uint8), np.zeros(total, np.uint8)
        # interleaved, best of each: the machine's noise hits both alike
        ours, reference = [], []
        for _ in range(REPEATS):
            ours.append(flctl_round_trip(sender, receiver, keys))
            reference.append(memcpy(source, target))
        ours, reference = min(ours), min(reference)
        assert all(torch.equal(a, b) for a, b in zip(sender.state_dict().values(),
                                                     receiver.state_dict().values()))
        row = {"dtype": str(dtype).replace("torch.", ""), "params": params, "bytes": total,
               "flctl_s": ours, "memcpy_s": reference, "ratio": ours / reference}
        if dtype == torch.float32:
            flower = best_of(REPEATS, flower_pattern, sender, receiver)
            row.update(flower_pattern_s=flower, flower_pattern_ratio=flower / reference)
        results.append(row)
    return results


def cnn_federation(hosts: int, rounds: int) -> dict:
    """The example on `hosts` local agents; per-round wall minus the slowest training."""
    with tempfile.TemporaryDirectory(prefix="flctl-bench-torch-") as tmp:
        root = Path(tmp)
        settings = Settings(agent=AgentSettings(port=free_port_block(hosts))).with_training(
            task="digits_cnn:DigitsCNN", task_params={"threads": 1}, epochs=1, lr=0.05,
            rounds=rounds, eval_every=10_000, deadline_s=600.0)
        init_workspace(root, local_hosts=hosts, settings=settings)
        (root / "flctl.yaml").write_text(render_settings(settings))
        shutil.copytree(EXAMPLE_TASKS, root / "tasks", dirs_exist_ok=True)
        workspace = load_workspace(root)
        deployed = engine.deploy(workspace, list(workspace.inventory.hosts),
                                 verify=lambda h, e: info_probe(workspace)(e))
        try:
            failed = [(r.host, r.error) for r in deployed if r.status in ("failed", "unreachable")]
            if failed:
                raise SystemExit(f"deploy failed: {failed}")
            context = workspace_context(workspace)
            limits = Limits(max_body_bytes=workspace.settings.limits.max_message_bytes)
            clients = [AgentClient(e, context, timeout=600, limits=limits)
                       for e in endpoints_for(workspace, workspace.inventory.hosts)]
            records: list = []
            Coordinator(clients, workspace.settings.training, create_run_dir(workspace.paths.runs),
                        tasks_dir=workspace.paths.tasks, on_round=records.append,
                        ca_pem=workspace.paths.ca_cert.read_bytes()).train()
        finally:
            engine.teardown(workspace, list(workspace.inventory.hosts))
    steady = records[1:-1]      # the first warms up, the last also evaluates
    overheads = [r.seconds - r.max_compute_s for r in steady]
    return {"hosts": hosts, "rounds_measured": len(steady),
            "round_s_median": statistics.median(r.seconds for r in steady),
            "slowest_training_s_median": statistics.median(r.max_compute_s for r in steady),
            "overhead_s_median": statistics.median(overheads),
            "overhead_s_max": max(overheads)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=int, default=10_000_000)
    parser.add_argument("--hosts", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    converted = conversion(args.params)
    federation = cnn_federation(args.hosts, args.rounds)
    targets = [Target(f"{row['dtype']} state dict ({row['params']:,} parameters) to the wire "
                      f"and back, vs a memcpy", row["ratio"], "<", CONVERSION_TARGET, "x")
               for row in converted]
    targets.append(Target(f"CNN round on {args.hosts} local agents, over the slowest host's "
                          "training", federation["overhead_s_median"], "<=", ROUND_TARGET_S,
                          " s"))
    if args.json:
        print(json.dumps({"conversion": converted, "round": federation,
                          "targets": [t.as_json() for t in targets]}, indent=2))
        return exit_status(targets)
    for row in converted:
        print(f"{row['dtype']:>9}: {row['bytes'] / 2**20:.0f} MiB, flctl {row['flctl_s'] * 1e3:.1f} ms, "
              f"memcpy {row['memcpy_s'] * 1e3:.1f} ms")
        if "flower_pattern_s" in row:
            print(f"           Flower tutorial pattern {row['flower_pattern_s'] * 1e3:.1f} ms "
                  f"= {row['flower_pattern_ratio']:.2f}x memcpy")
    print(f"CNN rounds: median {federation['round_s_median']:.3f} s, slowest host's training "
          f"{federation['slowest_training_s_median']:.3f} s "
          f"({federation['rounds_measured']} steady rounds)")
    for target in targets:
        print(target.line(".3g"))
    return exit_status(targets)


if __name__ == "__main__":
    sys.exit(main())
