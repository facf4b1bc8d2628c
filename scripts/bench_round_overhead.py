#!/usr/bin/env python3
"""Round overhead on loopback: round wall time minus the slowest host's compute.

Starts N real agents (separate processes, mutual TLS) through the deploy
engine, trains R rounds of a P-parameter float32 model with a task whose
local step is one pass over the weights, and reports the per-round overhead
(median), i.e. what flctl itself costs: transport, framing, aggregation.

Targets (issue 2): <= 0.15 s for P=1M and <= 1.5 s for P=10M with N=8. Each
is printed as met or MISSED with the measured figure (other N or P have no
target, and the output says so); the exit status is 1 if one is missed.

--flower measures Flower in the same run, on the same machine, for the same
N, P and R, when the `flwr` package is importable (`pip install flwr` into
the environment that runs this script; flctl does not depend on it):
Flower's legacy gRPC engine, `flwr.server.start_server` with FedAvg (no
evaluation) in this process and N `start_client` processes on 127.0.0.1
over TLS (a server certificate; flctl's TLS is mutual), whose fit returns
the received weights plus 0.001 like the echo task. The figure is the same:
round wall time (configure_fit to aggregate_fit done) minus the slowest
client's fit time, median of the same steady rounds. Flower's telemetry is
turned off (FLWR_TELEMETRY_ENABLED=0). Without --flower or without flwr,
no comparison with Flower is made, and the output says so.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from verdict import Target, exit_status  # noqa: E402  (the script's own folder)

from flctl.coordinator.records import create_run_dir
from flctl.coordinator.rounds import Coordinator
from flctl.coordinator.session import endpoints_for, info_probe, workspace_context
from flctl.core import pki
from flctl.core.data import save_dataset
from flctl.core.messages import Limits
from flctl.core.settings import AgentSettings, Settings, render_settings
from flctl.deploy import engine
from flctl.net.agent_client import AgentClient
from flctl.net.ports import free_port_block
from flctl.workspace import init_workspace, load_workspace

TARGETS = {(8, 1_000_000): 0.15, (8, 10_000_000): 1.5}  # (N hosts, P): seconds

ECHO_TASK = Path(__file__).with_name("echo_task.py")
LOOPBACK = "127.0.0.1"
FLOWER_ENGINE = ("legacy gRPC engine (flwr.server.start_server + flwr.client start_client "
                 "processes on 127.0.0.1, TLS with a server certificate, FedAvg, no evaluation)")
FLOWER_TIMEOUT_S = 1800.0


def steady(records: list) -> list:
    """The rounds that count: the first warms up connections, flctl's last also evaluates."""
    return records[1:-1] if len(records) > 2 else records


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
                              tasks_dir=workspace.paths.tasks,
                              on_round=records.append,
                              ca_pem=workspace.paths.ca_cert.read_bytes())
    coordinator.train()
    counted = steady(records)
    overheads = [r.fit_seconds - r.max_compute_s for r in counted]
    return {
        "n_params": n_params,
        "rounds_measured": len(counted),
        "overhead_s_median": statistics.median(overheads),
        "overhead_s_min": min(overheads),
        "fit_seconds_median": statistics.median(r.fit_seconds for r in counted),
        "max_compute_s_median": statistics.median(r.max_compute_s for r in counted),
        "bytes_per_round": counted[-1].bytes_sent + counted[-1].bytes_received,
    }


def echo_federation(hosts: int) -> Iterator[Path]:
    """A workspace of `hosts` deployed local agents with the echo task; torn down after."""
    return local_federation(hosts, ECHO_TASK, "echo_task:EchoTask")


@contextmanager
def local_federation(hosts: int, task_file: Path | None, task: str,
                     frozen: dict[str, Any] | None = None,
                     data: list[Any] | None = None) -> Iterator[Path]:
    """A workspace of `hosts` deployed local agents running `task` (from
    `task_file`, copied into its tasks folder; None: a built-in task), with
    `frozen` arrays saved as the workspace's frozen part (name -> array, as
    .npy) and `data` (Datasets) in place of the demo shards; torn down after."""
    with tempfile.TemporaryDirectory(prefix="flctl-bench-") as tmp:
        root = Path(tmp)
        # the task an agent runs is fixed at deploy
        settings = Settings(agent=AgentSettings(port=free_port_block(hosts))).with_training(
            task=task)
        init_workspace(root, local_hosts=hosts, settings=settings)
        (root / "flctl.yaml").write_text(render_settings(settings))
        if task_file is not None:
            shutil.copy(task_file, root / "tasks" / task_file.name)
        for index, shard in enumerate(data or [], start=1):
            save_dataset(shard, root / "data" / f"local{index}.npz")
        for name, array in (frozen or {}).items():
            (root / "frozen").mkdir(exist_ok=True)
            np.save(root / "frozen" / f"{name}.npy", array)
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


