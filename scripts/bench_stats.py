#!/usr/bin/env python3
"""`flctl stats` over 8 deployed local agents (separate processes, mutual TLS):
both passes (sums, then histograms), checks and combining, timed end to end
from this machine, on the bundled digits split over the hosts (64 features)
and on a wider synthetic table (1000 features x 5000 rows per host).
Target: under 2 s for 8 hosts. Only loopback traffic.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Any

import numpy as np
from bench_round_overhead import local_federation  # noqa: E402  (the script's own folder)
from verdict import Target, exit_status  # noqa: E402

from flctl.coordinator.session import stats_workspace
from flctl.core.data import Dataset
from flctl.workspace import load_workspace

HOSTS = 8
TARGET_S = 2.0


def timed(hosts: int, data: list[Dataset] | None, repeats: int) -> dict[str, Any]:
    with local_federation(hosts, None, "logreg", data=data) as root:
        workspace = load_workspace(root)
        seconds = []
        for _ in range(repeats):
            started = time.perf_counter()
            found = stats_workspace(workspace, list(workspace.inventory.hosts), min_count=10,
                                    bins=32)
            seconds.append(time.perf_counter() - started)
    return {"hosts": hosts, "features": len(found.count), "rows": found.rows,
            "seconds": seconds, "median_s": statistics.median(seconds)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    wide = [Dataset(rng.normal(size=(5000, 1000)).astype(np.float32),
                    rng.integers(0, 10, 5000)) for _ in range(HOSTS)]
    runs = [timed(HOSTS, None, args.repeats), timed(HOSTS, wide, args.repeats)]
    targets = [Target(f"flctl stats, {r['hosts']} hosts, {r['features']} features x "
                      f"{r['rows']} rows (median of {args.repeats})", r["median_s"], "<",
                      TARGET_S, " s") for r in runs]
    if args.json:
        print(json.dumps({"runs": runs, "targets": [t.as_json() for t in targets]}, indent=2))
    else:
        for target in targets:
            print(f"  {target.line()}")
    return exit_status(targets)


if __name__ == "__main__":
    sys.exit(main())
