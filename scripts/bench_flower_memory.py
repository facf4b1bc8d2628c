#!/usr/bin/env python3
"""Flower's server-side memory for one FedAvg round, for comparison with flctl's.

flctl's figure comes from `scripts/bench_large_model.py --only memory` (the
coordinator's peak RSS over a FedAvg run at P = 5e8 with 4 and with 8 hosts).
This script measures what Flower's server holds for the same round: every
client's result arrives as a `FitRes` whose `parameters` are a `Parameters` of
serialized ndarrays (`flwr.common.ndarrays_to_parameters`, the .npy bytes of
each array), all N are held at once, and then
`flwr.server.strategy.FedAvg(...).aggregate_fit(1, results, [])` runs. In
Flower 1.42 `FedAvg()` defaults to `inplace=True`, which goes through
`aggregate.aggregate_inplace` (deserializes one result at a time and adds it in
place into the first); `FedAvg(inplace=False)` goes through `aggregate.aggregate`
(deserializes every result, builds a weighted copy of each, sums them). Both
are measured (--mode).

Each (mode, N) runs in a fresh child process (this script with --child). The
model is two float32 arrays, one of P - 1000 elements and one of 1000, filled
with random values (scaled in place between clients, so no two replies are
equal). The child reports:

  baseline  VmRSS after importing numpy and flwr, before the model exists
  (a)       the peak while holding the N serialized replies before aggregating,
            i.e. what Flower's server holds after receiving them
  (b)       the peak through aggregate_fit (its result serialized included)

The replies are built with Flower's own ndarrays_to_parameters, which costs a
transient extra model copy or two; that building peak is printed separately as
the harness's and kept out of (a) and (b): the kernel's peak (VmHWM) is reset
through /proc/self/clear_refs once the replies are built and the source
arrays freed. (a) and (b) are a lower bound on a real Flower server: the gRPC
receive path and the protobuf message a reply arrives in are not modelled.

Before it allocates anything a child predicts its peak from the mode's
copy count (building: N + 1 models, inplace: N + 2, copy: 3N + 2) and skips,
printing why, when that exceeds MemAvailable minus 2 GB.

Run it with the interpreter of a separate venv that has flwr, not flctl's:

    python3 -m venv /tmp/flwr-venv && /tmp/flwr-venv/bin/pip install flwr numpy
    /tmp/flwr-venv/bin/python scripts/bench_flower_memory.py [--params 5e8]
        [--hosts 4 8] [--mode inplace copy] [--json]

Measured with flwr 1.42.0 (numpy 2.4, CPython 3.11). It uses no network:
nothing is sent to any address, no Flower server or client is started (only
the strategy's aggregation code is called), and Flower's telemetry is also
switched off in the child's environment (FLWR_TELEMETRY_ENABLED=0).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

GB = 1e9
SMALL = 1000            # elements of the model's small array
SAFETY_BYTES = 2e9      # skip when the predicted peak exceeds MemAvailable minus this
MODES = {"inplace": "FedAvg() (inplace=True: aggregate_inplace)",
         "copy": "FedAvg(inplace=False): aggregate"}


# ------------------------------------------------------------------ memory figures

def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")


def status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def mem_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no MemAvailable in /proc/meminfo")


def copies(mode: str, hosts: int) -> dict[str, int]:
    """Model-sized copies alive at each peak, above the baseline."""
    return {"build": hosts + 1, "held": hosts,
            "aggregate": hosts + 2 if mode == "inplace" else 3 * hosts + 2}


# ------------------------------------------------------------------ child

def child(mode: str, hosts: int, n_params: int) -> dict[str, Any]:
    import flwr
    import numpy as np
    from flwr.common import Code, FitRes, Status, bytes_to_ndarray, ndarrays_to_parameters
    from flwr.server.strategy import FedAvg

    gc.collect()
    baseline = status_bytes("VmRSS")
    model_bytes = 4 * n_params
    report: dict[str, Any] = {
        "mode": mode, "strategy": MODES[mode], "hosts": hosts, "n_params": n_params,
        "model_bytes": model_bytes, "flwr": flwr.__version__, "numpy": np.__version__,
        "baseline_rss": baseline}
    expected = copies(mode, hosts)
    predicted = max(expected.values()) * model_bytes * 1.02 + 50e6
    available = mem_available()   # this process's baseline is already taken out of it
    report["predicted_peak"] = baseline + predicted
    report["mem_available"] = available
    if predicted > available - SAFETY_BYTES:
        report["skipped"] = (
            f"predicted peak {(baseline + predicted) / GB:.2f} GB "
            f"({max(expected.values())} model copies of {model_bytes / GB:.2f} GB + baseline) "
            f"exceeds what is free: MemAvailable {available / GB:.2f} GB minus "
            f"{SAFETY_BYTES / GB:.0f} GB")
        return report

    # The N replies, as Flower's server holds them once received.
    started = time.perf_counter()
    rng = np.random.default_rng(0)
    big = rng.random(n_params - SMALL, dtype=np.float32)
    small = rng.random(SMALL, dtype=np.float32)
    small_first = small.astype(np.float64)
    scale = np.float32(1.001)
    results: list[tuple[Any, Any]] = []
    counts = [100 + 37 * i for i in range(hosts)]
    for count in counts:
        parameters = ndarrays_to_parameters([big, small])
        # aggregate_fit reads only the FitRes; the ClientProxy (the connection) is unused.
        results.append((None, FitRes(Status(Code.OK, "ok"), parameters, count, {})))
        np.multiply(big, scale, out=big)
        np.multiply(small, scale, out=small)
    del big, small, parameters
    gc.collect()
    report["build_s"] = time.perf_counter() - started
    report["build_peak"] = status_bytes("VmHWM")
    report["reply_bytes"] = sum(len(t) for t in results[0][1].parameters.tensors)

    # (a) holding the N serialized replies
    reset_peak()
    report["held_rss"] = status_bytes("VmRSS")
    report["held_peak"] = status_bytes("VmHWM")

    # (b) through aggregate_fit
    strategy = FedAvg() if mode == "inplace" else FedAvg(inplace=False)
    started = time.perf_counter()
    aggregated, _ = strategy.aggregate_fit(1, results, [])
    report["aggregate_s"] = time.perf_counter() - started
    report["aggregate_peak"] = status_bytes("VmHWM")

    # The round's result is the weighted mean (checked on the small array).
    weights = np.array(counts, np.float64) / sum(counts)
    factors = np.float64(scale) ** np.arange(hosts)
    want = small_first * float(weights @ factors)
    got = bytes_to_ndarray(aggregated.tensors[1])
    report["result_ok"] = bool(np.allclose(got, want, rtol=1e-5, atol=0))
    return report


def run_child(mode: str, hosts: int, n_params: int) -> dict[str, Any]:
    env = dict(os.environ, FLWR_TELEMETRY_ENABLED="0")
    done = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", mode,
                           str(hosts), str(n_params)],
                          env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        sys.stderr.write(done.stderr)
        raise SystemExit(f"child for {mode}, N={hosts} exited with {done.returncode}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------ report

def describe(run: dict[str, Any]) -> list[str]:
    model, base = run["model_bytes"], run["baseline_rss"]
    head = (f"{run['strategy']}, N={run['hosts']}, P={run['n_params']:.1e} "
            f"(model {model / GB:.3f} GB):")
    if "skipped" in run:
        return [f"{head} SKIPPED: {run['skipped']}"]

    def figure(label: str, peak: int) -> str:
        return (f"  {label}: peak RSS {peak / GB:.3f} GB = {peak / model:.2f}x the model; "
                f"net of the baseline {(peak - base) / GB:.3f} GB = "
                f"{(peak - base) / model:.2f}x")

    return [head,
            f"  baseline RSS (numpy + flwr imported) {base / GB:.3f} GB; one reply "
            f"{run['reply_bytes'] / GB:.3f} GB",
            figure("(a) holding the N replies     ", run["held_peak"]),
            figure("(b) through aggregate_fit     ", run["aggregate_peak"])
            + f"; aggregate_fit {run['aggregate_s']:.1f} s"
            + ("" if run["result_ok"] else "; RESULT WRONG"),
            f"  (harness, building the replies: peak {run['build_peak'] / GB:.3f} GB, "
            f"{run['build_s']:.1f} s; not part of (a) or (b))"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=float, default=5e7,
                        help="parameters in the model (float32), default 5e7")
    parser.add_argument("--hosts", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--mode", choices=sorted(MODES), nargs="+",
                        default=["inplace", "copy"])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        mode, hosts, n_params = args.child
        print(json.dumps(child(mode, int(hosts), int(n_params))))
        return 0
    n_params = int(args.params)
    if n_params <= SMALL:
        parser.error(f"--params must exceed {SMALL}")
    runs = [run_child(mode, hosts, n_params) for mode in args.mode for hosts in args.hosts]
    if args.json:
        print(json.dumps({"runs": runs}, indent=2))
    else:
        print(f"flwr {runs[0]['flwr']}, numpy {runs[0]['numpy']}")
        for run in runs:
            print("\n".join(describe(run)))
    return 0 if all(r.get("result_ok", True) for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
