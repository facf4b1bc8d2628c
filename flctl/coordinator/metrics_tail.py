"""Follow a run's metrics.jsonl as it grows (`flctl runs attach`).

The file is the run's record of its rounds, so a view of a run that some
other process trains reads it, not the process. Only whole lines are read
(the writer may be mid-append); a line that does not parse is skipped, as
records.read_metrics does. A resume rewrites the file (it drops rounds after
the checkpoint), so a new file or a shorter one is read again from the start
and only rounds after the last one given are given.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from flctl.coordinator.records import METRICS, RunDir


class MetricsTail:
    def __init__(self, run: RunDir) -> None:
        self.path: Path = run.path / METRICS
        self._offset = 0
        self._inode: int | None = None
        self.last_round = 0

    def new_records(self) -> list[dict[str, Any]]:
        """The rounds written since the last call, in order."""
        try:
            status = os.stat(self.path)
        except FileNotFoundError:
            return []
        if status.st_ino != self._inode or status.st_size < self._offset:
            self._inode, self._offset = status.st_ino, 0
        if status.st_size == self._offset:
            return []
        with open(self.path, "rb") as handle:
            handle.seek(self._offset)
            chunk = handle.read(status.st_size - self._offset)
        end = chunk.rfind(b"\n")
        if end < 0:
            return []
        self._offset += end + 1
        found = []
        for raw in chunk[:end].split(b"\n"):
            try:
                record = json.loads(raw.decode("utf-8"))
            except ValueError:
                continue
            number = record.get("round") if isinstance(record, dict) else None
            if isinstance(number, int) and not isinstance(number, bool) and \
                    number > self.last_round:
                found.append(record)
                self.last_round = number
        return found
