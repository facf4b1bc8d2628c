"""What the coordinator takes from a host, and how far it believes it.

Hosts answer in JSON headers and arrays; none of it is trusted. The model's
shape comes from the operator's settings, never from a host. Each host's
`info` at discovery is schema-checked and fixes what that host may claim
later: a fit's example count (FedAvg's weight) is at most the training
examples it reported, an evaluation counts at most its test examples, and
losses and accuracies must be finite and in range. A reply's arrays must
have the round's layout before the coordinator reserves memory for them.
A host that breaks any of this is left out (of the run, or of the round)
with a reason; the others carry on.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from flctl.core.aggregation import all_finite
from flctl.core.dtypes import is_number
from flctl.core.frozen import is_sha256
from flctl.core.messages import INFO_SPEC, ArraySpec
from flctl.core.schema import SchemaError, check
from flctl.core.settings import TrainingSettings
from flctl.core.tasks import BUILTIN_TASKS
from flctl.core.text import clean_text
from flctl.errors import TrainingError

SHAPE_PARAMS = ("n_features", "n_classes")
# An encoded update (float16, int8, top-k indices and values) is at most this
# many times the float32 model, plus headers; anything bigger is refused
# before a buffer is reserved for it.
ENCODED_BYTES_FACTOR = 3
ENCODED_OVERHEAD_BYTES = 1 << 16
ENCODED_ARRAYS_PER_WEIGHT = 8



class HostRefused(TrainingError):
    """One host's answer cannot be used; the run goes on without it."""


@dataclass(frozen=True)
class HostProfile:
    """What discovery learnt of a host: the bounds its later replies must keep."""

    name: str
    n_train: int
    n_eval: int   # examples its evaluation may count (test set, else training set)
    frozen: str | None = None       # its frozen part's digest (flctl.core.frozen)
    frozen_bytes: int = 0
    memory: int | None = None       # bytes it says it has available (only to refuse it)


def check_info(name: str, info: Any, training: TrainingSettings,
               task_params: dict[str, Any]) -> HostProfile:
    """The host's profile, or HostRefused saying why it cannot take part."""
    try:
        info = check(info, INFO_SPEC, "info")
    except SchemaError as exc:
        raise HostRefused(f"{name}: bad info answer ({exc.message})") from None
    if info["name"] != name:
        raise HostRefused(f"{name}: its agent answers as {info['name']!r}")
    if info["task"] != training.task:
        raise HostRefused(f"{name}: it runs task {info['task']!r}, not {training.task!r}; "
                          "run `flctl deploy`")
    data = info["data"]
    if data is None:
        raise HostRefused(f"{name}: agent has no data ({info['data_error'] or 'no reason given'})")
    if data["n_train"] < 1:
        raise HostRefused(f"{name}: no training examples")
    params = task_params
    if training.task in BUILTIN_TASKS:
        if data["n_features"] != params.get("n_features"):
            raise HostRefused(f"{name}: its data has {data['n_features']} features; the model "
                              f"takes training.task_params.n_features = "
                              f"{params.get('n_features')}")
        if data["n_classes"] > params.get("n_classes", 0):
            raise HostRefused(f"{name}: its labels go up to {data['n_classes'] - 1}; the model "
                              f"has training.task_params.n_classes = {params.get('n_classes')}")
    if info.get("frozen_error"):
        raise HostRefused(f"{name}: {clean_text(info['frozen_error'])}")
    frozen = info.get("frozen") or {}
    if frozen and not is_sha256(frozen["sha256"]):
        raise HostRefused(f"{name}: bad info answer (info.frozen.sha256: not a sha256)")
    memory = (info.get("memory") or {}).get("available_bytes")
    return HostProfile(name, data["n_train"], data["n_test"] or data["n_train"],
                       frozen.get("sha256"), frozen.get("bytes", 0), memory)


def deployed_task_mismatch(infos: dict[str, Any], training: TrainingSettings) -> str | None:
    """One line when hosts run another task than this run asks for, else None.

    The task an agent runs is fixed at deploy; `--task` cannot change it.
    """
    others = sorted(name for name, info in infos.items()
                    if isinstance(info, dict) and info.get("task") != training.task)
    if not others:
        return None
    running = sorted({str(infos[name].get("task")) for name in others})
    return (f"task {training.task!r} is not deployed on {', '.join(others)} (deployed: "
            f"{', '.join(running)}): set training.task in flctl.yaml and run `flctl deploy`")


