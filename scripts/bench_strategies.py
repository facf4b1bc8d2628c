"""Benchmark: one round of every aggregation strategy, next to FedAvg.

Each strategy is timed end to end as the coordinator uses it:
`start_round(global, r)`, `add(host, [u_i], n_i)` for each of N updates of P
float32 parameters, `result()`. Stateful strategies (FedAvgM, FedAdagrad,
FedAdam, FedYogi) have run one round first, so the timed rounds include
reading and writing their optimiser state as every round after the first
does. Times are the best of `--repeats`, strategies interleaved so all see
the same machine load. Peak extra memory is measured with tracemalloc (numpy
reports its buffers to it) in a separate untimed round, and excludes the N
inputs the caller already holds: for the FedAvg family it stays a few models
whatever N, for the robust strategies it includes their copy of every update.

Usage: python scripts/bench_strategies.py [--n 100] [--p 1000000] [--repeats 3] [--json]
Inputs take N x P x 4 bytes (400 MB at the defaults); robust strategies hold as
much again while a round runs.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time

import numpy as np
from bench_aggregation import peak_extra_bytes  # noqa: E402  (the script's own folder)

from flctl.core.strategies import STRATEGIES, Strategy, make_strategy

HOLDS = {
    "fedavg": "float64 sum + result",
    "fedavgm": "float64 sum + result",
    "fedprox": "float64 sum + result",
    "fedadagrad": "float64 sum + result",
    "fedadam": "float64 sum + result",
    "fedyogi": "float64 sum + result",
    "fedmedian": "copy of every update + result",
    "fedtrimmedavg": "copy of every update + result",
    "krum": "copy of every update + NxN",
    "multikrum": "copy of every update + NxN + result",
}


def params_for(name: str, n: int) -> dict:
    # Krum needs n > 2f + 2; tolerate a tenth of the hosts being hostile.
    return {"num_malicious": max(0, min(n // 10, (n - 3) // 2))} if "krum" in name else {}


def one_round(strategy: Strategy, template: list[np.ndarray], updates: list[np.ndarray],
              num_examples: list[int], round_number: int) -> list[np.ndarray]:
    round_ = strategy.start_round(template, round_number)
    for i, (u, k) in enumerate(zip(updates, num_examples)):
        round_.add(f"host{i:04d}", [u], k)
    return round_.result()


def round_peak_bytes(strategy: Strategy, template: list[np.ndarray], updates: list[np.ndarray],
                     num_examples: list[int]) -> int:
    return peak_extra_bytes(lambda: one_round(strategy, template, updates, num_examples, 99))


def main() -> int:
    parser = argparse.ArgumentParser(description="Aggregation time and memory per strategy")
    parser.add_argument("--n", type=int, default=100, help="number of updates (hosts)")
    parser.add_argument("--p", type=int, default=1_000_000, help="float32 parameters per model")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds each; best counts")
    parser.add_argument("--strategies", default=",".join(STRATEGIES),
                        help="comma-separated names (default: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    names = [s for s in args.strategies.split(",") if s]
    unknown = sorted(set(names) - set(STRATEGIES))
    if unknown:
        parser.error(f"unknown strategies: {', '.join(unknown)}")
    if args.n < 3 or args.p < 1 or args.repeats < 1:
        parser.error("--n must be >= 3, --p and --repeats positive")
    if "fedavg" not in names:
        names.insert(0, "fedavg")

    rng = np.random.default_rng(args.seed)
    template = [rng.normal(0.0, 0.1, args.p).astype(np.float32)]
    updates = [template[0] + rng.normal(0.0, 0.01, args.p).astype(np.float32)
               for _ in range(args.n)]
    num_examples = [int(k) for k in rng.integers(10, 1000, size=args.n)]
    model_bytes = args.p * 4

    strategies = {name: make_strategy(name, params_for(name, args.n)) for name in names}
    for strategy in strategies.values():
        one_round(strategy, template, updates, num_examples, 0)  # state exists from now on
    times: dict[str, list[float]] = {name: [] for name in names}
    for repeat in range(args.repeats):
        for name, strategy in strategies.items():
            start = time.perf_counter()
            one_round(strategy, template, updates, num_examples, repeat + 1)
            times[name].append(time.perf_counter() - start)
    best = {name: min(t) for name, t in times.items()}
    peaks = {name: round_peak_bytes(strategy, template, updates, num_examples)
             for name, strategy in strategies.items()}

    # Optimiser state lives between rounds, so it is not in a round's peak: listed apart.
    state = {name: sum(a.nbytes for arrays in strategy.state().values() for a in arrays)
             for name, strategy in strategies.items()}
    rows = [{"strategy": name, "params": params_for(name, args.n), "seconds": best[name],
             "vs_fedavg": best[name] / best["fedavg"], "all_runs_s": times[name],
             "peak_extra_mb": peaks[name] / 2**20, "peak_extra_models": peaks[name] / model_bytes,
             "state_models": state[name] / model_bytes, "holds": HOLDS.get(name, "")}
            for name in names]
    report = {"n_updates": args.n, "params": args.p, "model_mb": model_bytes / 2**20,
              "repeats": args.repeats, "strategies": rows, "numpy": np.__version__,
              "python": platform.python_version(), "machine": platform.machine()}
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"One round of {args.n} updates x {args.p:,} float32 "
          f"({report['model_mb']:.1f} MB per model), best of {args.repeats}")
    print(f"{'strategy':14} {'seconds':>8} {'x fedavg':>9} {'round peak':>11} {'x model':>8} "
          f"{'state':>6}  holds during a round")
    for row in rows:
        print(f"{row['strategy']:14} {row['seconds']:8.3f} {row['vs_fedavg']:9.2f} "
              f"{row['peak_extra_mb']:8.1f} MB {row['peak_extra_models']:8.2f} "
              f"{row['state_models']:6.1f}  {row['holds']}")
    print("round peak: extra memory while a round runs (inputs excluded); state: optimiser "
          "state kept between rounds, in models")
    return 0


if __name__ == "__main__":
    sys.exit(main())
