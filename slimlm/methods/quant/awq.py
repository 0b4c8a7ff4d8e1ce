"""AWQ: activation-aware weight quantization (Lin et al. 2024, arXiv:2306.00978).

A few input channels carry much larger activations than the rest, and rounding the weights that
multiply them costs the most output error. AWQ scales those weight columns up by
``s = mean|x|^α`` before rounding (so they get relatively finer steps) and divides the activations
by ``s`` exactly, by folding ``1/s`` into the op that produces them: the RMSNorm before q/k/v and
before gate/up, v's output rows before o, up's output rows before down. The model's function is
unchanged before rounding; only the rounding error moves to where it hurts less.

``α`` is searched on a grid per group of linears sharing one input, minimising their output error
``Σ tr(ΔW H ΔWᵀ)`` with ``H = Σ xᵀx`` from the sequential driver (optionally estimated through a
fixed Gaussian sketch of ``H``'s Cholesky factor, which makes the search ~5× cheaper on CPU). The
optional clipping search then shrinks each group's range where that lowers the same error, and RTN
on the scaled weights gives the same packed format as every other weight quantizer. With
``quantize: false`` the step stops after folding the scales: the float model computes the same
function, and a following ``gptq`` step rounds the rescaled weights with error feedback instead.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from pydantic import Field
from torch import nn

from slimlm.calibrate import BlockContext, run_sequential
from slimlm.layers.quant import QuantizedWeight, QuantLinear
from slimlm.memory import drop_file_pages
from slimlm.methods import StepContext, StepReport, register_method
from slimlm.methods.linear import require_finite_weights, select_linears
from slimlm.methods.quant.gptq import require_finite_stats
from slimlm.methods.quant.grid import clip_grid, fit_grid, quantize_to_grid, round_to_nearest
from slimlm.methods.quant.rtn import WeightQuantConfig, check_group_sizes, resolve_group_size
from slimlm.models.arch import Arch, block_linears, get_module, heads, input_groups, set_module


class AWQConfig(WeightQuantConfig):
    n_grid: int = Field(20, ge=1, le=100, description="grid points for α in [0, 1)")
    clip: bool = Field(True, description="search a per-group clipping ratio (skipped for q/k)")
    clip_grid: int = Field(20, ge=1, le=100, description="clipping ratios are 1 - k/clip_grid")
    max_shrink: float = Field(0.5, gt=0, lt=1, description="smallest clipping ratio is 1 - max_shrink")
    search_rank: int = Field(128, ge=0, description="Gaussian sketch width of H for the α search (0 = exact)")
    quantize: bool = Field(True, description="round the scaled weights (RTN); false leaves them in float, scales "
                           "folded, for a later step such as gptq (awq → gptq)")


@dataclass(frozen=True)
class ScaleGroup:
    """``prev``'s output is divided by ``s``; the input columns of every consumer are multiplied by it."""

    prev: str  # path in the block: a norm or a linear
    consumers: tuple[str, ...]
    rep: int = 1  # grouped-query attention: o's input repeats each v channel for `rep` heads
    head_dim: int = 1


