#!/usr/bin/env python3
"""48 lab hosts: the operator's CPU for deploy and training, and a no-change redeploy.

`scripts/lab.sh up 48 DIR` (DIR a workspace for the lab), then, each as the
operator runs it (a new `flctl` process, start-up and imports included):

1. `flctl deploy` on fresh hosts: the operator's CPU seconds per host;
2. `flctl deploy` again: its wall time, and no host may change anything
   (each host's changes are read from the workspace's audit log);
3. `flctl train --rounds 1` and `--rounds 1+R` over the WireGuard overlay:
   the operator's CPU per round (the difference over R rounds, so start-up
   and connecting are not counted as rounds) and per run;
4. `flctl teardown`, then the lab comes down.

Both deploys run with stderr on a terminal (a pty), so the live progress
view is drawn as an operator sees it and its cost is counted.

The operator's CPU is the flctl process's own user + sys time
(getrusage(RUSAGE_SELF) in that process as it exits) plus its children's
(RUSAGE_CHILDREN: the hub's helpers it starts, `wg-up`, `wg genpsk`),
both printed; the targets use the sum. The hub's wireguard-go (a daemon
on the operator's machine, carrying every round over the overlay) is
printed beside it. The whole machine's CPU (all lab hosts
included, from /proc/stat) is printed beside it: the lab hosts share this
machine's cores, so wall times here include the hosts' work.

The wheel cache is warmed and the workspace's wheel lock written first:
resolving wheels on the package index is a once-per-project cost, not a
per-deploy one.

Targets (issue 16, at 48 hosts): fresh deploy <= 0.2 operator CPU-s per
host; no-change redeploy of 48 hosts <= 15 s wall with 0 changed. Exit
status 1 if a target is missed, 2 if the lab cannot run here.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import pty
import struct
import subprocess
import sys
import tempfile
import termios
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from bench_deploy import _host_python, machine_cpu_s  # noqa: E402  (the script's own folder)
from verdict import Target, exit_status  # noqa: E402

from flctl import audit  # noqa: E402
from flctl.core.fsutil import atomic_write  # noqa: E402
from flctl.deploy.bundle import HostEnv  # noqa: E402
from flctl.deploy.install import BundleCache  # noqa: E402
from flctl.workspace import load_workspace  # noqa: E402

from lab import lab_available, lab_up  # noqa: E402

TARGET_HOSTS = 48
TARGET_DEPLOY_CPU_PER_HOST_S = 0.2
TARGET_REDEPLOY_S = 15.0

# Runs the flctl CLI in this interpreter and, as it exits, writes its own and
# its children's CPU seconds to the file named in FLCTL_BENCH_RUSAGE.
_WRAPPER = """\
import atexit, json, os, resource, sys

def _report():
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    with open(os.environ["FLCTL_BENCH_RUSAGE"], "w") as f:
        json.dump({"self": own.ru_utime + own.ru_stime,
                   "children": kids.ru_utime + kids.ru_stime}, f)

