"""Width pruning: remove MLP neurons and whole attention KV groups, ranked by activation importance
(Minitron: Muralidharan et al. 2024, "Compact Language Models via Pruning and Knowledge
Distillation"; LLM-Pruner: Ma et al. 2023 for the coupled-structure view).

Importance is the energy of each structure's contribution to the block output on calibration data:

* MLP neuron ``j``: ``‖a_j‖² · ‖W_down[:, j]‖²`` (``a_j`` = its activation, the down-projection input),
  exactly the squared norm of what that neuron adds to the output.
* KV group ``g`` (one KV head and every query head that reads it): ``tr(W_o,g H_gg W_o,gᵀ)`` with
  ``H = Σ zᵀz`` over the o-projection inputs ``z`` — the squared norm of the group's output share.

Every block keeps the same number of neurons and groups (each block picks its own), so the result is
a standard model whose config says the new MLP width and head counts (under the keys the
architecture row names, e.g. ``intermediate_size`` / OPT's ``ffn_dim``); it saves and reloads with plain
``transformers``. Fused projections (phi3's ``qkv_proj``, ``gate_up_proj``) are sliced by row range.
"""

from __future__ import annotations

import time

import torch
from pydantic import Field, model_validator
from torch import nn

from slimlm.calibrate import BlockContext, run_sequential
from slimlm.config import StepConfig
from slimlm.errors import SlimlmError
from slimlm.methods import StepContext, StepReport, register_method
from slimlm.models.arch import (Arch, Heads, block_linears, blocks, fused_rows, get_module, heads, intermediate_size,
                                 set_module, set_widths, unmet)
from slimlm.models.info import count_params


class WidthConfig(StepConfig):
    """``param_reduction`` (share of all parameters to remove), optionally with ``heads_ratio``;
    or explicit kept shares ``mlp_ratio`` / ``heads_ratio`` in (0, 1]."""

    param_reduction: float | None = Field(None, gt=0, lt=1, description="share of the model's parameters to remove")
    mlp_ratio: float | None = Field(None, gt=0, le=1, description="kept share of MLP neurons")
    heads_ratio: float | None = Field(None, gt=0, le=1, description="kept share of KV groups (with their query heads)")

    @model_validator(mode="after")
    def _one_budget(self) -> "WidthConfig":
        if self.param_reduction is None and self.mlp_ratio is None and self.heads_ratio is None:
            raise ValueError("give param_reduction (e.g. 0.25) or mlp_ratio/heads_ratio")
        if self.param_reduction is not None and self.mlp_ratio is not None:
            raise ValueError("param_reduction sets the MLP width itself; drop mlp_ratio (heads_ratio may stay)")
        return self


def neuron_importance(w_down: torch.Tensor, sq: torch.Tensor) -> torch.Tensor:
    """(inter,) energy of each MLP neuron's output: Σ_tokens a_j² · ‖W_down[:, j]‖²; ``w_down`` (hidden, inter)."""
    return sq * w_down.float().pow(2).sum(0)


def group_importance(w_o: torch.Tensor, hessian: torch.Tensor, n_groups: int) -> torch.Tensor:
    """(n_groups,) output energy of each KV group; ``w_o`` (hidden, heads·hd), ``hessian`` (heads·hd)²."""
    w = w_o.float().reshape(w_o.shape[0], n_groups, -1)  # (hidden, groups, n_rep·hd): query heads of group g are contiguous
    cols = w.shape[-1]
    return torch.stack([((w[:, g] @ hessian[g * cols:(g + 1) * cols, g * cols:(g + 1) * cols]) * w[:, g]).sum()
                        for g in range(n_groups)])


