#!/usr/bin/env python3
"""Round overhead on loopback: round wall time minus the slowest host's compute.

Starts N real agents (separate processes, mutual TLS) through the deploy
engine, trains R rounds of a P-parameter float32 model with a task whose
local step is one pass over the weights, and reports the per-round overhead
(median), i.e. what flctl itself costs: transport, framing, aggregation.

Targets (issue 2): <= 0.15 s for P=1M and <= 1.5 s for P=10M with N=8.
Reference: Flower 1.42's deployment engine spends ~12 s (P=1M) and ~21 s
(P=10M) per round on this machine.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from flctl.coordinator.records import create_run_dir
from flctl.coordinator.rounds import Coordinator
from flctl.coordinator.session import endpoints_for, info_probe, workspace_context
from flctl.core.messages import Limits
from flctl.core.settings import AgentSettings, Settings, render_settings
from flctl.deploy import engine
from flctl.net.agent_client import AgentClient
from flctl.net.ports import free_port_block
from flctl.workspace import init_workspace, load_workspace

TARGETS = {1_000_000: 0.15, 10_000_000: 1.5}
FLOWER_SECONDS = {1_000_000: 12.0, 10_000_000: 21.0}

ECHO_TASK = Path(__file__).with_name("echo_task.py")


def measure(root: Path, n_params: int, rounds: int, **overrides: object) -> dict:
    """Train `rounds` rounds of the echo task; median figures of the steady rounds."""
    workspace = load_workspace(root)
    training = workspace.settings.with_training(
        task="echo_task:EchoTask", task_params={"n_params": n_params}, rounds=rounds,
        eval_every=10_000, deadline_s=600.0, **overrides).training
    context = workspace_context(workspace)
    limits = Limits(max_body_bytes=workspace.settings.limits.max_message_bytes)
    clients = [AgentClient(e, context, timeout=600, limits=limits)
               for e in endpoints_for(workspace, workspace.inventory.hosts)]
    records = []
    coordinator = Coordinator(clients, training, create_run_dir(workspace.paths.runs),
                              task_search_path=[workspace.paths.tasks],
                              on_round=records.append,
                              ca_pem=workspace.paths.ca_cert.read_bytes())
    coordinator.train()
    # The last round also evaluates; the first warms up connections.
    steady = records[1:-1] if len(records) > 2 else records
    overheads = [r.fit_seconds - r.max_compute_s for r in steady]
    return {
        "n_params": n_params,
        "rounds_measured": len(steady),
        "overhead_s_median": statistics.median(overheads),
        "overhead_s_min": min(overheads),
        "fit_seconds_median": statistics.median(r.fit_seconds for r in steady),
        "max_compute_s_median": statistics.median(r.max_compute_s for r in steady),
        "bytes_per_round": steady[-1].bytes_sent + steady[-1].bytes_received,
    }


@contextmanager
def echo_federation(hosts: int) -> Iterator[Path]:
    """A workspace of `hosts` deployed local agents with the echo task; torn down after."""
    with tempfile.TemporaryDirectory(prefix="flctl-bench-") as tmp:
        root = Path(tmp)
        settings = Settings(agent=AgentSettings(port=free_port_block(hosts)))
        init_workspace(root, local_hosts=hosts, settings=settings)
        (root / "flctl.yaml").write_text(render_settings(settings))
        shutil.copy(ECHO_TASK, root / "tasks" / "echo_task.py")
        workspace = load_workspace(root)
        results = engine.deploy(workspace, list(workspace.inventory.hosts),
                                verify=lambda h, e: info_probe(workspace)(e))
        failed = [(r.host, r.error) for r in results if r.status in ("failed", "unreachable")]
        try:
            if failed:
                raise SystemExit(f"deploy failed: {failed}")
            yield root
        finally:
            engine.teardown(workspace, list(workspace.inventory.hosts))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--hosts", type=int, default=8)
    parser.add_argument("--params", type=int, nargs="+", default=[1_000_000, 10_000_000])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with echo_federation(args.hosts) as root:
        figures = [measure(root, p, args.rounds) for p in args.params]
    for figure in figures:
        target = TARGETS.get(figure["n_params"])
        flower = FLOWER_SECONDS.get(figure["n_params"])
        figure["target_s"] = target
        figure["ratio_to_target"] = figure["overhead_s_median"] / target if target else None
        figure["flower_round_s"] = flower
        figure["speedup_vs_flower"] = flower / figure["fit_seconds_median"] if flower else None
    if args.json:
        print(json.dumps({"hosts": args.hosts, "results": figures}, indent=2))
        return 0
    print(f"round overhead on loopback, N={args.hosts} agents (median of steady rounds)")
    for f in figures:
        line = (f"P={f['n_params']:>11,}  overhead {f['overhead_s_median']:.3f} s "
                f"(round {f['fit_seconds_median']:.3f} s, slowest compute "
                f"{f['max_compute_s_median']:.3f} s, {f['bytes_per_round'] / 1e6:.0f} MB moved)")
        if f["target_s"]:
            line += (f"  target {f['target_s']} s -> {f['ratio_to_target']:.2f}x of budget; "
                     f"Flower ~{f['flower_round_s']:.0f} s/round -> {f['speedup_vs_flower']:.0f}x faster")
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
