"""Benchmark: what DP-FedAvg's noise costs in accuracy, and what privacy it buys.

Runs the in-process simulation (flctl.core.simulation) on the digits data
split over 8 hosts (Dirichlet alpha 0.5, seed 0) with the default
TrainingSettings (20 rounds, 5 local epochs, lr 0.5, logistic regression),
and reports the final accuracy on the pooled test set with epsilon at
delta = 1e-5 for: no DP; central DP (clip C chosen from the measured update
norms, several noise multipliers); local DP. Noisy rows are the mean and
standard deviation over --seeds noise seeds.

With 8 hosts all taking part every round, q = 1: no amplification by
sampling, so epsilon is large at any noise that keeps the model useful.
That is the honest figure for a small federation. The last rows simulate a
larger one (100 hosts, 10 sampled per round, q = 0.1; Dirichlet alpha 2.0,
since digits has too few examples for 100 hosts at 0.5) to show how sampling
and a larger denominator change both numbers.

Usage: python scripts/bench_privacy.py [--seeds 3] [--delta 1e-5]
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from typing import Any

import numpy as np

from flctl.core.aggregation import update_distance
from flctl.core.data import Dataset, make_federated_shards
from flctl.core.privacy import CentralDP, RdpAccountant, local_accounting, privatize_locally
from flctl.core.settings import TrainingSettings
from flctl.core.simulation import UpdateHook, accuracy_percent, simulate
from flctl.core.strategies import FedAvg, Strategy, StrategyState

CENTRAL_NOISE = (0.3, 0.5, 1.0, 2.0)
LOCAL_NOISE = (0.3, 1.0)


class _SampledRound:
    """Passes on only the updates of the hosts sampled this round."""

    def __init__(self, inner: Any, chosen: set[str]) -> None:
        self._inner, self._chosen = inner, chosen

    @property
    def count(self) -> int:
        return int(self._inner.count)

    def add(self, host: str, weights: list[np.ndarray], num_examples: int) -> None:
        if host in self._chosen:
            self._inner.add(host, weights, num_examples)

    def result(self) -> list[np.ndarray]:
        return self._inner.result()


class SampledHosts:
    """A strategy that sees `per_round` of `n_hosts` per round, drawn as the coordinator does.

    simulate() trains every shard every round; this keeps the simulation loop
    and drops the updates of the hosts the coordinator would not have asked.
    """

    def __init__(self, inner: Strategy, n_hosts: int, per_round: int, seed: int) -> None:
        self.inner, self.n_hosts, self.per_round, self.seed = inner, n_hosts, per_round, seed
        self.name = inner.name

    def start_round(self, global_weights: list[np.ndarray], round_number: int) -> _SampledRound:
        rng = np.random.default_rng([self.seed, round_number])
        chosen = rng.choice(self.n_hosts, size=self.per_round, replace=False)
        return _SampledRound(self.inner.start_round(global_weights, round_number),
                             {f"host{i}" for i in chosen})

    def fit_config_extra(self) -> dict[str, Any]:
        return self.inner.fit_config_extra()

    def state(self) -> StrategyState:
        return self.inner.state()

    def load_state(self, state: StrategyState) -> None:
        self.inner.load_state(state)


def local_hook(clip: float, noise: float, seed: int) -> UpdateHook:
    # Seeded for a reproducible benchmark only: a real host must use its own
    # entropy, or whoever knows the seed can subtract the noise.
    def hook(host: int, round_number: int, global_weights: list[np.ndarray],
             weights: list[np.ndarray]) -> list[np.ndarray]:
        rng = np.random.default_rng([seed, host, round_number])
        return privatize_locally(global_weights, weights, clip, noise, rng)
    return hook


def mean_sd(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


def epsilon_text(q: float, noise: float, rounds: int, delta: float) -> str:
    eps = RdpAccountant.after_rounds(q, noise, rounds).epsilon(delta)
    return "∞" if math.isinf(eps) else f"{eps:.3g}"


def run(shards: list[Dataset], pooled: Dataset, training: TrainingSettings,
        strategy: Strategy | None = None, hook: UpdateHook | None = None) -> float:
    weights = simulate(shards, training=training, strategy=strategy, on_update=hook)
    return accuracy_percent(weights, pooled)


def main() -> int:
    parser = argparse.ArgumentParser(description="Accuracy and epsilon of DP-FedAvg")
    parser.add_argument("--seeds", type=int, default=3, help="noise seeds per noisy row")
    parser.add_argument("--delta", type=float, default=1e-5)
    args = parser.parse_args()
    started = time.perf_counter()
    training = TrainingSettings()
    rounds, delta, seeds = training.rounds, args.delta, range(args.seeds)
    shards, pooled = make_federated_shards(8, alpha=0.5, seed=0)
    n = len(shards)

    # ---- no DP, measuring the update norms to choose the clip
    norms: dict[int, list[float]] = {}

    def measure(host: int, round_number: int, global_weights: list[np.ndarray],
                weights: list[np.ndarray]) -> list[np.ndarray]:
        norms.setdefault(round_number, []).append(update_distance(weights, global_weights))
        return weights

    baseline = run(shards, pooled, training, hook=measure)
    every = [x for r in sorted(norms) for x in norms[r]]
    clip = round(float(np.median(every)), 1)
    print(f"# DP-FedAvg on digits: {n} hosts (Dirichlet 0.5), {rounds} rounds, "
          f"{training.epochs} local epochs, lr {training.lr}; delta = {delta:g}\n")
    print("Update norms ||w_host - w_global|| without DP (median, max over hosts):")
    for r in (1, 2, 5, 10, 20):
        if r in norms:
            print(f"  round {r:2d}: {np.median(norms[r]):.2f}, {max(norms[r]):.2f}")
    print(f"  all rounds: median {np.median(every):.2f}, 90th percentile "
          f"{np.percentile(every, 90):.2f}  ->  clip C = {clip:g} (the median, as "
          f"McMahan et al. suggest)\n")

    rows: list[tuple[str, str, str, str, str]] = [
        ("none", "-", "-", f"{baseline:.1f}", "∞ (no DP)")]
    clipped = [run(shards, pooled, training, CentralDP(FedAvg(), clip, 0.0, n, noise_seed=s))
               for s in seeds[:1]]
    rows.append(("central, clip only", f"{clip:g}", "0", mean_sd(clipped), "∞ (no noise)"))
    for z in CENTRAL_NOISE:
        accs = [run(shards, pooled, training, CentralDP(FedAvg(), clip, z, n, noise_seed=s))
                for s in seeds]
        rows.append(("central", f"{clip:g}", f"{z:g}", mean_sd(accs),
                     epsilon_text(1.0, z, rounds, delta)))
    for z in LOCAL_NOISE:
        accs = [run(shards, pooled, training, hook=local_hook(clip, z, s)) for s in seeds]
        q, sigma = local_accounting(z)
        rows.append(("local (per host)", f"{clip:g}", f"{z:g}", mean_sd(accs),
                     epsilon_text(q, sigma, rounds, delta)))

    print(f"| DP | clip C | noise z | accuracy % (pooled test, {args.seeds} seeds) | "
          f"epsilon @ delta={delta:g} |")
    print("|---|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print(f"\nCentral: q = 1 ({n} of {n} hosts per round), noise std on the average "
          f"z*C/{n}. Local: each host adds z*C per coordinate; accounted per host at q = 1 "
          f"with sensitivity 2C (z/2), no amplification.")

    # ---- a larger federation: 100 hosts, 10 sampled per round
    big_n, per_round = 100, 10
    big_shards, big_pooled = make_federated_shards(big_n, alpha=2.0, seed=0)
    q = per_round / big_n
    big_norms: dict[int, list[float]] = {}

    def measure_big(host: int, round_number: int, global_weights: list[np.ndarray],
                    weights: list[np.ndarray]) -> list[np.ndarray]:
        big_norms.setdefault(round_number, []).append(update_distance(weights, global_weights))
        return weights

    big_rows = [("none", "-", "-", mean_sd([run(
        big_shards, big_pooled, training, SampledHosts(FedAvg(), big_n, per_round, seed=0),
        hook=measure_big)]), "∞ (no DP)")]
    big_clip = round(float(np.median([x for r in big_norms.values() for x in r])), 1)
    for z in (0.5, 1.0, 2.0):
        accs = [run(big_shards, big_pooled, training,
                    SampledHosts(CentralDP(FedAvg(), big_clip, z, per_round, noise_seed=s),
                                 big_n, per_round, seed=0)) for s in seeds]
        big_rows.append(("central", f"{big_clip:g}", f"{z:g}", mean_sd(accs),
                         epsilon_text(q, z, rounds, delta)))
    print(f"\n## Larger federation: {big_n} hosts (Dirichlet 2.0), {per_round} sampled per "
          f"round (q = {q:g}), {rounds} rounds; clip = median update norm\n")
    print(f"| DP | clip C | noise z | accuracy % ({args.seeds} seeds) | "
          f"epsilon @ delta={delta:g} |")
    print("|---|---|---|---|---|")
    for row in big_rows:
        print("| " + " | ".join(row) + " |")

    # ---- what --target-epsilon would do
    print()
    for label, rate in ((f"{n} hosts, q = 1", 1.0), (f"{big_n} hosts, q = {q:g}", q)):
        for target in (1.0, 10.0):
            fits = RdpAccountant().rounds_within(target, delta, rate, 1.0, limit=10**6)
            print(f"{label}, z = 1: {fits} rounds fit under epsilon = {target:g}")
    print(f"\n({time.perf_counter() - started:.1f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
