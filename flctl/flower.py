"""Run an existing Flower `NumPyClient` as a flctl task, its code unchanged.

A Flower client already does what a flctl task does, on the same lists of
numpy arrays: `get_parameters(config)` gives a model, `fit(parameters,
config)` trains it and `evaluate(parameters, config)` scores it. This
adapter calls those three methods; flctl does the rest (deploy, keys,
firewall, rounds, checkpoints). List `flwr` in tasks/requirements.txt (the
client's module imports it on the hosts) and write, next to the client:

    from flctl.flower import FlowerData, FlowerTask
    from .client import FlowerClient, Net, load_loaders   # the Flower code as it is

    class Digits(FlowerTask):
        @staticmethod
        def load_data(path, params):
            train, val = load_loaders(path)
            return FlowerData((train, val), n_train=len(train.dataset),
                              n_test=len(val.dataset))

        def client(self, data):
            if data is None:                  # only the first model is wanted
                return FlowerClient(Net(), None, None)
            return FlowerClient(Net(), *data.value)

The config a Flower client receives carries flctl's settings (epochs,
batch_size, lr, seed, round, device) and Flower's usual `server_round`.
Seeding is the client's own business, as it is under Flower: a run resumes
from the exact checkpoint, but whether later rounds repeat bit for bit
depends on the client. Nothing here imports flwr.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Any

import numpy as np

from flctl.core.tasks import TaskError

__all__ = ["FlowerData", "FlowerTask"]

# Flower's config values are Scalars; flctl's other settings stay with flctl.
_SCALARS = (bool, int, float, str, bytes)


@dataclass
class FlowerData:
    """What `load_data` returns: whatever the client is built from (`value`),
    and the example counts the coordinator holds the host's claims to."""

    value: Any
    n_train: int
    n_test: int = 0


class FlowerTask:
    """A flctl task around a Flower NumPyClient. Subclass it with `load_data`
    (a staticmethod returning FlowerData) and `client(data)`, which builds the
    client from that data, or from None when only `get_parameters` is asked."""

    def __init__(self, **params: Any) -> None:
        self.params = params
        self._bound: tuple[FlowerData | None, Any] | None = None

    @staticmethod
    def load_data(path: str, params: dict[str, Any]) -> FlowerData:
        raise NotImplementedError("FlowerTask.load_data(path, params) must return FlowerData")

    def client(self, data: FlowerData | None) -> Any:
        raise NotImplementedError("FlowerTask.client(data) must return the NumPyClient")

    def flower_config(self, config: dict[str, Any]) -> dict[str, Any]:
        """The config the client gets: flctl's scalar settings and `server_round`.
        A client that reads other keys (those its Flower server's
        on_fit_config_fn sent, say `local_epochs`) gets them by overriding this."""
        plain = {k: v for k, v in config.items() if isinstance(v, _SCALARS)}
        if "round" in plain:
            plain["server_round"] = plain["round"]
        return plain

    # ------------------------------------------------------------ flctl's contract

    def _client(self, data: FlowerData | None) -> Any:
        if self._bound is None or self._bound[0] is not data:
            made = self.client(data)
            missing = [m for m in ("get_parameters", "fit", "evaluate")
                       if not callable(getattr(made, m, None))]
            if missing:
                raise TaskError(f"{type(self).__name__}.client() returned a "
                                f"{type(made).__name__}, not a NumPyClient (no "
                                f"{', '.join(missing)})")
            self._bound = (data, made)    # a host has one data set: one client for it
        return self._bound[1]

    def init(self, seed: int) -> list[np.ndarray]:
        parameters = self._client(None).get_parameters({"seed": seed})
        return [np.array(p, copy=True) for p in _arrays(parameters, "get_parameters")]

    def fit(self, weights: list[np.ndarray], data: FlowerData,
            config: dict[str, Any]) -> tuple[list[np.ndarray], int, dict[str, Any]]:
        answer = self._client(data).fit(weights, self.flower_config(config))
        if not isinstance(answer, tuple) or len(answer) != 3:
            raise TaskError("the Flower client's fit() must return (parameters, "
                            "num_examples, metrics)")
        parameters, examples, metrics = answer
        return _arrays(parameters, "fit"), _count(examples, "fit"), _metrics(metrics, "fit")

    def evaluate(self, weights: list[np.ndarray], data: FlowerData,
                 config: dict[str, Any]) -> tuple[float, int, dict[str, Any]]:
        answer = self._client(data).evaluate(weights, self.flower_config(config))
        if not isinstance(answer, tuple) or len(answer) != 3:
            raise TaskError("the Flower client's evaluate() must return (loss, "
                            "num_examples, metrics)")
        loss, examples, metrics = answer
        if not isinstance(loss, numbers.Real):
            raise TaskError(f"the Flower client's evaluate() returned a loss of type "
                            f"{type(loss).__name__}")
        return float(loss), _count(examples, "evaluate"), _metrics(metrics, "evaluate")


def _arrays(parameters: Any, method: str) -> list[np.ndarray]:
    if not isinstance(parameters, (list, tuple)) or not all(
            isinstance(p, np.ndarray) for p in parameters):
        raise TaskError(f"the Flower client's {method}() must return a list of numpy arrays")
    return list(parameters)


def _count(examples: Any, method: str) -> int:
    if isinstance(examples, bool) or not isinstance(examples, numbers.Integral) or examples < 0:
        raise TaskError(f"the Flower client's {method}() returned num_examples {examples!r}")
    return int(examples)


def _metrics(metrics: Any, method: str) -> dict[str, Any]:
    if metrics is None:
        return {}
    if not isinstance(metrics, dict):
        raise TaskError(f"the Flower client's {method}() returned metrics that are not a dict")
    return dict(metrics)
