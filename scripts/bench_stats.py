#!/usr/bin/env python3
"""`flctl stats` over 8 deployed local agents (separate processes, mutual TLS):
both passes (sums, then histograms), checks and combining, timed end to end
from this machine, on the bundled digits split over the hosts (64 features)
and on a wider synthetic table (1000 features x 5000 rows per host).
Target: under 2 s for 8 hosts. Only loopback traffic.

With --secure, each federation is also measured with `flctl stats --secure`
(two secure sums: keys advertised, shared, masked vectors summed, unmasked,
per pass) in the same deployment, alternating plain and secure runs; printed:
both medians, the ratio secure / plain (target under 3x) and the secure time
against the same 2 s.
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
TARGET_RATIO = 3.0


def timed(hosts: int, data: list[Dataset] | None, repeats: int, secure: bool) -> dict[str, Any]:
    kinds = [False, True] if secure else [False]
    with local_federation(hosts, None, "logreg", data=data) as root:
        workspace = load_workspace(root)
        seconds: dict[bool, list[float]] = {kind: [] for kind in kinds}
        for _ in range(repeats):
            for kind in kinds:           # alternating: both see the same machine load
                started = time.perf_counter()
                found = stats_workspace(workspace, list(workspace.inventory.hosts),
                                        min_count=10, bins=32, secure=kind)
                seconds[kind].append(time.perf_counter() - started)
    out = {"hosts": hosts, "features": len(found.count), "rows": found.rows,
           "seconds": seconds[False], "median_s": statistics.median(seconds[False])}
    if secure:
        out["secure_seconds"] = seconds[True]
        out["secure_median_s"] = statistics.median(seconds[True])
        out["ratio"] = out["secure_median_s"] / out["median_s"]
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--secure", action="store_true",
                        help="also time flctl stats --secure; print the ratio")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    wide = [Dataset(rng.normal(size=(5000, 1000)).astype(np.float32),
                    rng.integers(0, 10, 5000)) for _ in range(HOSTS)]
    runs = [timed(HOSTS, None, args.repeats, args.secure),
            timed(HOSTS, wide, args.repeats, args.secure)]
    targets = []
    for r in runs:
        what = (f"{r['hosts']} hosts, {r['features']} features x {r['rows']} rows "
                f"(median of {args.repeats})")
        targets.append(Target(f"flctl stats, {what}", r["median_s"], "<", TARGET_S, " s"))
        if args.secure:
            targets.append(Target(f"flctl stats --secure, {what}", r["secure_median_s"], "<",
                                  TARGET_S, " s"))
            targets.append(Target(f"secure / plain time, {what}", r["ratio"], "<",
                                  TARGET_RATIO, "x"))
    if args.json:
        print(json.dumps({"runs": runs, "targets": [t.as_json() for t in targets]}, indent=2))
    else:
        for target in targets:
            print(f"  {target.line()}")
    return exit_status(targets)


if __name__ == "__main__":
    sys.exit(main())
