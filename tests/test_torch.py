"""flctl.torch: a PyTorch model's state dict as flctl's weights and back.

Every dtype a model carries survives bit for bit (bfloat16 included, which
numpy lacks), CPU tensors are shared rather than copied, and a TorchTask
trains a real model through flctl's task contract reproducibly.
"""

from __future__ import annotations

import socket

import numpy as np
import pytest
import torch

from flctl.coordinator.records import load_weights, weights_npz
from flctl.core.messages import Message
from flctl.core.strategies import make_strategy
from flctl.net.framing import recv_message, send_message
from flctl.torch import TorchData, TorchTask, federated_keys, from_arrays, to_arrays


class Mixed(torch.nn.Module):
    """Every kind of state a real model has."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 4, 3)
        self.norm = torch.nn.BatchNorm2d(4)
        self.small = torch.nn.Parameter(torch.randn(5).half())
        self.brain = torch.nn.Parameter(torch.randn(7).to(torch.bfloat16))
        self.register_buffer("flags", torch.tensor([True, False, True]))


def test_every_dtype_round_trips_bit_for_bit(tmp_path) -> None:
    torch.manual_seed(0)
    model = Mixed()
    keys = federated_keys(model)
    arrays = to_arrays(model.state_dict(), keys)
    dtypes = {k: str(a.dtype) for k, a in zip(keys, arrays)}
    assert dtypes["brain"] == "bfloat16" and dtypes["small"] == "float16"
    assert dtypes["norm.num_batches_tracked"] == "int64" and dtypes["flags"] == "bool"
    # over the wire and through a checkpoint file, then back into a fresh model
    a, b = socket.socketpair()
    with a, b:
        send_message(a, Message("m", {}, arrays))
        received = recv_message(b)[0].arrays
    with open(tmp_path / "w.npz", "wb") as handle:
        weights_npz(received)(handle)
    loaded = load_weights(tmp_path / "w.npz")
    other = Mixed()
    from_arrays(other, loaded, keys)
    for name, tensor in model.state_dict().items():
        got = other.state_dict()[name]
        assert got.dtype == tensor.dtype
        assert torch.equal(got.view(torch.int16) if got.dtype == torch.bfloat16 else got,
                           tensor.view(torch.int16) if tensor.dtype == torch.bfloat16 else tensor)


def test_cpu_tensors_are_shared_not_copied() -> None:
    model = torch.nn.Linear(1000, 100)
    keys = federated_keys(model)
    arrays = to_arrays(model.state_dict(), keys)
    assert arrays[0].ctypes.data == model.weight.data_ptr()
    brain = torch.randn(4).to(torch.bfloat16)
    assert to_arrays({"b": brain}, ["b"])[0].ctypes.data == brain.data_ptr()


def test_mismatches_are_named() -> None:
    model = torch.nn.Linear(3, 2)
    keys = federated_keys(model)
    with pytest.raises(ValueError, match="weight: shape"):
        from_arrays(model, [np.zeros((2, 4), np.float32), np.zeros(2, np.float32)], keys)
    with pytest.raises(ValueError, match="bias: torch.float64 does not match"):
        from_arrays(model, [np.zeros((2, 3), np.float32), np.zeros(2)], keys)
    with pytest.raises(KeyError, match="nope"):
        federated_keys(model, exclude=["nope"])
    kept = federated_keys(Mixed(), exclude=["norm.num_batches_tracked"])
    assert "norm.num_batches_tracked" not in kept and "norm.running_var" in kept


def test_strategies_keep_buffers_meaningful() -> None:
    """Integer buffers take the rounded example-weighted mean, booleans the
    majority, bfloat16 is averaged as the floats it holds; server optimisers
    step only the floats."""
    torch.manual_seed(1)
    models = [Mixed() for _ in range(3)]
    keys = federated_keys(models[0])
    for model, batches, flags in zip(models, (10, 11, 11), ([1, 0, 1], [1, 1, 0], [0, 1, 0])):
        model.norm.num_batches_tracked.fill_(batches)
        model.flags.copy_(torch.tensor(flags, dtype=torch.bool))
    updates = [to_arrays(m.state_dict(), keys) for m in models]
    start = [a.copy() for a in updates[0]]
    index = {k: i for i, k in enumerate(keys)}
    for name in ("fedavg", "fedadam", "fedmedian"):
        strategy = make_strategy(name, {})
        round_ = strategy.start_round(start, 1)
        for i, update in enumerate(updates):
            round_.add(f"h{i}", update, [1, 1, 2][i])
        result = round_.result()
        assert [r.dtype for r in result] == [u.dtype for u in start], name
        assert int(result[index["norm.num_batches_tracked"]]) == 11, name   # 10.75 -> 11
        # weighted votes 2/4, 3/4 and 1/4 true: a tie counts as true
        assert result[index["flags"]].tolist() == [True, True, False], name
        brain = result[index["brain"]].astype(np.float32)
        mean = np.mean([u[index["brain"]].astype(np.float32) for u in updates], axis=0)
        if name == "fedavg":
            weighted = sum(u[index["brain"]].astype(np.float64) * w
                           for u, w in zip(updates, [1, 1, 2])) / 4
            np.testing.assert_allclose(brain, weighted, rtol=1e-2)
        assert np.isfinite(brain).all() and mean.shape == brain.shape


class Tiny(TorchTask):
    def model(self) -> torch.nn.Module:
        return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))

    @staticmethod
    def load_data(path: str, params: dict) -> TorchData:
        g = torch.Generator().manual_seed(int(params.get("seed", 0)))
        x = torch.randn(64, 4, generator=g)
        y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y),
                                             batch_size=16, shuffle=True)
        return TorchData(loader, loader)

    def train(self, model, data, config):
        optimizer = torch.optim.SGD(model.parameters(), lr=config["lr"])
        total = 0.0
        for x, y in data.train:
            optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x.to(self.device)), y.to(self.device))
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(y)
        return {"train_loss": total / data.n_train}

    def test(self, model, data, config):
        x, y = data.test.dataset.tensors
        logits = model(x.to(self.device))
        correct = (logits.argmax(1) == y.to(self.device)).float().mean()
        return float(torch.nn.functional.cross_entropy(logits, y)), {"accuracy": float(correct)}


def test_a_torch_task_trains_through_flctls_contract_reproducibly() -> None:
    data = Tiny.load_data("unused", {"seed": 3})
    config = {"seed": 7, "round": 2, "lr": 0.5, "device": "cpu"}
    weights = Tiny().init(7)
    first, n, metrics = Tiny().fit([w.copy() for w in weights], data, config)
    again, _, _ = Tiny().fit([w.copy() for w in weights], data, config)
    assert n == 64 and metrics["train_loss"] > 0
    assert all(np.array_equal(a, b) for a, b in zip(first, again))   # seeded: bit for bit
    assert not all(np.array_equal(a, w) for a, w in zip(first, weights))
    before, _, _ = Tiny().evaluate(weights, data, config)
    after, count, scores = Tiny().evaluate(first, data, config)
    assert count == 64 and after < before and 0 <= scores["accuracy"] <= 1
    assert all(np.array_equal(a, b) for a, b in zip(Tiny().init(7), Tiny().init(7)))


def test_a_fit_does_not_depend_on_what_the_agent_did_before() -> None:
    """An agent keeps its task between runs; a resumed run must shuffle as the
    first did, whether or not this agent built the model in an earlier call."""
    data = Tiny.load_data("unused", {"seed": 3})
    config = {"seed": 7, "round": 5, "lr": 0.5, "device": "cpu"}
    weights = Tiny().init(7)
    fresh, _, _ = Tiny().fit([w.copy() for w in weights], data, config)
    busy = Tiny()
    busy.fit([w.copy() for w in weights], data, {**config, "round": 4})
    busy.evaluate(weights, data, config)
    later, _, _ = busy.fit([w.copy() for w in weights], data, config)
    assert all(np.array_equal(a, b) for a, b in zip(fresh, later))
