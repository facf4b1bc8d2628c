"""The task contract the agent trains with, the built-in tasks, and loading a user's task.

A task is anything with `init`, `fit` and `evaluate` over `list[np.ndarray]`
weights: the agent never needs to know the model, so users bring their own
(numpy, PyTorch, ...) as a `module:Class` that deploy ships to the hosts.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import inspect
import numbers
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Callable, Protocol, runtime_checkable

import numpy as np

from flctl.core.data import Dataset
from flctl.core.fedstats import Transform
from flctl.core.fsutil import sha256_hex
from flctl.core.models import MLP, LogisticRegression, stable_step
from flctl.core.settings import TrainingSettings
from flctl.core.spooled import FileArray
from flctl.errors import FlctlError

# fit() falls back to the training defaults of flctl.yaml (TrainingSettings
# is their one home), so a config that omits a key trains as documented.
_DEFAULTS = TrainingSettings()
FIT_DEFAULTS: dict[str, Any] = {
    "epochs": _DEFAULTS.epochs,
    "batch_size": _DEFAULTS.batch_size,
    "lr": _DEFAULTS.lr,
    "seed": 0,
    "round": 0,
    # FedProx's mu (the coordinator sends it when the strategy is fedprox); 0 is plain SGD.
    "proximal_mu": 0.0,
    # lr is the largest step: the built-in tasks take at most the data's stable step
    "lr_bound": _DEFAULTS.lr_bound,
}
EVAL_BATCH = 4096

REQUIRED_METHODS = ("init", "fit", "evaluate")


class TaskError(FlctlError):
    """A task cannot be loaded, or was given weights, data or settings it cannot use."""


@runtime_checkable
class Task(Protocol):
    def init(self, seed: int) -> list[np.ndarray]: ...

    def fit(self, weights: list[np.ndarray], data: Dataset,
            config: dict) -> tuple[list[np.ndarray], int, dict]: ...

    def evaluate(self, weights: list[np.ndarray], data: Dataset,
                 config: dict) -> tuple[float, int, dict]: ...


def check_weights(weights: Sequence[np.ndarray], reference: Sequence[np.ndarray]) -> None:
    """Refuse weights whose layout differs from `reference` (count, shapes, dtypes)."""
    if len(weights) != len(reference):
        raise TaskError(f"expected {len(reference)} weight arrays, got {len(weights)}")
    for i, (got, want) in enumerate(zip(weights, reference)):
        if not isinstance(got, (np.ndarray, FileArray)):
            raise TaskError(f"weight array {i}: expected a numpy array, got {type(got).__name__}")
        if got.shape != want.shape:
            raise TaskError(f"weight array {i}: expected shape {want.shape}, got {got.shape}")
        if got.dtype != want.dtype:
            raise TaskError(f"weight array {i}: expected dtype {want.dtype}, got {got.dtype}")


class _SGDTask:
    """Plain mini-batch SGD over the local data for a model with loss_and_grads/predict_proba.

    With a `transform` (the federated mean and scale, flctl.core.fedstats),
    features are standardised and missing values filled with the mean
    before the model sees them, the same on every host and at evaluation.
    """

    def __init__(self, model: LogisticRegression | MLP,
                 transform: dict[str, Any] | None = None) -> None:
        self.model = model
        # Zero-size-cost stand-ins for check_weights: shapes and dtype only.
        self._reference = [np.empty(shape, dtype=np.float32) for shape in model.param_shapes()]
        try:
            self.transform = None if transform is None else \
                Transform.from_params(transform, model.n_features)
        except ValueError as exc:
            raise TaskError(str(exc)) from None
        # per data array (the agent's data stay the same objects between rounds)
        self._transformed: dict[int, tuple[np.ndarray, Any]] = {}
        self._steps: dict[int, tuple[np.ndarray, Any]] = {}

    def _step(self, x: np.ndarray, lr: float, bound: bool) -> float:
        """`lr`, or on standardised data its stable step when that is smaller
        (models.stable_step; computed once per array). On raw data the bound
        is the data's scale, not the step that works (saturated softmax
        learns at far larger steps): the user's lr goes as given."""
        if not bound or self.transform is None:
            return lr
        return min(lr, _once_per_array(self._steps, x, stable_step))

    def init(self, seed: int) -> list[np.ndarray]:
        return self.model.init_params(np.random.default_rng(seed))

    def fit(self, weights: list[np.ndarray], data: Dataset,
            config: dict) -> tuple[list[np.ndarray], int, dict]:
        """New weights, the number of local training examples (FedAvg's weight), train_loss.

        train_loss is the example-weighted mean of the mini-batch losses of the last epoch
        (the data loss: without FedProx's proximal term, so runs stay comparable).
        With config "proximal_mu" = mu > 0 (FedProx), each step descends the loss
        plus mu/2 * ||w - w_global||^2, whose gradient mu * (w - w_global) keeps
        the local model near the global one on skewed data.
        """
        check_weights(weights, self._reference)
        settings = _fit_settings(config)
        x, y = self._checked(data.x_train, data.y_train, "training")
        n = x.shape[0]
        if n == 0:
            raise TaskError("no training examples")
        params = [w.copy() for w in weights]
        step = self._step(x, float(settings["lr"]), bool(settings["lr_bound"]))
        lr = np.float32(step)
        mu = np.float32(settings["proximal_mu"])
        batch = settings["batch_size"]
        # Seeded by (seed, round) so a resumed run replays the same shuffles.
        rng = np.random.default_rng([settings["seed"], settings["round"]])
        loss_sum = 0.0
        # Overflow is detected below and reported as divergence, not as warnings.
        with np.errstate(over="ignore", invalid="ignore"):
            for _ in range(settings["epochs"]):
                order = rng.permutation(n)
                loss_sum = 0.0
                for start in range(0, n, batch):
                    idx = order[start:start + batch]
                    loss, grads = self.model.loss_and_grads(params, x[idx], y[idx])
                    loss_sum += loss * len(idx)
                    if mu > 0:
                        grads = [g + mu * (p - w) for g, p, w in zip(grads, params, weights)]
                    for p, g in zip(params, grads):
                        p -= lr * g
            finite = np.isfinite(loss_sum) and all(np.all(np.isfinite(p)) for p in params)
        if not finite:
            raise TaskError(f"training diverged (non-finite loss or weights); lower lr "
                            f"(now {settings['lr']}, step {step:.4g})")
        return params, n, {"train_loss": loss_sum / n, "lr": step}

    def evaluate(self, weights: list[np.ndarray], data: Dataset,
                 config: dict) -> tuple[float, int, dict]:
        """Mean cross-entropy (no L2) and accuracy on the local test data, else the train data."""
        check_weights(weights, self._reference)
        if data.x_test is not None and data.y_test is not None and data.n_test > 0:
            x, y = self._checked(data.x_test, data.y_test, "test")
        else:
            x, y = self._checked(data.x_train, data.y_train, "training")
        n = x.shape[0]
        if n == 0:
            raise TaskError("no examples to evaluate on")
        loss_sum = 0.0
        correct = 0
        for start in range(0, n, EVAL_BATCH):
            xb, yb = x[start:start + EVAL_BATCH], y[start:start + EVAL_BATCH]
            proba = self.model.predict_proba(weights, xb)
            picked = proba[np.arange(len(yb)), yb].astype(np.float64)
            loss_sum -= float(np.log(np.maximum(picked, 1e-12)).sum())
            correct += int((proba.argmax(axis=1) == yb).sum())
        return loss_sum / n, n, {"accuracy": correct / n}

    def _checked(self, x: np.ndarray, y: np.ndarray, part: str) -> tuple[np.ndarray, np.ndarray]:
        if x.ndim != 2 or x.shape[1] != self.model.n_features:
            raise TaskError(f"{part} data has shape {x.shape}; this task expects "
                            f"{self.model.n_features} features per example")
        if y.shape != (x.shape[0],):
            raise TaskError(f"{part} labels have shape {y.shape}, expected ({x.shape[0]},)")
        if y.size and (y.min() < 0 or y.max() >= self.model.n_classes):
            raise TaskError(f"{part} labels must be in 0..{self.model.n_classes - 1}, "
                            f"found {int(y.min())}..{int(y.max())}")
        return self._prepared(x), y.astype(np.int64, copy=False)

    def _prepared(self, x: np.ndarray) -> np.ndarray:
        """`x` as the model takes it: transformed once per array (then kept)."""
        if self.transform is None:
            if np.isnan(x).any():
                raise TaskError("the data has missing values: they are filled with the "
                                "federated mean when training.standardize is on (or auto)")
            return x.astype(np.float32, copy=False)
        return _once_per_array(self._transformed, x, self.transform.apply)


