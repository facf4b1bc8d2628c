"""training.tracking: mlflow -- settings as params, every round's numbers as
metrics at step = round, the final weights and manifest as artifacts.

The MLflow run is named after the flctl run; its id and the store it lives
in are kept in the run's tracking.json, so `flctl train --resume` reopens the
same MLflow run (from any directory) and goes on at the next step. An empty
training.tracking_uri is MLflow's own default (MLFLOW_TRACKING_URI, else its
local store in the current directory).
"""

from __future__ import annotations

import logging
import math
import os
import re
import socket
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from flctl.tracking.base import TrackerUnavailable, flat_settings, installed, round_scalars

FIELD = "training.tracking"
CONNECT_TIMEOUT_S = 3.0
# MLflow retries an HTTP request for minutes by default; a tracker must not
# hold a round that long. Used unless the user set these variables.
HTTP_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
            "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}
# Rounds are sent at most this often (the first at once); the rest wait for the
# next send or the run's end. A killed run's unsent rounds come from
# metrics.jsonl on resume (the MLflow run's own history says what it holds).
SEND_EVERY_S = 5.0
MAX_BATCH = 1000  # MLflow's limit on metrics per log_batch
MAX_PARAM_CHARS = 6000  # MLflow's limit on a param's value
BAD_NAME_CHARS = re.compile(r"[^/\w.\- ]")
RUN_TAG = "flctl.run_id"
SAFE_ID = re.compile(r"[\w.-]+\Z")


class MlflowTracker:
    name = "mlflow"

    def __init__(self, tracking_uri: str, experiment: str) -> None:
        self.tracking_uri = tracking_uri
        self.experiment = experiment
        self.client: Any = None
        self.run_id = ""
        self.finished = False
        self.pending: list[Any] = []
        self.sent_at = -math.inf  # the first round goes at once: a bad store shows at round 1
        self._env_before: dict[str, str | None] = {}
        installed("mlflow", "mlflow", FIELD)

    def start(self, run_id: str, settings: Mapping[str, Any],
              saved: Mapping[str, Any] | None) -> dict[str, Any]:
        uri = (saved or {}).get("tracking_uri") or self.tracking_uri
        if uri.startswith(("http://", "https://")):
            _check_reachable(uri)
            self._env_before = {k: os.environ.get(k) for k in HTTP_ENV}
            for key, value in HTTP_ENV.items():
                os.environ.setdefault(key, value)
        import mlflow
        from mlflow import MlflowClient
        from mlflow.entities import Param

        _quiet()  # after the import, which sets MLflow's loggers to INFO

        uri = uri or mlflow.get_tracking_uri()  # MLflow's default, resolved to a full URI
        self.client = MlflowClient(tracking_uri=uri)
        experiment_id = (saved or {}).get("experiment_id") or self._experiment_id()
        found = self._find(experiment_id, run_id, saved) if saved is not None else None
        if found is not None:  # resumed: the same MLflow run, on at its next step
            self.run_id = found
            self.client.update_run(self.run_id, status="RUNNING")
            steps = [m.step for m in self.client.get_metric_history(self.run_id, "seconds")]
            return {"tracking_uri": uri, "experiment_id": experiment_id,
                    "run_id": self.run_id, "last_round": max(steps, default=0)}
        run = self.client.create_run(experiment_id, run_name=run_id,
                                     tags={RUN_TAG: run_id})
        self.run_id = run.info.run_id
        params = [Param(_name(k), "" if v is None else str(v)[:MAX_PARAM_CHARS])
                  for k, v in sorted(flat_settings(settings).items())]
        for i in range(0, len(params), 100):  # MLflow takes 100 params per batch
            self.client.log_batch(self.run_id, params=params[i:i + 100])
        return {"tracking_uri": uri, "experiment_id": experiment_id, "run_id": self.run_id}

    def _experiment_id(self) -> str:
        experiment = self.client.get_experiment_by_name(self.experiment)
        return str(experiment.experiment_id if experiment is not None
                   else self.client.create_experiment(self.experiment))

    def _find(self, experiment_id: str, run_id: str, saved: Mapping[str, Any]) -> str | None:
        """The MLflow run of a resumed flctl run: the one tracking.json names, else
        the one tagged with its run id (killed before tracking.json was written)."""
        if saved.get("run_id"):
            return str(saved["run_id"])
        if not SAFE_ID.match(run_id):
            return None
        runs = self.client.search_runs([experiment_id], f"tags.`{RUN_TAG}` = '{run_id}'",
                                       max_results=1)
        return runs[0].info.run_id if runs else None

    def round(self, record: Mapping[str, Any]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        step = int(record["round"])
        self.pending += [Metric(name, value, now, step) for name, value in
                         round_scalars(record).items()]
        if time.monotonic() - self.sent_at >= SEND_EVERY_S:
            self._send()

    def _send(self) -> None:
        """The rounds held so far, in batches (a store's write costs about the
        same for one round as for many: at most one every SEND_EVERY_S)."""
        batch, self.pending = self.pending, []
        self.sent_at = time.monotonic()
        for i in range(0, len(batch), MAX_BATCH):
            self.client.log_batch(self.run_id, metrics=batch[i:i + MAX_BATCH])

    def finish(self, final_path: Path, manifest: Mapping[str, Any]) -> None:
        self._send()
        self.client.log_artifact(self.run_id, str(final_path))
        self.client.log_dict(self.run_id, dict(manifest), "manifest.json")
        self.client.set_terminated(self.run_id, "FINISHED")
        self.finished = True

    def close(self) -> None:
        try:
            if self.client is not None and self.run_id and not self.finished:
                # interrupted or failed: `flctl train --resume` sets it running again
                self._send()
                self.client.set_terminated(self.run_id, "KILLED")
        finally:
            for key, value in self._env_before.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
            self._env_before = {}


def _name(key: str) -> str:
    """A settings key as an MLflow param name (task_params keys are the user's)."""
    return BAD_NAME_CHARS.sub("_", key)[:250]


def _check_reachable(uri: str) -> None:
    """Fail in seconds, not after MLflow's retries, when nothing listens there."""
    parts = urlsplit(uri)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        with socket.create_connection((parts.hostname or "", port), timeout=CONNECT_TIMEOUT_S):
            pass
    except OSError as exc:
        why = exc.strerror or type(exc).__name__
        raise TrackerUnavailable(f"cannot reach the tracking server at {uri} ({why})") from None


def _quiet() -> None:
    """MLflow's INFO lines (database set-up, run links) and its warnings would
    land in the middle of the round table."""
    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", module=r"mlflow(\.|$)")
