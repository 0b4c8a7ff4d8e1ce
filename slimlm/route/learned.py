"""A small learned router: logistic regression from the small model's signals to P(its answer is right).

Trained from a labelled file by full-batch gradient descent in numpy (a convex problem with a few
features — no scikit-learn needed). Features are standardised with the training set's mean and
spread, which are stored with the weights so the router is a plain YAML mapping.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from slimlm.errors import SlimlmError
from slimlm.route.signals import FEATURES, Evidence, features


@dataclass
class LogisticRouter:
    """``predict(ev)`` = sigmoid(w · standardise(features(ev)) + b): the chance the answer is correct."""

    names: list[str]
    mean: list[float]
    std: list[float]
    weights: list[float]
    bias: float

    def predict_features(self, x: np.ndarray) -> np.ndarray:
        z = (x - np.asarray(self.mean)) / np.asarray(self.std)
        return 1.0 / (1.0 + np.exp(-(z @ np.asarray(self.weights) + self.bias)))

    def predict(self, ev: Evidence) -> float:
        return float(self.predict_features(np.asarray([features(ev, self.names)]))[0])

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "LogisticRouter":
        try:
            return cls(names=list(d["names"]), mean=list(d["mean"]), std=list(d["std"]), weights=list(d["weights"]),
                       bias=float(d["bias"]))
        except (KeyError, TypeError) as exc:
            raise SlimlmError(f"router file: the learned router lacks {exc}", "re-run `slimlm route tune --signal learned`") from None


def fit_logistic(x: np.ndarray, y: np.ndarray, names: list[str] | tuple[str, ...] = FEATURES, *, l2: float = 1e-2,
                 steps: int = 2000, lr: float = 0.5) -> LogisticRouter:
    """Fit on features ``x`` (N, F) and 0/1 labels ``y`` (N,), L2-regularised (the bias is not)."""
    if len(x) < 2 or len(set(y.tolist())) < 2:
        raise SlimlmError("the learned router needs labelled items with both right and wrong small-model answers",
                          "use a larger or more varied labelled file")
    x = x.astype(np.float64)
    mean, std = x.mean(0), x.std(0)
    std[std < 1e-9] = 1.0
    z = (x - mean) / std
    w = np.zeros(z.shape[1])
    b = float(np.log(y.mean() / (1 - y.mean())))
    for _ in range(steps):
        p = 1.0 / (1.0 + np.exp(-(z @ w + b)))
        g = p - y
        w -= lr * (z.T @ g / len(y) + l2 * w)
        b -= lr * float(g.mean())
    return LogisticRouter(list(names), mean.tolist(), std.tolist(), w.tolist(), b)
