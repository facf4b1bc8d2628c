"""A task whose local step is one pass over the weights: what benchmarks use
to measure flctl's own cost (transport, framing, aggregation) rather than
a model's. Benchmarks copy this file into a workspace's tasks/ directory."""

import numpy as np


class EchoTask:
    def __init__(self, n_params=1_000_000):
        self.n_params = int(n_params)

    def init(self, seed):
        return [np.zeros(self.n_params, dtype=np.float32)]

    def fit(self, weights, data, config):
        return [weights[0] + np.float32(0.001)], 100, {"train_loss": 0.0}

    def evaluate(self, weights, data, config):
        return 0.0, 100, {"accuracy": 0.0}
