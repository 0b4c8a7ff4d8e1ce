"""Factored (low-rank) linear layer: ``y = B (A x) + b`` with ``A: (rank, in)``, ``B: (out, rank)``.

Two smaller matmuls replace one ``(out, in)`` matmul; parameters and multiply-adds both drop from
``in·out`` to ``rank·(in + out)``, so the format only pays off when that is smaller.

The two factors are plain ``nn.Linear`` children (``first`` = A, ``second`` = B) exposed through
:meth:`linear_parts`, so weight quantizers that go through ``slimlm.methods.linear.select_linears``
may quantize them in a later step of the same recipe (the children are then ``QuantLinear``).
It deliberately has no ``logical_numel``: ``count_params`` counts its children (dense or packed),
which is the true count ``rank·(in + out) + bias`` without counting anything twice.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from slimlm.layers import register_format


@register_format
class LowRankLinear(nn.Module):
    """``x → first (in→rank, no bias) → second (rank→out, original bias)``."""

    format = "low_rank_linear"

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool) -> None:
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.first = nn.Linear(in_features, rank, bias=False)  # A: (rank, in)
        self.second = nn.Linear(rank, out_features, bias=bias)  # B: (out, rank)

    @classmethod
    def from_factors(cls, a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None) -> "LowRankLinear":
        """Build from ``a: (rank, in)`` and ``b: (out, rank)`` so that ``W ≈ b @ a``."""
        rank, in_f = a.shape
        layer = cls(in_f, b.shape[0], rank, bias is not None).to(device=a.device, dtype=a.dtype)
        with torch.no_grad():
            layer.first.weight.copy_(a)
            layer.second.weight.copy_(b)
            if bias is not None:
                layer.second.bias.copy_(bias)
        return layer

    def spec(self) -> dict[str, Any]:
        return {"in_features": self.in_features, "out_features": self.out_features, "rank": self.rank,
                "bias": self.second.bias is not None}

    @classmethod
    def empty(cls, spec: dict[str, Any]) -> "LowRankLinear":
        return cls(**spec)

    def linear_parts(self) -> dict[str, nn.Module]:
        """The factor layers by local name, for steps that transform linears one at a time."""
        return {"first": self.first, "second": self.second}

    @property
    def weight(self) -> torch.Tensor:
        """Dense equivalent ``B @ A`` (out, in), for statistics, errors and export."""
        return self.second.weight @ self.first.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.second.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(self.first(x))

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}"
