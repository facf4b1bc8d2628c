"""Benchmark: what each update codec costs in accuracy and buys in upload bytes.

Every codec runs the same federated training in-process (core.simulation,
default TrainingSettings: FedAvg, logistic regression on the digits, split
over --hosts hosts with Dirichlet --alpha label skew). Each host's update
goes through the codec the way the agent and coordinator will use it: the
host encodes DELTA = trained - global with its own error-feedback state and
a per-(seed, host, round) generator, the coordinator decodes and adds the
delta back to the global weights before aggregating. Bytes are the wire
arrays' payload summed over the hosts of one round (the JSON header, a few
dozen bytes, is not counted). Accuracy is on the pooled held-out test set,
averaged over --seeds.

A second table times encode + decode of one 1M-parameter update (best of
--repeats), the cost each host and the coordinator pay per update.

Usage: python scripts/bench_compression.py [--seeds 0] [--hosts 8] [--alpha 0.5]
"""

from __future__ import annotations

import argparse
import platform
import time
from dataclasses import dataclass

import numpy as np

from flctl.core.compression import ErrorFeedback, make_codec, wire_bytes
from flctl.core.data import Dataset, make_federated_shards
from flctl.core.settings import TrainingSettings
from flctl.core.simulation import UpdateHook, accuracy_percent, simulate
from flctl.core.tasks import LogRegTask
from flctl.core.uplink import UplinkSpec, pack_update, unpack_update


@dataclass(frozen=True)
class Config:
    label: str
    codec: str
    params: dict


CONFIGS = [
    Config("float32", "float32", {}),
    Config("float16", "float16", {}),
    Config("int8", "int8", {}),
    Config("topk 0.1", "topk", {"fraction": 0.1}),
    Config("topk 0.05", "topk", {"fraction": 0.05}),
    Config("topk 0.01", "topk", {"fraction": 0.01}),
    Config("topk 0.05, no error feedback", "topk", {"fraction": 0.05, "error_feedback": False}),
]


class CompressedUploads:
    """The on_update hook: what a host sends (core.uplink, as the agent does) and
    what the coordinator rebuilds from it; counts the payload bytes."""

    def __init__(self, spec: UplinkSpec, seed: int) -> None:
        self.spec = spec
        self.codec = spec.codec()
        self.seed = seed
        self.states: dict[int, ErrorFeedback | None] = {}
        self.bytes_per_round: dict[int, int] = {}

    def __call__(self, host: int, round_number: int, global_weights: list[np.ndarray],
                 update: list[np.ndarray]) -> list[np.ndarray]:
        if host not in self.states:
            self.states[host] = self.codec.new_state()
        rng = np.random.default_rng([self.seed, host, round_number])
        wire, header = pack_update(self.spec, global_weights, update, rng, self.states[host])
        self.bytes_per_round[round_number] = (self.bytes_per_round.get(round_number, 0)
                                              + wire_bytes(wire))
        if header is None:  # float32: the weights as trained
            return wire
        return unpack_update(self.codec, header, wire, global_weights)


def run(config: Config, data: list[tuple[list[Dataset], Dataset]], seeds: list[int],
        training: TrainingSettings) -> tuple[float, float]:
    """(mean upload bytes per round, mean pooled test accuracy %) over the seeds."""
    byte_counts, accuracies = [], []
    for seed, (shards, pooled) in zip(seeds, data):
        hook: UpdateHook = CompressedUploads(UplinkSpec(config.codec, config.params), seed)
        weights = simulate(shards, training=training, seed=seed, on_update=hook)
        byte_counts += list(hook.bytes_per_round.values())
        accuracies.append(accuracy_percent(weights, pooled))
    return float(np.mean(byte_counts)), float(np.mean(accuracies))


def time_codec(config: Config, delta: list[np.ndarray], repeats: int) -> tuple[float, float]:
    """Best (encode ms, decode ms) of `repeats` for one update."""
    codec = make_codec(config.codec, config.params)
    state = codec.new_state()
    rng = np.random.default_rng(0)
    shapes = [d.shape for d in delta]
    best_encode = best_decode = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        wire, header = codec.encode(delta, rng, state)
        middle = time.perf_counter()
        codec.decode(header, wire, shapes)
        end = time.perf_counter()
        best_encode = min(best_encode, middle - start)
        best_decode = min(best_decode, end - middle)
    return best_encode * 1e3, best_decode * 1e3


def main() -> int:
    parser = argparse.ArgumentParser(description="Accuracy and upload bytes per update codec")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds to average over")
    parser.add_argument("--hosts", type=int, default=8)
    parser.add_argument("--alpha", type=float, default=0.5, help="Dirichlet label skew")
    parser.add_argument("--params", type=int, default=1_000_000,
                        help="parameters of the timed update")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",") if s]
    if not seeds or args.hosts < 1 or args.params < 1000 or args.repeats < 1:
        parser.error("need at least one seed, --hosts >= 1, --params >= 1000, --repeats >= 1")

    training = TrainingSettings()
    data = [make_federated_shards(args.hosts, alpha=args.alpha, seed=s) for s in seeds]
    results = {c.label: run(c, data, seeds, training) for c in CONFIGS}
    ref_bytes, ref_acc = results["float32"]
    n_params = sum(w.size for w in LogRegTask().init(0))
    print(f"## Update compression: {args.hosts} hosts, Dirichlet {args.alpha}, "
          f"{training.strategy}, {training.rounds} rounds x {training.epochs} epochs, "
          f"{training.task} ({n_params} parameters), seeds {','.join(map(str, seeds))}\n")
    print("| codec | bytes/round uploaded | ratio vs float32 | accuracy % | diff vs float32 |")
    print("|---|---:|---:|---:|---:|")
    for label, (nbytes, acc) in results.items():
        print(f"| {label} | {nbytes:,.0f} | {nbytes / ref_bytes:.3f} | {acc:.2f} | "
              f"{acc - ref_acc:+.2f} |")

    rng = np.random.default_rng(0)
    rows = (args.params - 1000) // 1000  # a weight matrix plus a bias-like remainder
    delta = [(rng.standard_normal((rows, 1000)) * 0.01).astype(np.float32),
             (rng.standard_normal(args.params - rows * 1000) * 0.01).astype(np.float32)]
    print(f"\n## Encode + decode of one {args.params:,}-parameter update "
          f"(best of {args.repeats}; {platform.machine()}, numpy {np.__version__})\n")
    print("| codec | encode ms | decode ms | total ms |")
    print("|---|---:|---:|---:|")
    for config in CONFIGS:
        encode_ms, decode_ms = time_codec(config, delta, args.repeats)
        print(f"| {config.label} | {encode_ms:.1f} | {decode_ms:.1f} | "
              f"{encode_ms + decode_ms:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
