#!/usr/bin/env python3
"""Deploy speed on the lab (real sshd in network namespaces, as root).

Targets (issue 3): deploying to 8 lab hosts takes at most 1.5x the time of
deploying to 1; a no-change redeploy of 8 hosts finishes in under 3 s. Both
are reported next to the same steps done one host at a time (--forks 1), and
each is printed as met or MISSED with the measured figure (--hosts other
than 8 has no target, and the output says so). Exit status 1 if a target is
missed, 2 if the lab cannot run here.
The wheel cache is warmed first: preparing wheels is a once-per-machine
cost on the operator's side, not a per-deploy one.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from verdict import Target, exit_status  # noqa: E402  (the script's own folder)

from flctl.coordinator.session import info_probe  # noqa: E402
from flctl.deploy import engine  # noqa: E402
from flctl.deploy.bundle import HostEnv  # noqa: E402
from flctl.deploy.install import BundleCache  # noqa: E402
from flctl.deploy.results import HostResult  # noqa: E402
from flctl.workspace import Workspace, load_workspace  # noqa: E402

from lab import lab_available, lab_up  # noqa: E402

TARGET_HOSTS = 8
TARGET_RATIO = 1.5  # deploy to all hosts / deploy to one
TARGET_REDEPLOY_S = 3.0  # no-change redeploy of all hosts, strictly under


def machine_cpu_s() -> float:
    """CPU seconds used by everything on this machine (all lab hosts included)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    busy = fields[0] + fields[1] + fields[2] + fields[5] + fields[6]
    return busy / os.sysconf("SC_CLK_TCK")


def operator_cpu_s() -> float:
    """CPU seconds used by this (the operator's) process: SSH, signing, uploads."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


CPU: dict[str, tuple[float, float]] = {}


def timed(action: Callable[[], list[HostResult]],
          label: str) -> tuple[float, list[HostResult]]:
    machine0, operator0 = machine_cpu_s(), operator_cpu_s()
    started = time.perf_counter()
    results = action()
    elapsed = time.perf_counter() - started
    CPU[label] = (machine_cpu_s() - machine0, operator_cpu_s() - operator0)
    bad = [(r.host, r.status, r.error) for r in results if r.status in ("failed", "unreachable")]
    if bad:
        raise SystemExit(f"deploy failed: {bad}")
    return elapsed, results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--hosts", type=int, default=8)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    reason = lab_available()
    if reason:
        print(f"lab not available: {reason}", file=sys.stderr)
        return 2
    import tempfile

    with tempfile.TemporaryDirectory(prefix="flctl-bench-deploy-") as tmp:
        root = Path(tmp)
        lab = lab_up(args.hosts, root)
        try:
            workspace: Workspace = load_workspace(root)
            hosts = list(workspace.inventory.hosts)
            bundles = BundleCache()
            probe = info_probe(workspace)

            def run(targets: list, forks: int, label: str) -> tuple[float, list]:
                return timed(lambda: engine.deploy(workspace, targets, forks=forks,
                                                   verify=lambda h, e: probe(e), bundles=bundles),
                             label)

            def clean() -> None:
                engine.teardown(workspace, hosts)

            bundles.get(HostEnv(*_host_python(lab)))  # warm the operator-side wheel cache
            one, _ = run(hosts[:1], 16, "one")
            clean()
            parallel, _ = run(hosts, 16, "parallel")
            redeploy, again = run(hosts, 16, "redeploy")
            assert all(r.changed == 0 for r in again)
            clean()
            serial, _ = run(hosts, 1, "serial")
            serial_redeploy, _ = run(hosts, 1, "serial_redeploy")
            clean()
        finally:
            lab.down()
    targets = [] if args.hosts != TARGET_HOSTS else [
        Target(f"deploy to {args.hosts} hosts / deploy to 1", parallel / one, "<=",
               TARGET_RATIO, "x"),
        Target(f"no-change redeploy of {args.hosts} hosts", redeploy, "<", TARGET_REDEPLOY_S,
               " s")]
    figures = {
        "hosts": args.hosts,
        "deploy_1_host_s": one,
        "deploy_all_parallel_s": parallel,
        "deploy_all_one_at_a_time_s": serial,
        "ratio_all_vs_1": parallel / one,
        "target_ratio": TARGET_RATIO,
        "redeploy_no_change_parallel_s": redeploy,
        "redeploy_no_change_one_at_a_time_s": serial_redeploy,
        "target_redeploy_s": TARGET_REDEPLOY_S,
        "targets": [t.as_json() for t in targets],
        "met": all(t.met for t in targets),
        "cores": os.cpu_count(),
        "machine_cpu_s": {k: v[0] for k, v in CPU.items()},
        "operator_cpu_s": {k: v[1] for k, v in CPU.items()},
    }
    if args.json:
        print(json.dumps(figures, indent=2))
        return exit_status(targets)
    n = args.hosts
    print(f"deploy to 1 lab host:            {one:6.2f} s")
    print(f"deploy to {n} hosts in parallel:   {parallel:6.2f} s  = {parallel / one:.2f}x of 1 host")
    print(f"deploy to {n} hosts one at a time: {serial:6.2f} s  = {serial / one:.2f}x of 1 host")
    print(f"no-change redeploy, {n} hosts:      {redeploy:6.2f} s;  one at a time "
          f"{serial_redeploy:.2f} s")
    for t in targets:
        print(t.line())
    if not targets:
        print(f"no target at {n} hosts (the targets are for {TARGET_HOSTS})")
    machine_one, operator_one = CPU["one"]
    machine_all, operator_all = CPU["parallel"]
    print(f"CPU per host: {machine_one:.2f} s in all for 1 host, {machine_all / n:.2f} s each "
          f"for {n}; the operator's share {operator_one:.2f} s / {operator_all / n:.2f} s. "
          f"All lab hosts share this machine's {os.cpu_count()} cores, so {n} hosts need at "
          f"least {machine_all / (os.cpu_count() or 1):.1f} s here; on real hosts only the "
          f"operator's share is shared.")
    return exit_status(targets)


def _host_python(lab) -> tuple[str, str]:  # type: ignore[no-untyped-def]
    version = lab.exec(lab.hosts[0], "python3", "-c",
                       "import platform; print(platform.python_version())").stdout.strip()
    arch = lab.exec(lab.hosts[0], "uname", "-m").stdout.strip()
    return version, arch


if __name__ == "__main__":
    sys.exit(main())
