"""training.tracking: tensorboard -- event files written with TensorBoard's own
writer and protos (no TensorFlow or PyTorch needed).

One sub-directory per run under one log dir (default `<workspace>/tensorboard`),
so `tensorboard --logdir <workspace>/tensorboard` compares runs. A resumed run
writes a new event file into its own sub-directory and goes on at the next
step; TensorBoard reads a directory's files as one run.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flctl.tracking.base import flat_settings, installed, round_scalars

FIELD = "training.tracking"
ROUND_TAG = "seconds"  # a scalar every round has


class TensorBoardTracker:
    name = "tensorboard"

    def __init__(self, log_root: Path) -> None:
        self.log_root = log_root
        self.writer: Any = None
        # imported now, so a missing package is one line before the run starts
        installed("tensorboard", "tensorboard", FIELD)

    def start(self, run_id: str, settings: Mapping[str, Any],
              saved: Mapping[str, Any] | None) -> dict[str, Any]:
        from tensorboard.summary.writer.event_file_writer import EventFileWriter

        logdir = Path(saved["logdir"]) if saved and saved.get("logdir") else \
            self.log_root / run_id
        logdir.mkdir(parents=True, exist_ok=True)
        last = _last_round(logdir) if saved is not None else 0
        self.writer = EventFileWriter(str(logdir))
        if saved is None:  # a resumed run has them already
            flat = flat_settings(settings)
            self._write(0, self._text("settings", _settings_table(flat)))
            self._write(0, self._hparams(run_id, flat))
            self.writer.flush()
            return {"logdir": str(logdir)}
        return {"logdir": str(logdir), "last_round": last}

    def round(self, record: Mapping[str, Any]) -> None:
        from tensorboard.compat.proto.summary_pb2 import Summary

        values = [Summary.Value(tag=name, simple_value=value)
                  for name, value in round_scalars(record).items()]
        self._write(int(record["round"]), Summary(value=values))
        self.writer.flush()  # a killed coordinator loses no round it reported

    def finish(self, final_path: Path, manifest: Mapping[str, Any]) -> None:
        text = "```\n" + json.dumps({"final_weights": str(final_path), **manifest}, indent=2,
                                    sort_keys=True, default=str) + "\n```"
        self._write(int(manifest.get("rounds") or 0), self._text("manifest", text))
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    # ---------------------------------------------------------------- protos
    def _write(self, step: int, summary: Any) -> None:
        from tensorboard.compat.proto.event_pb2 import Event

        self.writer.add_event(Event(wall_time=time.time(), step=step, summary=summary))

    @staticmethod
    def _text(tag: str, markdown: str) -> Any:
        from tensorboard.plugins.text.summary_v2 import text_pb

        return text_pb(tag, markdown)

    @staticmethod
    def _hparams(run_id: str, flat: Mapping[str, Any]) -> Any:
        from tensorboard.plugins.hparams.summary_v2 import hparams_pb

        # the hparams dashboard takes bool, number or string values only
        values = {k: ("" if v is None else v) for k, v in flat.items()}
        return hparams_pb(values, trial_id=run_id)


def _last_round(logdir: Path) -> int:
    """The last round the directory's event files hold (a run killed after
    writing a round but before tracking.json said so must not log it twice)."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    last = 0
    for path in sorted(logdir.glob("events.out.tfevents.*")):
        for event in EventFileLoader(str(path)).Load():  # stops at a torn last record
            if any(value.tag == ROUND_TAG for value in event.summary.value):
                last = max(last, int(event.step))
    return last


def _settings_table(flat: Mapping[str, Any]) -> str:
    rows = [f"| {key} | {json.dumps(value)} |" for key, value in sorted(flat.items())]
    return "| setting | value |\n|---|---|\n" + "\n".join(rows)