def _once_per_array(cache: dict[int, tuple[np.ndarray, Any]], x: np.ndarray,
                    make: Callable[[np.ndarray], Any]) -> Any:
    """make(x), computed once per array object (the cache holds x, so its id
    cannot be reused by another array while the entry lives)."""
    cached = cache.get(id(x))
    if cached is None or cached[0] is not x:
        cached = (x, make(x))
        cache[id(x)] = cached
    return cached[1]


def _fit_settings(config: dict) -> dict[str, Any]:
    settings = dict(FIT_DEFAULTS)
    settings.update({k: v for k, v in (config or {}).items() if k in FIT_DEFAULTS})
    for key in ("epochs", "batch_size"):
        value = settings[key]
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise TaskError(f"fit config {key!r} must be a positive integer, got {value!r}")
    for key in ("seed", "round"):
        value = settings[key]
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise TaskError(f"fit config {key!r} must be a non-negative integer, got {value!r}")
    lr = settings["lr"]
    if isinstance(lr, bool) or not isinstance(lr, numbers.Real) or not 0 < lr < float("inf"):
        raise TaskError(f"fit config 'lr' must be a positive number, got {lr!r}")
    if not isinstance(settings["lr_bound"], bool):
        raise TaskError(f"fit config 'lr_bound' must be true or false, "
                        f"got {settings['lr_bound']!r}")
    mu = settings["proximal_mu"]
    if isinstance(mu, bool) or not isinstance(mu, numbers.Real) or not 0 <= mu < float("inf"):
        raise TaskError(f"fit config 'proximal_mu' must be a number >= 0, got {mu!r}")
    return settings


