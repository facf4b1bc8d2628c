"""A task for tests and benchmarks of round timing: the built-in model, every
fit `delay` seconds longer (standing in for real compute). Copied into a
workspace's tasks/ as slow.py and chosen as `slow:Slow`."""

import time

from flctl.core.tasks import LogRegTask


class Slow(LogRegTask):
    def __init__(self, delay=0.0, **params):
        super().__init__(**params)
        self.delay = float(delay)

    def fit(self, weights, data, config):
        time.sleep(self.delay)
        return super().fit(weights, data, config)
