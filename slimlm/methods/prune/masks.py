"""Shared pruning config and mask helpers: per-row / per-layer top-k and N:M selection over a score.

Every unstructured or semi-structured pruner reduces to "keep the highest-scoring weights" under
one of three scopes — the whole layer (magnitude's classic baseline), each output row (Wanda), or
each run of ``m`` consecutive input weights in a row (N:M, the pattern sparse tensor cores and the
2:4 storage format need). Masks are boolean, ``True`` = keep, shape ``(out, in)`` like the weight.
"""

from __future__ import annotations

import torch
from pydantic import Field, model_validator
from torch import nn

from slimlm.errors import SlimlmError
from slimlm.layers.sparse import mark_sparse
from slimlm.methods.linear import LinearStepConfig


class PruneConfig(LinearStepConfig):
    """Either ``sparsity`` (fraction of weights removed, unstructured) or ``n``/``m`` (keep n of every m)."""

    sparsity: float | None = Field(None, description="fraction of weights to remove, in (0, 1)")
    n: int | None = Field(None, description="N:M — weights kept in every group of m consecutive inputs")
    m: int | None = Field(None, description="N:M — group length along the input dimension")

    @model_validator(mode="after")
    def _one_pattern(self) -> "PruneConfig":
        if (self.n is None) != (self.m is None):
            raise ValueError("give both n and m for N:M sparsity (e.g. n: 2, m: 4)")
        if self.n is not None and self.sparsity is not None:
            raise ValueError("give either sparsity or n/m, not both")
        if self.n is None and self.sparsity is None:
            raise ValueError("give sparsity (e.g. 0.5) or n/m (e.g. n: 2, m: 4)")
        if self.sparsity is not None and not 0.0 < self.sparsity < 1.0:
            raise ValueError(f"sparsity must be in (0, 1), got {self.sparsity}")
        if self.n is not None and not 0 < self.n < self.m:  # type: ignore[operator]
            raise ValueError(f"N:M needs 0 < n < m, got {self.n}:{self.m}")
        return self

    def pattern(self) -> str:
        return f"{self.n}:{self.m}" if self.n is not None else "unstructured"


def check_nm(targets: dict[str, nn.Module], cfg: PruneConfig, where: str) -> None:
    """N:M groups run along the input dimension, so ``m`` must divide every target's in_features."""
    if cfg.m is None:
        return
    for name, mod in targets.items():
        if mod.in_features % cfg.m:
            raise SlimlmError(
                f"{where}: m={cfg.m} does not divide in_features {mod.in_features} of {name}",
                "choose m dividing every targeted layer's input size (4 or 8 for most models), or narrow `targets`",
            )


def topk_mask(score: torch.Tensor, sparsity: float, *, per_row: bool) -> torch.Tensor:
    """Keep the ``1 - sparsity`` highest scores per row (or over the whole tensor); ties break by index."""
    flat = score if per_row else score.reshape(1, -1)
    n_prune = int(flat.shape[1] * sparsity)
    mask = torch.ones_like(flat, dtype=torch.bool)
    if n_prune:
        idx = torch.topk(flat, n_prune, dim=1, largest=False).indices
        mask.scatter_(1, idx, False)
    return mask.reshape(score.shape)


def nm_mask(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the ``n`` highest scores in every run of ``m`` consecutive columns of each row."""
    rows, cols = score.shape
    if cols % m:
        raise ValueError(f"m={m} does not divide {cols} columns")
    groups = score.reshape(rows, cols // m, m)
    keep = torch.topk(groups, n, dim=2).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(2, keep, True)
    return mask.reshape(rows, cols)


def score_mask(score: torch.Tensor, sparsity: float | None = None, n: int | None = None, m: int | None = None,
               *, per_row: bool) -> torch.Tensor:
    """Keep-mask over ``score`` (out, in): N:M when ``n``/``m`` are given, else top ``1 - sparsity``."""
    if n is not None and m is not None:
        return nm_mask(score, n, m)
    if sparsity is None:
        raise ValueError("give sparsity or n and m")
    return topk_mask(score, sparsity, per_row=per_row)


def mark_pruned(model: nn.Module, names: list[str], pattern: str) -> None:
    """Mark the pruned layers themselves, so the mark follows them through later steps (layers/sparse.py)."""
    for name in names:
        mark_sparse(model.get_submodule(name), pattern)
