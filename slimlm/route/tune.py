"""Cost/quality curves of a cascade and the thresholds that meet a quality target at the lowest cost.

Inputs are per-item arrays from a labelled dev set: each non-final tier's confidence and every tier's
correctness. An item stops at the first tier whose confidence reaches that tier's threshold
(``conf >= threshold``; the last tier always answers). Metrics follow RouteLLM (Ong et al. 2024):
PGR = (acc − acc_small) / (acc_large − acc_small), APGR = its area over escalation rates 0–100 %,
and the escalation needed for a quality level. This module's *CPT target* is the issue's: the lowest
escalation rate whose accuracy reaches ``ratio`` × the last tier's accuracy (RouteLLM's own
CPT(x %) is the rate reaching x % PGR; both are reported by the benchmark).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np

from slimlm.errors import SlimlmError


def escalate_lowest(conf: np.ndarray, rate: float) -> np.ndarray:
    """Boolean mask escalating the ``round(rate·n)`` least confident items (ties broken by position)."""
    n = len(conf)
    k = int(round(rate * n))
    mask = np.zeros(n, dtype=bool)
    mask[np.argsort(conf, kind="stable")[:k]] = True
    return mask


def curve(conf: np.ndarray, small_ok: np.ndarray, large_ok: np.ndarray, rates: list[float]) -> list[float]:
    """Two-tier cascade accuracy when the ``rate`` least confident items go to the large model."""
    out = []
    for r in rates:
        esc = escalate_lowest(conf, r)
        out.append(float(np.where(esc, large_ok, small_ok).mean()))
    return out


def random_curve(small_ok: np.ndarray, large_ok: np.ndarray, rates: list[float]) -> list[float]:
    """Expected accuracy of routing a random ``rate`` of the items (the baseline every signal must beat)."""
    a, b = float(small_ok.mean()), float(large_ok.mean())
    return [(1 - r) * a + r * b for r in rates]


def apgr(conf: np.ndarray, small_ok: np.ndarray, large_ok: np.ndarray, steps: int = 100) -> float:
    """Area under PGR(escalation rate) for rates 0..1 (trapezoid rule; random routing scores 0.5)."""
    rates = [i / steps for i in range(steps + 1)]
    a, b = float(small_ok.mean()), float(large_ok.mean())
    if math.isclose(a, b):
        return math.nan
    pgr = [(acc - a) / (b - a) for acc in curve(conf, small_ok, large_ok, rates)]
    return float(sum((pgr[i] + pgr[i + 1]) / 2 for i in range(steps)) / steps)


def rate_for(conf: np.ndarray, small_ok: np.ndarray, large_ok: np.ndarray, goal: float) -> float:
    """Lowest escalation rate (over all n + 1 cut points) whose cascade accuracy reaches ``goal``."""
    n = len(conf)
    order = np.argsort(conf, kind="stable")
    # accuracy after escalating the k least confident: small's hits minus theirs plus large's hits
    gain = np.concatenate([[0.0], np.cumsum(large_ok[order].astype(float) - small_ok[order].astype(float))])
    acc = (small_ok.sum() + gain) / n
    hit = np.nonzero(acc >= goal - 1e-12)[0]
    return float(hit[0] / n) if len(hit) else math.nan


def best_cut(conf: np.ndarray, small_ok: np.ndarray, large_ok: np.ndarray) -> tuple[float, float, float]:
    """(escalation rate, accuracy, threshold) of the most accurate cut point — a cascade can beat both
    models when they err on different items. Ties go to the lowest rate."""
    n = len(conf)
    order = np.argsort(conf, kind="stable")
    gain = np.concatenate([[0.0], np.cumsum(large_ok[order].astype(float) - small_ok[order].astype(float))])
    k = int(np.argmax(gain))
    threshold = float(conf[order[k]]) if k < n else math.inf
    return k / n, float((small_ok.sum() + gain[k]) / n), threshold


def pgr_rate(conf: np.ndarray, small_ok: np.ndarray, large_ok: np.ndarray, pgr: float) -> float:
    """RouteLLM's CPT(pgr): lowest escalation rate recovering ``pgr`` of the small→large accuracy gap."""
    a, b = float(small_ok.mean()), float(large_ok.mean())
    return rate_for(conf, small_ok, large_ok, a + pgr * (b - a))


@dataclass
class TuneResult:
    """Thresholds per non-final tier, with what they achieve on the dev set."""

    thresholds: list[float]
    accuracy: float
    target_accuracy: float
    escalation: float  # fraction of items that leave the first tier
    cost: float  # mean cost per item under the tiers' costs
    met: bool


def simulate(thresholds: list[float], confs: list[np.ndarray], oks: list[np.ndarray], costs: list[float]) -> tuple[float, float, float]:
    """(accuracy, escalation rate, mean cost) of a cascade with these thresholds on the dev set."""
    n = len(oks[0])
    active = np.ones(n, dtype=bool)
    answered_ok = np.zeros(n, dtype=bool)
    cost = np.zeros(n)
    escalated = 0.0
    for i, ok in enumerate(oks):
        cost[active] += costs[i]
        stop = active & (confs[i] >= thresholds[i]) if i < len(confs) else active
        answered_ok |= stop & ok
        active = active & ~stop
        if i == 0:
            escalated = float(active.mean())
    return float(answered_ok.mean()), escalated, float(cost.mean())


def _candidates(conf: np.ndarray, grid: int | None) -> list[float]:
    """Cut points: every distinct confidence (exact) or ``grid`` quantiles, plus 'escalate all'."""
    finite = conf[np.isfinite(conf)]
    vals = np.unique(finite) if grid is None or len(np.unique(finite)) <= grid else np.unique(np.quantile(finite, np.linspace(0, 1, grid)))
    return [-math.inf, *vals.tolist(), math.inf]


def tune(confs: list[np.ndarray], oks: list[np.ndarray], *, ratio: float = 0.98, costs: list[float] | None = None,
         grid: int = 41) -> TuneResult:
    """Thresholds reaching ``ratio`` × the last tier's dev accuracy at the lowest mean cost.

    Two tiers: an exact sweep over every cut point (lowest escalation rate). More tiers: the
    product of ``grid`` quantile cut points per tier. When no setting reaches the target, the
    most accurate one is returned with ``met=False``.
    """
    if len(oks) < 2 or len(confs) != len(oks) - 1:
        raise SlimlmError("a cascade needs ≥ 2 tiers and a confidence for every tier but the last", "check the router's tiers")
    if not len(oks[0]):
        raise SlimlmError("the labelled dev set is empty", "give `slimlm route tune` a file with labelled items")
    costs = costs or [float(10**i) for i in range(len(oks))]
    goal = ratio * float(oks[-1].mean())
    cands = [_candidates(c, None if len(oks) == 2 else grid) for c in confs]
    best: tuple | None = None
    for ths in itertools.product(*cands):
        acc, esc, cost = simulate(list(ths), confs, oks, costs)
        key = (acc < goal - 1e-12, cost if acc >= goal - 1e-12 else -acc, esc)
        if best is None or key < best[0]:
            best = (key, list(ths), acc, esc, cost)
    assert best is not None
    _, ths, acc, esc, cost = best
    return TuneResult(thresholds=ths, accuracy=acc, target_accuracy=goal, escalation=esc, cost=cost, met=acc >= goal - 1e-12)
