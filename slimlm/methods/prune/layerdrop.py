"""Layer drop by Block Influence (ShortGPT: Men et al. 2024, "ShortGPT: Layers in Large Language
Models are More Redundant Than You Expect").

``BI_i = 1 − mean_tokens cos(x_i, y_i)`` where ``x_i``/``y_i`` are block ``i``'s input/output hidden
states on calibration text: a block that barely turns its input has low influence. All scores are
measured on the unchanged model, then the ``n`` lowest blocks are removed at once. The result is a
standard model with fewer layers (config and KV-cache indices renumbered), so it saves and reloads
with plain ``transformers``.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from slimlm.calibrate import BlockContext, run_sequential
from slimlm.config import StepConfig
from slimlm.errors import SlimlmError
from slimlm.memory import drop_file_pages
from slimlm.methods import StepContext, StepReport, register_method
from slimlm.models.arch import Arch, blocks, per_block_lists, set_module, text_config


class LayerDropConfig(StepConfig):
    """Exactly one of ``n`` (blocks to remove) or ``fraction`` (share of blocks to remove)."""

    n: int | None = Field(None, ge=1, description="number of blocks to remove")
    fraction: float | None = Field(None, gt=0, lt=1, description="share of blocks to remove, in (0, 1)")

    @model_validator(mode="after")
    def _one_amount(self) -> "LayerDropConfig":
        if (self.n is None) == (self.fraction is None):
            raise ValueError("give exactly one of n (blocks to remove) or fraction (e.g. 0.25)")
        return self


def block_influence(inputs: list[torch.Tensor], outputs: list[torch.Tensor]) -> float:
    """1 − cosine similarity of each token's hidden state before/after a block, averaged over tokens."""
    cos = [F.cosine_similarity(x.float(), y.float(), dim=-1).reshape(-1) for x, y in zip(inputs, outputs)]  # (B·T,)
    return float(1.0 - torch.cat(cos).mean())


def measure_influence(model: nn.Module, arch: Arch, ids: torch.Tensor, batch_size: int) -> list[float]:
    """Block Influence of every block, in order, with the sequential driver (model unchanged).

    Each block runs once: its outputs are both scored and handed on as the next block's inputs.
    """
    scores: list[float] = []

    def process(ctx: BlockContext) -> None:
        ctx.fp_outputs = ctx.forward()
        scores.append(block_influence(ctx.inputs, ctx.fp_outputs))

    run_sequential(model, arch, ids, process, batch_size=batch_size, propagate="reference", desc="block influence")
    return scores


def n_to_drop(cfg: LayerDropConfig, n_blocks: int) -> int:
    n = cfg.n if cfg.n is not None else round(cfg.fraction * n_blocks)  # type: ignore[operator]
    what = f"n={cfg.n}" if cfg.n is not None else f"fraction={cfg.fraction} ({n} blocks)"
    if n >= n_blocks:
        raise SlimlmError(f"layer_drop: {what} would remove all {n_blocks} blocks (or more)",
                          f"remove at most {n_blocks - 1} blocks")
    if n < 1:
        raise SlimlmError(f"layer_drop: {what} removes no block of {n_blocks}", f"use a fraction ≥ {0.5 / n_blocks:.3f} or n ≥ 1")
    return n


def drop_blocks(model: nn.Module, arch: Arch, drop: set[int]) -> list[int]:
    """Remove blocks ``drop`` in place; renumber layer indices and fix the config. Returns kept indices."""
    old = blocks(model, arch)
    keep = [i for i in range(len(old)) if i not in drop]
    set_module(model, arch.blocks, nn.ModuleList([old[i] for i in keep]))
    for i in drop:
        for p in old[i].parameters():
            drop_file_pages(p, model)
    for new_idx, old_idx in enumerate(keep):
        for mod in old[old_idx].modules():  # attention's layer_idx indexes the KV cache
            if hasattr(mod, "layer_idx"):
                mod.layer_idx = new_idx
    cfg = text_config(model.config)
    cfg.num_hidden_layers = len(keep)
    for key in per_block_lists(arch):  # e.g. the sliding/full attention pattern follows its blocks
        if getattr(cfg, key, None) is not None:
            setattr(cfg, key, [getattr(cfg, key)[i] for i in keep])
    return keep


@register_method("layer_drop", LayerDropConfig, keeps_dense=lambda cfg: True)
def run_layer_drop(ctx: StepContext, cfg: LayerDropConfig) -> StepReport:
    t0 = time.perf_counter()
    n_blocks = len(blocks(ctx.model, ctx.arch))
    n = n_to_drop(cfg, n_blocks)
    scores = measure_influence(ctx.model, ctx.arch, ctx.calib_ids(), ctx.calibration.batch_size)
    drop = set(sorted(range(n_blocks), key=lambda i: scores[i])[:n])
    drop_blocks(ctx.model, ctx.arch, drop)
    return StepReport(
        method="layer_drop", seconds=time.perf_counter() - t0,
        extra={"block_influence": {f"{ctx.arch.blocks}.{i}": s for i, s in enumerate(scores)},
               "dropped": sorted(drop), "n_blocks_before": n_blocks, "n_blocks_after": n_blocks - n},
    )