def top_sorted(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` highest scores, in their original order."""
    return scores.topk(k).indices.sort().values


def slice_linear(lin: nn.Linear, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> nn.Linear:
    """A smaller ``nn.Linear`` keeping output ``rows`` and input ``cols`` (None = all)."""
    w = lin.weight.detach()
    w = w[rows] if rows is not None else w
    w = w[:, cols] if cols is not None else w
    new = nn.Linear(w.shape[1], w.shape[0], bias=lin.bias is not None, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        new.weight.copy_(w)
        if lin.bias is not None:
            new.bias.copy_(lin.bias[rows] if rows is not None else lin.bias)
    return new


def _expand(groups: torch.Tensor, width: int) -> torch.Tensor:
    """Channel indices of kept groups, each ``width`` channels wide."""
    return (groups[:, None] * width + torch.arange(width, device=groups.device)).reshape(-1)


def prune_block(block: nn.Module, arch: Arch, neurons: torch.Tensor | None, groups: torch.Tensor | None,
                h: Heads, inter: int) -> None:
    """Keep MLP ``neurons`` and KV ``groups`` of one block, in place (fused projections by row range)."""
    if neurons is not None:
        for path in arch.gate_up_paths():
            fused = fused_rows(arch, path, h, inter)
            rows = torch.cat([neurons + fused["gate"].start, neurons + fused["up"].start]) if fused else neurons
            set_module(block, path, slice_linear(block.get_submodule(path), rows=rows))
        down = arch.mlp_path(arch.down)
        set_module(block, down, slice_linear(block.get_submodule(down), cols=neurons))
        mlp = get_module(block, arch.mlp)
        if hasattr(mlp, "intermediate_size"):
            mlp.intermediate_size = len(neurons)
    if groups is not None:
        q_rows, kv_rows = _expand(groups, h.n_rep * h.head_dim), _expand(groups, h.head_dim)
        if arch.fused_qkv:
            path = arch.qkv_paths()[0]
            f = fused_rows(arch, path, h, inter)
            rows = torch.cat([q_rows + f["q"].start, kv_rows + f["k"].start, kv_rows + f["v"].start])  # type: ignore[index]
            set_module(block, path, slice_linear(block.get_submodule(path), rows=rows))
        else:
            for leaf, rows in ((arch.q, q_rows), (arch.k, kv_rows), (arch.v, kv_rows)):
                set_module(block, arch.attn_path(leaf), slice_linear(block.get_submodule(arch.attn_path(leaf)), rows=rows))
        o = arch.attn_path(arch.o)
        set_module(block, o, slice_linear(block.get_submodule(o), cols=q_rows))
        attn = block.get_submodule(arch.attn)
        for attr, value in (("num_heads", len(groups) * h.n_rep), ("num_key_value_heads", len(groups))):
            if hasattr(attn, attr):
                setattr(attn, attr, value)


def _numel(lin: nn.Linear) -> int:
    return lin.weight.numel() + (lin.bias.numel() if lin.bias is not None else 0)


def plan_width(cfg: WidthConfig, model: nn.Module, arch: Arch, n_kv: int) -> tuple[int, int]:
    """(kept MLP neurons, kept KV groups) per block, from ratios or a parameter budget."""
    block = blocks(model, arch)[0]
    n_blocks = len(blocks(model, arch))
    inter = intermediate_size(block, arch)
    lin = block_linears(block, arch)
    per_neuron = sum(_numel(lin[p]) for p in (*arch.gate_up_paths(), arch.mlp_path(arch.down))) / inter
    per_group = sum(_numel(lin[p]) for p in (*arch.qkv_paths(), arch.attn_path(arch.o))) / n_kv
    if cfg.heads_ratio is not None:
        keep_g = round(cfg.heads_ratio * n_kv)
        if keep_g < 1:
            raise SlimlmError(f"width: heads_ratio {cfg.heads_ratio} keeps none of the {n_kv} KV groups", f"use heads_ratio ≥ {0.5 / n_kv:.2f}")
    if cfg.param_reduction is None:
        keep_n = round((cfg.mlp_ratio or 1.0) * inter)
        if keep_n < 1:
            raise SlimlmError(f"width: mlp_ratio {cfg.mlp_ratio} keeps none of the {inter} MLP neurons", f"use mlp_ratio ≥ {0.5 / inter:.4f}")
        return keep_n, keep_g if cfg.heads_ratio is not None else n_kv
    budget = cfg.param_reduction * count_params(model)  # parameters to remove
    block_params = n_blocks * (inter * per_neuron + n_kv * per_group)
    if cfg.heads_ratio is None:  # remove the same share of attention as of the blocks overall, in whole groups
        keep_g = max(1, n_kv - round(budget / block_params * n_kv)) if unmet("head_dim", model.config, arch) is None else n_kv
    left = budget - n_blocks * (n_kv - keep_g) * per_group
    keep_n = inter - max(0, round(left / (n_blocks * per_neuron)))
    if keep_n < 1:
        raise SlimlmError(f"width: param_reduction {cfg.param_reduction} needs more than every MLP neuron",
                          "use a smaller param_reduction (embeddings and norms are not width-pruned)")
    return keep_n, keep_g


def _needs(cfg: WidthConfig) -> frozenset[str]:
    """Removing heads needs a configurable head size; a bare ``param_reduction`` then prunes the MLP only."""
    return frozenset({"head_dim"}) if cfg.heads_ratio is not None and cfg.heads_ratio < 1 else frozenset()


@register_method("width", WidthConfig, needs=_needs, keeps_dense=lambda cfg: True)
def run_width(ctx: StepContext, cfg: WidthConfig) -> StepReport:
    t0 = time.perf_counter()
    model, arch = ctx.model, ctx.arch
    h = heads(model.config, arch)
    before = count_params(model)
    keep_n, keep_g = plan_width(cfg, model, arch, h.n_kv)
    inter = intermediate_size(blocks(model, arch)[0], arch)
    o_path, down_path = arch.attn_path(arch.o), arch.mlp_path(arch.down)
    kept: dict[str, dict[str, list[int]]] = {}

    def process(ctx_b: BlockContext) -> None:
        mods = {o_path: ctx_b.block.get_submodule(o_path), down_path: ctx_b.block.get_submodule(down_path)}
        stats = ctx_b.collect(mods, {"sq"} if keep_g == h.n_kv else {"sq", "hessian"})
        neurons = groups = None
        if keep_n < inter:
            neurons = top_sorted(neuron_importance(mods[down_path].weight, stats[down_path].sq), keep_n)
        if keep_g < h.n_kv:
            groups = top_sorted(group_importance(mods[o_path].weight, stats[o_path].hessian, h.n_kv), keep_g)
        prune_block(ctx_b.block, arch, neurons, groups, h, inter)
        kept[ctx_b.name] = {"groups": groups.tolist() if groups is not None else list(range(h.n_kv))}

    # attention that reads head counts from the shared config (phi3) cannot run a pruned block before
    # the config says the new counts, while later blocks still need the old ones: feed reference outputs
    propagate = "reference" if arch.heads_from_config and keep_g < h.n_kv else ctx.calibration.propagate
    errors = run_sequential(model, arch, ctx.calib_ids(), process, batch_size=ctx.calibration.batch_size,
                            propagate=propagate, desc="width")
    set_widths(model.config, arch, Heads(keep_g * h.n_rep, keep_g, h.head_dim), keep_n)
    after = count_params(model)
    return StepReport(method="width", block_errors=errors, seconds=time.perf_counter() - t0,
                      extra={"intermediate_size": [inter, keep_n], "kv_groups": [h.n_kv, keep_g],
                             "params": [before, after], "param_reduction": 1 - after / before, "kept_groups": kept})
