"""Numpy models (gradients, shapes, learning) and the task contract built on them."""

from __future__ import annotations

import sys
import textwrap

import numpy as np
import pytest

from flctl.core.data import Dataset, load_digits
from flctl.core.models import MLP, LogisticRegression
from flctl.core.settings import TrainingSettings
from flctl.core.tasks import (
    BUILTIN_TASKS,
    LogRegTask,
    MLPTask,
    Task,
    TaskError,
    check_weights,
    load_task,
)


def numerical_grads(model, params, x, y, eps=1e-6):
    grads = []
    for p in params:
        g = np.zeros_like(p)
        flat, gflat = p.reshape(-1), g.reshape(-1)
        for i in range(flat.size):
            saved = flat[i]
            flat[i] = saved + eps
            up, _ = model.loss_and_grads(params, x, y)
            flat[i] = saved - eps
            down, _ = model.loss_and_grads(params, x, y)
            flat[i] = saved
            gflat[i] = (up - down) / (2 * eps)
        grads.append(g)
    return grads


def relative_error(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(a) + np.linalg.norm(b), 1e-12))


@pytest.mark.parametrize("model", [
    LogisticRegression(6, 4, l2=0.1),
    MLP(6, 4, hidden=(5,), l2=0.1),
    MLP(6, 4, hidden=(7, 5), l2=0.05),
], ids=["logreg", "mlp-1", "mlp-2"])
def test_gradients_match_central_differences(model):
    rng = np.random.default_rng(3)
    params = [p.astype(np.float64) + rng.normal(0, 0.3, p.shape)
              for p in model.init_params(rng)]
    x = rng.normal(size=(9, 6))
    y = rng.integers(0, 4, size=9)
    _, analytic = model.loss_and_grads(params, x, y)
    numeric = numerical_grads(model, params, x, y)
    for a, n in zip(analytic, numeric):
        assert a.dtype == np.float64
        assert relative_error(a, n) < 1e-4


def test_l2_term_is_in_the_loss():
    model_plain = LogisticRegression(3, 2, l2=0.0)
    model_l2 = LogisticRegression(3, 2, l2=2.0)
    w = np.array([[1.0, -1.0], [0.5, 0.0], [0.0, 2.0]])
    params = [w, np.zeros(2)]
    x, y = np.ones((4, 3)), np.array([0, 1, 0, 1])
    plain, _ = model_plain.loss_and_grads(params, x, y)
    with_l2, _ = model_l2.loss_and_grads(params, x, y)
    assert with_l2 - plain == pytest.approx(0.5 * 2.0 * float(np.sum(w * w)))


@pytest.mark.parametrize("model", [LogisticRegression(64, 10), MLP(64, 10, hidden=(32, 16))])
def test_float32_in_float32_out_and_probabilities(model):
    params = model.init_params(np.random.default_rng(0))
    assert all(p.dtype == np.float32 for p in params)
    assert [p.shape for p in params] == model.param_shapes()
    x, y = load_digits()
    loss, grads = model.loss_and_grads(params, x[:50], y[:50])
    assert np.isfinite(loss)
    assert [g.shape for g in grads] == [p.shape for p in params]
    assert all(g.dtype == np.float32 for g in grads)
    proba = model.predict_proba(params, x[:50])
    assert proba.shape == (50, 10)
    assert proba.dtype == np.float32
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, rtol=1e-5)
    assert np.all(proba >= 0)


def test_he_init_scale_and_determinism():
    model = MLP(400, 10, hidden=(300,))
    a = model.init_params(np.random.default_rng(7))
    b = model.init_params(np.random.default_rng(7))
    c = model.init_params(np.random.default_rng(8))
    assert all(np.array_equal(p, q) for p, q in zip(a, b))
    assert not np.array_equal(a[0], c[0])
    assert a[0].std() == pytest.approx(np.sqrt(2 / 400), rel=0.05)
    assert a[2].std() == pytest.approx(np.sqrt(2 / 300), rel=0.05)
    assert not a[1].any() and not a[3].any()


@pytest.mark.parametrize("bad", [dict(n_features=0, n_classes=3), dict(n_features=3, n_classes=-1),
                                 dict(n_features=3, n_classes=2, l2=-1.0),
                                 dict(n_features=3, n_classes=2, hidden=(4, 0))])
