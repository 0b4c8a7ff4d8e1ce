"""SmoothQuant W8A8 (Xiao et al. 2023, https://arxiv.org/abs/2211.10438).

Activations of LLMs have a few outlier channels that make per-token int8 activations lossy.
Per input channel j, ``s_j = max|X_j|^α / max|W_j|^(1-α)`` moves that range into the weights:
``X ← X / s`` (folded into the preceding norm, so it costs nothing at run time) and ``W ← W · s``.
Before rounding the block computes exactly the same function. Then every target becomes an
:class:`~slimlm.layers.int8.Int8Linear`: int8 per-output-channel weights, dynamic per-token int8
activations, an int8×int8→int32 matmul.

Folding points (architecture table, no per-family code):
- q/k/v ← ``attn_norm``; gate/up ← ``mlp_norm``. A Gemma norm computes ``x·(off + w)``, so its weight
  becomes ``(off + w)/s − off``.
- down_proj ← up_proj (gated MLPs: ``down_in = act(gate) · up``, so dividing up's rows by ``s`` divides
  down's input channels by ``s`` exactly).
- o_proj has no exact single fold point under grouped-query attention; it is quantized unsmoothed.
- Post-norm models (OPT with ``do_layer_norm_before: false``) have no norm feeding the linears: the
  step declares the ``prenorm`` need and is refused before any work there.
A group is smoothed only when every consumer of the fold point is still a plain ``nn.Linear`` (so it
chains after pruning steps that keep dense linears, and leaves groups alone that another step packed).
"""

from __future__ import annotations

import time

import torch
from pydantic import Field, field_validator
from torch import nn

from slimlm.calibrate import BlockContext, run_sequential
from slimlm.errors import SlimlmError
from slimlm.layers.int8 import Int8Linear
from slimlm.memory import drop_file_pages
from slimlm.methods import StepContext, StepReport, register_method
from slimlm.methods.linear import LinearStepConfig, layer_error, require_finite_weights, select_linears
from slimlm.models.arch import Arch, set_module


class SmoothQuantConfig(LinearStepConfig):
    alpha: float = Field(0.5, ge=0.0, le=1.0, description="migration strength: 0 = none, 1 = all into weights")
    bits: int = Field(8, description="weight and activation bits (SmoothQuant is W8A8 only)")
    smooth_down: bool = Field(True, description="smooth down_proj through up_proj in gated MLPs")

    @field_validator("bits")
    @classmethod
    def _only_eight(cls, v: int) -> int:
        if v != 8:
            raise ValueError(f"smoothquant supports bits=8 only (got {v}); use rtn/gptq for other weight bit widths")
        return v


def smoothing_scales(x_max: torch.Tensor, w_max: torch.Tensor, alpha: float) -> torch.Tensor:
    """s (in,) = max|X|^α / max|W|^(1-α); channels never active (or all-zero weight) keep s = 1."""
    x = x_max.float().clamp(min=1e-5)
    w = w_max.float().clamp(min=1e-5)
    s = x.pow(alpha) / w.pow(1.0 - alpha)
    dead = (x_max <= 0) | (w_max <= 0)
    return torch.where(dead, torch.ones_like(s), s).clamp(min=1e-5, max=1e5)


@torch.no_grad()
def smooth_into_norm(norm: nn.Module, linears: list[nn.Linear], s: torch.Tensor, offset: float) -> None:
    """X/s via the norm's weight (and bias), W·s via the consumers' columns: outputs unchanged."""
    w = norm.weight
    w.copy_(((offset + w.float()) / s - offset).to(w.dtype))
    if getattr(norm, "bias", None) is not None:
        norm.bias.copy_((norm.bias.float() / s).to(norm.bias.dtype))
    for lin in linears:
        lin.weight.copy_((lin.weight.float() * s[None, :]).to(lin.weight.dtype))


@torch.no_grad()
def smooth_through_linear(prev: nn.Linear, nxt: nn.Linear, s: torch.Tensor) -> None:
    """Divide ``prev``'s output rows (and bias) by s, multiply ``nxt``'s input columns by s."""
    prev.weight.copy_((prev.weight.float() / s[:, None]).to(prev.weight.dtype))
    if prev.bias is not None:
        prev.bias.copy_((prev.bias.float() / s).to(prev.bias.dtype))
    nxt.weight.copy_((nxt.weight.float() * s[None, :]).to(nxt.weight.dtype))


