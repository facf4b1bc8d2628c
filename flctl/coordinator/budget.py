"""Where the coordinator puts the updates it receives, and how many it holds.

A small update is received into memory: a slot is taken before its arrays
are allocated (from inside the frame reader) and given back once it is
folded into the aggregate, so however many hosts answer at the same time,
at most `slots` of them exist. An update bigger than IN_MEMORY_BYTES goes to
a spool file instead (core.spooled), chunk by chunk as it arrives, and is
folded from there once it is complete and accepted: coordinator memory stays
the model and its sum, whatever the number of hosts and the model's size.
A reply whose array layout is not what the round expects is refused before
anything is reserved for it, so a host cannot make the coordinator hold a
model of its choosing.
"""

from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path
from typing import Callable

import numpy as np

from flctl.core.messages import ArraySpec, FrameHead, Position
from flctl.core.spooled import SpoolFile
from flctl.errors import ProtocolError, TrainingError
from flctl.net.framing import ArrayReceiver

# Updates up to this size are held in memory (under a slot); larger ones spool.
IN_MEMORY_BYTES = 64 << 20
# Keep this much disk free beside a spooled update (checkpoints need room too).
SPOOL_DISK_MARGIN = 256 << 20

SpecCheck = Callable[[list[ArraySpec]], None]


class MemoryBudget:
    """Bounds how many received updates exist in memory at once, and keeps
    released spool files for the next round's updates.

    Why keep them: a new spool file takes fresh pages for every update, and
    on a virtual machine that hands free memory back to its host (virtio
    free page reporting) fresh pages cost far more than the bytes moved:
    five 1 GB updates into new spool files arrived at 68-562 MB/s, into a
    kept one at 545-920 MB/s (scripts/bench_tls.py --size-mb 1000). A kept
    file's pages are overwritten in place. `close()` at the end of the run
    frees them.
    """

    def __init__(self, slots: int) -> None:
        self._slots = threading.BoundedSemaphore(max(1, slots))
        self._spare_lock = threading.Lock()
        self._spare: list[tuple[Path, int, int]] = []   # (directory, fd, size)
        self._closed = False

    def take_spool(self, directory: Path, nbytes: int) -> tuple[int | None, int]:
        """A kept spool file of `directory` (the closest in size at or above
        `nbytes`, else the biggest) and its size, or (None, 0)."""
        with self._spare_lock:
            mine = [i for i, (d, _, _) in enumerate(self._spare) if d == directory]
            if not mine:
                return None, 0
            fits = [i for i in mine if self._spare[i][2] >= nbytes]
            pick = min(fits, key=lambda i: self._spare[i][2]) if fits else \
                max(mine, key=lambda i: self._spare[i][2])
            _, fd, size = self._spare.pop(pick)
            return fd, size

    def keep_spool(self, directory: Path, fd: int) -> None:
        with self._spare_lock:
            if not self._closed:   # a worker that outlived its run frees its file
                self._spare.append((directory, fd, os.fstat(fd).st_size))
                return
        os.close(fd)

    def close(self) -> None:
        """Free the kept spool files (their disk space and page cache)."""
        with self._spare_lock:
            spare, self._spare, self._closed = self._spare, [], True
        for _, fd, _ in spare:
            os.close(fd)

    def allocator(self, held: list[bool], expect: SpecCheck | None = None,
                  ) -> Callable[[list[ArraySpec]], list[np.ndarray]]:
        """`expect(specs)` raises for a reply that does not fit the round."""

        def allocate(specs: list[ArraySpec]) -> list[np.ndarray]:
            if expect is not None:
                expect(specs)
            self._slots.acquire()
            held.append(True)
            return [np.empty(spec.shape, spec.dtype) for spec in specs]

        return allocate

    def release(self, held: list[bool]) -> None:
        while held:
            held.pop()
            self._slots.release()

    def receiver(self, expect: SpecCheck, spool_dir: Path | None) -> UpdateReceiver:
        """A Receiver for one update: in memory under a slot, or spooled to
        `spool_dir` when it is large (None: always in memory)."""
        return UpdateReceiver(self, expect, spool_dir)


class UpdateReceiver:
    """Receives one host's update (framing.Receiver); `release()` when done with it."""

    def __init__(self, budget: MemoryBudget, expect: SpecCheck, spool_dir: Path | None) -> None:
        self._budget = budget
        self._expect = expect
        self._spool_dir = spool_dir
        self._held: list[bool] = []
        self._memory: ArrayReceiver | None = None
        self._spool: SpoolFile | None = None
        self._specs: list[ArraySpec] | None = None
        # Where the next byte goes: a resumed stream must start exactly here.
        self.position: Position = (0, 0)

    @property
    def spooled(self) -> bool:
        return self._spool is not None

    @property
    def started(self) -> bool:
        """True once a reply's head was accepted: the rest may come as a resumed stream."""
        return self._specs is not None

    def begin(self, head: FrameHead) -> None:
        if head.resume is not None:
            if self._specs is None or head.specs != self._specs:
                raise ProtocolError("a resumed update does not continue the interrupted one")
            if head.resume != self.position:
                raise ProtocolError(f"the update resumed at {list(head.resume)}, the "
                                    f"coordinator holds it up to {list(self.position)}")
            return
        if self._specs is not None:
            # sent again whole: fine while nothing of the first one arrived
            if self.position == (0, 0) and head.specs == self._specs:
                return
            raise ProtocolError("a second update arrived for one request")
        specs = head.specs
        self._expect(specs)
        self._specs = specs
        total = sum(spec.nbytes for spec in specs)
        if self._spool_dir is None or total <= IN_MEMORY_BYTES:
            self._memory = ArrayReceiver(self._budget.allocator(self._held))
            self._memory.begin(head)
            return
        self._spool_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        reuse, has = self._budget.take_spool(self._spool_dir, total)
        free = shutil.disk_usage(self._spool_dir).free
        if free < total - min(has, total) + SPOOL_DISK_MARGIN:
            if reuse is not None:
                os.close(reuse)
            raise TrainingError(f"update refused: spooling its {total / 1e9:.2f} GB needs more "
                                f"free disk than the {free / 1e9:.2f} GB left under "
                                f"{self._spool_dir}")
        self._spool = SpoolFile(self._spool_dir, [(s.dtype, s.shape) for s in specs], reuse)

    def buffer(self, index: int, offset: int, nbytes: int) -> memoryview:
        if self._spool is not None:
            return self._spool.buffer(nbytes)
        assert self._memory is not None
        return self._memory.buffer(index, offset, nbytes)

    def received(self, index: int, offset: int, nbytes: int) -> None:
        if self._spool is not None:
            self._spool.write(index, offset, nbytes)
        self.position = (index, offset + nbytes)

    def finish(self) -> list:
        if self._spool is not None:
            return list(self._spool.arrays())
        assert self._memory is not None
        return self._memory.finish()

    def release(self) -> None:
        """Give back the slot, or the spool file for the next update to reuse."""
        self._memory = None
        self._budget.release(self._held)
        if self._spool is not None:
            self._budget.keep_spool(self._spool.directory, self._spool.detach())
            self._spool = None