atexit.register(_report)
sys.argv[0] = "flctl"
from flctl.cli.app import main
main()
"""


def hub_wireguard_cpu_s() -> float:
    """CPU seconds of the wireguard-go processes in this network namespace: the
    hub's end of the overlay (each lab host's runs in its own namespace)."""
    own = os.stat("/proc/self/ns/net").st_ino
    total = 0.0
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if (proc / "comm").read_text().strip() != "wireguard-go" or \
                    os.stat(proc / "ns" / "net").st_ino != own:
                continue
            fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


@dataclass
class Run:
    """One flctl command: wall time, CPU (its own, its children's, the machine's)."""

    wall_s: float
    own_cpu_s: float
    children_cpu_s: float
    machine_cpu_s: float
    hub_cpu_s: float   # the hub's wireguard-go, a daemon of the operator's machine
    document: dict[str, Any]

    @property
    def operator_cpu_s(self) -> float:
        return self.own_cpu_s + self.children_cpu_s

    def as_json(self) -> dict[str, Any]:
        return {"wall_s": round(self.wall_s, 3), "operator_cpu_s": round(self.operator_cpu_s, 3),
                "flctl_own_cpu_s": round(self.own_cpu_s, 3),
                "flctl_children_cpu_s": round(self.children_cpu_s, 3),
                "hub_wireguard_cpu_s": round(self.hub_cpu_s, 3),
                "machine_cpu_s": round(self.machine_cpu_s, 3)}


def flctl(*args: str, timeout: float = 1800, terminal: bool = False) -> Run:
    """One `flctl` command, timed. With `terminal`, its stderr is a terminal
    (a pty, 50 x 200), so it draws its live progress view as it does for an
    operator; stdout is captured either way."""
    with tempfile.NamedTemporaryFile(prefix="flctl-bench-rusage-", suffix=".json") as usage:
        env = dict(os.environ, FLCTL_BENCH_RUSAGE=usage.name, COLUMNS="200", LINES="50",
                   NO_COLOR="1")
        with _stderr(terminal) as (stderr, captured):
            machine0, hub0 = machine_cpu_s(), hub_wireguard_cpu_s()
            started = time.perf_counter()
            done = subprocess.run([sys.executable, "-c", _WRAPPER, *args], stdout=subprocess.PIPE,
                                  stderr=stderr, text=True, timeout=timeout, env=env,
                                  stdin=subprocess.DEVNULL)
            wall = time.perf_counter() - started
            machine, hub = machine_cpu_s() - machine0, hub_wireguard_cpu_s() - hub0
        try:
            document = json.loads(done.stdout) if "--json" in args else {}
        except json.JSONDecodeError:
            document = {}
        if done.returncode != 0:
            raise SystemExit(f"flctl {' '.join(args)} failed (exit {done.returncode}):\n"
                             f"{done.stdout[-3000:]}\n{captured()[-3000:]}")
        cpu = json.loads(Path(usage.name).read_text())
    return Run(wall, cpu["self"], cpu["children"], machine, max(0.0, hub), document)


@contextlib.contextmanager
def _stderr(terminal: bool) -> Iterator[tuple[int, Callable[[], str]]]:
    """A file descriptor for the command's stderr, and what it wrote so far.
    A pty is drained by a thread (a full pty would stall the writer)."""
    if not terminal:
        with tempfile.TemporaryFile() as file:
            yield file.fileno(), lambda: (file.seek(0), file.read().decode(errors="replace"))[1]
        return
    primary, secondary = pty.openpty()
    fcntl.ioctl(secondary, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 200, 0, 0))
    chunks: list[bytes] = []

    def drain() -> None:
        while True:
            try:
                chunk = os.read(primary, 65536)
            except OSError:   # EIO: every writer has closed the pty
                return
            if not chunk:
                return
            chunks.append(chunk)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        yield secondary, lambda: b"".join(chunks).decode(errors="replace")
    finally:
        os.close(secondary)
        reader.join(timeout=5)
        os.close(primary)


def deploy_changes(root: Path) -> dict[str, list[str]]:
    """Per host, what the latest deploy changed (from the workspace's audit log)."""
    entries = [e for e in audit.read(load_workspace(root).paths).entries
               if e.get("command") == "deploy"]
    hosts = entries[-1].get("hosts") or {} if entries else {}
    return {name: list(h.get("changes") or []) for name, h in hosts.items()}


def pin_wheels(root: Path, env: HostEnv) -> None:
    """Warm the wheel cache and write the workspace's wheel lock, as after the
    project's first deploy: resolving wheels on the package index (pip, seconds
    of CPU) is a once-per-project cost, not a per-deploy one."""
    bundles = BundleCache()
    bundles.get(env)
    lock = bundles.updated_lock()
    if lock is not None:
        atomic_write(load_workspace(root).paths.wheel_lock, lock.render())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hosts", type=int, default=TARGET_HOSTS)
    parser.add_argument("--rounds", type=int, default=3, help="rounds R measured (after 1)")
    parser.add_argument("--forks", type=int, default=None, help="deploy --forks (default: "
                                                                "flctl's own)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    reason = lab_available()
    if reason:
        print(f"lab not available: {reason}", file=sys.stderr)
        return 2
    forks = ["--forks", str(args.forks)] if args.forks else []
    n = args.hosts
    with tempfile.TemporaryDirectory(prefix="flctl-bench-lab48-") as tmp:
        workspace = Path(tmp) / "ws"
        started = time.perf_counter()
        lab = lab_up(n, workspace)
        lab_up_s = time.perf_counter() - started
        ws = ["-w", str(workspace)]
        try:
            pin_wheels(workspace, HostEnv(*_host_python(lab)))
            fresh = flctl("deploy", *ws, *forks, terminal=True)
            fresh_changed = deploy_changes(workspace)
            again = flctl("deploy", *ws, *forks, terminal=True)
            again_changes = deploy_changes(workspace)
            one = flctl("train", *ws, "--rounds", "1", "--json")
            more = flctl("train", *ws, "--rounds", str(1 + args.rounds), "--json")
            down = flctl("teardown", *ws, "--json", *forks)
        finally:
            lab.down()
    redeploy_changed = sorted(name for name, changes in again_changes.items() if changes)
    if len(fresh_changed) < n + 1:   # every host, and the hub
        raise SystemExit(f"the fresh deploy reached {len(fresh_changed)} of {n} hosts + hub")
    trained = more.document
    per_round = (more.operator_cpu_s - one.operator_cpu_s) / args.rounds
    participants = [len(r.get("participants", [])) for r in trained.get("history", [])]
    targets = [] if n != TARGET_HOSTS else [
        Target(f"fresh deploy of {n} hosts, operator CPU per host", fresh.operator_cpu_s / n,
               "<=", TARGET_DEPLOY_CPU_PER_HOST_S, " s"),
        Target(f"no-change redeploy of {n} hosts", again.wall_s, "<=", TARGET_REDEPLOY_S, " s"),
        Target(f"hosts changed by the no-change redeploy of {n}", len(redeploy_changed), "<=",
               0, ""),
    ]
    figures = {
        "hosts": n,
        "cores": os.cpu_count(),
        "lab_up_s": round(lab_up_s, 2),
        "deploy": fresh.as_json(),
        "deploy_operator_cpu_per_host_s": round(fresh.operator_cpu_s / n, 4),
        "redeploy": again.as_json(),
        "redeploy_changed_hosts": redeploy_changed,
        "train_1_round": one.as_json(),
        f"train_{1 + args.rounds}_rounds": more.as_json(),
        "train_operator_cpu_per_round_s": round(per_round, 4),
        "train_participants_per_round": participants,
        "teardown": down.as_json(),
        "targets": [t.as_json() for t in targets],
        "met": all(t.met for t in targets),
    }
    if args.json:
        print(json.dumps(figures, indent=2))
        return exit_status(targets)
    print(f"lab up, {n} hosts: {lab_up_s:.1f} s")
    show("fresh deploy", fresh, n)
    show("no-change redeploy", again, n)
    print(f"  changed hosts: {len(redeploy_changed)}"
          + (f"; {redeploy_changed[0]}: {', '.join(again_changes[redeploy_changed[0]])}"
             if redeploy_changed else ""))
    show("train 1 round", one, n)
    show(f"train {1 + args.rounds} rounds", more, n)
    print(f"  operator CPU per round: {per_round:.3f} s ({per_round / n * 1000:.1f} ms per host); "
          f"participants per round {participants}")
    show("teardown", down, n)
    for t in targets:
        print(t.line(".3g") + f"  ({t.measured / t.limit:.2f}x of the target)"
              if t.limit else t.line(".3g"))
    if not targets:
        print(f"no target at {n} hosts (the targets are for {TARGET_HOSTS})")
    return exit_status(targets)


def show(label: str, run: Run, n: int) -> None:
    print(f"{label + ':':22s} {run.wall_s:6.2f} s wall; operator CPU {run.operator_cpu_s:6.2f} s "
          f"= {run.operator_cpu_s / n:.3f} s per host (flctl {run.own_cpu_s:.2f} s + its "
          f"children {run.children_cpu_s:.2f} s); hub wireguard-go {run.hub_cpu_s:.2f} s; "
          f"whole machine {run.machine_cpu_s:.1f} CPU-s")


if __name__ == "__main__":
    sys.exit(main())
