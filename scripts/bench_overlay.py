#!/usr/bin/env python3
"""Round time over the WireGuard overlay vs the underlay, on the lab.

Issue 4's target: for P=1M float32 and 3 hosts, an overlay round costs no
more than (bytes moved / wireguard-go throughput) + 0.2 s, with the
throughput measured in the same run (a single TCP stream from the hub to a
host through the tunnel). The bound is computed from the run's own figures
at any --hosts and --params, and printed as met or MISSED with the measured
round time; exit status 1 if it is missed, 2 if the lab cannot run here.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from verdict import Target, exit_status  # noqa: E402  (the script's own folder)

from flctl.coordinator.records import create_run_dir  # noqa: E402
from flctl.coordinator.rounds import Coordinator  # noqa: E402
from flctl.coordinator.session import endpoints_for, info_probe, workspace_context  # noqa: E402
from flctl.coordinator.summary import RoundRecord  # noqa: E402
from flctl.core.settings import load_settings, render_settings  # noqa: E402
from flctl.deploy import engine  # noqa: E402
from flctl.net.agent_client import AgentClient  # noqa: E402
from flctl.workspace import load_workspace  # noqa: E402

from lab import Lab, lab_available, lab_up  # noqa: E402

ECHO_TASK = Path(__file__).with_name("echo_task.py")
SINK_PORT = 7999
SINK = (
    "import socket\n"
    f"s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
    f"s.bind(('0.0.0.0', {SINK_PORT})); s.listen(1); c, _ = s.accept()\n"
    "n = 0\n"
    "while True:\n"
    "    b = c.recv(1 << 20)\n"
    "    if not b: break\n"
    "    n += len(b)\n"
    "c.sendall(str(n).encode()); c.close()\n"
)


def tunnel_throughput(lab: Lab, host: str, address: str, megabytes: int = 64) -> float:
    """MB/s of one TCP stream from the hub to `host` at `address`."""
    import subprocess

    sink = subprocess.Popen(["bash", str(Path(__file__).parent / "lab.sh"), "exec", host,
                             "python3", "-c", SINK], stdout=subprocess.DEVNULL)
    try:
        payload = b"\0" * (1 << 20)
        for _ in range(100):
            try:
                conn = socket.create_connection((address, SINK_PORT), timeout=5)
                break
            except OSError:
                time.sleep(0.1)
        else:
            raise SystemExit("throughput sink did not start")
        started = time.perf_counter()
        for _ in range(megabytes):
            conn.sendall(payload)
        conn.shutdown(socket.SHUT_WR)
        received = int(conn.recv(64).decode() or 0)
        elapsed = time.perf_counter() - started
        conn.close()
        assert received == megabytes << 20, received
        return megabytes * (1 << 20) / 1e6 / elapsed
    finally:
        sink.wait(timeout=30)


def rounds(root: Path, n_params: int, count: int) -> list[RoundRecord]:
    workspace = load_workspace(root)
    training = workspace.settings.with_training(
        task="echo_task:EchoTask", task_params={"n_params": n_params}, rounds=count,
        eval_every=10_000, deadline_s=300.0).training
    context = workspace_context(workspace)
    clients = [AgentClient(e, context, timeout=300)
               for e in endpoints_for(workspace, workspace.inventory.hosts)]
    records: list[RoundRecord] = []
    Coordinator(clients, training, create_run_dir(workspace.paths.runs),
                on_round=records.append).train()
    return records[1:-1] if len(records) > 2 else records


def deploy(root: Path, listen: str) -> None:
    settings = load_settings(root / "flctl.yaml").with_training(task="echo_task:EchoTask")
    agent = dataclasses.replace(settings.agent, listen=listen)
    (root / "flctl.yaml").write_text(render_settings(dataclasses.replace(settings, agent=agent)))
    workspace = load_workspace(root)
    probe = info_probe(workspace)
    results = engine.deploy(workspace, list(workspace.inventory.hosts),
                            verify=lambda h, e: probe(e))
    bad = [(r.host, r.error) for r in results if r.status in ("failed", "unreachable")]
    if bad:
        raise SystemExit(f"deploy failed: {bad}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--hosts", type=int, default=3)
    parser.add_argument("--params", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if lab_available():
        print(f"lab not available: {lab_available()}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="flctl-bench-overlay-") as tmp:
        root = Path(tmp)
        lab = lab_up(args.hosts, root)
        try:
            shutil.copy(ECHO_TASK, root / "tasks" / "echo_task.py")
            deploy(root, "overlay")
            first = load_workspace(root).inventory.hosts[0]
            throughput = tunnel_throughput(lab, first.name, str(first.overlay_ip))
            overlay = rounds(root, args.params, args.rounds)
            engine.teardown(load_workspace(root), list(load_workspace(root).inventory.hosts))
            deploy(root, "underlay")
            underlay = rounds(root, args.params, args.rounds)
            engine.teardown(load_workspace(root), list(load_workspace(root).inventory.hosts))
        finally:
            lab.down()

    def median_round(records: list[RoundRecord]) -> float:
        return statistics.median(r.fit_seconds for r in records)

    moved = overlay[-1].bytes_sent + overlay[-1].bytes_received
    bound = moved / 1e6 / throughput + 0.2
    target = Target("round over the overlay", median_round(overlay), "<=", bound, " s")
    figures = {
        "hosts": args.hosts, "n_params": args.params,
        "overlay_round_s": median_round(overlay), "underlay_round_s": median_round(underlay),
        "bytes_per_round": moved, "wireguard_go_mb_s": throughput,
        "target_round_s": bound, "ratio_to_target": median_round(overlay) / bound,
        "targets": [target.as_json()], "met": target.met,
    }
    if args.json:
        print(json.dumps(figures, indent=2))
        return exit_status([target])
    print(f"P={args.params:,} float32, {args.hosts} hosts, {moved / 1e6:.1f} MB per round")
    print(f"wireguard-go throughput (one TCP stream, hub -> host): {throughput:.1f} MB/s")
    print(f"round over the overlay:  {figures['overlay_round_s']:.3f} s  (target <= "
          f"{bound:.3f} s = bytes/throughput + 0.2 s -> {figures['ratio_to_target']:.2f}x)")
    print(f"round over the underlay: {figures['underlay_round_s']:.3f} s")
    print(target.line(".3f"))
    return exit_status([target])


if __name__ == "__main__":
    sys.exit(main())
