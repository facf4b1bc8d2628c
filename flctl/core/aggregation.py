"""Streaming weighted averaging of model updates.

The coordinator may receive hundreds of updates of a large model in one
round. Stacking them (what `np.average(np.stack(...))` and Flower's
`aggregate` do) costs O(hosts x model) memory; here each update is folded
into one running sum as it arrives and can be freed right after.

The fold works in chunks of CHUNK elements: `w * x` goes into a small
scratch buffer that stays in the CPU cache until it is added to the sum, so
each update is read from memory once and the extra memory is one model-sized
sum plus two chunk-sized buffers, whatever the number of hosts. This beats
the plain numpy `acc += w * x`, which allocates and faults in a model-sized
temporary for every update.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Union

import numpy as np
from numpy.typing import DTypeLike

from flctl.core.dtypes import cast_back, is_bfloat16, is_float, is_number
from flctl.core.spooled import FileArray

# What an update's array may be: in memory, or in the coordinator's spool file.
UpdateArray = Union[np.ndarray, FileArray]

# 64 Ki elements (256 KiB in float32): small enough to stay in L2 between the
# multiply and the add, large enough that per-call overhead is noise.
CHUNK = 65536


def accumulation_dtype(template: Sequence[np.ndarray]) -> np.dtype:
    """float64, whatever the model's float type.

    Updates arrive in whatever order the network delivers them. With integer
    weights (example counts) each product `n * x` of a float32 (or float16)
    value is exact in float64, so the sum rounds back to the same float32
    whatever the order: a resumed run reproduces an uninterrupted one bit for
    bit. The sum costs 2x a float32 model of memory (the budget is 3x).
    """

    return np.dtype(np.float64)


def _flat(array: np.ndarray) -> np.ndarray:
    """A 1-D view (a copy only for non-contiguous input, which the wire never produces)."""
    return np.ascontiguousarray(array).reshape(-1)


def flat_blocks(array: UpdateArray, size: int = CHUNK,
                buffer: np.ndarray | None = None) -> Iterator[tuple[int, int, np.ndarray]]:
    """(start, stop, elements [start, stop) of the flattened array), `size` at a time.

    In-memory arrays give views; a spooled FileArray is read block by block
    into one reused buffer (`buffer`, or its own), so reading an update of
    any size costs one block of memory. A block is valid until the next.
    """
    if isinstance(array, FileArray):
        count = array.size
        if buffer is None or buffer.dtype != array.dtype or buffer.size < min(size, count):
            buffer = np.empty(min(size, count), array.dtype)
        for start in range(0, count, size):
            stop = min(start + size, count)
            yield start, stop, array.read(start, stop, buffer)
        return
    flat = _flat(np.asarray(array))
    for start in range(0, flat.size, size):
        stop = min(start + size, flat.size)
        yield start, stop, flat[start:stop]


def all_finite(array: UpdateArray) -> bool:
    """True if no NaN or infinity is in `array` (integers always are finite).

    Sums chunks with BLAS dot against ones: NaN and inf propagate into the
    sum, no temporary is allocated, and it runs at memory speed. A chunk sum
    beyond the float range also reads as non-finite; weights that large are
    as unusable as NaN.
    """
    if isinstance(array, FileArray):
        return array.finite   # checked as it was written
    array = np.asarray(array)
    if not is_float(array.dtype):
        return True
    if is_bfloat16(array.dtype):
        array = array.astype(np.float32)   # exact: bfloat16 is float32's top half
    if array.dtype.itemsize < 4:  # a float16 sum overflows on ordinary values: check each
        return bool(np.isfinite(array).all())
    flat = _flat(array)
    ones = np.ones(min(CHUNK, flat.size), dtype=flat.dtype)
    for start in range(0, flat.size, CHUNK):
        part = flat[start:start + CHUNK]
        if not math.isfinite(float(np.dot(part, ones[:part.size]))):
            return False
    return True


class WeightedAccumulator:
    """Running sum of weight * update over a fixed list of array shapes.

    Holds one model-sized sum and a chunk-sized scratch buffer; never keeps a
    reference to the arrays passed to `add`.
    """

    def __init__(self, template: Sequence[np.ndarray], dtype: DTypeLike = np.float32, *,
                 require_finite: bool = False) -> None:
        self.dtype = np.dtype(dtype)
        if not np.issubdtype(self.dtype, np.floating):
            raise ValueError(f"accumulator dtype must be a float type, got {self.dtype}")
        self.shapes = [tuple(np.shape(array)) for array in template]
        self.require_finite = require_finite
        self._acc: list[np.ndarray] | None = [np.zeros(s, self.dtype) for s in self.shapes]
        largest = max((int(np.prod(s)) for s in self.shapes), default=0)
        self._scratch = np.empty(min(CHUNK, largest), self.dtype)
        self._count = 0
        self._total_weight = 0.0

    @property
    def count(self) -> int:
        """Number of updates added so far."""
        return self._count

    @property
    def total_weight(self) -> float:
        return self._total_weight

    def _checked(self, weight: float) -> float:
        if self._acc is None:
            raise ValueError("accumulator already consumed by take_mean()")
        weight = float(weight)
        if not math.isfinite(weight) or weight < 0:
            raise ValueError(f"weight must be a finite number >= 0, got {weight}")
        return weight

    def add(self, arrays: Sequence[UpdateArray], weight: float) -> None:
        """Fold `weight * arrays` into the sum; on any error the sum is left untouched."""
        weight = self._checked(weight)
        arrays = [a if isinstance(a, FileArray) else np.asarray(a) for a in arrays]
        self._validate(arrays)
        # Overflow is the caller's to detect (FedAvg checks its result), not a warning.
        with np.errstate(over="ignore", invalid="ignore"):
            for x, acc in zip(arrays, self._acc):
                target = acc.reshape(-1)
                for start, stop, block in flat_blocks(x):
                    scratch = self._scratch[:stop - start]
                    np.multiply(block, weight, out=scratch)
                    np.add(target[start:stop], scratch, out=target[start:stop])
        self._count += 1
        self._total_weight += weight

    def add_delta(self, base: Sequence[np.ndarray], delta: Sequence[UpdateArray],
                  weight: float) -> None:
        """Fold `weight * (base + delta)`: a site's mean sent as its change from
        the model (`base`), which float32 carries far more exactly than the
        mean itself. Same checks, same chunks, no model-sized temporary."""
        weight = self._checked(weight)
        delta = [a if isinstance(a, FileArray) else np.asarray(a) for a in delta]
        self._validate(delta)
        with np.errstate(over="ignore", invalid="ignore"):
            for g, d, acc in zip(base, delta, self._acc):
                target, flat_base = acc.reshape(-1), _flat(np.asarray(g))
                for start, stop, block in flat_blocks(d):
                    scratch = self._scratch[:stop - start]
                    np.add(block, flat_base[start:stop], out=scratch, dtype=self.dtype)
                    np.multiply(scratch, weight, out=scratch)
                    np.add(target[start:stop], scratch, out=target[start:stop])
        self._count += 1
        self._total_weight += weight

    def _validate(self, arrays: list[UpdateArray]) -> None:
        if len(arrays) != len(self.shapes):
            raise ValueError(f"expected {len(self.shapes)} arrays, got {len(arrays)}")
        for i, (x, shape) in enumerate(zip(arrays, self.shapes)):
            if x.shape != shape:
                raise ValueError(f"array {i}: expected shape {shape}, got {x.shape}")
            if not is_number(x.dtype):
                raise ValueError(f"array {i}: dtype {x.dtype} is not a real number type")
        if self.require_finite:
            # Checked before anything is added: a float sum cannot be un-added exactly.
            for i, x in enumerate(arrays):
                if not all_finite(x):
                    raise ValueError(f"array {i}: contains NaN or infinite values")

    def mean(self) -> list[np.ndarray]:
        """Weighted mean as new arrays; the accumulator stays usable."""
        if self._acc is None:
            raise ValueError("accumulator already consumed by take_mean()")
        self._require_weight()
        return [np.divide(acc, self._total_weight) for acc in self._acc]

    def take_mean(self) -> list[np.ndarray]:
        """Weighted mean computed in place in the sum's own buffers (no extra model copy).

        For the end of a round, when no more updates will come.
        """
        if self._acc is None:
            raise ValueError("accumulator already consumed by take_mean()")
        self._require_weight()
        result, self._acc = self._acc, None
        self._scratch = np.empty(0, self.dtype)
        for acc in result:
            np.divide(acc, self._total_weight, out=acc)
        return result

    def _require_weight(self) -> None:
        if self._total_weight == 0:
            raise ValueError("nothing to average: total weight is 0"
                             if self._count else "nothing to average: no updates added")


def narrow_in_place(wide: np.ndarray, dtype: DTypeLike) -> np.ndarray:
    """`wide.astype(dtype)` without a second model-sized buffer.

    Writes the narrow values over the front of `wide`'s own buffer, chunk by
    chunk (element i lands on bytes already read: 4i < 8i), then shrinks the
    buffer in place. `wide` must own its data and have no other views; it is
    unusable afterwards. Falls back to a copy when that does not hold.
    """
    target = np.dtype(dtype)
    if target == wide.dtype:
        return wide
    if not np.issubdtype(target, np.floating):   # integers round, booleans vote, bfloat16
        return cast_back(wide, target)
    if (target.itemsize > wide.itemsize or not wide.flags.owndata
            or not wide.flags.c_contiguous or wide.ndim == 0 or wide.size == 0):
        return wide.astype(target)
    shape, count = wide.shape, wide.size
    source = wide.reshape(-1)
    narrow = wide.view(np.uint8).reshape(-1)[:count * target.itemsize].view(target)
    scratch = np.empty(min(CHUNK, count), target)
    for start in range(0, count, CHUNK):
        stop = min(start + CHUNK, count)
        np.copyto(scratch[:stop - start], source[start:stop], casting="same_kind")
        narrow[start:stop] = scratch[:stop - start]
    del source, narrow
    wide.resize(-(-count * target.itemsize // wide.itemsize), refcheck=False)
    return wide.view(np.uint8)[:count * target.itemsize].view(target).reshape(shape)


def weighted_average(updates: Sequence[Sequence[np.ndarray]], weights: Sequence[float],
                     dtype: DTypeLike | None = None) -> list[np.ndarray]:
    """sum_i w_i * u_i / sum_i w_i, accumulated in float64 (or `dtype`), returned in
    each array's own dtype (core.dtypes.cast_back: integers rounded)."""
    if len(updates) != len(weights):
        raise ValueError(f"{len(updates)} updates but {len(weights)} weights")
    if not updates:
        raise ValueError("nothing to average: no updates")
    acc = WeightedAccumulator(updates[0], dtype if dtype is not None
                              else accumulation_dtype(updates[0]))
    for update, weight in zip(updates, weights):
        acc.add(update, weight)
    kinds = [np.asarray(a).dtype for a in updates[0]]
    return [narrow_in_place(m, kind) for m, kind in zip(acc.take_mean(), kinds)]


def norm(update: Sequence[UpdateArray]) -> float:
    """L2 norm over all arrays (of a change, e.g. a site's mean delta), in chunks."""
    total = 0.0
    scratch = np.empty(CHUNK, np.float64)
    for array in update:
        for start, stop, block in flat_blocks(array):
            part = scratch[:stop - start]
            np.copyto(part, block, casting="unsafe")
            total += float(np.dot(part, part))
    return math.sqrt(total)


def update_distance(update: Sequence[UpdateArray], reference: Sequence[np.ndarray]) -> float:
    """L2 norm of `update - reference` over all arrays, in chunks (no model-sized temporary)."""
    total = 0.0
    scratch = np.empty(CHUNK, np.float64)
    for new, old in zip(update, reference):
        b = _flat(np.asarray(old))
        for start, stop, block in flat_blocks(new):
            part = scratch[:stop - start]
            np.subtract(block, b[start:stop], out=part, dtype=np.float64)
            total += float(np.dot(part, part))
    return math.sqrt(total)