def test_models_reject_bad_hyperparameters(bad):
    with pytest.raises(ValueError):
        MLP(**bad)


@pytest.mark.parametrize("task", [LogRegTask(), MLPTask(hidden=(32,))], ids=["logreg", "mlp"])
def test_sgd_decreases_loss_on_digits(task):
    x, y = load_digits()
    data = Dataset(x[:1200], y[:1200])
    weights = task.init(0)
    before, n_before, metrics_before = task.evaluate(weights, data, {})
    trained, n_used, fit_metrics = task.fit(weights, data, {"epochs": 3, "lr": 0.1, "seed": 1})
    after, n_after, metrics_after = task.evaluate(trained, data, {})
    assert n_used == n_before == n_after == 1200
    assert after < 0.5 * before
    assert metrics_after["accuracy"] > metrics_before["accuracy"] + 0.5
    assert 0 < fit_metrics["train_loss"] < before


def test_fit_is_reproducible_and_leaves_input_untouched():
    task = LogRegTask()
    x, y = load_digits()
    data = Dataset(x[:300], y[:300])
    weights = task.init(1)
    original = [w.copy() for w in weights]
    a, _, _ = task.fit(weights, data, {"seed": 5, "round": 2})
    b, _, _ = task.fit(weights, data, {"seed": 5, "round": 2})
    c, _, _ = task.fit(weights, data, {"seed": 5, "round": 3})
    assert all(np.array_equal(w, o) for w, o in zip(weights, original))
    assert all(np.array_equal(p, q) for p, q in zip(a, b))
    assert not np.array_equal(a[0], c[0])  # the round changes the shuffle
    assert all(p.dtype == np.float32 for p in a)


def test_evaluate_prefers_test_data():
    task = LogRegTask()
    x, y = load_digits()
    weights, _, _ = task.fit(task.init(0), Dataset(x[:500], y[:500]), {"epochs": 5})
    with_test = Dataset(x[:500], y[:500], x[500:520], y[500:520])
    _, n, _ = task.evaluate(weights, with_test, {})
    assert n == 20
    _, n, _ = task.evaluate(weights, Dataset(x[:500], y[:500]), {})
    assert n == 500
    wrong = Dataset(x[:500], y[:500], x[500:520], (y[500:520] + 1) % 10)
    assert task.evaluate(weights, wrong, {})[2]["accuracy"] < 0.3


@pytest.mark.parametrize("config, fragment", [
    ({"epochs": 0}, "'epochs'"), ({"batch_size": 2.5}, "'batch_size'"),
    ({"lr": -1}, "'lr'"), ({"lr": "fast"}, "'lr'"), ({"round": -1}, "'round'"),
])
def test_fit_rejects_bad_config(config, fragment):
    task = LogRegTask()
    x, y = load_digits()
    with pytest.raises(TaskError, match=fragment):
        task.fit(task.init(0), Dataset(x[:40], y[:40]), config)


def test_fit_rejects_data_and_weights_it_cannot_use():
    task = LogRegTask()
    x, y = load_digits()
    with pytest.raises(TaskError, match="64 features"):
        task.fit(task.init(0), Dataset(x[:40, :10], y[:40]), {})
    with pytest.raises(TaskError, match=r"labels must be in 0\.\.9"):
        task.fit(task.init(0), Dataset(x[:40], y[:40] + 5), {})
    with pytest.raises(TaskError, match="diverged"):
        task.fit(task.init(0), Dataset(x[:200] * 1e4, y[:200]), {"lr": 1e6, "lr_bound": False})
    with pytest.raises(TaskError, match="expected 2 weight arrays, got 4"):
        task.fit(MLPTask().init(0), Dataset(x[:40], y[:40]), {})
    with pytest.raises(TaskError, match="no training examples"):
        task.fit(task.init(0), Dataset(x[:0], y[:0]), {})


def test_check_weights():
    ref = [np.zeros((3, 2), np.float32), np.zeros(2, np.float32)]
    check_weights([np.ones((3, 2), np.float32), np.ones(2, np.float32)], ref)
    with pytest.raises(TaskError, match="expected 2 weight arrays, got 1"):
        check_weights(ref[:1], ref)
    with pytest.raises(TaskError, match=r"weight array 0: expected shape \(3, 2\), got \(2, 3\)"):
        check_weights([np.zeros((2, 3), np.float32), ref[1]], ref)
    with pytest.raises(TaskError, match="weight array 1: expected dtype float32, got float64"):
        check_weights([ref[0], np.zeros(2)], ref)
    with pytest.raises(TaskError, match="numpy array"):
        check_weights([ref[0], [0.0, 0.0]], ref)