# ---- Flower, measured in the same run (--flower, only when flwr is importable)

def flower_version() -> str | None:
    """The installed flwr's version, or None if `import flwr` would fail."""
    if importlib.util.find_spec("flwr") is None:
        return None
    return importlib.metadata.version("flwr")


def _import_flwr() -> Any:
    """Import flwr with its telemetry off (it reads the variable once, at import)."""
    os.environ["FLWR_TELEMETRY_ENABLED"] = "0"
    import flwr
    from flwr.supercore import telemetry

    if telemetry.FLWR_TELEMETRY_ENABLED != "0":
        raise SystemExit("flwr was imported before its telemetry could be turned off")
    logging.getLogger("flwr").setLevel(logging.ERROR)  # deprecation banners, per-round INFO
    return flwr


def _flower_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k.lower() not in ("http_proxy", "https_proxy", "grpc_proxy", "all_proxy")}
    env["FLWR_TELEMETRY_ENABLED"] = "0"
    return env


def flower_client(address: str, ca_path: Path, n_params: int) -> None:
    """Child process: one Flower client whose fit is the echo task's."""
    _import_flwr()
    from flwr.client import NumPyClient

    try:
        from flwr.client import start_client  # type: ignore[attr-defined]  # flwr < 1.17
    except ImportError:
        from flwr.compat.client.app import start_client

    class EchoClient(NumPyClient):  # type: ignore[misc]
        def get_parameters(self, config: dict) -> list[np.ndarray]:
            return [np.zeros(n_params, dtype=np.float32)]

        def fit(self, parameters: list[np.ndarray], config: dict) -> tuple:
            started = time.perf_counter()
            weights = [parameters[0] + np.float32(0.001)]
            return weights, 100, {"compute_s": time.perf_counter() - started}

        def evaluate(self, parameters: list[np.ndarray], config: dict) -> tuple:
            return 0.0, 100, {"accuracy": 0.0}

    start_client(server_address=address, client=EchoClient().to_client(),
                 root_certificates=ca_path.read_bytes(), max_wait_time=120.0)


