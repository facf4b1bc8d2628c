"""A host's data as its task reads it, and what may be said about it.

The built-in tasks train on one .npz or CSV file (flctl.core.data). A
user's task may read anything (an image folder, parquet, DICOM) by having
a staticmethod `load_data(path, params)`: it gets the host's `data_path`
and `data_params` from the inventory and returns any object with an
`n_train` count (and, optionally, `n_test`), which the coordinator holds
the host's later claims to. The agent loads the data this way at start,
and deploy runs the same code on the host (flctl.agent.task_check), as the
agent's user, before it starts the agent.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flctl.core.agentconfig import AgentConfig
from flctl.core.data import Dataset, load_dataset
from flctl.core.tasks import TaskError, data_loader, task_class
from flctl.errors import FlctlError

MAX_EXAMPLES = 2**40


def load_host_data(config: AgentConfig) -> Any:
    """The host's data for its deployed task; FlctlError in one line if it cannot be read."""
    cls = task_class(config.task, Path(config.tasks_dir) if config.tasks_dir else None)
    loader = data_loader(cls)
    if loader is None:
        return load_dataset(config.data_path)
    try:
        data = loader(config.data_path, dict(config.data_params))
    except FlctlError:
        raise
    except Exception as exc:   # the user's loader: any failure is this host's data problem
        text = " ".join(str(exc).split())
        raise TaskError(f"{config.task}.load_data({config.data_path!r}): "
                        f"{type(exc).__name__}: {text}") from None
    summary(data)   # refuse data without counts now, not at the first round
    return data


def check_host_data(config: AgentConfig, data: Any) -> None:
    """Deploy's task check: the task's own `check_data(data)` (a staticmethod),
    when it has one, may refuse data that loads but is unfit (a label out of
    range, images of the wrong size); its exception is this host's one line."""
    cls = task_class(config.task, Path(config.tasks_dir) if config.tasks_dir else None)
    checker = getattr(cls, "check_data", None)
    if not callable(checker):
        return
    try:
        checker(data)
    except Exception as exc:   # the user's check: any failure is this host's data problem
        text = " ".join(str(exc).split())
        raise TaskError(f"{config.task}.check_data: {type(exc).__name__}: {text}") from None


def summary(data: Any) -> dict[str, Any]:
    """Sizes (and, for the built-in data, shape) the agent reports in `info`."""
    if isinstance(data, Dataset):
        return {"n_train": data.n_train, "n_test": data.n_test,
                "n_features": data.n_features, "n_classes": data.n_classes}
    counts = {}
    for name in ("n_train", "n_test"):
        value = getattr(data, name, 0 if name == "n_test" else None)
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_EXAMPLES:
            raise TaskError(f"load_data must return data with an integer {name} (examples), "
                            f"got {value!r}")
        counts[name] = value
    return {**counts, "n_features": None, "n_classes": None}


def stats_table(config: AgentConfig, data: Any) -> tuple[Any, Any]:
    """(features, labels) for flctl stats: the built-in data's training part,
    or what a task's `table(data)` staticmethod returns for its own data."""
    if isinstance(data, Dataset):
        return data.x_train, data.y_train
    cls = task_class(config.task, Path(config.tasks_dir) if config.tasks_dir else None)
    table = getattr(cls, "table", None)
    if not callable(table):
        raise TaskError(f"task {config.task!r} reads its own data and has no table(data) "
                        f"(features, labels): flctl stats cannot see it")
    try:
        return table(data)
    except Exception as exc:   # the user's code: this host's problem, in one line
        text = " ".join(str(exc).split())
        raise TaskError(f"{config.task}.table: {type(exc).__name__}: {text}") from None