def test_default_training_is_what_fit_uses():
    defaults = TrainingSettings()
    task = LogRegTask()
    x, y = load_digits()
    data = Dataset(x[:100], y[:100])
    explicit = {"epochs": defaults.epochs, "batch_size": defaults.batch_size, "lr": defaults.lr}
    a, _, _ = task.fit(task.init(0), data, {})
    b, _, _ = task.fit(task.init(0), data, explicit)
    assert all(np.array_equal(p, q) for p, q in zip(a, b))


# --------------------------------------------------------------------------- load_task


def test_load_builtin_tasks_with_params():
    assert set(BUILTIN_TASKS) == {"logreg", "mlp"}
    task = load_task("mlp", {"hidden": [16, 8], "n_features": 5, "n_classes": 3})
    assert isinstance(task, Task)
    assert [w.shape for w in task.init(0)] == [(5, 16), (16,), (16, 8), (8,), (8, 3), (3,)]
    assert isinstance(load_task("logreg"), LogRegTask)


def write_module(directory, name, body):
    (directory / f"{name}.py").write_text(textwrap.dedent(body))


def test_load_user_task_from_the_tasks_folder(tmp_path):
    write_module(tmp_path, "flctl_usertask_ok", """
        import numpy as np
        class Mean:
            def __init__(self, scale=1.0):
                self.scale = scale
            def init(self, seed):
                return [np.full(2, self.scale, np.float32)]
            def fit(self, weights, data, config):
                return weights, data.n_train, {"train_loss": 0.0}
            def evaluate(self, weights, data, config):
                return 0.0, data.n_train, {"accuracy": 1.0}
        """)
    before = list(sys.path)
    task = load_task("flctl_usertask_ok:Mean", {"scale": 3.0}, tasks_dir=tmp_path)
    assert sys.path == before
    assert task.init(0)[0].tolist() == [3.0, 3.0]
    # imported inside the folder's own package: the global name stays free
    assert "flctl_usertask_ok" not in sys.modules


def test_a_task_comes_only_from_the_shipped_folder(tmp_path):
    """`subprocess:Popen` (the reported attack) or any installed module is not a task:
    the name must resolve to a file in the tasks folder, and a same-named file there
    never replaces the installed module."""
    marker = tmp_path / "MARKER"
    for name in ("subprocess:Popen", "os:system", "json:JSONDecoder", "flctl.core.tasks:LogRegTask"):
        with pytest.raises(TaskError, match="no module"):
            load_task(name, {"args": ["touch", str(marker)]}, tasks_dir=tmp_path)
    assert not marker.exists()
    write_module(tmp_path, "json", """
        class Task:
            def init(self, seed): return []
            def fit(self, weights, data, config): return weights, 1, {}
            def evaluate(self, weights, data, config): return 0.0, 1, {}
        """)
    import json

    load_task("json:Task", tasks_dir=tmp_path)
    assert sys.modules["json"] is json and hasattr(json, "dumps")   # the real one stays
    with pytest.raises(TaskError, match="no tasks folder"):
        load_task("json:Task")


def test_a_task_must_be_a_class_before_anything_is_called(tmp_path):
    marker = tmp_path / "CALLED"
    write_module(tmp_path, "flctl_usertask_fn", f"""
        def factory(**params):
            open({str(marker)!r}, "w").close()
            return object()
        class NoEvaluate:
            def __init__(self):
                open({str(marker)!r}, "w").close()
            def init(self, seed): return []
            def fit(self, weights, data, config): return weights, 1, {{}}
        """)
    with pytest.raises(TaskError, match="is not a class"):
        load_task("flctl_usertask_fn:factory", tasks_dir=tmp_path)
    with pytest.raises(TaskError, match="lacks method.*evaluate"):
        load_task("flctl_usertask_fn:NoEvaluate", tasks_dir=tmp_path)
    assert not marker.exists()


