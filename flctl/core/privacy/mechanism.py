"""DP-FedAvg (McMahan et al. 2018, "Learning Differentially Private Recurrent Language Models").

User-level differential privacy: one host's whole data set is the unit
protected. Each host's update delta = weights - global is clipped to L2 norm
`clip_norm` over all arrays jointly, so adding or removing a host moves the
SUM of the round's clipped deltas by at most clip_norm (its sensitivity).

Central DP (`CentralDP`): the coordinator clips, averages the clipped deltas
with UNIFORM weights over the EXPECTED number of participants m (a fixed
denominator, as DP-FedAvg's estimator sum_k delta_k / (qW) with w_k = 1), and
adds N(0, (noise_multiplier * clip_norm / m)^2) to each coordinate of the
average. Why not FedAvg's example-count weights: the counts are reported by
the hosts, unverified, and a host's weight would enter the sensitivity (one
host claiming a huge count would own the average); the denominator sum of
counts, like the actual number of replies, depends on who took part, so
dividing by it leaks membership and unbounds the sensitivity. With a fixed m
the sensitivity of the average is exactly clip_norm / m whoever answers. The
round is accounted as the sampled Gaussian mechanism with sampling rate
q = m / total hosts and this noise multiplier (see accountant.py, which
also explains why fixed-size sampling is accounted as Poisson sampling).
The coordinator sees the raw updates: central DP protects what the released
models reveal, not the updates in transit.

Local DP (`privatize_locally`): each host clips and noises its own update
before sending it, N(0, (noise_multiplier * clip_norm)^2) per coordinate,
so not even the coordinator sees a raw update. Accounting: the coordinator
knows which hosts it sampled, so there is no amplification by sampling
(q = 1), and replacing a host's data can move its clipped delta by up to
2 x clip_norm, so each round the host takes part in is a Gaussian mechanism
with noise multiplier noise_multiplier / 2 (`local_accounting`).

Noise comes from numpy Generators: central noise from (noise_seed, round),
so a run is reproducible and a resumed run draws the very same noise. The
noise seed must be SECRET: whoever can regenerate the noise can subtract it
from a published model. It is not training.seed (flctl.yaml, default 0);
by default it is 128 bits of fresh entropy kept in the strategy state under
a key listed in SECRET_STATE_KEYS, which the run's records keep in a file of
their own, readable by its owner only and removed when the run finishes. Local noise must come from the host's own entropy for the same reason.

Floating point: clipping and noise run in float64 and only the noised
result is rounded to the model's float type (post-processing, which costs
no privacy).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

import numpy as np

from flctl.core.aggregation import (
    CHUNK,
    all_finite,
    flat_blocks,
    narrow_in_place,
    norm,
    update_distance,
)
from flctl.core.dtypes import cast_back, is_float, is_number
from flctl.core.privacy.accountant import PrivacyError, check_noise_multiplier
from flctl.core.spooled import FileArray
from flctl.core.strategies import FedAvg, needs_only_the_mean
from flctl.core.strategies.base import (
    Strategy,
    StrategyError,
    StrategyState,
    check_num_examples,
)

# The strategy-state key that carries the secret noise seed through checkpoints.
NOISE_SEED_KEY = "dp_noise_seed"
# Strategy-state keys that must never be published: kept 0600 while a run can
# be resumed, deleted when it finishes (flctl.coordinator.records).
SECRET_STATE_KEYS = frozenset({NOISE_SEED_KEY})
_SEED_WORDS = 4  # 128 bits as uint32 words


def check_clip_norm(clip_norm: object) -> float:
    if (isinstance(clip_norm, bool) or not isinstance(clip_norm, numbers.Real)
            or not 0.0 < clip_norm < math.inf):
        raise PrivacyError(f"clip norm must be a finite number > 0, got {clip_norm!r}")
    return float(clip_norm)


def _flat(array: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(array).reshape(-1)


def _float_type(array: np.ndarray) -> np.dtype:
    dtype = np.asarray(array).dtype
    if not is_float(dtype):
        raise PrivacyError(f"differential privacy adds noise to every model array; an array "
                           f"of dtype {dtype} (a counter such as BatchNorm's "
                           f"num_batches_tracked) cannot carry it: leave it out of the "
                           f"federated state (with flctl.torch: TorchTask.exclude)")
    return dtype


def _check_pair(global_weights: Sequence[np.ndarray], weights: Sequence[np.ndarray]) -> None:
    if len(weights) != len(global_weights):
        raise PrivacyError(f"update has {len(weights)} arrays, the model {len(global_weights)}")
    for i, (w, g) in enumerate(zip(weights, global_weights)):
        if np.shape(w) != np.shape(g):
            raise PrivacyError(f"update array {i} has shape {np.shape(w)}, "
                               f"the model {np.shape(g)}")


# ---------------------------------------------------------------- clipping


def clip_update(global_weights: Sequence[np.ndarray], weights: Sequence[np.ndarray],
                clip_norm: float) -> tuple[list[np.ndarray], float]:
    """(weights whose delta from the global model has L2 norm <= clip_norm, the delta's norm).

    The norm is over all arrays jointly. An update already within the bound
    is returned unchanged (the same values); a larger one is scaled toward
    the global model by clip_norm / norm, computed in float64 and rounded
    to each array's float type, so its norm is clip_norm up to that rounding.
    """
    clip_norm = check_clip_norm(clip_norm)
    _check_pair(global_weights, weights)
    norm = update_distance(weights, global_weights)
    if not math.isfinite(norm):
        raise PrivacyError("update is not finite (NaN or infinite values)")
    if norm <= clip_norm:
        return [np.asarray(w) for w in weights], norm
    scale = clip_norm / norm
    clipped = []
    for w, g in zip(weights, global_weights):
        wide = np.asarray(g, dtype=np.float64) + (
            np.asarray(w, dtype=np.float64) - np.asarray(g, dtype=np.float64)) * scale
        clipped.append(cast_back(wide, _float_type(w)))
    return clipped, norm


def privatize_locally(global_weights: Sequence[np.ndarray], weights: Sequence[np.ndarray],
                      clip_norm: float, noise_multiplier: float,
                      rng: np.random.Generator) -> list[np.ndarray]:
    """What a host sends under local DP: its clipped delta plus N(0, (z C)^2) per coordinate.

    `rng` must be seeded from the host's own entropy (np.random.default_rng()),
    never from a seed the coordinator knows: it could regenerate the noise.
    """
    clip_norm = check_clip_norm(clip_norm)
    std = check_noise_multiplier(noise_multiplier) * clip_norm
    _check_pair(global_weights, weights)
    norm = update_distance(weights, global_weights)
    if not math.isfinite(norm):
        raise PrivacyError("update is not finite (NaN or infinite values)")
    scale = min(1.0, clip_norm / norm) if norm > 0 else 1.0
    private = []
    for w, g in zip(weights, global_weights):
        dtype = _float_type(w)
        base = np.asarray(g, dtype=np.float64)
        delta = (np.asarray(w, dtype=np.float64) - base) * scale
        delta += rng.standard_normal(delta.shape) * std
        private.append(cast_back(base + delta, dtype))
    return private


def local_accounting(noise_multiplier: float) -> tuple[float, float]:
    """(sampling rate, noise multiplier) to give the accountant per round a host takes part in.

    No amplification by sampling (the coordinator knows who it asked) and
    sensitivity 2 x clip (a host's data replaced), hence z / 2 at q = 1.
    """
    return 1.0, check_noise_multiplier(noise_multiplier) / 2.0


def round_noise_rng(noise_seed: int, round_number: int) -> np.random.Generator:
    """The central noise stream of one round: independent per round, the same on resume."""
    return np.random.default_rng(np.random.SeedSequence(noise_seed, spawn_key=(round_number,)))


# ---------------------------------------------------------------- central DP


class CentralDPRound:
    """One round: a float64 running sum of clipped deltas (O(model), updates never held)."""

    def __init__(self, strategy: CentralDP, global_weights: Sequence[np.ndarray],
                 round_number: int) -> None:
        self.round_number = round_number
        self._strategy = strategy
        # Read-only reference: the coordinator does not change the global model mid-round.
        self._global = [np.asarray(g) for g in global_weights]
        self._dtypes = [_float_type(g) for g in self._global]
        self._sum: list[np.ndarray] | None = [np.zeros(g.shape, np.float64)
                                              for g in self._global]
        largest = max((g.size for g in self._global), default=0)
        self._scratch = np.empty(min(CHUNK, largest), np.float64)
        self._hosts: set[str] = set()
        self._norms: list[float] = []
        self._result: list[np.ndarray] | None = None

    @property
    def count(self) -> int:
        return len(self._hosts)

    @property
    def hosts(self) -> frozenset[str]:
        return frozenset(self._hosts)

    @property
    def norms(self) -> tuple[float, ...]:
        """The raw update norms of this round, for choosing clip_norm.

        They are NOT privatised: use them on the coordinator to tune, never publish them.
        """
        return tuple(self._norms)

    @property
    def clipped_fraction(self) -> float:
        clip = self._strategy.clip_norm
        return sum(n > clip for n in self._norms) / len(self._norms) if self._norms else 0.0

    def _checked(self, where: str, weights: list[np.ndarray],
                 is_delta: bool = False) -> tuple[list[Any], float]:
        """The update's arrays (or a change, `is_delta`) once they fit the model and
        are finite; its distance from the model."""
        arrays = [w if isinstance(w, FileArray) else np.asarray(w) for w in weights]
        if len(arrays) != len(self._global):
            raise StrategyError(f"{where}: expected {len(self._global)} arrays, "
                                f"got {len(arrays)}")
        for i, (x, g) in enumerate(zip(arrays, self._global)):
            if x.shape != g.shape:
                raise StrategyError(f"{where}: array {i}: expected shape {g.shape}, "
                                    f"got {x.shape}")
            if not is_number(x.dtype):
                raise StrategyError(f"{where}: array {i}: dtype {x.dtype} is not a real "
                                    f"number type")
            if not all_finite(x):
                raise StrategyError(f"{where}: array {i}: contains NaN or infinite values")
        distance = norm(arrays) if is_delta else update_distance(arrays, self._global)
        if not math.isfinite(distance):
            raise StrategyError(f"{where}: its distance from the model overflows")
        return arrays, distance

    def _fold(self, arrays: list[Any], scale: float, is_delta: bool = False) -> None:
        """sum += scale * (update - global) (or scale * change), in float64 chunks."""
        assert self._sum is not None
        for x, g, acc in zip(arrays, self._global, self._sum):
            base, target = _flat(g), acc.reshape(-1)
            for start, stop, block in flat_blocks(x):
                part = self._scratch[:stop - start]
                if is_delta:
                    np.copyto(part, block, casting="unsafe")
                else:
                    np.subtract(block, base[start:stop], out=part, dtype=np.float64)
                if scale != 1.0:
                    np.multiply(part, scale, out=part)
                np.add(target[start:stop], part, out=target[start:stop])

    def add(self, host: str, weights: list[np.ndarray], num_examples: int) -> None:
        """Clip one host's delta and fold it in; a refused update leaves the round unchanged.

        num_examples is checked like FedAvg's but not used: the average is uniform.
        """
        where = f"round {self.round_number}: update from {host}"
        if self._result is not None or self._sum is None:
            raise StrategyError(f"{where} after result()")
        if host in self._hosts:
            raise StrategyError(f"round {self.round_number}: second update from {host}")
        check_num_examples(self.round_number, host, num_examples)
        arrays, norm = self._checked(where, weights)
        scale = min(1.0, self._strategy.clip_norm / norm) if norm > 0 else 1.0
        self._fold(arrays, scale)
        self._hosts.add(host)
        self._norms.append(norm)

    def add_site(self, site: str, members: Sequence[str], delta: list[np.ndarray],
                 num_examples: int, sampled: int) -> None:
        """Fold in a site's partial: the mean, over the `sampled` members it was
        asked for, of their clipped deltas (`clipped_mean_delta`: this very
        clipping at the site), so `sampled` x it is their clipped sum.

        A mean of deltas each within clip_norm is within clip_norm itself; a
        site's partial is clipped to that again, so no site moves the sum by
        more than `sampled` members could (honest ones are unchanged)."""
        where = f"round {self.round_number}: update from site {site}"
        if self._result is not None or self._sum is None:
            raise StrategyError(f"{where} after result()")
        again = sorted(set(members) & self._hosts)
        if again or not members or len(set(members)) != len(members):
            raise StrategyError(f"{where}: its members "
                                f"{', '.join(again) or '(none, or repeated)'} already counted")
        if isinstance(sampled, bool) or not isinstance(sampled, int) \
                or not len(members) <= sampled:
            raise StrategyError(f"{where}: {sampled!r} members asked, {len(members)} answered")
        check_num_examples(self.round_number, f"site {site}", num_examples)
        arrays, size = self._checked(where, delta, is_delta=True)
        scale = sampled * (min(1.0, self._strategy.clip_norm / size) if size > 0 else 1.0)
        self._fold(arrays, scale, is_delta=True)
        self._hosts.update(members)

    def clipped_mean_delta(self) -> list[np.ndarray]:
        """A site's reply: the sum of its members' clipped changes over the members
        asked (expected_participants), no noise, in the model's dtypes."""
        if self._result is not None or self._sum is None or not self._hosts:
            raise StrategyError(f"round {self.round_number}: no updates to aggregate")
        total, self._sum = self._sum, None
        denominator = float(self._strategy.expected_participants)
        with np.errstate(over="ignore", invalid="ignore"):
            for acc in total:
                np.divide(acc, denominator, out=acc)
            delta = [narrow_in_place(acc, dtype) for acc, dtype in zip(total, self._dtypes)]
        if not all(all_finite(d) for d in delta):
            raise StrategyError(f"round {self.round_number}: the site's clipped mean overflowed")
        self._result = delta
        return delta

    def result(self) -> list[np.ndarray]:
        """global + (sum of clipped deltas) / m + noise, then the inner strategy's step.

        The first call draws the round's noise and commits; later calls return
        the same weights.
        """
        if self._result is not None:
            return self._result
        if self._sum is None or not self._hosts:
            raise StrategyError(f"round {self.round_number}: no updates to aggregate")
        strategy = self._strategy
        strategy.check_release(self.round_number)
        rng = round_noise_rng(strategy.noise_seed, self.round_number)
        std = strategy.noise_std
        denominator = float(strategy.expected_participants)
        total, self._sum = self._sum, None
        noise = np.empty(self._scratch.size, np.float64)
        for acc, g in zip(total, self._global):
            target, base = acc.reshape(-1), _flat(g)
            for start in range(0, target.size, CHUNK):
                stop = min(start + CHUNK, target.size)
                part, extra = target[start:stop], noise[:stop - start]
                np.divide(part, denominator, out=part)
                if std > 0:
                    rng.standard_normal(out=extra)
                    np.multiply(extra, std, out=extra)
                    np.add(part, extra, out=part)
                np.add(part, base[start:stop], out=part)
        del noise
        self._scratch = np.empty(0, np.float64)
        with np.errstate(over="ignore", invalid="ignore"):
            noised = [narrow_in_place(acc, dtype) for acc, dtype in zip(total, self._dtypes)]
        del total
        if not all(all_finite(a) for a in noised):
            raise StrategyError(f"round {self.round_number}: the noised aggregate is not "
                                f"finite in the model's float type")
        self._result = strategy.inner_step(self._global, noised, self.round_number)
        strategy.mark_released(self.round_number)
        return self._result


class CentralDP:
    """DP-FedAvg with central noise around a FedAvg-family strategy.

    The inner strategy sees one "update" per round, the noised uniform
    average, so FedAvg/FedProx return it as is and FedAvgM/FedAdam/...
    take their server step from it (post-processing: no privacy cost).
    Robust strategies are refused: median, trimmed mean and Krum need the
    individual updates, and DP-FedAvg's sensitivity argument is about the mean.

    `expected_participants` is the m of the fixed denominator: the number of
    hosts the coordinator samples per round, max(min_hosts, ceil(fraction x
    total)). Give the accountant q = m / total.
    """

    def __init__(self, inner: Strategy, clip_norm: float, noise_multiplier: float,
                 expected_participants: int, noise_seed: int | None = None) -> None:
        if not needs_only_the_mean(inner):
            raise PrivacyError(f"central DP needs a FedAvg-family strategy (fedavg, fedprox, "
                               f"fedavgm, fedadagrad, fedadam, fedyogi), not "
                               f"{getattr(inner, 'name', type(inner).__name__)!r}")
        if (isinstance(expected_participants, bool)
                or not isinstance(expected_participants, numbers.Integral)
                or expected_participants < 1):
            raise PrivacyError(f"expected participants must be an integer >= 1, "
                               f"got {expected_participants!r}")
        if noise_seed is None:
            noise_seed = int(np.random.SeedSequence().entropy)  # 128 bits of OS entropy
        elif (isinstance(noise_seed, bool) or not isinstance(noise_seed, numbers.Integral)
              or not 0 <= noise_seed < 2 ** (32 * _SEED_WORDS)):
            raise PrivacyError(f"noise seed must be an integer in [0, 2^128), "
                               f"got {noise_seed!r}")
        self.inner = inner
        self.name = f"dp-{inner.name}"
        self.clip_norm = check_clip_norm(clip_norm)
        self.noise_multiplier = check_noise_multiplier(noise_multiplier)
        self.expected_participants = int(expected_participants)
        self.noise_seed = int(noise_seed) % 2 ** (32 * _SEED_WORDS)
        # Rounds whose noised aggregate this object released: releasing a round
        # twice would publish two outputs with the same noise.
        self._released: set[int] = set()

    @property
    def noise_std(self) -> float:
        """Std of the noise on each coordinate of the averaged delta: z C / m."""
        return self.noise_multiplier * self.clip_norm / self.expected_participants

    # ------------------------------------------------------------ the protocol
    def start_round(self, global_weights: list[np.ndarray], round_number: int) -> CentralDPRound:
        try:
            return CentralDPRound(self, global_weights, round_number)
        except PrivacyError as exc:
            raise StrategyError(f"round {round_number}: {exc}") from None

    def fit_config_extra(self) -> dict[str, Any]:
        return self.inner.fit_config_extra()

    def state(self) -> StrategyState:
        """The inner strategy's state plus the secret noise seed (resume draws the same noise)."""
        words = [(self.noise_seed >> (32 * i)) & 0xFFFFFFFF for i in range(_SEED_WORDS)]
        return {**self.inner.state(), NOISE_SEED_KEY: [np.array(words, dtype=np.uint32)]}

    def load_state(self, state: StrategyState) -> None:
        """Restore `state()` output; {} resets the inner strategy and keeps this seed."""
        state = dict(state)
        seed_arrays = state.pop(NOISE_SEED_KEY, None)
        if seed_arrays is not None:
            self.noise_seed = self._seed_from(seed_arrays)
        self.inner.load_state(state)
        self._released.clear()

    # ------------------------------------------------------------ for the round
    def check_release(self, round_number: int) -> None:
        if round_number in self._released:
            raise StrategyError(f"round {round_number}: its noised aggregate was already "
                                f"released; the same noise must not be published twice")

    def mark_released(self, round_number: int) -> None:
        self._released.add(round_number)

    def inner_step(self, global_weights: Sequence[np.ndarray], noised: list[np.ndarray],
                   round_number: int) -> list[np.ndarray]:
        if isinstance(self.inner, FedAvg):
            return noised  # the mean of one update is that update
        inner_round = self.inner.start_round(list(global_weights), round_number)
        inner_round.add("central-dp-aggregate", noised, 1)
        return inner_round.result()

    @staticmethod
    def _seed_from(arrays: object) -> int:
        if (not isinstance(arrays, (list, tuple)) or len(arrays) != 1
                or np.asarray(arrays[0]).shape != (_SEED_WORDS,)
                or np.asarray(arrays[0]).dtype != np.uint32):
            raise StrategyError(f"strategy state {NOISE_SEED_KEY!r} must be one array of "
                                f"{_SEED_WORDS} uint32 words")
        words = np.asarray(arrays[0])
        return sum(int(w) << (32 * i) for i, w in enumerate(words))
