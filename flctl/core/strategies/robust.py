"""What the robust strategies (FedMedian, FedTrimmedAvg, Krum) share: holding the round.

Median, trimmed mean and Krum's distances need every update at once, so
unlike FedAvg these rounds keep a private copy of each update, in the
model's float type. An update that came in memory is copied in memory: N x
model for N hosts (400 MB for 100 hosts of a 1M-parameter float32 model).
An update the coordinator spooled to disk (a FileArray, core.spooled) is
too large for that, so its copy goes to a spool file of the round's own,
beside the receiver's, streamed and checked one block at a time: page cache
and disk, not the coordinator's memory. The copies are dropped (the files
closed, and so deleted) once `result()` has run, or when the round is
closed or collected unfinished. Per-coordinate work then goes over the
model in column blocks of (N, C) elements, read from memory or from the
files, so the memory beyond the in-memory copies is one block plus the
result: with spooled updates a round holds about one model whatever N.

They are unweighted, as in the papers and Flower: the example counts hosts
report are not verified, and weighting by them would let one hostile host
claim a huge count. Updates are aggregated in host-name order, so the
result does not depend on the order in which they arrived; a copy on disk
holds the same values as one in memory, so where an update was kept does
not change the result by a bit.

With bucketing (bucketing.py, the `bucket_size` parameter) `result()` first
replaces the sorted updates by the means of random buckets of them, drops
the copies, and the rule combines the bucket means instead.
"""

from __future__ import annotations

import shutil
import weakref
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from flctl.core.aggregation import UpdateArray, all_finite, flat_blocks
from flctl.core.dtypes import cast_back, is_bfloat16, is_number
from flctl.core.spooled import FileArray, SpoolFile
from flctl.core.strategies.base import StatelessStrategy, StrategyError, check_num_examples

if TYPE_CHECKING:   # bucketing.py builds on this module
    from flctl.core.strategies.bucketing import Bucketing

# Elements in one (N, C) column block: 4 MB of float32, whatever N. Also the
# piece a spooled update is copied in: a multiple of aggregation.CHUNK, so the
# finite check sees the same chunks as on a copy in memory.
BLOCK_ELEMENTS = 1 << 20


def held_dtype(array: np.ndarray | FileArray) -> np.dtype:
    """The model array's float type; float32 for bfloat16 (exact), float64 for
    integer and boolean buffers."""
    dtype = array.dtype if isinstance(array, FileArray) else np.asarray(array).dtype
    if is_bfloat16(dtype):
        return np.dtype(np.float32)
    return dtype if np.issubdtype(dtype, np.floating) else np.dtype(np.float64)


def _flat(array: UpdateArray) -> UpdateArray:
    """A held array as a flat sequence: a 1-D view, or the FileArray itself (flat already)."""
    return array if isinstance(array, FileArray) else array.reshape(-1)


def _fill(row: np.ndarray, source: UpdateArray, start: int, stop: int,
          scratch: dict[np.dtype, np.ndarray]) -> None:
    """row[...] = source[start:stop]; a FileArray is read straight into the row
    when the dtypes match, else through a scratch piece (same values either way)."""
    if not isinstance(source, FileArray):
        row[...] = source[start:stop]
    elif source.dtype == row.dtype:
        source.read(start, stop, row)
    else:
        if source.dtype not in scratch:
            scratch[source.dtype] = np.empty(row.size, source.dtype)
        row[...] = source.read(start, stop, scratch[source.dtype])