def _col_max(linears: list[nn.Linear]) -> torch.Tensor:
    return torch.stack([lin.weight.detach().abs().amax(dim=0).float() for lin in linears]).amax(dim=0)


def _plain(mods: list[nn.Module | None]) -> bool:
    return all(type(m) is nn.Linear for m in mods)


def smooth_block(block: nn.Module, arch: Arch, x_max: dict[str, torch.Tensor], alpha: float, smooth_down: bool,
                 wanted: set[str]) -> list[str]:
    """Apply every exact smoothing the architecture allows to one block, for groups holding a target
    (``wanted``: block-local paths); returns the groups smoothed."""
    done = []
    qkv = list(arch.qkv_paths())
    attn_in = [block.get_submodule(p) for p in qkv]
    if wanted & set(qkv) and _plain(attn_in):
        s = smoothing_scales(x_max["attn_in"], _col_max(attn_in), alpha)
        smooth_into_norm(block.get_submodule(arch.attn_norm), attn_in, s, arch.norm_offset)
        done.append("qkv")
    gate_up = list(arch.gate_up_paths())
    mlp_in = [block.get_submodule(p) for p in gate_up]
    if wanted & set(gate_up) and _plain(mlp_in):
        s = smoothing_scales(x_max["mlp_in"], _col_max(mlp_in), alpha)
        smooth_into_norm(block.get_submodule(arch.mlp_norm), mlp_in, s, arch.norm_offset)
        done.append("gate_up" if arch.gate else "up")
    up, down = block.get_submodule(arch.mlp_path(arch.up)), block.get_submodule(arch.mlp_path(arch.down))
    # down's input is act(gate) · up: linear in up's output rows (not when up shares a fused linear with gate)
    if smooth_down and arch.gate and not arch.fused_gate_up and arch.mlp_path(arch.down) in wanted and _plain([up, down]):
        s = smoothing_scales(x_max["down_in"], _col_max([down]), alpha)
        smooth_through_linear(up, down, s)
        done.append("down")
    return done


@register_method("smoothquant", SmoothQuantConfig, needs=lambda cfg: frozenset({"prenorm"}))
def run_smoothquant(ctx: StepContext, cfg: SmoothQuantConfig) -> StepReport:
    model, arch = ctx.model, ctx.arch
    targets = select_linears(model, arch, cfg, "smoothquant")
    report = StepReport(method="smoothquant", extra={"alpha": cfg.alpha, "smoothed": {}, "kernel": "auto: torch._int_mm ≤ 16 tokens, int32 GEMM above"})
    probes = {"attn_in": arch.qkv_paths()[0], "mlp_in": arch.gate_up_paths()[0], "down_in": arch.mlp_path(arch.down)}
    t0 = time.perf_counter()

    def process(bctx: BlockContext) -> None:
        prefix = bctx.name + "."
        local = {n.removeprefix(prefix): m for n, m in targets.items() if n.startswith(prefix)}
        if not local:
            return
        require_finite_weights({prefix + p: m for p, m in local.items()}, "smoothquant")  # per block, not up front
        stats = bctx.collect({p: bctx.block.get_submodule(p) for p in probes.values()}, {"max"})
        x_max = {k: stats[p].max for k, p in probes.items()}
        for k, v in x_max.items():
            if v is None or not torch.isfinite(v).all():
                raise SlimlmError(f"smoothquant: activations entering {prefix}{probes[k]} hold NaN or inf",
                                  "check the model's weights and norms; quantizing would spread the non-finite values")
        report.extra["smoothed"][bctx.name] = smooth_block(bctx.block, arch, x_max, cfg.alpha, cfg.smooth_down, set(local))
        for path in local:
            lin = bctx.block.get_submodule(path)  # re-read: smoothing changed the weights in place
            new = Int8Linear.from_linear(lin.weight, lin.bias)
            report.layer_errors[prefix + path] = layer_error(lin.weight.detach(), new.weight, None)
            set_module(bctx.block, path, new)
            drop_file_pages(lin.weight, model)

    report.block_errors = run_sequential(model, arch, ctx.calib_ids(), process, batch_size=ctx.calibration.batch_size,
                                         propagate=ctx.calibration.propagate, desc="smoothquant")
    report.seconds = time.perf_counter() - t0
    return report