class LogRegTask(_SGDTask):
    """Softmax logistic regression trained with mini-batch SGD."""

    def __init__(self, n_features: int = 64, n_classes: int = 10, l2: float = 1e-4,
                 transform: dict[str, Any] | None = None) -> None:
        super().__init__(LogisticRegression(n_features, n_classes, l2), transform)


class MLPTask(_SGDTask):
    """ReLU MLP trained with mini-batch SGD."""

    def __init__(self, n_features: int = 64, n_classes: int = 10,
                 hidden: Sequence[int] = (64,), l2: float = 1e-4,
                 transform: dict[str, Any] | None = None) -> None:
        super().__init__(MLP(n_features, n_classes, hidden, l2), transform)


BUILTIN_TASKS: dict[str, type] = {"logreg": LogRegTask, "mlp": MLPTask}


_MODULE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*\Z")
_CLASS_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


def task_class(name: str, tasks_dir: Path | None = None) -> type:
    """The class of a built-in task, or of a user's task given as "pkg.mod:Class".

    A user's task is imported from `tasks_dir` (where deploy put the
    workspace's tasks/) and from nowhere else (_tasks_package). What it
    names must be a class with init, fit and evaluate before anything of it
    is called.
    """
    if name in BUILTIN_TASKS:
        return BUILTIN_TASKS[name]
    if ":" in name:
        return _import_class(name, tasks_dir)
    raise TaskError(f"unknown task {name!r}: use one of {', '.join(sorted(BUILTIN_TASKS))} "
                    f"or 'module:Class'")


