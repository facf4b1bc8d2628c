"""What the robust strategies (FedMedian, FedTrimmedAvg, Krum) share: holding the round.

Median, trimmed mean and Krum's distances need every update at once, so
unlike FedAvg these rounds keep a private copy of each update, in the
model's float type: N x model of memory for N hosts (400 MB for 100 hosts
of a 1M-parameter float32 model). The copies are dropped once `result()`
has run. Per-coordinate work then goes over the model in column blocks of
(N, C) elements, so the extra memory beyond the copies is one block.

They are unweighted, as in the papers and Flower: the example counts hosts
report are not verified, and weighting by them would let one hostile host
claim a huge count. Updates are aggregated in host-name order, so the
result does not depend on the order in which they arrived.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import numpy as np

from flctl.core.aggregation import all_finite
from flctl.core.dtypes import cast_back, is_bfloat16, is_number
from flctl.core.strategies.base import StatelessStrategy, StrategyError, check_num_examples

# Elements in one (N, C) column block: 4 MB of float32, whatever N.
BLOCK_ELEMENTS = 1 << 20


def held_dtype(array: np.ndarray) -> np.dtype:
    """The model array's float type; float32 for bfloat16 (exact), float64 for
    integer and boolean buffers."""
    dtype = np.asarray(array).dtype
    if is_bfloat16(dtype):
        return np.dtype(np.float32)
    return dtype if np.issubdtype(dtype, np.floating) else np.dtype(np.float64)


def column_blocks(updates: Sequence[Sequence[np.ndarray]], index: int,
                  dtype: np.dtype | None = None, *,
                  hosts_last: bool = False) -> Iterator[tuple[int, int, np.ndarray]]:
    """(start, stop, block) over array `index` of every update, [start:stop) at a time.

    block[i] is update i's slice; with `hosts_last` the block is transposed
    (one row per coordinate, contiguous), the layout numpy's SIMD sort and
    partition along the last axis are fast on (5x faster than along axis 0).
    Buffers are reused for every step, and the caller may change them.
    """
    n = len(updates)
    flats = [update[index].reshape(-1) for update in updates]
    size = flats[0].size
    width = max(1, min(size, BLOCK_ELEMENTS // n))
    buffer = np.empty((n, width), dtype or flats[0].dtype)
    transposed = np.empty((width, n), buffer.dtype) if hosts_last else None
    for start in range(0, size, width):
        stop = min(start + width, size)
        block = buffer[:, :stop - start]
        for row, flat in zip(block, flats):
            row[...] = flat[start:stop]
        if transposed is None:
            yield start, stop, block
        else:
            by_coordinate = transposed[:stop - start]
            np.copyto(by_coordinate, block.T)
            yield start, stop, by_coordinate


def merge_coordinates(updates: Sequence[Sequence[np.ndarray]],
                      reduce_block: Callable[[np.ndarray, np.ndarray], None]
                      ) -> list[np.ndarray]:
    """One merged array per model array: `reduce_block(block, out)` fills `out`
    (one value per coordinate) from a hosts-last block of every update."""
    merged_arrays = []
    for index, template in enumerate(updates[0]):
        merged = np.empty(template.shape, template.dtype)
        flat = merged.reshape(-1)
        if flat.size:
            for start, stop, block in column_blocks(updates, index, hosts_last=True):
                reduce_block(block, flat[start:stop])
        merged_arrays.append(merged)
    return merged_arrays


class HeldRound:
    """A round that keeps a copy of every update; subclasses combine them in `aggregate`."""

    def __init__(self, global_weights: Sequence[np.ndarray], round_number: int) -> None:
        self.round_number = round_number
        self.shapes = [tuple(np.shape(w)) for w in global_weights]
        self._dtypes = [np.asarray(w).dtype for w in global_weights]
        self._held = [held_dtype(w) for w in global_weights]
        # Read-only reference: the coordinator does not change the global model mid-round.
        self.global_weights = list(global_weights)
        self._updates: dict[str, list[np.ndarray]] = {}
        self._hosts: list[str] = []
        self._result: list[np.ndarray] | None = None

    @property
    def count(self) -> int:
        return len(self._hosts)

    @property
    def hosts(self) -> frozenset[str]:
        return frozenset(self._hosts)

    def add(self, host: str, weights: list[np.ndarray], num_examples: int) -> None:
        """Keep a checked copy of one host's update; a refused update changes nothing."""
        where = f"round {self.round_number}: update from {host}"
        if self._result is not None:
            raise StrategyError(f"round {self.round_number}: update from {host} after result()")
        if host in self._updates:
            raise StrategyError(f"round {self.round_number}: second update from {host}")
        check_num_examples(self.round_number, host, num_examples)
        arrays = [np.asarray(a) for a in weights]
        if len(arrays) != len(self.shapes):
            raise StrategyError(f"{where}: expected {len(self.shapes)} arrays, got {len(arrays)}")
        for i, (x, shape) in enumerate(zip(arrays, self.shapes)):
            if x.shape != shape:
                raise StrategyError(f"{where}: array {i}: expected shape {shape}, got {x.shape}")
            if not is_number(x.dtype):
                raise StrategyError(f"{where}: array {i}: dtype {x.dtype} is not a real "
                                    f"number type")
        # Checked after the copy: a float64 value can turn infinite in a float32 copy.
        with np.errstate(over="ignore"):
            copies = [np.array(x, dtype=dtype, order="C", copy=True)
                      for x, dtype in zip(arrays, self._held)]
        for i, copy in enumerate(copies):
            if not all_finite(copy):
                raise StrategyError(f"{where}: array {i}: contains NaN or infinite values")
        self._updates[host] = copies
        self._hosts.append(host)

    def result(self) -> list[np.ndarray]:
        """The new global weights, in the global model's dtypes. Idempotent."""
        if self._result is None:
            if not self._updates:
                raise StrategyError(f"round {self.round_number}: no updates to aggregate")
            hosts = sorted(self._updates)
            merged = self.aggregate(hosts, [self._updates[h] for h in hosts])
            self._updates = {}  # the copies are the bulk of this round's memory
            self._result = [cast_back(m, dtype) for m, dtype in zip(merged, self._dtypes)]
        return self._result

    def aggregate(self, hosts: list[str], updates: list[list[np.ndarray]]) -> list[np.ndarray]:
        """The combined model from all updates (sorted by host), in the held dtypes."""
        raise NotImplementedError


class RobustStrategy(StatelessStrategy):
    """Robust strategies keep nothing between rounds (the held copies live in the round)."""
