"""Calibration statistics: linears that read the same tensor share one accumulator, with equal results."""

from __future__ import annotations

import torch
from torch import nn

from slimlm.calibrate.stats import collect_linear_stats


def test_same_input_group_shares_one_statistic() -> None:
    g = torch.Generator().manual_seed(0)
    a, b, c = nn.Linear(8, 4), nn.Linear(8, 3), nn.Linear(8, 2)
    xs = [torch.randn(2, 5, 8, generator=g) for _ in range(3)]

    def run() -> None:
        for x in xs:  # like q/k/v: every layer reads the very same tensor
            a(x), b(x), c(x)

    mods = {"a": a, "b": b, "c": c}
    separate, _ = collect_linear_stats(mods, {"hessian", "sq"}, run)
    shared, _ = collect_linear_stats(mods, {"hessian", "sq"}, run, [("a", "b"), ("missing", "c")])
    assert shared["a"] is shared["b"] and shared["c"] is not shared["a"]
    for name in mods:
        assert shared[name].n_tokens == separate[name].n_tokens == 30
        assert torch.equal(shared[name].hessian, separate[name].hessian)
        assert torch.equal(shared[name].sq, separate[name].sq)
