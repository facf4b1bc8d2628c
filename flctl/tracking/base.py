"""What every tracking sink is, and the guard that keeps a failing one from
stopping training.

A sink gets plain dicts only (the settings, each round's metrics.jsonl
record, the manifest), never the coordinator's objects: metrics.jsonl stays
the source of truth and a sink is one more view of it, fed beside it.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Protocol

from flctl.core.text import clean_text
from flctl.errors import ConfigError

Tell = Callable[[str], None]
REASON_CHARS = 300


class Tracker(Protocol):
    """One sink. `start` gets None for a new run; for a resumed one, the state
    it returned when the run started (from the run's tracking.json; {} if
    there is none). It returns what it needs to find its run again (a run id,
    a log dir) and, if it knows, "last_round": the last round it holds."""

    name: str

    def start(self, run_id: str, settings: Mapping[str, Any],
              saved: Mapping[str, Any] | None) -> dict[str, Any]: ...

    def round(self, record: Mapping[str, Any]) -> None: ...

    def finish(self, final_path: Path, manifest: Mapping[str, Any]) -> None: ...

    def close(self) -> None: ...


class TrackerUnavailable(Exception):
    """A sink that cannot work this run (a server that does not answer): its
    message is the whole warning's reason."""


def require(module: str, extra: str, field: str) -> ModuleType:
    """Import an optional library, or one line naming the extra to install."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise _missing(module, extra, field) from None


def installed(module: str, extra: str, field: str) -> None:
    """Check an optional library is there without importing it (MLflow takes
    seconds to import: the sink's thread does that while rounds run)."""
    if importlib.util.find_spec(module) is None:
        raise _missing(module, extra, field)


def _missing(module: str, extra: str, field: str) -> ConfigError:
    return ConfigError(f"needs the {module} package: pip install 'flctl[{extra}]'", field=field)


def reason(exc: BaseException) -> str:
    """An exception as one short line (a library's message may span a page)."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    text = clean_text(text)
    return text if len(text) <= REASON_CHARS else text[:REASON_CHARS - 3] + "..."


class Guarded:
    """A tracker whose first failure is one warning and turns it off for the
    rest of the run (not retried: a sink that failed once would otherwise
    warn every round, and its history would have holes either way)."""

    def __init__(self, tracker: Tracker, tell: Tell) -> None:
        self.tracker = tracker
        self.tell = tell
        self.active = True
        self.name = tracker.name

    def call(self, method: str, *args: Any) -> Any:
        if not self.active:
            return None
        try:
            return getattr(self.tracker, method)(*args)
        except Exception as exc:  # noqa: BLE001  (any failure of a sink: warn, never stop)
            self.active = False
            what = reason(exc) if isinstance(exc, TrackerUnavailable) else \
                f"{method} failed: {reason(exc)}"
            self.tell(f"tracking: {self.name}: {what}; {self.name} is off for the rest of "
                      "this run, training goes on")
            self._close_quietly()
            return None

    def close(self) -> None:
        if self.active:
            self.active = False
            self._close_quietly()

    def _close_quietly(self) -> None:
        try:
            self.tracker.close()
        except Exception:  # noqa: BLE001, S110  (already warned, or closing after the run)
            pass


def flat_settings(settings: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested settings as one level of dotted keys with scalar values (lists
    and other values as JSON): what hyper-parameter tables show."""
    out: dict[str, Any] = {}
    for key, value in settings.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flat_settings(value, f"{name}."))
        elif value is None or isinstance(value, (bool, int, float, str)):
            out[name] = value
        else:
            out[name] = json.dumps(value, sort_keys=True, default=str)
    return out


def host_counts(record: Mapping[str, Any]) -> dict[str, int]:
    """Hosts answered / dropped / straggled in a round; records written before
    per-host entries existed count participants and dropped."""
    hosts = record.get("hosts")
    if isinstance(hosts, Mapping):
        statuses = [h.get("status") for h in hosts.values() if isinstance(h, Mapping)]
        return {s: statuses.count(s) for s in ("answered", "dropped", "straggled")}
    return {"answered": len(record.get("participants") or ()),
            "dropped": len(record.get("dropped") or {}), "straggled": 0}


# record key -> the scalar's name in TensorBoard and MLflow
ROUND_SCALARS = {
    "accuracy": "accuracy", "eval_loss": "eval_loss", "train_loss": "train_loss",
    "central_accuracy": "central_accuracy", "central_loss": "central_loss",
    "seconds": "seconds", "fit_seconds": "fit_seconds", "eval_seconds": "eval_seconds",
    "bytes_sent": "bytes_sent", "bytes_received": "bytes_received", "epsilon": "epsilon",
    "attempts": "attempts",
}


def round_scalars(record: Mapping[str, Any]) -> dict[str, float]:
    """A round record's numbers as named scalars (absent and non-finite left out)."""
    out: dict[str, float] = {}
    for key, name in ROUND_SCALARS.items():
        value = record.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) \
                and math.isfinite(value):
            out[name] = float(value)
    for status, count in host_counts(record).items():
        out[f"hosts_{status}"] = float(count)
    return out
