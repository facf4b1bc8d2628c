"""Updates kept in a file while they arrive, read back a block at a time.

A host's update for a large model is bigger than what the coordinator may
hold next to the model and the float64 sum (3x the model in all). So an
update that does not fit in memory is written, chunk by chunk as it comes
off the wire, to an unlinked temporary file (its bytes live in the page
cache and on disk, not in the coordinator's memory), checked while it is
written (finite values), and folded into the sum only once it is complete
and accepted, by reading it back in cache-sized blocks with pread. An
update that is refused, or cut off, is never folded: closing the file
frees it, and nothing of it can reach a checkpoint.

FileArray stands in for a numpy array in the few places that read an
update (aggregation.flat_blocks and friends); `np.asarray` on it reads it
whole into memory. The robust strategies, which keep every update, copy a
spooled one into a spool file of their own beside it (`directory`), since
the receiver's file is closed as soon as the update is handed over.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from flctl.core.dtypes import is_bfloat16, is_float


def _finite(piece: np.ndarray) -> bool:
    if not is_float(piece.dtype):
        return True
    if is_bfloat16(piece.dtype):
        piece = piece.astype(np.float32)   # exact, and a piece is small
    return bool(np.isfinite(piece).all())


class _Lease:
    """The spool file's descriptor as its FileArrays see it: -1 once the file
    is closed or handed to another update, so a late read fails (EBADF)
    instead of reading someone else's bytes."""

    def __init__(self, fd: int) -> None:
        self.fd = fd


class FileArray:
    """One array of a spooled update: shape, dtype, and its bytes in a file."""

    def __init__(self, lease: _Lease, offset: int, dtype: np.dtype, shape: tuple[int, ...],
                 finite: bool, directory: Path | None = None) -> None:
        self._lease = lease
        self._offset = offset
        self.dtype = np.dtype(dtype)
        self.shape = tuple(shape)
        self.size = int(np.prod(self.shape, dtype=np.int64)) if self.shape else 1
        self.nbytes = self.size * self.dtype.itemsize
        self.ndim = len(self.shape)
        # Every byte went through SpoolFile.write, which looked at it.
        self.finite = finite
        # Where its file lives: a copy kept past the file's release goes beside it.
        self.directory = directory

    def read(self, start: int, stop: int, out: np.ndarray | None = None) -> np.ndarray:
        """Elements [start, stop) of the flattened array, into `out` (or a new array)."""
        count = stop - start
        if out is None:
            out = np.empty(count, self.dtype)
        view = memoryview(out[:count].view(np.uint8))
        position = self._offset + start * self.dtype.itemsize
        done = 0
        while done < view.nbytes:
            n = os.preadv(self._lease.fd, [view[done:]], position + done)
            if n <= 0:
                raise OSError(f"spool file ended {view.nbytes - done} bytes early")
            done += n
        return out[:count]

    def __array__(self, dtype: np.dtype | None = None, copy: bool | None = None) -> np.ndarray:
        whole = self.read(0, self.size).reshape(self.shape)
        return whole if dtype is None else whole.astype(dtype, copy=False)

    def __len__(self) -> int:
        return self.shape[0] if self.shape else 0


class SpoolFile:
    """An update's arrays written into one unlinked temporary file (0600)."""

    def __init__(self, directory: Path, layout: Sequence[tuple[np.dtype, tuple[int, ...]]],
                 reuse: int | None = None) -> None:
        """`reuse`: the descriptor of a released spool file of the same
        directory (`detach`), whose pages are overwritten instead of new ones
        being taken (see budget.MemoryBudget)."""
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.directory = directory
        self._fd = reuse if reuse is not None else open_unlinked(directory)
        self._lease = _Lease(self._fd)
        self.layout = [(np.dtype(dtype), tuple(shape)) for dtype, shape in layout]
        self.offsets: list[int] = []
        total = 0
        for dtype, shape in self.layout:
            self.offsets.append(total)
            total += int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        self.nbytes = total
        if reuse is not None and os.fstat(reuse).st_size > total:
            os.ftruncate(reuse, total)   # no stale bytes of a bigger update past the end
        self._finite = [True] * len(self.layout)
        self._piece = np.empty(0, np.uint8)

    def buffer(self, nbytes: int) -> memoryview:
        """A reusable buffer for the next `nbytes` to write."""
        if self._piece.size < nbytes:
            self._piece = np.empty(nbytes, np.uint8)
        return memoryview(self._piece[:nbytes])

    def write(self, index: int, offset: int, nbytes: int) -> None:
        """Write the buffer's first `nbytes` at byte `offset` of array `index`.

        `offset` and `nbytes` are whole elements (the wire's chunks and pieces
        are multiples of 8 bytes, the last of an array excepted).
        """
        dtype = self.layout[index][0]
        data = self._piece[:nbytes]
        if self._finite[index] and not _finite(data.view(dtype)):
            self._finite[index] = False
        view = memoryview(data)
        position = self.offsets[index] + offset
        done = 0
        while done < nbytes:
            done += os.pwrite(self._fd, view[done:], position + done)

    def arrays(self) -> list[FileArray]:
        self._piece = np.empty(0, np.uint8)
        return [FileArray(self._lease, offset, dtype, shape, finite, self.directory)
                for (dtype, shape), offset, finite
                in zip(self.layout, self.offsets, self._finite)]

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = self._lease.fd = -1

    def detach(self) -> int:
        """Give up the file without closing it, for the next update to reuse
        (its FileArrays must not be read after this)."""
        fd, self._fd = self._fd, -1
        self._lease.fd = -1
        return fd


def open_unlinked(directory: Path) -> int:
    """A new 0600 file in `directory` that never has a name: a crash leaves nothing behind."""
    try:
        return os.open(directory, os.O_TMPFILE | os.O_RDWR, 0o600)
    except (AttributeError, OSError):
        fd, name = tempfile.mkstemp(dir=directory, prefix=".update-")
        os.unlink(name)
        return fd