def data_loader(cls: type) -> Callable[[str, dict[str, Any]], Any] | None:
    """A task's own data loader, `load_data(path, params)` (a staticmethod), if it
    has one; tasks without one train on the built-in .npz/CSV files."""
    loader = getattr(cls, "load_data", None)
    return loader if callable(loader) else None


def load_task(name: str, params: dict | None = None, tasks_dir: Path | None = None) -> Task:
    """Instantiate `task_class(name, tasks_dir)` with `params`."""
    params = dict(params or {})
    cls = task_class(name, tasks_dir)
    try:
        task = cls(**params)
    except (TypeError, ValueError) as exc:
        raise TaskError(f"task {name!r}: bad params {params}: {exc}") from exc
    except FlctlError:
        raise
    except Exception as exc:
        raise TaskError(f"task {name!r}: constructor failed: {type(exc).__name__}: {exc}") \
            from exc
    return task


def attach_frozen(task: Task, name: str, path: str) -> None:
    """Give `task` its frozen part (flctl.core.frozen) through its
    `load_frozen(path)`; a task without one cannot take a frozen part."""
    load = getattr(task, "load_frozen", None)
    if not callable(load):
        raise TaskError(f"task {name!r} takes no frozen part (it has no load_frozen(path)), "
                        f"but this host has one at {path}")
    try:
        load(path)
    except FlctlError:
        raise
    except Exception as exc:
        raise TaskError(f"task {name!r}: cannot load the frozen part {path}: "
                        f"{type(exc).__name__}: {exc}") from exc


def _tasks_package(folder: Path) -> str:
    """A package whose only search path is `folder`: a user's task module is
    imported as a submodule of it, so it can come from that folder and from
    nowhere else, and never collides with (or replaces) a module of the same
    name elsewhere, nor with another workspace's tasks in the same process."""
    name = "flctl_tasks_" + sha256_hex(str(folder))[:16]
    if name not in sys.modules:
        spec = importlib.machinery.ModuleSpec(name, None, is_package=True)
        spec.submodule_search_locations = [str(folder)]
        package = importlib.util.module_from_spec(spec)
        sys.modules[name] = package
    return name


def _import_class(name: str, tasks_dir: Path | None) -> type:
    module_name, _, class_name = name.partition(":")
    if not _MODULE_NAME.match(module_name) or not _CLASS_NAME.match(class_name):
        raise TaskError(f"task {name!r}: expected 'module:Class' (Python names)")
    if tasks_dir is None:
        raise TaskError(f"task {name!r}: no tasks folder is deployed here")
    folder = Path(tasks_dir).resolve()
    top = module_name.split(".")[0]
    if importlib.machinery.PathFinder.find_spec(top, [str(folder)]) is None:
        raise TaskError(f"task {name!r}: no module {top!r} in the tasks folder {folder}")
    package = _tasks_package(folder)
    saved = list(sys.path)
    sys.path.insert(0, str(folder))   # the task's own plain sibling imports resolve there
    try:
        importlib.invalidate_caches()  # deploy may have just written the module
        module = importlib.import_module(f"{package}.{module_name}")
    except ModuleNotFoundError as exc:
        raise TaskError(f"task {name!r}: importing {module_name!r} failed: no module named "
                        f"{exc.name!r} (list it in tasks/requirements.txt, or set the host's "
                        f"python: to an interpreter that has it)") from exc
    except Exception as exc:
        raise TaskError(f"task {name!r}: importing {module_name!r} failed: "
                        f"{type(exc).__name__}: {exc}") from exc
    finally:
        sys.path[:] = saved
    cls = getattr(module, class_name, None)
    if cls is None:
        raise TaskError(f"task {name!r}: module {module_name!r} has no {class_name!r}")
    if not inspect.isclass(cls):
        raise TaskError(f"task {name!r}: {class_name!r} is not a class")
    missing = [m for m in REQUIRED_METHODS if not callable(getattr(cls, m, None))]
    if missing:
        raise TaskError(f"task {name!r} lacks method(s) {', '.join(missing)}; a task needs "
                        f"init(seed), fit(weights, data, config), evaluate(weights, data, config)")
    return cls
