"""Standard errors for trust metrics: closed form for means, a paired bootstrap for everything else.

Every trust metric is a function of per-item arrays (hits, probabilities, log-likelihoods). Two models
scored on the same items are compared *paired*: one bootstrap resample of item indices is applied to
both, so the item-to-item variance that both share cancels out of the difference's error bar.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np

Items = dict[str, np.ndarray]
BOOT = 1000  # bootstrap resamples
Z = 1.96  # "beyond its error bar": outside the 95 % interval


@dataclass
class Metric:
    """One trust number: ``fn(items)``; ``better`` is +1 (higher is better), −1 (lower) or 0 (no
    direction, never flagged). ``se`` is its standard error on this model."""

    name: str
    items: Items
    fn: Callable[[Items], float]
    better: int
    se: float

    @property
    def value(self) -> float:
        return float(self.fn(self.items))


def mean_se(x: np.ndarray) -> float:
    """Standard error of a mean (binomial ``sqrt(p(1−p)/(n−1))`` for 0/1 items, as slimlm's accuracies)."""
    x = np.asarray(x, dtype=float)
    return float(x.std(ddof=1) / math.sqrt(len(x))) if len(x) > 1 else float("nan")


def mean_metric(name: str, x: np.ndarray, better: int) -> Metric:
    x = np.asarray(x, dtype=float)
    return Metric(name, {"x": x}, lambda it: float(it["x"].mean()), better, mean_se(x))


def _resamples(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n, size=(BOOT, n))  # (BOOT, n) item indices


def bootstrap_se(fn: Callable[[Items], float], items: Items, seed: int = 0) -> float:
    n = len(next(iter(items.values())))
    vals = [fn({k: v[idx] for k, v in items.items()}) for idx in _resamples(n, seed)]
    return float(np.nanstd(vals, ddof=1))


def boot_metric(name: str, items: Items, fn: Callable[[Items], float], better: int, seed: int = 0) -> Metric:
    return Metric(name, items, fn, better, bootstrap_se(fn, items, seed))


def paired_delta(m: Metric, base: Metric, seed: int = 0) -> tuple[float, float]:
    """(m − base, its paired-bootstrap standard error); both scored on the same items in the same order."""
    n = len(next(iter(m.items.values())))
    if n != len(next(iter(base.items.values()))):
        raise ValueError(f"metric {m.name}: {n} items vs {len(next(iter(base.items.values())))} for the base model")
    diffs = [m.fn({k: v[idx] for k, v in m.items.items()}) - base.fn({k: v[idx] for k, v in base.items.items()})
             for idx in _resamples(n, seed)]
    return m.value - base.value, float(np.nanstd(diffs, ddof=1))


def degraded(delta: float, se: float, better: int) -> bool:
    """The change goes the bad way by more than ``Z`` standard errors."""
    return better != 0 and math.isfinite(se) and better * delta < -Z * se


def auc(pos: np.ndarray, neg: np.ndarray) -> float:
    """Area under the ROC curve that ``pos`` scores above ``neg`` (Mann–Whitney U / (n₊n₋), ties ½)."""
    pos, neg = np.asarray(pos, float), np.asarray(neg, float)
    ranks = _rankdata(np.concatenate([pos, neg]))
    u = ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2
    return float(u / (len(pos) * len(neg)))


def _rankdata(x: np.ndarray) -> np.ndarray:
    """Average ranks (1-based), ties share their mean rank."""
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x))
    sx = x[order]
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and sx[j + 1] == sx[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return ranks
