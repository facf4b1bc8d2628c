"""A run's tracking sinks, fed beside metrics.jsonl without slowing rounds.

TensorBoard and MLflow write files or talk to a server (an MLflow store's
first use alone takes seconds): they run on one thread of their own, fed
through a queue, so a round only pays for putting its record on it. The
Prometheus exporter is updated in the round callback itself, so a scrape
always shows the round just done.

Each queued sink's state (its MLflow run id, its log dir) and the last round
it logged are kept in the run's tracking.json. A resumed run reopens the
same MLflow run / log dir and first replays the checkpointed rounds the sink
had not logged (say the coordinator was killed between checkpoint and sink);
the last round a sink holds is read back from the sink itself (MLflow's
metric history, the event files) when it can say, since a kill may fall
between its write and tracking.json's: every step is logged once.
"""

from __future__ import annotations

import json
import queue
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Callable

from flctl.core.fsutil import atomic_write
from flctl.errors import ConfigError
from flctl.tracking.base import Guarded, Tell, Tracker, reason

STATE_FILE = "tracking.json"
FINISH_WAIT_S = 120.0  # the final artifacts (final.npz) may be large
CLOSE_WAIT_S = 10.0    # an interrupted run: do not hold the user long


class Tracking:
    def __init__(self, live: Sequence[Tracker], queued: Sequence[Tracker], tell: Tell) -> None:
        self.tell = tell
        self.live = [Guarded(t, tell) for t in live]
        self.queued = [Guarded(t, tell) for t in queued]
        self.state: dict[str, dict[str, Any]] = {}
        self.state_path: Path | None = None
        self.jobs: queue.Queue[Callable[[], None] | None] = queue.Queue()
        self.worker: threading.Thread | None = None

    def start(self, run_dir: Path, run_id: str, settings: Mapping[str, Any], *,
              resumed: bool, done: Sequence[Mapping[str, Any]] = ()) -> None:
        """Open every sink for the run; `done`: the rounds a resumed run has
        already checkpointed (metrics.jsonl records)."""
        saved = _read_state(run_dir / STATE_FILE, self.tell) if resumed else {}
        for sink in self.live:
            sink.call("start", run_id, settings, None)
            for record in done:  # totals and last values as of the checkpoint
                sink.call("round", record)
        if not self.queued:
            return
        self.state_path = run_dir / STATE_FILE
        self.worker = threading.Thread(target=self._work, name="flctl-tracking", daemon=True)
        self.worker.start()

        def open_sinks() -> None:
            for sink in self.queued:
                before = saved.get(sink.name, {}) if resumed else None
                state = sink.call("start", run_id, settings, before)
                if state is None:
                    continue
                # what the sink knows it logged, else what tracking.json says
                last = int(state.get("last_round", (before or {}).get("last_round", 0)))
                self.state[sink.name] = {**state, "last_round": last}
                self._save()
                for record in done:
                    if int(record["round"]) > last:
                        self._log(sink, record)
            self._save()

        self.jobs.put(open_sinks)

    def round(self, record: Mapping[str, Any]) -> None:
        for sink in self.live:
            sink.call("round", record)
        if self.worker is not None:
            self.jobs.put(lambda: self._round(record))

    def finish(self, final_path: Path, manifest: Mapping[str, Any]) -> None:
        """The run's end: artifacts to the sinks, waiting for them (bounded)."""
        for sink in self.live:
            sink.call("finish", final_path, manifest)
        if self.worker is None:
            return
        finished = threading.Event()

        def finish_sinks() -> None:
            for sink in self.queued:
                sink.call("finish", final_path, manifest)
            finished.set()

        self.jobs.put(finish_sinks)
        if not finished.wait(FINISH_WAIT_S):
            self.tell(f"tracking: still sending after {FINISH_WAIT_S:g} s; not waiting longer "
                      "(the run itself is complete)")

    def close(self) -> None:
        for sink in self.live:
            sink.close()
        if self.worker is None:
            return

        def close_sinks() -> None:
            for sink in self.queued:
                sink.close()

        self.jobs.put(close_sinks)
        self.jobs.put(None)
        self.worker.join(CLOSE_WAIT_S)
        self.worker = None

    # ------------------------------------------------------------ the worker
    def _work(self) -> None:
        while True:
            job = self.jobs.get()
            if job is None:
                return
            try:
                job()
            except Exception as exc:  # noqa: BLE001  (a bug here must not end tracking silently)
                self.tell(f"tracking: {reason(exc)}")

    def _round(self, record: Mapping[str, Any]) -> None:
        for sink in self.queued:
            self._log(sink, record)
        self._save()

    def _log(self, sink: Guarded, record: Mapping[str, Any]) -> None:
        if sink.name not in self.state:
            return
        sink.call("round", record)
        if sink.active:
            self.state[sink.name]["last_round"] = int(record["round"])

    def _save(self) -> None:
        if self.state_path is None or not self.state:
            return
        try:
            atomic_write(self.state_path, json.dumps(self.state, indent=2, sort_keys=True))
        except OSError as exc:  # the sinks go on; only a resume would start them afresh
            self.tell(f"tracking: cannot write {self.state_path} ({reason(exc)}); a resumed "
                      "run may start its tracking runs afresh")
            self.state_path = None


def _read_state(path: Path, tell: Tell) -> dict[str, dict[str, Any]]:
    try:
        state = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        tell(f"tracking: {path} unreadable ({reason(exc)}): the sinks start afresh")
        return {}
    return {k: v for k, v in state.items() if isinstance(v, dict)} if isinstance(state, dict) \
        else {}


def open_tracking(settings: Mapping[str, Any], *, root: Path, project: str,
                  metrics_port: int | None = None, metrics_address: str = "127.0.0.1",
                  resumed: bool = False, tell: Tell) -> Tracking:
    """The sinks the settings ask for (training.tracking, plus the Prometheus
    exporter with a metrics port), checked before the run starts: a port in
    use, or a missing package for a new run, is one ConfigError line. A
    resumed run goes on without a sink whose package is gone (it cannot
    change its settings)."""
    live: list[Tracker] = []
    if metrics_port is not None:
        from flctl.tracking.prometheus import PrometheusExporter

        live.append(PrometheusExporter(metrics_port, metrics_address))
    queued: list[Tracker] = []
    kind = settings.get("tracking", "none")
    try:
        if kind == "tensorboard":
            from flctl.tracking.tensorboard import TensorBoardTracker

            log_root = Path(settings.get("tracking_dir") or "tensorboard")
            queued.append(TensorBoardTracker(root / log_root))  # an absolute dir stays
        elif kind == "mlflow":
            from flctl.tracking.mlflow import MlflowTracker

            queued.append(MlflowTracker(settings.get("tracking_uri") or "",
                                        settings.get("tracking_experiment") or project))
    except ConfigError as exc:
        if not resumed:
            for sink in live:
                sink.close()
            raise
        tell(f"tracking: {exc.message}; the resumed run goes on without it")
    return Tracking(live, queued, tell)