def measure_flower(hosts: int, n_params: int, rounds: int) -> dict:
    """R rounds of Flower's FedAvg with `hosts` echo clients; the same figures as measure()."""
    _import_flwr()
    from flwr.common import ndarrays_to_parameters
    from flwr.server import ServerConfig, start_server
    from flwr.server.strategy import FedAvg

    class TimedFedAvg(FedAvg):  # type: ignore[misc]
        """FedAvg that times each fit round from configure_fit to aggregate_fit done."""

        def __init__(self, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.records: list[dict[str, float]] = []
            self._started = 0.0

        def configure_fit(self, server_round: int, parameters: Any, client_manager: Any) -> Any:
            self._started = time.perf_counter()
            return super().configure_fit(server_round, parameters, client_manager)

        def aggregate_fit(self, server_round: int, results: list, failures: list) -> Any:
            aggregated = super().aggregate_fit(server_round, results, failures)
            elapsed = time.perf_counter() - self._started
            self.records.append({
                "fit_seconds": elapsed, "replies": len(results), "failures": len(failures),
                "max_compute_s": max((float(r.metrics["compute_s"]) for _, r in results),
                                     default=0.0)})
            return aggregated

    strategy = TimedFedAvg(
        fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=hosts,
        min_evaluate_clients=0, min_available_clients=hosts,
        initial_parameters=ndarrays_to_parameters([np.zeros(n_params, dtype=np.float32)]))
    with tempfile.TemporaryDirectory(prefix="flctl-bench-flower-") as tmp:
        folder = Path(tmp)
        ca_key, ca_cert = pki.make_ca("bench CA")
        key, cert = pki.issue_certificate(ca_key, ca_cert, "flower-server",
                                          ip_addresses=[LOOPBACK])
        (folder / "ca.crt").write_bytes(ca_cert)
        address = f"{LOOPBACK}:{free_port_block(1)}"
        logs = [open(folder / f"client{i}.log", "wb") for i in range(hosts)]  # noqa: SIM115
        children = [subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--flower-client", address,
             str(folder / "ca.crt"), str(n_params)],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=_flower_env())
            for log in logs]
        finished = threading.Event()

        def watchdog() -> None:
            # start_server waits for its clients without a limit: stop if one dies or hangs.
            deadline = time.monotonic() + FLOWER_TIMEOUT_S
            while not finished.wait(1.0):
                dead = [c for c in children if c.poll() not in (None, 0)]
                if dead or time.monotonic() > deadline:
                    for child in children:
                        child.kill()
                    tail = (folder / "client0.log").read_bytes()[-3000:].decode(errors="replace")
                    print(f"Flower run failed ({'a client exited' if dead else 'timed out'});"
                          f" client0's log ends:\n{tail}", file=sys.stderr, flush=True)
                    os._exit(2)

        threading.Thread(target=watchdog, daemon=True).start()
        try:
            start_server(server_address=address, strategy=strategy,
                         config=ServerConfig(num_rounds=rounds, round_timeout=600.0),
                         certificates=(ca_cert, cert, key))
        finally:
            finished.set()
            for child in children:
                try:
                    child.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    child.kill()
                    child.wait()
            for log in logs:
                log.close()
    records = strategy.records
    if len(records) != rounds or any(r["failures"] or r["replies"] != hosts for r in records):
        raise SystemExit(f"Flower run incomplete: {records}")
    counted = steady(records)
    overheads = [r["fit_seconds"] - r["max_compute_s"] for r in counted]
    return {
        "n_params": n_params,
        "rounds_measured": len(counted),
        "overhead_s_median": statistics.median(overheads),
        "overhead_s_min": min(overheads),
        "fit_seconds_median": statistics.median(r["fit_seconds"] for r in counted),
        "max_compute_s_median": statistics.median(r["max_compute_s"] for r in counted),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hosts", type=int, default=8)
    parser.add_argument("--params", type=int, nargs="+", default=[1_000_000, 10_000_000])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--flower", action="store_true",
                        help="also measure Flower in this run (needs `pip install flwr`)")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--flower-client", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.flower_client:
        address, ca_path, n_params = args.flower_client
        flower_client(address, Path(ca_path), int(n_params))
        return 0

    version = flower_version() if args.flower else None
    if not args.flower:
        no_flower = "no Flower comparison made: run with --flower (needs `pip install flwr`)"
    elif version is None:
        no_flower = ("no Flower comparison made: flwr is not importable here; "
                     "`pip install flwr` into this environment and run with --flower")
    else:
        no_flower = ""

    with echo_federation(args.hosts) as root:
        figures = [measure(root, p, args.rounds) for p in args.params]
    # Flower after flctl's agents are gone, so the two never share the machine.
    flower = {p: measure_flower(args.hosts, p, args.rounds) for p in args.params} if version \
        else {}

    targets: dict[int, Target] = {}
    for figure in figures:
        p = figure["n_params"]
        if (args.hosts, p) in TARGETS:
            targets[p] = Target(f"round overhead at N={args.hosts}, P={p:,}",
                                figure["overhead_s_median"], "<=", TARGETS[args.hosts, p], " s")
        figure["targets"] = [targets[p].as_json()] if p in targets else []
        figure["target_s"] = TARGETS.get((args.hosts, p))
        figure["ratio_to_target"] = (figure["overhead_s_median"] / figure["target_s"]
                                     if figure["target_s"] else None)
        figure["reference"] = None
        if p in flower:
            f = flower[p]
            figure["reference"] = {
                "system": "flwr", "version": version, "engine": FLOWER_ENGINE,
                "source": f"measured in this run, flwr {version}", **f,
                "overhead_ratio": f["overhead_s_median"] / figure["overhead_s_median"],
                "round_ratio": f["fit_seconds_median"] / figure["fit_seconds_median"]}
    report = {"hosts": args.hosts, "rounds": args.rounds, "results": figures,
              "targets": [t.as_json() for t in targets.values()],
              "met": all(t.met for t in targets.values()),
              "flower": ({"measured": True, "version": version, "engine": FLOWER_ENGINE}
                         if version else {"measured": False, "why": no_flower})}
    if args.json:
        print(json.dumps(report, indent=2))
        return exit_status(list(targets.values()))
    print(f"round overhead on loopback, N={args.hosts} agents, {args.rounds} rounds "
          f"(median of the {figures[0]['rounds_measured']} steady rounds)")
    for f in figures:
        print(f"P={f['n_params']:>11,}  overhead {f['overhead_s_median']:.3f} s "
              f"(round {f['fit_seconds_median']:.3f} s, slowest compute "
              f"{f['max_compute_s_median']:.3f} s, {f['bytes_per_round'] / 1e6:.0f} MB moved)")
        if f["n_params"] in targets:
            print(f"  {targets[f['n_params']].line()}")
        else:
            print(f"  no target at N={args.hosts}, P={f['n_params']:,} (targets: N=8, P=1M "
                  f"and 10M)")
        ref = f["reference"]
        if ref:
            print(f"  Flower {ref['version']}: overhead {ref['overhead_s_median']:.3f} s "
                  f"(round {ref['fit_seconds_median']:.3f} s, slowest compute "
                  f"{ref['max_compute_s_median']:.3f} s) -> Flower's overhead is "
                  f"{ref['overhead_ratio']:.1f}x flctl's, its round {ref['round_ratio']:.1f}x; "
                  f"{ref['source']}")
    if version:
        print(f"Flower: {FLOWER_ENGINE}")
    else:
        print(no_flower)
    return exit_status(list(targets.values()))


if __name__ == "__main__":
    sys.exit(main())