def column_blocks(updates: Sequence[Sequence[UpdateArray]], index: int,
                  dtype: np.dtype | None = None, *,
                  hosts_last: bool = False) -> Iterator[tuple[int, int, np.ndarray]]:
    """(start, stop, block) over array `index` of every update, [start:stop) at a time.

    block[i] is update i's slice, from memory or read from its spool file;
    with `hosts_last` the block is transposed (one row per coordinate,
    contiguous), the layout numpy's SIMD sort and partition along the last
    axis are fast on (5x faster than along axis 0). Buffers are reused for
    every step, and the caller may change them.
    """
    n = len(updates)
    flats = [_flat(update[index]) for update in updates]
    size = flats[0].size
    width = max(1, min(size, BLOCK_ELEMENTS // n))
    buffer = np.empty((n, width), dtype or flats[0].dtype)
    transposed = np.empty((width, n), buffer.dtype) if hosts_last else None
    scratch: dict[np.dtype, np.ndarray] = {}
    for start in range(0, size, width):
        stop = min(start + width, size)
        block = buffer[:, :stop - start]
        for row, flat in zip(block, flats):
            _fill(row, flat, start, stop, scratch)
        if transposed is None:
            yield start, stop, block
        else:
            by_coordinate = transposed[:stop - start]
            np.copyto(by_coordinate, block.T)
            yield start, stop, by_coordinate


def merge_coordinates(updates: Sequence[Sequence[UpdateArray]],
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


def in_memory(update: Sequence[UpdateArray]) -> list[np.ndarray]:
    """A held update as numpy arrays: read whole from its file if it is on disk
    (one model's memory, for the update a strategy returns as it is)."""
    return [np.asarray(a) for a in update]


def spool_directory(arrays: Sequence[UpdateArray]) -> Path | None:
    """Where a spooled update's copy goes: beside its first file (None: in memory)."""
    for array in arrays:
        if isinstance(array, FileArray) and array.directory is not None:
            return array.directory
    return None


def _close_all(spools: list[SpoolFile]) -> None:
    for spool in spools:
        spool.close()
    spools.clear()


class HeldRound:
    """A round that keeps a copy of every update; subclasses combine them in `aggregate`.

    A spooled update's copy is a file: `close()` drops every copy, and runs by
    itself when `result()` is done or when an abandoned round is collected.
    """

    def __init__(self, global_weights: Sequence[np.ndarray], round_number: int,
                 bucketing: Bucketing | None = None) -> None:
        self.round_number = round_number
        # The rule sees bucket means instead of the updates when it is active.
        self.bucketing = bucketing if bucketing is not None and bucketing.active else None
        self.buckets: tuple[str, ...] = ()   # the buckets' names, once result() made them
        self.shapes = [tuple(np.shape(w)) for w in global_weights]
        self._dtypes = [np.asarray(w).dtype for w in global_weights]
        self._held = [held_dtype(w) for w in global_weights]
        # Read-only reference: the coordinator does not change the global model mid-round.
        self.global_weights = list(global_weights)
        self._updates: dict[str, list[UpdateArray]] = {}
        self._hosts: list[str] = []
        self._result: list[np.ndarray] | None = None
        self._closed = False
        # The files of the copies on disk; closed with the round, even one that
        # is dropped without result() (a round cut short by too few hosts).
        self._spools: list[SpoolFile] = []
        self._closer = weakref.finalize(self, _close_all, self._spools)

    @property
    def count(self) -> int:
        return len(self._hosts)

    @property
    def hosts(self) -> frozenset[str]:
        return frozenset(self._hosts)

    def add(self, host: str, weights: list[UpdateArray], num_examples: int) -> None:
        """Keep a checked copy of one host's update; a refused update changes nothing."""
        where = f"round {self.round_number}: update from {host}"
        if self._result is not None:
            raise StrategyError(f"round {self.round_number}: update from {host} after result()")
        if self._closed:
            raise StrategyError(f"{where} after the round was closed")
        if host in self._updates:
            raise StrategyError(f"round {self.round_number}: second update from {host}")
        check_num_examples(self.round_number, host, num_examples)
        arrays = [a if isinstance(a, FileArray) else np.asarray(a) for a in weights]
        self._check_layout(where, arrays)
        directory = spool_directory(arrays)
        if directory is None:
            copies = self._copy_in_memory(where, arrays)
        else:
            copies = self._copy_to_disk(where, arrays, directory)
        self._updates[host] = copies
        self._hosts.append(host)

    def _check_layout(self, where: str, arrays: list[UpdateArray]) -> None:
        if len(arrays) != len(self.shapes):
            raise StrategyError(f"{where}: expected {len(self.shapes)} arrays, got {len(arrays)}")
        for i, (x, shape) in enumerate(zip(arrays, self.shapes)):
            if x.shape != shape:
                raise StrategyError(f"{where}: array {i}: expected shape {shape}, got {x.shape}")
            if not is_number(x.dtype):
                raise StrategyError(f"{where}: array {i}: dtype {x.dtype} is not a real "
                                    f"number type")

    def _copy_in_memory(self, where: str, arrays: list[UpdateArray]) -> list[np.ndarray]:
        # Checked after the copy: a float64 value can turn infinite in a float32 copy.
        with np.errstate(over="ignore"):
            copies = [np.array(x, dtype=dtype, order="C", copy=True)
                      for x, dtype in zip(arrays, self._held)]
        for i, copy in enumerate(copies):
            if not all_finite(copy):
                raise StrategyError(f"{where}: array {i}: contains NaN or infinite values")
        return copies

    def _copy_to_disk(self, where: str, arrays: list[UpdateArray],
                      directory: Path) -> list[FileArray]:
        """The update, cast to the held dtypes, in a new unlinked file beside its own;
        refused (and the file closed) at the first block that is not finite."""
        try:
            spool = SpoolFile(directory, list(zip(self._held, self.shapes)))
        except OSError as exc:
            raise StrategyError(f"{where}: could not hold it on disk: {exc}") from exc
        try:
            free = shutil.disk_usage(directory).free
            if free < spool.nbytes:
                raise StrategyError(f"{where}: holding it on disk needs "
                                    f"{spool.nbytes / 1e9:.2f} GB, {free / 1e9:.2f} GB are "
                                    f"free under {directory}")
            for i, x in enumerate(arrays):
                self._stream(where, spool, i, x)
            copies = spool.arrays()
        except OSError as exc:
            spool.close()
            raise StrategyError(f"{where}: could not hold it on disk: {exc}") from exc
        except BaseException:
            spool.close()
            raise
        self._spools.append(spool)
        return copies

    def _stream(self, where: str, spool: SpoolFile, index: int, x: UpdateArray) -> None:
        """Array `index` into `spool`, a block at a time, cast to its held dtype."""
        refused = StrategyError(f"{where}: array {index}: contains NaN or infinite values")
        if isinstance(x, FileArray) and not x.finite:
            raise refused   # seen while it was received: no need to read it again
        dtype = self._held[index]
        for start, stop, block in flat_blocks(x, BLOCK_ELEMENTS):
            nbytes = (stop - start) * dtype.itemsize
            piece = np.frombuffer(spool.buffer(nbytes), dtype)
            # Checked after the cast, as in memory: a float64 value can overflow float32.
            with np.errstate(over="ignore"):
                np.copyto(piece, block, casting="unsafe")
            if not all_finite(piece):
                raise refused
            spool.write(index, start * dtype.itemsize, nbytes)

    def close(self) -> None:
        """Drop every held copy (the files close, and so vanish); for a round that is
        over, aggregated or not. No update is taken after it."""
        self._closed = True
        self._updates = {}
        self._closer()

    def result(self) -> list[np.ndarray]:
        """The new global weights, in the global model's dtypes. Idempotent."""
        if self._result is None:
            if not self._updates:
                raise StrategyError(f"round {self.round_number}: no updates to aggregate")
            hosts = sorted(self._updates)
            updates = [self._updates[h] for h in hosts]
            if self.bucketing is not None:
                hosts, updates = self._bucketed(hosts, updates)
            merged = self.aggregate(hosts, updates)
            del updates
            self.close()  # the copies are the bulk of this round's memory, or disk
            self._result = [cast_back(m, dtype) for m, dtype in zip(merged, self._dtypes)]
        return self._result

    def _bucketed(self, hosts: list[str], updates: list[list[UpdateArray]]
                  ) -> tuple[list[str], list[list[UpdateArray]]]:
        """The bucket means in place of the updates; the copies are dropped at once."""
        assert self.bucketing is not None
        copies = len(self._spools)
        # new spool files go on self._spools as they are made: closed with the round
        names, means = self.bucketing.apply(self.round_number, hosts, updates, self._spools)
        for spool in self._spools[:copies]:
            spool.close()
        del self._spools[:copies]
        self._updates = {}
        self.buckets = tuple(names)
        return names, means

    def inputs(self, n: int) -> str:
        """What the rule combines, for messages: '4 updates' or '4 buckets (8 updates
        in buckets of 2)'."""
        if self.bucketing is None:
            return f"{n} updates"
        return f"{n} buckets ({self.bucketing.describe(self.count)})"

    def aggregate(self, hosts: list[str], updates: list[list[UpdateArray]]
                  ) -> list[np.ndarray]:
        """The combined model from all updates (sorted by host), as numpy arrays in the
        held dtypes (or already in the model's: result() casts what is not).

        An update held on disk is a list of FileArrays, closed once this returns:
        read it block by block (column_blocks), or whole with `in_memory`.
        """
        raise NotImplementedError


class RobustStrategy(StatelessStrategy):
    """Robust strategies keep nothing between rounds (the held copies live in the round)."""
