"""Will the model fit? The memory a run needs, checked before round 1.

A model that does not fit is found out hours into a run by the kernel's
OOM killer otherwise. The coordinator holds the global model, the sum it
folds updates into and the updates arriving (measured: 3.05x the model's
bytes for a FedAvg round, whatever the host count; updates past 64 MB
wait on disk); a host holds the model it receives and the task's own copy
it trains (2x), plus its frozen part. These are estimates: the check
refuses only what clearly cannot fit.
"""

from __future__ import annotations

COORDINATOR_FACTOR = 3
HOST_FACTOR = 2
GB = 1e9


def available_memory(meminfo: str = "/proc/meminfo") -> int | None:
    """MemAvailable in bytes (Linux), or None where it cannot be read."""
    try:
        with open(meminfo) as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def coordinator_need(model_bytes: int) -> int:
    """What the coordinator needs beyond the model it already holds."""
    return (COORDINATOR_FACTOR - 1) * model_bytes


def host_need(model_bytes: int, frozen_bytes: int = 0) -> int:
    return HOST_FACTOR * model_bytes + frozen_bytes


def shortfall(who: str, need: int, available: int | None, model_bytes: int) -> str | None:
    """One line when `need` bytes clearly exceed what `who` has, else None."""
    if available is None or need <= available:
        return None
    return (f"{who} needs about {need / GB:.1f} GB of memory for this model "
            f"({model_bytes / GB:.2f} GB) and has {available / GB:.1f} GB available")
