"""Built-in numpy models: softmax logistic regression and a ReLU MLP.

Parameters are a flat `list[np.ndarray]` ([W1, b1, W2, b2, ...]) because that
is what travels on the wire and what the aggregation math averages; the model
objects hold only hyperparameters, never weights, so one model object serves
every round and every host. All math runs in the dtype of the parameters given
(float32 in training, float64 for gradient checks).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def _softmax_cross_entropy(logits: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray]:
    """Mean cross-entropy and its gradient with respect to the logits."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    sums = exp.sum(axis=1, keepdims=True)
    log_probs = shifted - np.log(sums)
    n = logits.shape[0]
    rows = np.arange(n)
    loss = -float(log_probs[rows, y].mean())
    grad = exp / sums
    grad[rows, y] -= 1
    grad /= n
    return loss, grad


def _softmax(logits: np.ndarray) -> np.ndarray:
    exp = np.exp(logits - logits.max(axis=1, keepdims=True))
    return exp / exp.sum(axis=1, keepdims=True)


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if int(value) != value or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


def stable_step(x: np.ndarray, iterations: int = 50, seed: int = 0) -> float:
    """The largest gradient step that keeps softmax regression on `x` stable.

    The cross-entropy's Hessian in (W, b) is E[(diag(p) - p p^T) (x) z z^T]
    with z = [x, 1], and the softmax covariance's norm is at most 1/2, so the
    loss is L-smooth with L <= lambda_max(E[z z^T]) / 2; gradient descent is
    stable below 2 / L = 4 / lambda_max. lambda_max comes from power
    iteration (from below, so it is raised by 10% to stay on the safe side).
    Standardised features give E[z z^T] the correlation matrix: its
    lambda_max is 1 for independent features and up to d for d copies of
    one, which is why no fixed step suits data of every width.
    """
    n = x.shape[0]
    if n == 0:
        return float("inf")
    x = np.asarray(x, dtype=np.float32)
    v = np.random.default_rng(seed).standard_normal(x.shape[1] + 1).astype(np.float64)
    lam = 0.0
    for _ in range(iterations):
        v /= np.linalg.norm(v)
        xv = x @ v[:-1].astype(np.float32) + np.float32(v[-1])      # z v, row by row
        w = np.empty_like(v)
        w[:-1] = (x.T @ xv) / n                                     # E[z z^T] v
        w[-1] = float(xv.sum()) / n
        lam_next = float(v @ w)
        v = w
        if lam_next <= 0 or abs(lam_next - lam) <= 1e-4 * lam_next:
            lam = lam_next
            break
        lam = lam_next
    if not np.isfinite(lam) or lam <= 0:
        return float("inf")
    return 4.0 / (1.1 * lam)


class LogisticRegression:
    """Multinomial logistic regression: logits = x @ W + b, L2 on W only."""

    def __init__(self, n_features: int, n_classes: int, l2: float = 1e-4) -> None:
        _check_positive(n_features=n_features, n_classes=n_classes)
        if l2 < 0:
            raise ValueError(f"l2 must be >= 0, got {l2}")
        self.n_features = int(n_features)
        self.n_classes = int(n_classes)
        self.l2 = float(l2)

    def param_shapes(self) -> list[tuple[int, ...]]:
        return [(self.n_features, self.n_classes), (self.n_classes,)]

    def init_params(self, rng: np.random.Generator) -> list[np.ndarray]:
        # Small random weights rather than zeros so the seed is visible in the
        # result; the problem is convex, so the scale hardly matters.
        w = rng.normal(0.0, 0.01, size=(self.n_features, self.n_classes)).astype(np.float32)
        return [w, np.zeros(self.n_classes, dtype=np.float32)]

    def loss_and_grads(self, params: list[np.ndarray], x: np.ndarray,
                       y: np.ndarray) -> tuple[float, list[np.ndarray]]:
        w, b = params
        x = x.astype(w.dtype, copy=False)
        loss, d_logits = _softmax_cross_entropy(x @ w + b, y)
        loss += 0.5 * self.l2 * float(np.sum(w * w))
        grad_w = x.T @ d_logits + self.l2 * w
        grad_b = d_logits.sum(axis=0)
        return loss, [grad_w.astype(w.dtype, copy=False), grad_b.astype(b.dtype, copy=False)]

    def predict_proba(self, params: list[np.ndarray], x: np.ndarray) -> np.ndarray:
        w, b = params
        return _softmax(x.astype(w.dtype, copy=False) @ w + b)


class MLP:
    """Fully connected network with ReLU hidden layers and a softmax output."""

    def __init__(self, n_features: int, n_classes: int, hidden: Sequence[int] = (64,),
                 l2: float = 1e-4) -> None:
        _check_positive(n_features=n_features, n_classes=n_classes)
        hidden = tuple(hidden)
        for width in hidden:
            _check_positive(hidden=width)
        if l2 < 0:
            raise ValueError(f"l2 must be >= 0, got {l2}")
        self.n_features = int(n_features)
        self.n_classes = int(n_classes)
        self.hidden = tuple(int(h) for h in hidden)
        self.l2 = float(l2)

    @property
    def _widths(self) -> list[int]:
        return [self.n_features, *self.hidden, self.n_classes]

    def param_shapes(self) -> list[tuple[int, ...]]:
        widths = self._widths
        shapes: list[tuple[int, ...]] = []
        for fan_in, fan_out in zip(widths[:-1], widths[1:]):
            shapes += [(fan_in, fan_out), (fan_out,)]
        return shapes

    def init_params(self, rng: np.random.Generator) -> list[np.ndarray]:
        """He initialisation: keeps ReLU activations' variance steady through the layers."""
        params: list[np.ndarray] = []
        widths = self._widths
        for fan_in, fan_out in zip(widths[:-1], widths[1:]):
            scale = np.sqrt(2.0 / fan_in)
            params.append(rng.normal(0.0, scale, size=(fan_in, fan_out)).astype(np.float32))
            params.append(np.zeros(fan_out, dtype=np.float32))
        return params

    def _forward(self, params: list[np.ndarray], x: np.ndarray) -> list[np.ndarray]:
        """Activations of every layer (input first, logits last)."""
        activations = [x.astype(params[0].dtype, copy=False)]
        n_layers = len(params) // 2
        for layer in range(n_layers):
            w, b = params[2 * layer], params[2 * layer + 1]
            z = activations[-1] @ w + b
            if layer < n_layers - 1:
                np.maximum(z, 0, out=z)
            activations.append(z)
        return activations

    def loss_and_grads(self, params: list[np.ndarray], x: np.ndarray,
                       y: np.ndarray) -> tuple[float, list[np.ndarray]]:
        activations = self._forward(params, x)
        loss, delta = _softmax_cross_entropy(activations[-1], y)
        weights = params[0::2]
        loss += 0.5 * self.l2 * sum(float(np.sum(w * w)) for w in weights)
        grads: list[np.ndarray] = [np.empty(0)] * len(params)
        for layer in range(len(weights) - 1, -1, -1):
            w = params[2 * layer]
            a_in = activations[layer]
            grads[2 * layer] = (a_in.T @ delta + self.l2 * w).astype(w.dtype, copy=False)
            grads[2 * layer + 1] = delta.sum(axis=0).astype(w.dtype, copy=False)
            if layer:
                delta = (delta @ w.T) * (a_in > 0)
        return loss, grads

    def predict_proba(self, params: list[np.ndarray], x: np.ndarray) -> np.ndarray:
        return _softmax(self._forward(params, x)[-1])
