"""flctl.flower: a Flower NumPyClient's three methods as flctl's task contract.

These tests drive the adapter with a client of NumPyClient's shape (no
flwr here); tests/test_lab_frameworks.py runs a real flwr client, listed in
tasks/requirements.txt, on lab hosts.
"""

from __future__ import annotations

import numpy as np
import pytest

from flctl.core.tasks import TaskError
from flctl.flower import FlowerData, FlowerTask


class Client:
    """The shape of a flwr.client.NumPyClient: adds 1 to every weight."""

    made = 0

    def __init__(self, data) -> None:
        Client.made += 1
        self.data = data
        self.configs: list[dict] = []

    def get_parameters(self, config):
        return [np.zeros(3, np.float32), np.ones((2, 2), np.float32)]

    def fit(self, parameters, config):
        self.configs.append(config)
        return [p + 1 for p in parameters], self.data.n_train, {"train_loss": 0.5}

    def evaluate(self, parameters, config):
        return 0.25, self.data.n_test, {"accuracy": 0.75}


class Task(FlowerTask):
    @staticmethod
    def load_data(path, params):
        return FlowerData(path, n_train=40, n_test=10)

    def client(self, data):
        return Client(data)


def test_the_clients_methods_are_the_tasks() -> None:
    task = Task()
    data = Task.load_data("/data", {})
    weights = task.init(3)
    assert [w.shape for w in weights] == [(3,), (2, 2)]
    config = {"epochs": 2, "lr": 0.1, "seed": 3, "round": 4, "device": "cpu",
              "uplink": {"codec": "float32"}}
    new, count, metrics = task.fit(weights, data, config)
    assert count == 40 and metrics == {"train_loss": 0.5}
    assert all(np.array_equal(n, w + 1) for n, w in zip(new, weights))
    assert task.evaluate(new, data, {"round": 4}) == (0.25, 10, {"accuracy": 0.75})
    # Flower's config holds scalars only, and the round under Flower's name too
    seen = task._bound[1].configs[0]
    assert seen == {"epochs": 2, "lr": 0.1, "seed": 3, "round": 4, "device": "cpu",
                    "server_round": 4}
    made = Client.made
    task.fit(weights, data, config)
    assert Client.made == made                      # one client for the host's data


@pytest.mark.parametrize("answer, complaint", [
    ((np.zeros(2), 1), "must return \\(parameters, num_examples, metrics\\)"),
    (([[1.0, 2.0]], 1, {}), "list of numpy arrays"),
    (([np.zeros(2)], -1, {}), "num_examples -1"),
    (([np.zeros(2)], True, {}), "num_examples True"),
    (([np.zeros(2)], 1, [("a", 1)]), "metrics that are not a dict"),
])
def test_a_client_that_breaks_the_contract_is_named(answer, complaint) -> None:
    class Broken(Task):
        def client(self, data):
            client = Client(data)
            client.fit = lambda parameters, config: answer
            return client

    with pytest.raises(TaskError, match=complaint):
        Broken().fit([np.zeros(2)], Task.load_data("/d", {}), {})


def test_something_that_is_not_a_client_is_refused() -> None:
    class NotAClient(Task):
        def client(self, data):
            return object()

    with pytest.raises(TaskError, match="not a NumPyClient \\(no get_parameters, fit, evaluate\\)"):
        NotAClient().init(0)
