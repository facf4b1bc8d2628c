#!/usr/bin/env python3
"""`flctl doctor` speed on the lab (real sshd in network namespaces, as root).

Target (issue 15): doctor on 8 lab hosts finishes in under 3 s, measured as
the operator runs it (the installed `flctl doctor --json`, a new process:
Python start-up and imports included). Median of --repeat runs, each printed;
the target line says met or MISSED. Exit status 1 if missed, 2 if the lab
cannot run here.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from verdict import Target, exit_status  # noqa: E402  (the script's own folder)

from lab import lab_available, lab_up  # noqa: E402

TARGET_HOSTS = 8
TARGET_S = 3.0


def flctl() -> list[str]:
    beside = Path(sys.executable).with_name("flctl")
    return [str(beside)] if beside.exists() else [shutil.which("flctl") or "flctl"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--hosts", type=int, default=TARGET_HOSTS)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    reason = lab_available()
    if reason:
        print(f"lab not available: {reason}", file=sys.stderr)
        return 2
    times: list[float] = []
    with tempfile.TemporaryDirectory(prefix="flctl-bench-doctor-") as tmp:
        root = Path(tmp)
        lab = lab_up(args.hosts, root)
        try:
            for _ in range(args.repeat):
                started = time.perf_counter()
                done = subprocess.run([*flctl(), "doctor", "-w", str(root), "--json"],
                                      capture_output=True, text=True, timeout=120,
                                      stdin=subprocess.DEVNULL)
                times.append(time.perf_counter() - started)
                report = json.loads(done.stdout)
                if done.returncode != 0:
                    bad = [h["host"] for h in report["hosts"] if not h["ok"]]
                    raise SystemExit(f"doctor found problems on healthy lab hosts: {bad}")
        finally:
            lab.down()
    median = statistics.median(times)
    targets = [Target(f"flctl doctor on {args.hosts} lab hosts", median, "<", TARGET_S, " s")] \
        if args.hosts == TARGET_HOSTS else []
    if args.json:
        print(json.dumps({"hosts": args.hosts, "runs_s": times, "median_s": median,
                          "targets": [t.as_json() for t in targets],
                          "met": all(t.met for t in targets)}, indent=2))
        return exit_status(targets)
    print(f"flctl doctor, {args.hosts} lab hosts: " + ", ".join(f"{t:.2f}" for t in times)
          + f" s; median {median:.2f} s")
    for t in targets:
        print(t.line())
    if not targets:
        print(f"no target at {args.hosts} hosts (the target is for {TARGET_HOSTS})")
    return exit_status(targets)


if __name__ == "__main__":
    sys.exit(main())
