#!/usr/bin/env python3
"""A thousand hosts on this machine: round overhead, coordinator memory, start-up.

Target (issue 16): 1,000 hosts, training.fraction 0.1 (100 sampled per
round), P = 100k float32 parameters: round overhead <= 1.0 s, coordinator
peak RSS <= 1 GB, and every sampled host's update counted (each round's
record has 100 participants, none dropped).

The coordinator is flctl's own, through the entry `flctl train` uses
(coordinator.session.train_workspace) in this process. The 1,000 agents
are real agent request handlers (flctl.agent.main.build_server: the
agent's RequestHandler behind its FrameServer, mutual TLS, real frames),
--per-process of them in each of hosts/per-process worker processes, each
on its own loopback port with its own host certificate issued by the
workspace's CA. They run the echo task (scripts/echo_task.py: fit returns
the weights plus 0.001), so what is measured is flctl's cost.

Round overhead is defined as in bench_round_overhead.py: a round's fit wall
time minus the slowest sampled host's reported compute time, median of the
steady rounds (the first warms up connections, the last also evaluates).
Start-up is the time from the call to train_workspace until round 1 starts
(discovery of all hosts, checks, the initial model): the first round's
callback time minus that round's own seconds. Peak RSS is this process's
high-water mark (VmHWM), which holds nothing but the coordinator and the
set-up before it. Each target prints met or MISSED; exit 1 if one is missed.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import logging
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
from verdict import Target, exit_status  # noqa: E402  (the script's own folder)

ECHO_TASK = Path(__file__).with_name("echo_task.py")
LOOPBACK = "127.0.0.1"
OVERHEAD_TARGET_S = 1.0
RSS_TARGET_BYTES = 1 << 30


def raise_open_files() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


class Sampler:
    """This process's threads and open files, sampled every 50 ms while it runs."""

    def __init__(self) -> None:
        self.threads = self.files = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            self.threads = max(self.threads, threading.active_count())
            self.files = max(self.files, len(os.listdir("/proc/self/fd")))

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def peak_rss_bytes() -> int:
    """This process's resident high-water mark (VmHWM), in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# ---- worker processes: many agents each

def serve(config_list: Path) -> int:
    """Child process: one agent per config file listed, until stdin closes."""
    from flctl.agent.main import build_server

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    raise_open_files()
    servers = []
    for line in config_list.read_text().splitlines():
        server = build_server(Path(line))
        server.start()
        servers.append(server)
    print("ready", flush=True)
    sys.stdin.read()   # the benchmark closes our stdin when it is done
    for server in servers:
        server.stop(join_timeout=1.0)
    return 0


# ---- the federation

def make_workspace(root: Path, hosts: int, n_params: int, fraction: float, rounds: int,
                   eval_every: int) -> None:
    """A workspace of `hosts` local hosts, their certificates and agent configs."""
    from flctl.core import pki
    from flctl.core.agentconfig import AgentConfig, render_agent_config
    from flctl.core.data import Dataset, save_dataset
    from flctl.core.inventory import render_local_inventory
    from flctl.core.settings import AgentSettings, OverlaySettings, Settings, render_settings
    from flctl.net.ports import free_port_block
    from flctl.workspace import init_workspace

    base = free_port_block(hosts)
    # a /22 or wider: the default /24 overlay has addresses for 253 hosts
    prefix = min(24, 32 - int(np.ceil(np.log2(hosts + 3))))
    settings = Settings(
        overlay=OverlaySettings(subnet=ipaddress.IPv4Network(f"10.208.0.0/{prefix}")),
        agent=AgentSettings(port=base)).with_training(
        task="echo_task:EchoTask", task_params={"n_params": n_params}, rounds=rounds,
        fraction=fraction, eval_every=eval_every, deadline_s=120.0, min_hosts=1)
    init_workspace(root, settings=settings)
    (root / "flctl.yaml").write_text(render_settings(settings))
    shutil.copy(ECHO_TASK, root / "tasks" / ECHO_TASK.name)
    rng = np.random.default_rng(0)
    (root / "data").mkdir(exist_ok=True)
    save_dataset(Dataset(rng.normal(size=(100, 4)).astype(np.float32),
                         rng.integers(0, 2, size=100)), root / "data" / "shared.npz")
    names = [f"h{i:04d}" for i in range(1, hosts + 1)]
    (root / "inventory.yaml").write_text(render_local_inventory(
        [(name, "data/shared.npz") for name in names]))
    ca_key = (root / "pki" / "ca.key").read_bytes()
    ca_cert = (root / "pki" / "ca.crt").read_bytes()
    agents = root / "agents"
    for index, name in enumerate(names):
        folder = agents / name
        folder.mkdir(parents=True)
        key, cert = pki.issue_certificate(ca_key, ca_cert, name, [name], [LOOPBACK])
        (folder / "host.key").write_bytes(key)
        os.chmod(folder / "host.key", 0o600)
        (folder / "host.crt").write_bytes(cert)
        config = AgentConfig(
            name=name, project=settings.project, bind_address=LOOPBACK, port=base + index,
            ca_cert=str(root / "pki" / "ca.crt"), cert=str(folder / "host.crt"),
            key=str(folder / "host.key"), data_path=str(root / "data" / "shared.npz"),
            state_file=str(folder / "state.json"), task="echo_task:EchoTask",
            tasks_dir=str(root / "tasks"), max_message_mb=settings.limits.max_message_mb)
        (folder / "agent.json").write_text(render_agent_config(config))


def start_workers(root: Path, hosts: int, per_process: int) -> list[subprocess.Popen]:
    folders = sorted((root / "agents").iterdir())
    workers = []
    for start in range(0, hosts, per_process):
        listing = root / f"worker{start // per_process}.txt"
        listing.write_text("".join(f"{f / 'agent.json'}\n"
                                   for f in folders[start:start + per_process]))
        log = open(root / f"worker{start // per_process}.log", "wb")  # noqa: SIM115
        workers.append(subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--serve", str(listing)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log))
    for worker in workers:
        assert worker.stdout is not None
        if worker.stdout.readline().strip() != b"ready":
            raise SystemExit(f"a worker did not start; see {root}/worker*.log")
    return workers


def stop_workers(workers: list[subprocess.Popen]) -> None:
    for worker in workers:
        assert worker.stdin is not None
        worker.stdin.close()
    for worker in workers:
        try:
            worker.wait(timeout=60)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()


def train(root: Path, open_files: int) -> dict[str, Any]:
    """One run through train_workspace; its records, messages and timings."""
    from flctl.coordinator.session import train_workspace
    from flctl.workspace import load_workspace

    workspace = load_workspace(root)
    records: list[Any] = []
    messages: list[str] = []
    seen: list[float] = []

    cpu: list[float] = []

    def on_round(record: Any) -> None:
        seen.append(time.perf_counter())
        usage = resource.getrusage(resource.RUSAGE_SELF)
        cpu.append(usage.ru_utime + usage.ru_stime)
        records.append(record)

    # by default as many as a shell often starts with: the coordinator raises
    # it itself (coordinator.openfiles)
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(open_files, hard), hard))
    started = time.perf_counter()
    with Sampler() as sampler:
        summary = train_workspace(workspace, workspace.settings.training,
                                  list(workspace.inventory.hosts), run_id="thousand",
                                  on_round=on_round, on_message=messages.append)
    return {"records": records, "messages": messages, "summary": summary,
            "cpu_per_round": [b - a for a, b in zip(cpu, cpu[1:])],
            "threads": sampler.threads, "open_files": sampler.files,
            "nofile_soft": resource.getrlimit(resource.RLIMIT_NOFILE)[0],
            "startup_s": seen[0] - started - records[0].seconds,
            "total_s": time.perf_counter() - started}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hosts", type=int, default=1000)
    parser.add_argument("--per-process", type=int, default=100,
                        help="agents served by each worker process")
    parser.add_argument("--fraction", type=float, default=0.1)
    parser.add_argument("--params", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--eval-every", type=int, default=10_000,
                        help="training.eval_every (the last round always evaluates)")
    parser.add_argument("--open-files", type=int, default=1024,
                        help="the soft open-file limit the coordinator starts with")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--serve", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        return serve(args.serve)

    raise_open_files()
    with tempfile.TemporaryDirectory(prefix="flctl-bench-thousand-") as tmp:
        root = Path(tmp)
        made = time.perf_counter()
        make_workspace(root, args.hosts, args.params, args.fraction, args.rounds,
                       args.eval_every)
        workers = start_workers(root, args.hosts, args.per_process)
        setup_s = time.perf_counter() - made
        try:
            run = train(root, args.open_files)
        finally:
            stop_workers(workers)
    peak = peak_rss_bytes()
    records = run["records"]
    sampled = max(1, int(np.ceil(args.fraction * args.hosts)))
    counted = records[1:-1] if len(records) > 2 else records
    overheads = [r.fit_seconds - r.max_compute_s for r in counted]
    overhead = statistics.median(overheads)
    complete = [len(r.participants) == sampled and not r.dropped for r in records]
    targets = [
        Target(f"round overhead, {args.hosts} hosts, {sampled} per round, P={args.params:,}",
               overhead, "<=", OVERHEAD_TARGET_S, " s"),
        Target("coordinator peak RSS", peak / 2**20, "<=", RSS_TARGET_BYTES / 2**20, " MiB"),
        Target("rounds with every sampled host's update counted", float(sum(complete)), ">=",
               float(len(records)), ""),
    ]
    report = {
        "hosts": args.hosts, "per_process": args.per_process, "sampled_per_round": sampled,
        "params": args.params, "rounds": len(records),
        "setup_s": setup_s, "startup_s": run["startup_s"], "total_s": run["total_s"],
        "overhead_s_median": overhead, "overhead_s_max": max(overheads),
        "round_s_median": statistics.median(r.seconds for r in counted),
        "last_round_s": records[-1].seconds, "last_round_eval_s": records[-1].eval_seconds,
        "participants": [len(r.participants) for r in records],
        "dropped": [len(r.dropped) for r in records],
        "coordinator_cpu_s_per_round": statistics.median(run["cpu_per_round"][:-1]
                                                         or run["cpu_per_round"]),
        "peak_rss_bytes": peak, "peak_threads": run["threads"],
        "peak_open_files": run["open_files"], "open_files_limit": run["nofile_soft"], "messages": run["messages"][:20],
        "targets": [t.as_json() for t in targets], "met": all(t.met for t in targets),
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return exit_status(targets)
    print(f"{args.hosts} agents in {-(-args.hosts // args.per_process)} processes, "
          f"{sampled} sampled per round, P={args.params:,}, {len(records)} rounds "
          f"(set-up {setup_s:.1f} s: certificates, configs, agents started)")
    print(f"start-up (discovery of {args.hosts} hosts to round 1): {run['startup_s']:.2f} s")
    print(f"round: median {report['round_s_median']:.3f} s over {len(counted)} steady rounds; "
          f"overhead median {overhead:.3f} s, max {max(overheads):.3f} s; last round "
          f"(with evaluation) {records[-1].seconds:.2f} s, of it evaluation "
          f"{records[-1].eval_seconds:.2f} s")
    print(f"participants per round: {report['participants']}, dropped: {report['dropped']}")
    print(f"coordinator: {report['coordinator_cpu_s_per_round']:.3f} CPU-s per steady round, "
          f"peak {run['threads']} threads, {run['open_files']} open files "
          f"(its open-file limit, from {args.open_files}: {run['nofile_soft']})")
    for message in run["messages"][:10]:
        print(f"  coordinator: {message}")
    for t in targets:
        print(t.line(".4g"))
    return exit_status(targets)


if __name__ == "__main__":
    sys.exit(main())