def shape_params(training: TrainingSettings, infos: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The task's parameters. A built-in task's shape is the operator's to set
    (training.task_params.n_features and n_classes): a host must not decide how
    big the model is. When they are missing, say what the hosts report."""
    params = dict(training.task_params)
    if training.task not in BUILTIN_TASKS:
        return params
    missing = [key for key in SHAPE_PARAMS if not isinstance(params.get(key), int)
               or isinstance(params.get(key), bool) or params[key] < 1]
    if missing:
        datas = [i.get("data") for i in infos if isinstance(i.get("data"), dict)]
        seen = ", ".join(sorted({f"{d.get('n_features')} features, labels below "
                                 f"{d.get('n_classes')}" for d in datas})) or "nothing"
        raise TrainingError(
            f"training.task_params needs {' and '.join(missing)} for the built-in task "
            f"{training.task!r} (the model's shape is set by you, not by the hosts); the hosts "
            f"report {seen}: add for example `task_params: {{n_features: ..., n_classes: ...}}` "
            f"under training in flctl.yaml")
    return params


def check_fit_counts(profile: HostProfile, num_examples: Any, metrics: Any) -> None:
    """A fit's example count and training loss, within what the host can honestly claim."""
    if isinstance(num_examples, bool) or not isinstance(num_examples, int) \
            or not 1 <= num_examples <= profile.n_train:
        raise TrainingError(f"update rejected: it claims {num_examples!r} examples, the host "
                            f"reported {profile.n_train} at discovery")
    loss = metrics.get("train_loss") if isinstance(metrics, dict) else None
    if loss is not None and (isinstance(loss, bool) or not isinstance(loss, (int, float))
                             or not math.isfinite(loss)):
        raise TrainingError(f"update rejected: train_loss {loss!r} is not a finite number")


def check_evaluation(profile: HostProfile, loss: Any, num_examples: Any,
                     metrics: Any) -> None:
    if isinstance(num_examples, bool) or not isinstance(num_examples, int) \
            or not 1 <= num_examples <= profile.n_eval:
        raise TrainingError(f"evaluation rejected: it claims {num_examples!r} examples, the "
                            f"host has {profile.n_eval}")
    if isinstance(loss, bool) or not isinstance(loss, (int, float)) or not math.isfinite(loss) \
            or loss < 0:
        raise TrainingError(f"evaluation rejected: loss {loss!r} is not a finite number >= 0")
    accuracy = metrics.get("accuracy") if isinstance(metrics, dict) else None
    if accuracy is not None and (isinstance(accuracy, bool)
                                 or not isinstance(accuracy, (int, float))
                                 or not 0.0 <= accuracy <= 1.0):
        raise TrainingError(f"evaluation rejected: accuracy {accuracy!r} is not in [0, 1]")


MAX_NAME_CHARS = 256


def check_names(names: Any, count: int) -> list[str] | None:
    """The names a host's task gives the model's arrays (a PyTorch state dict's
    keys): None, or `count` distinct printable strings; anything else is refused."""
    if names is None:
        return None
    if not isinstance(names, list) or len(names) != count or not all(
            isinstance(n, str) and 0 < len(n) <= MAX_NAME_CHARS and clean_text(n) == n
            and n.isprintable() for n in names) or len(set(names)) != count:
        raise TrainingError(f"initial weights: their names are not {count} distinct printable "
                            f"strings of at most {MAX_NAME_CHARS} characters")
    return list(names)


def check_initial(weights: Sequence[np.ndarray]) -> None:
    """A host's initial model: arrays of numbers, all finite."""
    if not weights:
        raise TrainingError("the initial model has no arrays")
    for i, array in enumerate(weights):
        if not is_number(array.dtype):
            raise TrainingError(f"initial weights: array {i} has dtype {array.dtype}")
        if not all_finite(array):
            raise TrainingError(f"initial weights: array {i} holds NaN or infinite values")


# ------------------------------------------------------------ array layouts


SpecCheck = Callable[[list[ArraySpec]], None]


def expect_weights(weights: Sequence[np.ndarray]) -> SpecCheck:
    """A plain update: exactly the model's arrays, shapes and dtypes."""
    wanted = [(np.dtype(w.dtype), tuple(w.shape)) for w in weights]

    def expect(specs: list[ArraySpec]) -> None:
        got = [(np.dtype(s.dtype), tuple(s.shape)) for s in specs]
        if got != wanted:
            raise TrainingError(f"update rejected: its arrays ({_describe(got)}) are not the "
                                f"model's ({_describe(wanted)})")

    return expect


def expect_encoded(weights: Sequence[np.ndarray]) -> SpecCheck:
    """An encoded delta: its exact layout is the codec's to check after decoding,
    but its size is bounded by the model's before any buffer is reserved."""
    model_bytes = sum(int(w.size) * 4 for w in weights)
    limit = ENCODED_BYTES_FACTOR * model_bytes + ENCODED_OVERHEAD_BYTES
    max_arrays = ENCODED_ARRAYS_PER_WEIGHT * max(1, len(weights))

    def expect(specs: list[ArraySpec]) -> None:
        total = sum(int(s.nbytes) for s in specs)
        if len(specs) > max_arrays or total > limit:
            raise TrainingError(f"update rejected: {len(specs)} arrays of {total} bytes is "
                                f"more than an encoded update of this model can be")

    return expect


def expect_vector(size: int, dtype: type = np.uint32) -> SpecCheck:
    """One flat vector (a masked secure-aggregation update)."""

    def expect(specs: list[ArraySpec]) -> None:
        if len(specs) != 1 or np.dtype(specs[0].dtype) != np.dtype(dtype) \
                or tuple(specs[0].shape) != (size,):
            raise TrainingError(f"masked update rejected: expected one {np.dtype(dtype)} "
                                f"vector of {size} values")

    return expect


def _describe(layout: Sequence[tuple[np.dtype, tuple[int, ...]]]) -> str:
    shown = ", ".join(f"{dtype}{list(shape)}" for dtype, shape in layout[:4])
    return shown + (f", ... ({len(layout)} arrays)" if len(layout) > 4 else "")
