#!/usr/bin/env python3
"""A host joining a running federation: does it slow the rounds after it?

Target (issue 15): a host added to a running 8-host federation (`flctl
deploy --limit local9` beside `flctl train`) trains from the next round, and
the rounds after the join take no more than 10% longer (median round time)
than those of a run that started with the same 9 hosts.

Everything as the operator runs it: the installed `flctl` in new processes,
9 local agents on this machine, a task whose fit takes --delay seconds more
than the built-in logistic regression's (a stand-in for real compute, so
that a round is not only the machine's scheduling noise). First a run on all
9 hosts from the start, then local9 is torn down, a run starts on 8, and
local9 is deployed after --before rounds. Prints both medians, the ratio,
and met or MISSED; exit 1 if missed.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from verdict import Target, exit_status  # noqa: E402  (the script's own folder)

HOSTS = 9
NEWCOMER = f"local{HOSTS}"
TARGET_RATIO = 1.10
SLOW_TASK = Path(__file__).with_name("slow_task.py")  # copied into tasks/ as slow.py


def flctl(*args: str, timeout: float = 600) -> dict[str, Any]:
    beside = Path(sys.executable).with_name("flctl")
    command = [str(beside)] if beside.exists() else [sys.executable, "-m", "flctl"]
    done = subprocess.run([*command, *args, "--json"], capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)
    if done.returncode != 0:
        raise SystemExit(f"flctl {' '.join(args)} failed: {done.stderr.strip()}")
    return json.loads(done.stdout)


def flctl_popen(*args: str) -> subprocess.Popen:
    beside = Path(sys.executable).with_name("flctl")
    command = [str(beside)] if beside.exists() else [sys.executable, "-m", "flctl"]
    return subprocess.Popen([*command, *args, "--json"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)


def metrics(root: Path, run_id: str) -> list[dict[str, Any]]:
    path = root / "runs" / run_id / "metrics.jsonl"
    return ([json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            if path.exists() else [])


def workspace(root: Path, delay: float) -> None:
    from flctl.core.settings import AgentSettings, Settings, render_settings
    from flctl.net.ports import free_port_block
    from flctl.workspace import init_workspace

    settings = Settings(agent=AgentSettings(port=free_port_block(HOSTS))).with_training(
        task="slow:Slow", task_params={"delay": delay}, deadline_s=120.0)
    init_workspace(root, local_hosts=HOSTS, settings=settings)
    (root / "flctl.yaml").write_text(render_settings(settings))
    (root / "tasks" / "slow.py").write_text(SLOW_TASK.read_text())


def run_from_start(root: Path, rounds: int) -> list[float]:
    """Round times of a run on all 9 hosts from round 1 (the first round warms up)."""
    summary = flctl("train", "-w", str(root), "--rounds", str(rounds + 1),
                    "--run-id", "from-start")
    assert all(len(r["members"]) == HOSTS for r in summary["history"])
    return [r["seconds"] for r in summary["history"][1:]]


def run_with_join(root: Path, before: int, rounds: int
                  ) -> tuple[list[float], int, int, int, float]:
    """Round times after NEWCOMER joined a run of 8; the round its deploy
    started in, the round after the deploy returned, the first round it
    trained in, and the deploy's seconds. The run is stopped once `rounds`
    rounds with NEWCOMER are recorded (however many the deploy took)."""
    flctl("teardown", "-w", str(root), "--limit", NEWCOMER)
    process = flctl_popen("train", "-w", str(root), "--rounds", "100000", "--run-id", "joined")

    path = root / "runs" / "joined" / "metrics.jsonl"

    def wait_until(done: Callable[[list[dict[str, Any]]], bool]) -> list[dict[str, Any]]:
        """Light polling (a stat, a parse only when the file grew): the
        from-start run has no watcher taking CPU from its agents either."""
        deadline, size = time.monotonic() + 1200, -1
        while True:
            grown = path.stat().st_size if path.exists() else 0
            if grown != size:
                size, records = grown, metrics(root, "joined")
                if done(records):
                    return records
            if process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the run ended or stalled: {process.stderr.read()}")
            time.sleep(0.2)

    try:
        deployed_in = len(wait_until(lambda r: len(r) >= before)) + 1
        started = time.perf_counter()
        flctl("deploy", "-w", str(root), "--limit", NEWCOMER)
        deploy_s = time.perf_counter() - started
        # the round under way when the deploy returned may still be the 8 hosts'
        next_round = len(metrics(root, "joined")) + 2
        history = wait_until(
            lambda r: sum(NEWCOMER in line["members"] for line in r) >= rounds)
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            process.kill()
    after = [r for r in history if NEWCOMER in r["members"]]
    if any(NEWCOMER not in r["participants"] for r in after):
        raise SystemExit(f"{NEWCOMER} missed rounds after it joined")
    return [r["seconds"] for r in after], deployed_in, next_round, after[0]["round"], deploy_s


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=20, help="Rounds measured per run.")
    parser.add_argument("--before", type=int, default=3, help="Rounds of 8 before the join.")
    parser.add_argument("--delay", type=float, default=0.3, help="Seconds added to each fit.")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="flctl-bench-join-") as tmp:
        root = Path(tmp)
        workspace(root, args.delay)
        try:
            flctl("deploy", "-w", str(root))
            baseline = run_from_start(root, args.rounds)
            joined, deployed_in, next_round, first, deploy_s = run_with_join(
                root, args.before, args.rounds)
        finally:
            subprocess.run([sys.executable, "-m", "flctl", "teardown", "-w", str(root)],
                           capture_output=True, timeout=300)
            shutil.rmtree(root, ignore_errors=True)
    base, after = statistics.median(baseline), statistics.median(joined)
    ratio = after / base
    targets = [Target(f"median round after {NEWCOMER} joined 8 hosts / median round of 9 "
                      "from the start", ratio, "<=", TARGET_RATIO, "x")]
    trains_next = first <= next_round
    if args.json:
        print(json.dumps({"hosts": HOSTS, "delay_s": args.delay, "from_start_s": baseline,
                          "after_join_s": joined, "deploy_s": deploy_s,
                          "deploy_started_in_round": deployed_in,
                          "next_round_after_deploy": next_round, "first_round": first,
                          "trains_next_round": trains_next,
                          "targets": [t.as_json() for t in targets],
                          "met": all(t.met for t in targets) and trains_next}, indent=2))
    else:
        print(f"9 hosts from the start: median round {base:.3f} s over {len(baseline)} rounds")
        print(f"{NEWCOMER} deployed beside the run from round {deployed_in} (deploy "
              f"{deploy_s:.1f} s); the next round after it was {next_round}, it trained from "
              f"round {first} ({'met' if trains_next else 'MISSED'}): median round "
              f"{after:.3f} s over {len(joined)} rounds")
        for t in targets:
            print(t.line())
    return exit_status(targets) if trains_next else 1


if __name__ == "__main__":
    sys.exit(main())
