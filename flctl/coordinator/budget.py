"""How many received updates the coordinator holds at once.

A slot is taken before a reply's arrays are allocated (from inside the frame
reader) and given back once the update is folded into the aggregate, so
however many hosts answer at the same time, at most `slots` update-sized
buffers exist: coordinator memory stays O(model). A reply whose array specs
are not what the round expects is refused before it takes a slot, so a host
cannot make the coordinator reserve memory for a model of its choosing.
"""

from __future__ import annotations

import threading
from typing import Callable

import numpy as np

from flctl.core.messages import ArraySpec


class MemoryBudget:
    """Bounds how many received updates exist at once."""

    def __init__(self, slots: int) -> None:
        self._slots = threading.BoundedSemaphore(max(1, slots))

    def allocator(self, held: list[bool],
                  expect: Callable[[list[ArraySpec]], None] | None = None,
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
