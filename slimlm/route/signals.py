"""Confidence signals: how sure the small model is of its answer (higher = more confident).

Every signal is a pure function of an :class:`Evidence` record, registered by name, so the cascade,
the tuner and the benchmark compute exactly the same numbers. Whole-sequence probability is
length-biased (Gupta et al. 2024, "Language Model Cascades: Token-level Uncertainty and Beyond"), so
the main signals are *quantiles* of the answer's token log-probs; ``seq_logprob`` is kept as the
length-biased baseline. ``agreement`` is the self-consistency of k sampled answers with the answer
(Wang et al. 2023); ``learned`` (see :mod:`slimlm.route.learned`) combines the others.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

from slimlm.registry import Registry

SIGNALS: Registry[Callable[["Evidence"], float]] = Registry("confidence signal", "slimlm.route")


@dataclass
class Evidence:
    """What the answering model reveals about one answer.

    ``token_logprobs``: log-prob of each answer token; ``token_entropies``: entropy (nats) of the
    predictive distribution at each answer token, when the full distribution was available;
    ``samples``: k answers sampled at temperature > 0 (normalised text or choice indices);
    ``choice_logprobs``: for multiple choice, the score of every option (the answer is the argmax).
    """

    answer: str = ""
    token_logprobs: list[float] = field(default_factory=list)
    token_entropies: list[float] = field(default_factory=list)
    samples: list[str] = field(default_factory=list)
    choice_logprobs: list[float] = field(default_factory=list)


def quantile(values: list[float], q: float) -> float:
    """Linear-interpolated ``q``-quantile (numpy's default method); ``-inf`` for an empty answer."""
    if not values:
        return -math.inf
    xs = sorted(values)
    pos = q * (len(xs) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def choice_probs(scores: list[float]) -> list[float]:
    """Softmax of the options' scores: the model's distribution over the choices."""
    top = max(scores)
    ex = [math.exp(s - top) for s in scores]
    z = sum(ex)
    return [e / z for e in ex]


def _register(name: str) -> Callable[[Callable[[Evidence], float]], Callable[[Evidence], float]]:
    def deco(fn: Callable[[Evidence], float]) -> Callable[[Evidence], float]:
        SIGNALS.register(name, fn)
        return fn

    return deco


def _quantile_signal(q: float) -> Callable[[Evidence], float]:
    def fn(ev: Evidence) -> float:
        return quantile(ev.token_logprobs, q)

    fn.__doc__ = f"{q:.0%}-quantile of the answer's token log-probs"
    return fn


for _q in (0.0, 0.1, 0.25, 0.5):
    _register("lp_min" if _q == 0 else f"lp_q{int(_q * 100)}")(_quantile_signal(_q))


@_register("lp_mean")
def lp_mean(ev: Evidence) -> float:
    """Mean token log-prob (length-normalised sequence probability)."""
    return sum(ev.token_logprobs) / len(ev.token_logprobs) if ev.token_logprobs else -math.inf


@_register("seq_logprob")
def seq_logprob(ev: Evidence) -> float:
    """Whole-sequence log-probability: the length-biased baseline."""
    return sum(ev.token_logprobs) if ev.token_logprobs else -math.inf


@_register("neg_entropy")
def neg_entropy(ev: Evidence) -> float:
    """Minus the entropy: of the choice distribution for multiple choice, else the mean per-token entropy."""
    if ev.choice_logprobs:
        return sum(p * math.log(p) for p in choice_probs(ev.choice_logprobs) if p > 0)
    return -sum(ev.token_entropies) / len(ev.token_entropies) if ev.token_entropies else -math.inf


@_register("margin")
def margin(ev: Evidence) -> float:
    """Multiple choice: probability gap between the best and the second-best option."""
    if len(ev.choice_logprobs) < 2:
        return 1.0
    p = sorted(choice_probs(ev.choice_logprobs), reverse=True)
    return p[0] - p[1]


@_register("agreement")
def agreement(ev: Evidence) -> float:
    """Fraction of the k sampled answers equal to the answer (self-consistency)."""
    return sum(s == ev.answer for s in ev.samples) / len(ev.samples) if ev.samples else 1.0


FEATURES = ("lp_min", "lp_q10", "lp_q25", "lp_q50", "lp_mean", "seq_logprob", "neg_entropy", "margin", "agreement")


def features(ev: Evidence, names: tuple[str, ...] | list[str] = FEATURES) -> list[float]:
    """The signals ``names`` as a feature vector (infinite values clipped, for the learned router)."""
    return [max(min(SIGNALS.get(n)(ev), 1e4), -1e4) for n in names]

