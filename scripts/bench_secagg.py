#!/usr/bin/env python3
"""Round time with secure aggregation over plain FedAvg rounds (issue 6).

N real local agents (processes, mutual TLS) train the echo task (one pass
over a P-parameter float32 model) for R rounds, once plainly and once with
training.secure_aggregation: four fan-outs per round (keys, shares, masked
fit, unmask), fixed-point encoding, a ChaCha20 mask per host pair, and the
coordinator's unmasking. Reports the median steady-round time of each and
their ratio. Target: secure / plain <= 3 at N=8, P=1M, printed as met or
MISSED with the measured ratio (other N or P have no target, and the output
says so); exit status 1 if it is missed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_round_overhead import echo_federation, measure  # noqa: E402
from verdict import Target, exit_status  # noqa: E402

TARGET_RATIO = 3.0
TARGET_AT = (8, 1_000_000)  # (N hosts, P)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--hosts", type=int, default=8)
    parser.add_argument("--params", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with echo_federation(args.hosts) as root:
        plain = measure(root, args.params, args.rounds)
        secure = measure(root, args.params, args.rounds, secure_aggregation=True)
    ratio = secure["fit_seconds_median"] / plain["fit_seconds_median"]
    targets = [Target("secure / plain round time", ratio, "<=", TARGET_RATIO, "x")] \
        if (args.hosts, args.params) == TARGET_AT else []
    result = {"hosts": args.hosts, "n_params": args.params, "plain": plain, "secure": secure,
              "ratio": ratio, "target_ratio": TARGET_RATIO,
              "targets": [t.as_json() for t in targets], "met": all(t.met for t in targets)}
    if args.json:
        print(json.dumps(result, indent=2))
        return exit_status(targets)
    print(f"N={args.hosts} agents, P={args.params:,} float32, median of steady rounds")
    for label, figure in (("plain FedAvg", plain), ("secure aggregation", secure)):
        print(f"  {label:20} round {figure['fit_seconds_median']:.3f} s "
              f"(slowest host compute {figure['max_compute_s_median']:.3f} s, "
              f"{figure['bytes_per_round'] / 1e6:.1f} MB moved)")
    print(f"  secure / plain = {ratio:.2f}x")
    for t in targets:
        print(f"  {t.line()}")
    if not targets:
        print(f"  no target at N={args.hosts}, P={args.params:,} (the target, secure / plain "
              f"<= {TARGET_RATIO:g}x, is for N=8, P=1,000,000)")
    return exit_status(targets)


if __name__ == "__main__":
    sys.exit(main())
