"""Per-linear input statistics gathered with forward hooks during one block forward.

Kinds: ``sq`` (Σx² per input channel — Wanda, AWQ-style importances), ``abs`` (Σ|x| per input
channel — AWQ), ``hessian`` (XᵀX — GPTQ, SparseGPT, activation-aware SVD), ``max`` (max |x| per
channel — SmoothQuant).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
from torch import nn

KINDS = frozenset({"sq", "abs", "hessian", "max"})


@dataclass
class LinearStats:
    """Running sums over every calibration token seen by one linear's input."""

    n_tokens: int = 0
    sq: torch.Tensor | None = None  # (in,)
    abs: torch.Tensor | None = None  # (in,)
    max: torch.Tensor | None = None  # (in,)
    hessian: torch.Tensor | None = None  # (in, in), Σ xᵀx in float32
    kinds: frozenset[str] = field(default_factory=frozenset)

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()  # (tokens, in)
        self.n_tokens += x.shape[0]
        if "sq" in self.kinds:
            s = x.pow(2).sum(0)
            self.sq = s if self.sq is None else self.sq + s
        if "abs" in self.kinds:
            a = x.abs().sum(0)
            self.abs = a if self.abs is None else self.abs + a
        if "max" in self.kinds:
            m = x.abs().amax(0)
            self.max = m if self.max is None else torch.maximum(self.max, m)
        if "hessian" in self.kinds:
            h = x.T @ x
            self.hessian = h if self.hessian is None else self.hessian + h


def collect_linear_stats(
    modules: dict[str, nn.Module], kinds: Iterable[str], run: Callable[[], object],
    same_input: Iterable[tuple[str, ...]] = (),
) -> tuple[dict[str, LinearStats], object]:
    """Hook ``modules``, call ``run()`` (a block forward), return their stats and ``run``'s result.

    Modules of one ``same_input`` group (e.g. q/k/v) read the same tensor: only the first present is
    hooked and the others share its statistics (the Hessian is the costliest statistic to accumulate).
    """
    wanted = frozenset(kinds)
    unknown = wanted - KINDS
    if unknown:
        raise ValueError(f"unknown statistic kinds {sorted(unknown)}; known: {sorted(KINDS)}")
    stats = {name: LinearStats(kinds=wanted) for name in modules}
    hooked = dict(modules)
    for group in same_input:
        present = [name for name in group if name in modules]
        for name in present[1:]:
            stats[name] = stats[present[0]]
            hooked.pop(name)
    handles = [
        mod.register_forward_hook(lambda _m, inp, _out, s=stats[name]: s.add(inp[0]))
        for name, mod in hooked.items()
    ]
    try:
        result = run()
    finally:
        for h in handles:
            h.remove()
    return stats, result
