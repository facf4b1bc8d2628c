"""Server-side optimisers on top of FedAvg (FedAvgM, FedAdagrad, FedAdam, FedYogi).

Each round is an ordinary streaming FedAvg round (O(model) memory whatever
the number of hosts); `result()` then treats the change of the average,
delta = avg - w, as a pseudo-gradient and takes one optimiser step with it.
The optimiser state (momentum, moments) is one or two model-sized arrays
kept in the strategy object between rounds, in the model's float type.

The step runs over the model in chunks, twice: the first pass computes the
new state and weights into chunk-sized scratch buffers only to check they are
finite, the second writes them. So a step that would overflow is refused
with the strategy state untouched, and the extra memory stays a few chunks.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from flctl.core.aggregation import CHUNK, all_finite
from flctl.core.dtypes import cast_back, is_bfloat16, is_float
from flctl.core.strategies.base import StrategyError, StrategyState, check_number
from flctl.core.strategies.fedavg import FedAvgRound


def work_dtype(array: np.ndarray) -> np.dtype:
    """The float type the step runs in for one model array (float32 for bfloat16,
    float64 for integer and boolean buffers, which take no step: see apply_step)."""
    dtype = np.asarray(array).dtype
    if is_bfloat16(dtype):
        return np.dtype(np.float32)
    return dtype if np.issubdtype(dtype, np.floating) else np.dtype(np.float64)


def _flat(array: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(array).reshape(-1)


class ServerOptRound:
    """A FedAvg round whose `result()` applies the strategy's server step."""

    def __init__(self, strategy: ServerOptStrategy, global_weights: Sequence[np.ndarray],
                 round_number: int) -> None:
        self.round_number = round_number
        self._strategy = strategy
        self._generation = strategy.generation
        # Read-only reference: the coordinator does not change the global model mid-round.
        self._global = list(global_weights)
        self._average = FedAvgRound(global_weights, round_number, reject_non_finite=True)
        self._result: list[np.ndarray] | None = None

    @property
    def count(self) -> int:
        return self._average.count

    @property
    def hosts(self) -> frozenset[str]:
        return self._average.hosts

    def add(self, host: str, weights: list[np.ndarray], num_examples: int) -> None:
        """Fold in one host's update (streaming, no reference kept)."""
        self._average.add(host, weights, num_examples)

    def add_site(self, site: str, members: Sequence[str], delta: list[np.ndarray],
                 num_examples: int, sampled: int) -> None:
        """Fold in a site's mean change (FedAvgRound.add_site)."""
        self._average.add_site(site, members, delta, num_examples, sampled)

    def result(self) -> list[np.ndarray]:
        """The new global weights; the first call commits the optimiser step. Idempotent."""
        if self._result is None:
            if self._strategy.generation != self._generation:
                raise StrategyError(f"round {self.round_number}: the {self._strategy.name} "
                                    f"state changed since this round started (another round's "
                                    f"result or load_state); start the round again")
            average = self._average.result()
            self._result = self._strategy.apply_step(self._global, average, self.round_number)
        return self._result


