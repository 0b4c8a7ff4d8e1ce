"""Seeded character- and word-level perturbations of input text (robustness suite).

Each perturbation is a pure function ``(text, rate, rng) -> text`` registered by name; ``perturb``
derives the generator from (seed, kind, item key), so one item gets the same noise in every model and
every run, and the noise of one item does not depend on which other items were sampled. Only the
input (question, context) is perturbed, never the answer choices, so the choices' likelihoods stay
comparable with the clean run.
"""

from __future__ import annotations

import random
import re
from typing import Callable

from slimlm.errors import SlimlmError

Perturbation = Callable[[str, float, random.Random], str]
PERTURBATIONS: dict[str, Perturbation] = {}


def register(name: str) -> Callable[[Perturbation], Perturbation]:
    def deco(fn: Perturbation) -> Perturbation:
        PERTURBATIONS[name] = fn
        return fn

    return deco


def _map_words(text: str, fn: Callable[[str], str]) -> str:
    return re.sub(r"[A-Za-z]+", lambda m: fn(m.group(0)), text)


@register("typo")
def typo(text: str, rate: float, rng: random.Random) -> str:
    """With probability ``rate`` per word of ≥ 3 letters: swap two adjacent letters, drop one, or double one."""
    def one(w: str) -> str:
        if len(w) < 3 or rng.random() >= rate:
            return w
        i = rng.randrange(1, len(w) - 1)
        op = rng.randrange(3)
        if op == 0:
            return w[:i] + w[i + 1] + w[i] + w[i + 2 :]
        return w[:i] + w[i + 1 :] if op == 1 else w[:i] + w[i] + w[i:]

    return _map_words(text, one)


@register("case")
def case(text: str, rate: float, rng: random.Random) -> str:
    """With probability ``rate`` per word: upper-case it, lower-case it, or swap its case."""
    ops = (str.upper, str.lower, str.swapcase)
    return _map_words(text, lambda w: ops[rng.randrange(3)](w) if rng.random() < rate else w)


@register("whitespace")
def whitespace(text: str, rate: float, rng: random.Random) -> str:
    """With probability ``rate`` per space: remove it (joining two words) or double it."""
    return re.sub(r" ", lambda m: ("" if rng.random() < 0.5 else "  ") if rng.random() < rate else " ", text)


@register("word_drop")
def word_drop(text: str, rate: float, rng: random.Random) -> str:
    """Drop each word but the first with probability ``rate`` (no synonyms, no reordering)."""
    words = text.split(" ")
    kept = [w for i, w in enumerate(words) if i == 0 or rng.random() >= rate]
    return " ".join(kept)


def perturb(text: str, kind: str, rate: float, seed: int, key: str | int) -> str:
    """``text`` perturbed by ``kind``; the same (seed, kind, key) always gives the same result."""
    if kind not in PERTURBATIONS:
        raise SlimlmError(f"unknown perturbation {kind!r}", f"choose from {', '.join(sorted(PERTURBATIONS))}")
    return PERTURBATIONS[kind](text, rate, random.Random(f"{seed}:{kind}:{key}"))
