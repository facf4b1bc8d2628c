#!/usr/bin/env python3
"""`flctl report` on a 100-round run of 8 hosts: the run directory is
synthesized in the real format (metrics.jsonl lines as RoundRecord.as_dict()
writes them, with per-host records, and the manifest a finished run leaves),
then the real command, `flctl report RUN --json` in a fresh process, is
timed end to end: Python and matplotlib start-up, reading, drawing, writing.
Target: under 3 s (median of --repeats). The in-process `write_report` time
is printed beside it.

`synthesize_run` is also what tests/test_report.py builds its runs with.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from verdict import Target, exit_status  # noqa: E402  (the script's own folder)

from flctl.coordinator.records import METRICS, RunDir, create_run_dir
from flctl.coordinator.summary import RoundRecord

ROUNDS = 100
HOSTS = 8
TARGET_S = 3.0
MODEL_BYTES = 4 * 650  # logreg on digits, float32


def synthesize_run(runs_root: Path, run_id: str, hosts: Sequence[str], rounds: int,
                   *, seed: int = 0, dp: bool = False, host_records: bool = True,
                   drop: float = 0.1, finished: bool = True,
                   reasons: Sequence[str] = ("connection reset by peer",),
                   ) -> RunDir:
    """A run directory as `flctl train` leaves it: metrics.jsonl (one
    RoundRecord.as_dict() line per round, with "hosts" when `host_records`)
    and, when `finished`, manifest.json. Each sampled host drops out with
    probability `drop` (half of those miss the deadline instead)."""
    rng = np.random.default_rng(seed)
    run = create_run_dir(runs_root, run_id)
    lines = []
    for number in range(1, rounds + 1):
        sampled = [h for h in hosts if rng.random() < 0.9] or list(hosts)
        entries: dict[str, dict[str, Any]] = {}
        fits = []
        for host in sampled:
            sent = MODEL_BYTES + 200
            if rng.random() < drop:
                late = rng.random() < 0.5
                entries[host] = {"status": "straggled" if late else "dropped",
                                 "reason": "deadline exceeded" if late else
                                 str(reasons[int(rng.integers(len(reasons)))]),
                                 "bytes_sent": sent, "bytes_received": 0}
            else:
                fit = float(rng.uniform(0.05, 0.4))
                fits.append(fit)
                entries[host] = {"status": "answered", "bytes_sent": sent,
                                 "bytes_received": MODEL_BYTES + 300,
                                 "train_loss": float(2.3 * 0.97 ** number + rng.uniform(0, .2)),
                                 "examples": int(rng.integers(100, 400)), "fit_s": fit}
        answered = [h for h, e in entries.items() if e["status"] == "answered"]
        compute = max(fits, default=0.0)
        record = RoundRecord(
            round=number, participants=answered,
            dropped={h: e["reason"] for h, e in entries.items() if h not in answered},
            train_loss=2.3 * 0.97 ** number, eval_loss=2.2 * 0.97 ** number,
            accuracy=min(0.97, 0.3 + 0.7 * (1 - 0.95 ** number)),
            seconds=compute + float(rng.uniform(0.02, 0.1)), fit_seconds=sum(fits),
            max_compute_s=compute,
            bytes_sent=sum(e["bytes_sent"] for e in entries.values()),
            bytes_received=sum(e["bytes_received"] for e in entries.values()),
            epsilon=0.15 * number ** 0.5 if dp else None, delta=1e-5 if dp else None,
        ).as_dict()
        if host_records:
            record["hosts"] = entries
        lines.append(json.dumps(record, sort_keys=True) + "\n")
    (run.path / METRICS).write_text("".join(lines))
    if finished:
        manifest = {"run_id": run_id, "hosts": list(hosts), "rounds": rounds,
                    "rounds_planned": rounds, "stopped_early_at": None,
                    "accuracy": json.loads(lines[-1])["accuracy"],
                    "eval_loss": json.loads(lines[-1])["eval_loss"],
                    "privacy": "central" if dp else "none",
                    "epsilon": 0.15 * rounds ** 0.5 if dp else None,
                    "delta": 1e-5 if dp else None, "seed": seed,
                    "training": {"rounds": rounds, "strategy": "fedavg", "seed": seed},
                    "task_params": {}, "shapes": [[64, 10], [10]], "names": None,
                    "frozen": None, "weights_sha256": "0" * 64}
        (run.path / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))
    return run


def _cpu() -> float:
    used = resource.getrusage(resource.RUSAGE_CHILDREN)
    return used.ru_utime + used.ru_stime


def _cli_seconds(workspace: Path, run_id: str) -> tuple[float, float]:
    """Wall and CPU seconds of one `flctl report` process (CPU time shows how
    much of the wall time a busy machine added)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")]))
    cpu, started = _cpu(), time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "flctl", "report", run_id, "-w", str(workspace),
                           "--json"], capture_output=True, text=True, env=env, timeout=120)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"flctl report failed: {done.stderr.strip()}")
    return seconds, _cpu() - cpu


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    from flctl.report.build import write_report
    from flctl.workspace import init_workspace

    with tempfile.TemporaryDirectory(prefix="bench-report-") as tmp:
        root = Path(tmp) / "ws"
        init_workspace(root, local_hosts=2)  # a workspace that loads; its hosts do not matter
        hosts = [f"h{i}" for i in range(HOSTS)]
        run = synthesize_run(root / "runs", "bench", hosts, ROUNDS, dp=True)
        cli, cpu = zip(*[_cli_seconds(root, "bench") for _ in range(args.repeats)])
        inner = []
        for _ in range(args.repeats):
            started = time.perf_counter()
            made = write_report([run], Path(tmp) / "inner")
            inner.append(time.perf_counter() - started)
    result = {"rounds": ROUNDS, "hosts": HOSTS, "figures": len(made.figures),
              "cli_seconds": cli, "cli_median_s": statistics.median(cli),
              "cli_cpu_seconds": cpu, "cli_cpu_median_s": statistics.median(cpu),
              "write_report_seconds": inner, "write_report_median_s": statistics.median(inner)}
    targets = [Target(f"flctl report, {ROUNDS} rounds x {HOSTS} hosts, {len(made.figures)} "
                      f"figures (median of {args.repeats}, a fresh process each)",
                      result["cli_median_s"], "<", TARGET_S, " s")]
    if args.json:
        print(json.dumps({**result, "targets": [t.as_json() for t in targets]}, indent=2))
    else:
        print(f"  write_report in process: median {result['write_report_median_s']:.3f} s")
        print(f"  flctl report CPU time (user + sys): median {result['cli_cpu_median_s']:.3f} s")
        for target in targets:
            print(f"  {target.line()}")
    return exit_status(targets)


if __name__ == "__main__":
    sys.exit(main())
