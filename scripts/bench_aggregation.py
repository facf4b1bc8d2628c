"""Benchmark: streaming FedAvg against a single-pass numpy weighted sum.

Target (from the issue): FedAvg of N=100 updates of P=10M float32 in at most
1.25x the time of a single-pass numpy weighted sum over the same arrays, with
peak extra memory at most 3x one model. Each target is printed as met or
MISSED with the measured figure.

The reference is the cheapest honest numpy code for the same result:

    ref = w[0] * u[0]
    for i > 0: ref += w[i] * u[i]          # w[i] = n_i / sum(n), Python floats

FedAvg is timed end to end as the coordinator uses it:
`FedAvg().start_round(global, r)`, `add(host, [u_i], n_i)` for each update,
`result()`. Times are the best of `--repeats` runs, interleaved so that both
see the same machine load. Peak extra memory is measured with tracemalloc
(numpy reports its buffers to it) in a separate untimed run, relative to one
model's size. Inputs: N x P x 4 bytes (4 GB at the defaults).

When the `flwr` package is importable (`pip install flwr` into the same
environment; flctl does not depend on it), Flower's FedAvg aggregation is
measured in the same run, on the same arrays and the same way (timed in the
same interleaved loop, best of --repeats; peak extra memory with tracemalloc
in an untimed run), and printed with the flwr version it came from:
`flwr.server.strategy.aggregate.aggregate` on [(arrays, n_i)], and, where it
exists, `aggregate_inplace` (what Flower's FedAvg uses by default) on FitRes
whose Parameters hold the same arrays serialized as Flower's server receives
them; serializing is not timed, deserializing inside aggregate_inplace is.
Holding those serialized copies takes another N x P x 4 bytes, and Flower's
`aggregate` a further N x P x 4 while it runs. --no-flower skips Flower.
Without flwr no comparison with Flower is made, and the output says so.

Usage: python scripts/bench_aggregation.py [--n 100] [--p 10000000] [--no-flower] [--json]
Exit status 1 if a target is missed or flctl's result differs from the reference
(Flower's figures are for comparison and do not change it).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import platform
import sys
import time
import tracemalloc
from collections.abc import Callable
from typing import Any

import numpy as np
from verdict import Target, exit_status  # noqa: E402  (the script's own folder)

from flctl.core.strategies import FedAvg

TIME_TARGET = 1.25
MEMORY_TARGET = 3.0


def make_updates(n: int, p: int, seed: int) -> tuple[list[np.ndarray], list[int]]:
    rng = np.random.default_rng(seed)
    updates = [rng.random(p, dtype=np.float32) for _ in range(n)]
    num_examples = [int(k) for k in rng.integers(10, 1000, size=n)]
    return updates, num_examples


def numpy_reference(updates: list[np.ndarray], weights: list[float]) -> np.ndarray:
    # Python floats keep the arithmetic in float32 (NumPy 2 / NEP 50 weak scalars).
    ref = weights[0] * updates[0]
    for w, u in zip(weights[1:], updates[1:]):
        ref += w * u
    return ref


def fedavg(updates: list[np.ndarray], num_examples: list[int], template: list[np.ndarray],
           strategy: FedAvg) -> np.ndarray:
    round_ = strategy.start_round(template, 1)
    for i, (u, n) in enumerate(zip(updates, num_examples)):
        round_.add(f"host{i}", [u], n)
    return round_.result()[0]


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def peak_extra_bytes(fn: Callable[[], object]) -> int:
    """Peak bytes allocated while fn runs, above what was allocated before (result included)."""
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        before, _ = tracemalloc.get_traced_memory()
        result = fn()
        _, peak = tracemalloc.get_traced_memory()
        del result
    finally:
        tracemalloc.stop()
    return peak - before


def flower_aggregators(updates: list[np.ndarray], num_examples: list[int],
                       ) -> tuple[str, dict[str, Callable[[], np.ndarray]]] | None:
    """(flwr version, {name: call}) for Flower's FedAvg aggregation on these
    updates, or None if flwr is not importable."""
    if importlib.util.find_spec("flwr") is None:
        return None
    os.environ["FLWR_TELEMETRY_ENABLED"] = "0"  # read once, when flwr is imported
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
    from flwr.server.strategy import aggregate as flower

    version = importlib.metadata.version("flwr")
    pairs = [([u], n) for u, n in zip(updates, num_examples)]
    calls: dict[str, Callable[[], np.ndarray]] = {
        "aggregate": lambda: flower.aggregate(pairs)[0]}
    if hasattr(flower, "aggregate_inplace"):
        fit_results: list[tuple[Any, Any]] = [
            (None, FitRes(Status(Code.OK, ""), ndarrays_to_parameters([u]), n, {}))
            for u, n in zip(updates, num_examples)]
        calls["aggregate_inplace"] = lambda: flower.aggregate_inplace(fit_results)[0]
    return version, calls


def main() -> int:
    parser = argparse.ArgumentParser(description="Streaming FedAvg vs numpy weighted sum")
    parser.add_argument("--n", type=int, default=100, help="number of updates (hosts)")
    parser.add_argument("--p", type=int, default=10_000_000, help="float32 parameters per model")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each; best counts")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-flower", action="store_true",
                        help="do not measure Flower even if flwr is importable")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    if args.n < 1 or args.p < 1 or args.repeats < 1:
        parser.error("--n, --p and --repeats must be positive")

    updates, num_examples = make_updates(args.n, args.p, args.seed)
    total = sum(num_examples)
    weights = [k / total for k in num_examples]
    template = [np.zeros(args.p, np.float32)]
    model_bytes = args.p * 4
    flower = None if args.no_flower else flower_aggregators(updates, num_examples)
    flower_calls = flower[1] if flower else {}

    checked, unchecked = FedAvg(), FedAvg(reject_non_finite=False)
    runs: dict[str, list[float]] = {"reference": [], "fedavg": [], "fedavg_unchecked": [],
                                    **{f"flower_{name}": [] for name in flower_calls}}
    for _ in range(args.repeats):
        runs["reference"].append(timed(lambda: numpy_reference(updates, weights)))
        runs["fedavg"].append(timed(lambda: fedavg(updates, num_examples, template, checked)))
        runs["fedavg_unchecked"].append(
            timed(lambda: fedavg(updates, num_examples, template, unchecked)))
        for name, call in flower_calls.items():
            runs[f"flower_{name}"].append(timed(call))
    best = {name: min(times) for name, times in runs.items()}

    ref_peak = peak_extra_bytes(lambda: numpy_reference(updates, weights))
    agg_peak = peak_extra_bytes(lambda: fedavg(updates, num_examples, template, checked))
    flower_peaks = {name: peak_extra_bytes(call) for name, call in flower_calls.items()}

    ref = numpy_reference(updates, weights)
    got = fedavg(updates, num_examples, template, checked)
    equal = bool(np.allclose(got, ref, rtol=1e-5, atol=1e-6))
    max_abs_diff = float(np.max(np.abs(got.astype(np.float64) - ref)))

    time_ratio = best["fedavg"] / best["reference"]
    memory_ratio = agg_peak / model_bytes
    targets = [Target("time ratio to the numpy weighted sum", time_ratio, "<=", TIME_TARGET, "x"),
               Target("peak extra memory", memory_ratio, "<=", MEMORY_TARGET, "x model")]
    if flower:
        version = flower[0]
        reference: dict[str, Any] = {
            "measured": True, "system": "flwr", "version": version,
            "source": f"measured in this run, flwr {version}, on the same arrays"}
        for name, call in flower_calls.items():
            result = call()
            seconds = best[f"flower_{name}"]
            reference[name] = {
                "function": f"flwr.server.strategy.aggregate.{name}",
                "seconds": seconds, "all_runs_s": runs.pop(f"flower_{name}"),
                "time_ratio": seconds / best["reference"],
                "vs_flctl_fedavg": seconds / best["fedavg"],
                "peak_extra_models": flower_peaks[name] / model_bytes,
                "peak_extra_mib": flower_peaks[name] / 2**20,
                "max_abs_diff": float(np.max(np.abs(result.astype(np.float64) - ref))),
            }
            del result
    else:
        reference = {"measured": False, "why": (
            "--no-flower" if args.no_flower else
            "flwr is not importable here; `pip install flwr` into this environment")}
    report = {
        "n_updates": args.n,
        "params": args.p,
        "model_mb": model_bytes / 2**20,
        "inputs_gb": args.n * model_bytes / 2**30,
        "repeats": args.repeats,
        "reference_s": best["reference"],
        "fedavg_s": best["fedavg"],
        "fedavg_unchecked_s": best["fedavg_unchecked"],
        "all_runs_s": runs,
        "time_ratio": time_ratio,
        "time_ratio_unchecked": best["fedavg_unchecked"] / best["reference"],
        "time_target": TIME_TARGET,
        "reference_peak_extra_models": ref_peak / model_bytes,
        "fedavg_peak_extra_models": memory_ratio,
        "memory_target": MEMORY_TARGET,
        "targets": [t.as_json() for t in targets],
        "results_equal": equal,
        "max_abs_diff": max_abs_diff,
        "flower": reference,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
    }
    status = exit_status(targets) if equal else 1
    report["ok"] = status == 0

    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"FedAvg of {args.n} updates x {args.p:,} float32 "
              f"({report['model_mb']:.1f} MB per model, {report['inputs_gb']:.2f} GB of inputs), "
              f"best of {args.repeats}")
        print(f"  numpy weighted sum    {best['reference']:8.3f} s   "
              f"peak extra {report['reference_peak_extra_models']:.2f}x model")
        print(f"  flctl FedAvg          {best['fedavg']:8.3f} s   "
              f"peak extra {memory_ratio:.2f}x model   (NaN/inf check on)")
        print(f"  flctl FedAvg          {best['fedavg_unchecked']:8.3f} s   "
              f"(NaN/inf check off)")
        for t in targets:
            print(f"  {t.line()}")
        print(f"  results equal (allclose rtol 1e-5): {equal}   max |diff| {max_abs_diff:.2e}")
        if flower:
            print(f"  Flower ({reference['source']}):")
            for name in flower_calls:
                f = reference[name]
                print(f"    {name:18} {f['seconds']:8.3f} s   peak extra "
                      f"{f['peak_extra_models']:.2f}x model ({f['peak_extra_mib']:.0f} MiB)   "
                      f"{f['time_ratio']:.2f}x the numpy sum, {f['vs_flctl_fedavg']:.2f}x "
                      f"flctl FedAvg   max |diff| {f['max_abs_diff']:.2e}")
        else:
            print(f"  no Flower comparison made: {reference['why']}")
    return status


if __name__ == "__main__":
    sys.exit(main())