class ServerOptStrategy:
    """Long-lived strategy holding the optimiser state between rounds.

    Subclasses name their state arrays in STATE_KEYS, give their start values
    in `initial_value`, and write the update rule for one chunk in `step`.
    """

    name = "serveropt"
    STATE_KEYS: tuple[str, ...] = ()

    def __init__(self) -> None:
        self._state: dict[str, list[np.ndarray]] | None = None
        # Bumped whenever the state changes, so a stale round cannot step twice.
        self.generation = 0

    # ------------------------------------------------------------ the protocol
    def fit_config_extra(self) -> dict[str, Any]:
        return {}

    def start_round(self, global_weights: list[np.ndarray],
                    round_number: int) -> ServerOptRound:
        if self._state is not None:
            self._match_model(global_weights)
        return ServerOptRound(self, global_weights, round_number)

    def state(self) -> StrategyState:
        """Copies of the optimiser state; {} before the first step."""
        if self._state is None:
            return {}
        return {key: [array.copy() for array in arrays] for key, arrays in self._state.items()}

    def load_state(self, state: StrategyState) -> None:
        """Restore `state()` output; rounds started before this can no longer commit."""
        self._state = None if not state else self._checked_state(state)
        self.generation += 1

    # ------------------------------------------------------------ for subclasses
    def initial_value(self, key: str) -> float:
        """Every element of state array `key` starts at this value."""
        return 0.0

    def check_loaded(self, key: str, array: np.ndarray) -> str | None:
        """Why a loaded state array is unusable (e.g. a negative second moment), or None."""
        return None

    def step(self, delta: np.ndarray, weights: np.ndarray, old: Mapping[str, np.ndarray],
             new: Mapping[str, np.ndarray], new_weights: np.ndarray,
             scratch: Sequence[np.ndarray]) -> None:
        """One chunk of the update rule.

        Writes the new state into `new` and the new weights into
        `new_weights`, element by element: `new[k]` may be the very buffer
        `old[k]` (the committing pass), so read an element of old state only
        before writing that element. `scratch` holds two free buffers of the
        chunk's size.
        """
        raise NotImplementedError

    # ------------------------------------------------------------ the step
    def apply_step(self, global_weights: Sequence[np.ndarray], average: list[np.ndarray],
                   round_number: int) -> list[np.ndarray]:
        """New weights from the round's average; commits the new state (all or nothing)."""
        state = self._state if self._state is not None else self._fresh_state(global_weights)
        outputs = [a if a.dtype == work_dtype(w) else np.empty(a.shape, work_dtype(w))
                   for a, w in zip(average, global_weights)]
        for commit in (False, True):
            for index, (w, avg, out) in enumerate(zip(global_weights, average, outputs)):
                if not is_float(np.asarray(w).dtype):
                    # an integer or boolean buffer (BatchNorm's num_batches_tracked) is
                    # not a parameter: it takes the round's mean, with no server step
                    np.copyto(out, avg, casting="unsafe")
                    continue
                self._step_array(index, w, avg, out, {k: state[k][index] for k in state},
                                 commit, round_number)
        self._state = state
        self.generation += 1
        return [cast_back(out, np.asarray(w).dtype) for out, w in zip(outputs, global_weights)]

    def _step_array(self, index: int, weights: np.ndarray, average: np.ndarray,
                    out: np.ndarray, state: dict[str, np.ndarray], commit: bool,
                    round_number: int) -> None:
        dtype = work_dtype(weights)
        w_flat, avg_flat, out_flat = _flat(weights), _flat(average), out.reshape(-1)
        state_flat = {k: a.reshape(-1) for k, a in state.items()}
        size = min(CHUNK, w_flat.size)
        delta, *scratch = (np.empty(size, dtype) for _ in range(3))
        trial = {k: np.empty(size, dtype) for k in state}
        trial_weights = np.empty(size, dtype)
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            for start in range(0, w_flat.size, CHUNK):
                stop = min(start + CHUNK, w_flat.size)
                n = stop - start
                d = delta[:n]
                np.subtract(avg_flat[start:stop], w_flat[start:stop], out=d, dtype=dtype)
                old = {k: a[start:stop] for k, a in state_flat.items()}
                temps = [s[:n] for s in scratch]
                if commit:
                    self.step(d, w_flat[start:stop], old, old, out_flat[start:stop], temps)
                    continue
                new = {k: t[:n] for k, t in trial.items()}
                self.step(d, w_flat[start:stop], old, new, trial_weights[:n], temps)
                bad = [k for k, a in new.items() if not all_finite(a)]
                if bad or not all_finite(trial_weights[:n]):
                    what = ", ".join(bad) if bad else "the weights"
                    raise StrategyError(
                        f"round {round_number}: the {self.name} step makes {what} non-finite "
                        f"(array {index}); the round is refused and the optimiser state is "
                        f"unchanged")

    def _fresh_state(self, template: Sequence[np.ndarray]) -> dict[str, list[np.ndarray]]:
        return {key: [np.full(np.shape(w), self.initial_value(key), work_dtype(w))
                      for w in template] for key in self.STATE_KEYS}

    # ------------------------------------------------------------ checks
    def _match_model(self, global_weights: Sequence[np.ndarray]) -> None:
        assert self._state is not None
        for key, arrays in self._state.items():
            if len(arrays) != len(global_weights):
                raise StrategyError(f"{self.name} state {key!r} has {len(arrays)} arrays, "
                                    f"the model {len(global_weights)}")
            for i, (array, w) in enumerate(zip(arrays, global_weights)):
                if array.shape != np.shape(w):
                    raise StrategyError(f"{self.name} state {key!r} array {i} has shape "
                                        f"{array.shape}, the model {np.shape(w)}")
                if array.dtype != work_dtype(w):
                    arrays[i] = array.astype(work_dtype(w))

    def _checked_state(self, state: StrategyState) -> dict[str, list[np.ndarray]]:
        if not isinstance(state, Mapping):
            raise StrategyError(f"{self.name} state must be a mapping, got "
                                f"{type(state).__name__}")
        if set(state) != set(self.STATE_KEYS):
            raise StrategyError(f"{self.name} state must hold {', '.join(self.STATE_KEYS)}; "
                                f"got {', '.join(sorted(map(str, state))) or 'nothing'}")
        copies: dict[str, list[np.ndarray]] = {}
        for key in self.STATE_KEYS:
            arrays = state[key]
            if not isinstance(arrays, (list, tuple)):
                raise StrategyError(f"{self.name} state {key!r} must be a list of arrays")
            copies[key] = []
            for i, array in enumerate(arrays):
                array = np.array(array, copy=True)
                if not np.issubdtype(array.dtype, np.floating):
                    raise StrategyError(f"{self.name} state {key!r} array {i}: dtype "
                                        f"{array.dtype} is not a float type")
                if not all_finite(array):
                    raise StrategyError(f"{self.name} state {key!r} array {i}: NaN or "
                                        f"infinite values")
                problem = self.check_loaded(key, array)
                if problem:
                    raise StrategyError(f"{self.name} state {key!r} array {i}: {problem}")
                copies[key].append(array)
        first = copies[self.STATE_KEYS[0]]
        for key in self.STATE_KEYS[1:]:
            if [a.shape for a in copies[key]] != [a.shape for a in first]:
                raise StrategyError(f"{self.name} state {key!r} does not match "
                                    f"{self.STATE_KEYS[0]!r} in array count or shapes")
        return copies