def test_load_task_errors_are_one_clear_line(tmp_path):
    write_module(tmp_path, "flctl_usertask_bad", """
        class NoFit:
            def init(self, seed): return []
            def evaluate(self, weights, data, config): return 0.0, 0, {}
        NOT_A_CLASS = 3
        """)
    write_module(tmp_path, "flctl_usertask_broken", "import flctl_no_such_dependency\n")
    cases = [
        ("nosuch", "unknown task 'nosuch'.*logreg, mlp"),
        ("flctl_no_such_module:Task", "no module 'flctl_no_such_module' in the tasks folder"),
        ("flctl_usertask_broken:Task", "no module named 'flctl_no_such_dependency' .list it"),
        ("flctl_usertask_bad:Missing", "has no 'Missing'"),
        ("flctl_usertask_bad:NOT_A_CLASS", "is not a class"),
        ("flctl_usertask_bad:NoFit", "lacks method"),
        (":Cls", "expected 'module:Class'"),
        ("a b:Cls", "expected 'module:Class'"),
    ]
    for name, pattern in cases:
        with pytest.raises(TaskError, match=pattern) as info:
            load_task(name, tasks_dir=tmp_path)
        assert "\n" not in str(info.value)
    with pytest.raises(TaskError, match="bad params"):
        load_task("logreg", {"layers": 3})
    with pytest.raises(TaskError, match="bad params"):
        load_task("mlp", {"hidden": [0]})


@pytest.mark.parametrize("width, rank", [(5, 5), (64, 64), (400, 8)])
def test_the_stable_step_is_four_over_the_largest_curvature(width: int, rank: int) -> None:
    """stable_step(x) = 4 / lambda_max(E[z z^T]), z = [x, 1], within its 10%
    safety margin and never above the true bound (correlated columns make
    lambda_max grow with the width: 400 columns of rank 8)."""
    from flctl.core.models import stable_step

    rng = np.random.default_rng(width)
    x = rng.standard_normal((1500, rank)) @ rng.standard_normal((rank, width))
    x = ((x - x.mean(0)) / x.std(0)).astype(np.float32)
    z = np.hstack([x.astype(np.float64), np.ones((len(x), 1))])
    exact = 4.0 / np.linalg.eigvalsh(z.T @ z / len(z)).max()
    step = stable_step(x)
    assert exact / 1.1 * 0.98 <= step <= exact
    assert stable_step(np.zeros((0, width), np.float32)) == float("inf")


def test_default_lr_trains_wide_correlated_data_and_would_diverge_unbounded() -> None:
    """3000 standardised, strongly correlated features: the default lr (0.5)
    is far past the stable step; bounded, the built-in task trains; with
    training.lr_bound off the same fit overshoots (its loss is many times
    the bounded one's)."""
    from flctl.core.data import Dataset
    from flctl.core.tasks import LogRegTask

    rng = np.random.default_rng(0)
    latent = rng.standard_normal((600, 20))
    y = (latent[:, 0] > 0).astype(np.int64)
    x = latent @ rng.standard_normal((20, 3000)) + 0.1 * rng.standard_normal((600, 3000))
    x = x.astype(np.float32)
    data = Dataset(x[:500], y[:500], x[500:], y[500:])
    transform = {"mean": x.mean(0).tolist(), "scale": x.std(0).tolist()}
    task = LogRegTask(n_features=3000, n_classes=2, transform=transform)
    _, _, unstandardised = LogRegTask(n_features=3000, n_classes=2).fit(
        task.init(0), data, {"epochs": 1, "lr": 0.01})
    assert unstandardised["lr"] == 0.01   # raw data: the step is the user's
    weights = task.init(0)
    config = {"epochs": 2, "batch_size": 32, "lr": 0.5, "seed": 0, "round": 1}
    new, _, metrics = task.fit(weights, data, config)
    assert metrics["lr"] < 0.05 and np.isfinite(metrics["train_loss"])
    _, _, scores = task.evaluate(new, data, {})
    assert scores["accuracy"] >= 0.9
    loss, _, _ = task.evaluate(new, data, {})
    unbounded, _, wild = task.fit(weights, data, {**config, "lr_bound": False})
    assert wild["lr"] == 0.5 and wild["train_loss"] > 5 * metrics["train_loss"]
    assert task.evaluate(unbounded, data, {})[0] > 3 * loss