def scale_groups(block: nn.Module, arch: Arch, head_dim: int) -> list[ScaleGroup]:
    """The foldable (producer → consumers) pairs of one block, in execution order.

    A fused producer (phi3's qkv_proj, gate_up_proj) holds v or up in a row range only; those
    linear → linear folds are skipped there, the norm folds still apply.
    """
    lin = block_linears(block, arch)
    o, down = arch.attn_path(arch.o), arch.mlp_path(arch.down)
    groups = [ScaleGroup(arch.attn_norm, arch.qkv_paths())]
    if not arch.fused_qkv:
        v = arch.attn_path(arch.v)
        v_out, o_in = lin[v].weight.shape[0], lin[o].weight.shape[1]
        if o_in % v_out == 0 and v_out % head_dim == 0:
            groups.append(ScaleGroup(v, (o,), rep=o_in // v_out, head_dim=head_dim))
    groups.append(ScaleGroup(arch.mlp_norm, arch.gate_up_paths()))
    if arch.gate and not arch.fused_gate_up:  # down's input is act(gate) · up, linear in up's output
        groups.append(ScaleGroup(arch.mlp_path(arch.up), (down,)))
    return groups


def tie_heads(x: torch.Tensor, group: ScaleGroup) -> torch.Tensor:
    """Average (in,) over the heads that share one v channel, so a scale can be folded into v."""
    if group.rep == 1:
        return x
    t = x.view(-1, group.rep, group.head_dim).mean(dim=1, keepdim=True)  # (n_kv, 1, hd)
    return t.expand(-1, group.rep, -1).reshape(-1)


@torch.no_grad()
def apply_scales(block: nn.Module, arch: Arch, group: ScaleGroup, s: torch.Tensor) -> None:
    """Fold ``s`` (consumer input width) into the block: exact in real arithmetic."""
    prev = get_module(block, group.prev)
    s = s.to(prev.weight.device)
    if isinstance(prev, nn.Linear):
        s_prev = s.view(-1, group.rep, group.head_dim)[:, 0].reshape(-1) if group.rep > 1 else s
        prev.weight.div_(s_prev[:, None].to(prev.weight.dtype))
        if prev.bias is not None:
            prev.bias.div_(s_prev.to(prev.bias.dtype))
    else:  # a norm computing x̂ · (offset + w) (+ bias)
        off = arch.norm_offset
        prev.weight.copy_(((prev.weight.float() + off) / s - off).to(prev.weight.dtype))
        if getattr(prev, "bias", None) is not None:
            prev.bias.div_(s.to(prev.bias.dtype))
    for path in group.consumers:
        lin = get_module(block, path)
        lin.weight.mul_(s[None, :].to(lin.weight.dtype))


def _sketch(h: torch.Tensor, rank: int) -> torch.Tensor | None:
    """(in, rank) matrix ``L G`` with ``H ≈ L Lᵀ`` and a fixed Gaussian ``G``: ‖ΔW L G‖² estimates tr(ΔW H ΔWᵀ)."""
    if rank == 0 or rank >= h.shape[0]:
        return None
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    mean_diag = float(torch.diag(h).mean())
    for damp in (1e-6, 1e-4, 1e-2):
        lower, info = torch.linalg.cholesky_ex(h + damp * mean_diag * eye)
        if int(info) == 0:
            g = torch.randn(h.shape[0], rank, generator=torch.Generator().manual_seed(0)).to(h.device)
            return lower @ g / math.sqrt(rank)
    return None


def _quad(d: torch.Tensor, h: torch.Tensor, sketch: torch.Tensor | None) -> float:
    """tr(d H dᵀ): the summed squared output error of weight change ``d`` (out, in)."""
    if sketch is not None:
        return float((d @ sketch).pow(2).sum())
    return float(((d @ h) * d).sum())


@torch.no_grad()
def awq_scales(weights: list[torch.Tensor], group_sizes: list[int], x_mean: torch.Tensor, hessian: torch.Tensor, *,
               bits: int, symmetric: bool, n_grid: int = 20, search_rank: int = 0) -> tuple[torch.Tensor, float]:
    """Best per-input-channel scale ``s = mean|x|^α`` (in,) for consumers sharing one input, and its α."""
    h = hessian.float()
    sketch = _sketch(h, search_rank)
    ws = [w.detach().float() for w in weights]
    best_err, best_s, best_alpha = math.inf, torch.ones_like(x_mean), 0.0
    x = x_mean.float().clamp(min=0)
    for k in range(n_grid):
        alpha = k / n_grid
        s = x.pow(alpha).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        err = 0.0
        for w, g in zip(ws, group_sizes):
            d = round_to_nearest(w * s, bits, g, symmetric).dequantize() / s - w  # original-domain error
            err += _quad(d, h, sketch)
        if err < best_err:
            best_err, best_s, best_alpha = err, s, alpha
    return best_s, best_alpha


@register_method("awq", AWQConfig, needs=lambda cfg: frozenset({"prenorm"}), keeps_dense=lambda cfg: not cfg.quantize)
def run_awq(ctx: StepContext, cfg: AWQConfig) -> StepReport:
    model, arch = ctx.model, ctx.arch
    targets = select_linears(model, arch, cfg, "awq")
    check_group_sizes(targets, cfg.group_size, "awq")
    ids = ctx.calib_ids()  # raises a clear error when the calibration text is too short
    head_dim = heads(model.config, arch).head_dim
    no_clip = {arch.attn_path(arch.q), arch.attn_path(arch.k)}  # clipping q/k distorts attention scores
    report = StepReport(method="awq")
    alphas: dict[str, float] = {}

    def process(bctx: BlockContext) -> None:
        prefix = bctx.name + "."
        local = {n.removeprefix(prefix): m for n, m in targets.items() if n.startswith(prefix)}
        if not local:
            return
        require_finite_weights({prefix + p: m for p, m in local.items()}, "awq")
        plain = {p: m for p, m in block_linears(bctx.block, arch).items() if type(m) is nn.Linear}
        stats = bctx.collect(plain, {"abs", "hessian"}, input_groups(arch))  # one Hessian per distinct input
        for p in local:
            require_finite_stats(prefix + p, stats[p], "awq")
        gsize = {p: resolve_group_size(cfg.group_size, m.in_features, prefix + p, "awq") for p, m in plain.items()}
        in_scale = {p: torch.ones(m.in_features, device=m.weight.device) for p, m in plain.items()}
        for group in scale_groups(bctx.block, arch, head_dim):
            prev = get_module(bctx.block, group.prev)
            quant = [p for p in group.consumers if p in local]
            # a consumer or producer already converted by an earlier step cannot absorb a scale
            if not quant or any(p not in plain for p in group.consumers) or (isinstance(prev, nn.Linear) and group.prev not in plain):
                continue
            st = stats[group.consumers[0]]
            x_mean = tie_heads(st.abs / max(st.n_tokens, 1), group)
            s, alpha = awq_scales([plain[p].weight for p in quant], [gsize[p] for p in quant], x_mean, st.hessian,
                                  bits=cfg.bits, symmetric=cfg.symmetric, n_grid=cfg.n_grid, search_rank=cfg.search_rank)
            apply_scales(bctx.block, arch, group, s)
            alphas[prefix + group.prev] = alpha
            for p in group.consumers:
                in_scale[p] = in_scale[p] * s
        if not cfg.quantize:
            return
        for p, mod in local.items():
            w = mod.weight.detach().float()  # scaled weight (out, in)
            inv = 1.0 / in_scale[p]
            h = stats[p].hessian * inv[:, None] * inv[None, :]  # Hessian of the scaled inputs x / s
            g = gsize[p]
            if cfg.clip and p not in no_clip:
                scale, zero = clip_grid(w, h, bits=cfg.bits, group_size=g, symmetric=cfg.symmetric,
                                        n_grid=cfg.clip_grid, max_shrink=cfg.max_shrink)
            else:
                scale, zero = fit_grid(w, cfg.bits, g, cfg.symmetric)
            qw = QuantizedWeight(quantize_to_grid(w, scale, zero, cfg.bits, g), scale, zero, cfg.bits, g)
            set_module(bctx.block, p, QuantLinear.from_quantized(qw, mod.bias))
            report.layer_errors[prefix + p] = _quad(qw.dequantize() - w, h, None) / max(_quad(w, h, None), 1e-30)
            drop_file_pages(mod.weight, model)  # after the last read of w, which may share its pages

    t0 = time.perf_counter()
    report.block_errors = run_sequential(model, arch, ids, process, batch_size=ctx.calibration.batch_size,
                                         propagate=ctx.calibration.propagate, desc="awq")
    report.seconds = time.perf_counter() - t0
    report.extra["alpha"] = alphas
    return report