class AdaptiveOptStrategy(ServerOptStrategy):
    """The Reddi et al. (2021) family: FedAdagrad, FedAdam, FedYogi.

    With delta = avg - w:  m = beta_1 * m + (1 - beta_1) * delta,  v by the
    subclass's rule,  w = w + eta * m / (sqrt(v) + tau). Start values m = 0 and
    v = tau^2 (the paper's v_{-1} >= tau^2; Flower starts v at 0, which with its
    tau = 1e-9 differs by 1e-18 per coordinate). No bias correction, as in the
    paper and Flower's FedOpt.
    """

    STATE_KEYS = ("m", "v")

    def __init__(self, eta: float, beta_1: float, beta_2: float, tau: float) -> None:
        super().__init__()
        self.eta = check_number("eta", eta, 0.0, float("inf"), low_open=True)
        self.beta_1 = check_number("beta_1", beta_1, 0.0, 1.0)
        self.beta_2 = check_number("beta_2", beta_2, 0.0, 1.0)
        self.tau = check_number("tau", tau, 0.0, float("inf"), low_open=True)

    def initial_value(self, key: str) -> float:
        return self.tau ** 2 if key == "v" else 0.0

    def check_loaded(self, key: str, array: np.ndarray) -> str | None:
        return "negative second moment" if key == "v" and bool((array < 0).any()) else None

    def second_moment(self, squared: np.ndarray, old_v: np.ndarray, new_v: np.ndarray,
                      scratch: np.ndarray) -> None:
        """new_v from old_v and delta^2 (`squared`), element by element."""
        raise NotImplementedError

    def step(self, delta: np.ndarray, weights: np.ndarray, old: Mapping[str, np.ndarray],
             new: Mapping[str, np.ndarray], new_weights: np.ndarray,
             scratch: Sequence[np.ndarray]) -> None:
        first, second = scratch
        m, v = new["m"], new["v"]
        np.multiply(delta, 1.0 - self.beta_1, out=first)
        np.multiply(old["m"], self.beta_1, out=m)
        np.add(m, first, out=m)
        np.multiply(delta, delta, out=first)
        self.second_moment(first, old["v"], v, second)
        np.sqrt(v, out=first)
        np.add(first, self.tau, out=first)
        np.divide(m, first, out=first)
        np.multiply(first, self.eta, out=first)
        np.add(weights, first, out=new_weights)
