"""A task for models of any size: one float32 array of `n_params`, whose
local step adds a host-specific constant IN PLACE, so an agent holds one copy
of the model and nothing more. Benchmarks (bench_large_model.py) copy this
file into a workspace's tasks/ directory."""

import numpy as np


class BigTask:
    def __init__(self, n_params=600_000_000):
        self.n_params = int(n_params)
        self.backbone = None

    def load_frozen(self, path):
        """A frozen backbone (bench_large_model --only partial): memory-mapped
        from the host's disk, read by every step, never sent."""
        from pathlib import Path
        p = Path(path)
        self.backbone = np.load(p if p.is_file() else sorted(p.glob("*.npy"))[0],
                                mmap_mode="r")

    def init(self, seed):
        return [np.zeros(self.n_params, dtype=np.float32)]

    def fit(self, weights, data, config):
        step = np.float32(0.001 * (1 + len(data.x_train) % 7))
        if self.backbone is not None:
            step += np.float32(self.backbone[:1000].sum() * 1e-6)
        weights[0] += step          # no second copy of the model
        return [weights[0]], 100, {"train_loss": float(step)}

    def evaluate(self, weights, data, config):
        return 0.0, 100, {"accuracy": 0.0}
