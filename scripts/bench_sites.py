#!/usr/bin/env python3
"""Site aggregation: what reaches the coordinator, and what a round costs.

A local federation of SITES x PER_SITE deployed agents (separate processes,
mutual TLS; 4 x 8 = 32 by default) whose inventory makes each group of
PER_SITE hosts a site with its first host as aggregator. Each runs
scripts/big_task.py at P = 1M float32 (4 MB): one in-place step and no
data to speak of, so a round is dominated by moving and folding the model.
Every host is sampled every round (fraction 1).

The same agents train twice with the same seed: flat (every host's update
goes to the coordinator) and through the sites (one update per site). Per
round this prints the bytes the coordinator received, counted at its client
sockets as protocol frames (headers and arrays; TLS records not counted),
and the round's seconds. Rounds 2..R-1 are measured: round 1 warms up and
round R also evaluates on every host.

Targets: bytes received per site round <= SITES x model bytes + 5%, and the
site round's median time <= 1.2 x the flat one's. Each target is printed as
met or MISSED (scripts/verdict.py); the exit status is 1 if one is missed.
Only loopback.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from verdict import Target, exit_status  # noqa: E402  (the script's own folder)

from flctl.coordinator.records import create_run_dir, load_weights
from flctl.coordinator.rounds import Coordinator
from flctl.coordinator.session import endpoints_for, info_probe, workspace_context
from flctl.core.data import Dataset, save_dataset
from flctl.core.messages import Limits
from flctl.core.settings import AgentSettings, Settings, render_settings
from flctl.deploy import engine
from flctl.net.agent_client import AgentClient
from flctl.net.ports import free_port_block
from flctl.workspace import init_workspace, load_workspace

BIG_TASK = Path(__file__).with_name("big_task.py")
TASK = "big_task:BigTask"


def site_inventory(sites: int, per_site: int) -> str:
    lines = ["all:", "  vars:", "    connection: local", "  children:"]
    for s in range(sites):
        first = s * per_site + 1
        lines += [f"    site{s + 1}:", f"      aggregator: local{first}", "      hosts:"]
        lines += [f"        local{i}: {{data_path: data/local{i}.npz}}"
                  for i in range(first, first + per_site)]
    return "\n".join(lines) + "\n"


@contextmanager
def federation(sites: int, per_site: int) -> Iterator[Path]:
    hosts = sites * per_site
    with tempfile.TemporaryDirectory(prefix="flctl-bench-sites-") as tmp:
        root = Path(tmp)
        settings = Settings(agent=AgentSettings(port=free_port_block(hosts))).with_training(
            task=TASK)
        init_workspace(root, local_hosts=hosts, settings=settings)
        (root / "flctl.yaml").write_text(render_settings(settings))
        (root / "inventory.yaml").write_text(site_inventory(sites, per_site))
        rng = np.random.default_rng(0)
        for index in range(1, hosts + 1):   # big_task claims 100 examples: have them
            save_dataset(Dataset(rng.normal(size=(100, 4)).astype(np.float32),
                                 rng.integers(0, 2, 100)), root / "data" / f"local{index}.npz")
        shutil.copy(BIG_TASK, root / "tasks" / BIG_TASK.name)
        workspace = load_workspace(root)
        started = time.perf_counter()
        results = engine.deploy(workspace, list(workspace.inventory.hosts), forks=8,
                                verify=lambda h, e: info_probe(workspace)(e))
        print(f"deployed {hosts} agents in {time.perf_counter() - started:.0f} s", flush=True)
        failed = [(r.host, r.error) for r in results if r.status in ("failed", "unreachable")]
        try:
            if failed:
                raise SystemExit(f"deploy failed: {failed[:3]}")
            yield root
        finally:
            engine.teardown(workspace, list(workspace.inventory.hosts))


def train(root: Path, n_params: int, rounds: int, sites: bool) -> dict[str, Any]:
    workspace = load_workspace(root)
    training = workspace.settings.with_training(
        task=TASK, task_params={"n_params": n_params}, rounds=rounds, fraction=1.0,
        eval_every=rounds, deadline_s=600.0, seed=3).training
    limits = Limits(max_body_bytes=workspace.settings.limits.max_message_bytes)
    clients = [AgentClient(e, workspace_context(workspace), timeout=600, limits=limits)
               for e in endpoints_for(workspace, workspace.inventory.hosts)]
    records: list[Any] = []
    summary = Coordinator(clients, training, create_run_dir(workspace.paths.runs),
                          tasks_dir=workspace.paths.tasks, on_round=records.append,
                          ca_pem=workspace.paths.ca_cert.read_bytes(),
                          sites=workspace.inventory.sites if sites else None).train()
    measured = records[1:-1] or records
    return {"sites": sites, "round_s": [r.seconds for r in records],
            "bytes_received": [r.bytes_received for r in records],
            "bytes_sent": [r.bytes_sent for r in records],
            "participants": [len(r.participants) for r in records],
            "median_round_s": statistics.median(r.seconds for r in measured),
            "max_bytes_received": max(r.bytes_received for r in measured),
            "final": load_weights(summary.final_weights)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sites", type=int, default=4)
    parser.add_argument("--per-site", type=int, default=8)
    parser.add_argument("--params", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    model_bytes = 4 * args.params
    with federation(args.sites, args.per_site) as root:
        flat = train(root, args.params, args.rounds, sites=False)
        sited = train(root, args.params, args.rounds, sites=True)
    same = all(abs(float((a - b).max())) < 1e-5 for a, b in zip(flat.pop("final"),
                                                               sited.pop("final")))
    for run in (flat, sited):
        name = "sites" if run["sites"] else "flat"
        print(f"{name:5s} rounds (s): {' '.join(f'{s:.2f}' for s in run['round_s'])}; "
              f"received per round (MB): "
              f"{' '.join(f'{b / 1e6:.1f}' for b in run['bytes_received'])}; "
              f"sent per round (MB): {' '.join(f'{b / 1e6:.1f}' for b in run['bytes_sent'])}")
    print(f"model {model_bytes / 1e6:.1f} MB, {args.sites} sites x {args.per_site} hosts; "
          f"final weights equal: {same}")
    targets = [
        Target("coordinator bytes received per site round / model bytes",
               sited["max_bytes_received"] / model_bytes, "<=", args.sites * 1.05),
        Target("site round time / flat round time (median)",
               sited["median_round_s"] / flat["median_round_s"], "<=", 1.2, "x"),
    ]
    for target in targets:
        print(target.line())
    print("PASS" if all(t.met for t in targets) and same else "MISS")
    if args.json:
        print(json.dumps({"flat": flat, "sites": sited,
                          "targets": [t.as_json() for t in targets]}))
    return exit_status(targets) if same else 1


if __name__ == "__main__":
    sys.exit(main())
