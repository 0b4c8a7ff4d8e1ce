"""SparseGPT (Frantar & Alistarh 2023, "SparseGPT: Massive Language Models Can Be Accurately Pruned
in One-Shot").

Optimal Brain Surgeon, made affordable: columns are processed left to right; when a weight is
pruned (and, in the joint mode, when a kept weight is rounded to the int grid), its error is spread
over the not-yet-processed columns of its row through the inverse Hessian ``H⁻¹`` of the layer
input (``H = Σ XᵀX``), so the layer's output on calibration data changes as little as possible.
Masks are chosen per block of ``blocksize`` columns from the OBS saliency ``w² / [H⁻¹]_jj²``
(adaptive mask selection), or per N:M group as the sweep reaches it. The Cholesky factor of ``H⁻¹``
gives every row the same update coefficients, so all rows are solved at once.

Joint mode (``bits:``): each kept weight is quantized during the same sweep (the paper's §3.5
"joint sparsification and quantization"); pruned weights sit exactly on the zero point, so the
result is stored as sparse + int codes (``slimlm.layers.sparse.SparseQuantLinear``).
"""

from __future__ import annotations

import math

import torch
from pydantic import Field

from slimlm.layers.quant import QuantizedWeight, QuantLinear
from slimlm.methods import StepContext, StepReport, register_method
from slimlm.methods.linear import apply_to_linears, select_linears
from slimlm.methods.prune.masks import PruneConfig, check_nm, mark_pruned
from slimlm.methods.quant.gptq import inverse_hessian_factor
from slimlm.methods.quant.grid import fit_grid, quantize_to_grid
from slimlm.methods.quant.rtn import check_group_sizes, resolve_group_size


class SparseGPTConfig(PruneConfig):
    """``sparsity`` or ``n``/``m``; optional joint quantization with ``bits``/``group_size``/``symmetric``."""

    blocksize: int = Field(128, ge=8, description="columns per lazy-update block (a multiple of m)")
    damp: float = Field(0.01, gt=0, lt=1, description="Hessian damping, as a fraction of its mean diagonal")
    bits: int | None = Field(None, ge=2, le=8, description="joint mode: also quantize kept weights to this many bits")
    group_size: int = 128
    symmetric: bool = False


def _inverse_hessian_chol(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of the damped ``H⁻¹`` (in, in); dead inputs (never active) get H_jj = 1."""
    h = h.clone().float()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    return inverse_hessian_factor(h, damp)


def sparsegpt_prune(w: torch.Tensor, hessian: torch.Tensor, *, sparsity: float | None = None, n: int | None = None,
                    m: int | None = None, blocksize: int = 128, damp: float = 0.01, bits: int | None = None,
                    group_size: int = 128, symmetric: bool = False) -> tuple[torch.Tensor, QuantizedWeight | None]:
    """Prune ``w`` (out, in) given ``hessian`` (in, in) = Σ XᵀX; returns the updated dense weight
    (exact zeros where pruned) and, in joint mode, its integer codes on a per-group grid."""
    rows, cols = w.shape
    w = w.clone().float()
    dead = torch.diag(hessian) == 0
    w[:, dead] = 0
    hinv = _inverse_hessian_chol(hessian, damp)  # (in, in), upper triangular
    codes = torch.zeros(rows, cols, dtype=torch.uint8, device=w.device) if bits else None
    scales, zeros = [], []
    scale = zero = None
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        w1 = w[:, i1:i2].clone()  # (out, b)
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        d = torch.diag(hinv1)  # (b,)
        if n is None:
            saliency = w1.pow(2) / d.pow(2)[None, :]
            k = int(saliency.numel() * sparsity)  # type: ignore[operator]
            pruned = torch.zeros_like(w1, dtype=torch.bool)
            if k:
                pruned.view(-1)[torch.topk(saliency.view(-1), k, largest=False).indices] = True
        else:
            pruned = torch.zeros_like(w1, dtype=torch.bool)
        for i in range(i2 - i1):
            col = i1 + i
            if n is not None and i % m == 0:  # type: ignore[operator]
                sal = w1[:, i : i + m].pow(2) / d[i : i + m].pow(2)[None, :]
                pruned[:, i : i + m].scatter_(1, torch.topk(sal, m - n, dim=1, largest=False).indices, True)  # type: ignore[operator]
            q = w1[:, i].clone()
            q[pruned[:, i]] = 0
            if bits:
                if col % group_size == 0:  # fit the group's grid on its current (already updated) weights
                    ahead = torch.cat([w1[:, i:], w[:, i2:]], dim=1)[:, :group_size]
                    scale, zero = fit_grid(ahead, bits, group_size, symmetric)  # (out, 1) each
                    scales.append(scale)
                    zeros.append(zero)
                qc = quantize_to_grid(q[:, None], scale, zero, bits, group_size)  # (out, 1); 0 → zero point
                codes[:, col] = qc[:, 0]  # type: ignore[index]
                q = (qc[:, 0].float() - zero[:, 0].float()) * scale[:, 0].float()  # type: ignore[index]
            e = (w1[:, i] - q) / d[i]
            w1[:, i:] -= e[:, None] * hinv1[i, i:][None, :]
            w1[:, i] = q
            err1[:, i] = e
        w[:, i1:i2] = w1
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    if not bits:
        return w, None
    qw = QuantizedWeight(q=codes, scale=torch.cat(scales, 1), zero=torch.cat(zeros, 1), bits=bits, group_size=group_size)  # type: ignore[arg-type]
    return qw.dequantize(), qw


@register_method("sparsegpt", SparseGPTConfig, keeps_dense=lambda cfg: cfg.bits is None)
def run_sparsegpt(ctx: StepContext, cfg: SparseGPTConfig) -> StepReport:
    targets = select_linears(ctx.model, ctx.arch, cfg, "sparsegpt")
    check_nm(targets, cfg, "sparsegpt")
    if cfg.bits:
        check_group_sizes(targets, cfg.group_size, "sparsegpt")
    blocksize = cfg.blocksize if cfg.m is None else math.ceil(cfg.blocksize / cfg.m) * cfg.m  # N:M groups never straddle blocks

    def transform(name, linear, stats):
        g = resolve_group_size(cfg.group_size, linear.in_features, name, "sparsegpt") if cfg.bits else cfg.group_size
        w, qw = sparsegpt_prune(linear.weight.detach(), stats.hessian, sparsity=cfg.sparsity, n=cfg.n, m=cfg.m,
                                blocksize=blocksize, damp=cfg.damp, bits=cfg.bits, group_size=g, symmetric=cfg.symmetric)
        if qw is not None:
            return QuantLinear.from_quantized(qw, linear.bias)
        linear.weight.data.copy_(w.to(linear.weight.dtype))
        return linear

    names = list(targets)
    report = apply_to_linears(ctx.model, ctx.arch, targets, transform, method="sparsegpt", kinds=frozenset({"hessian"}),
                              calib_ids=ctx.calib_ids(), batch_size=ctx.calibration.batch_size,
                              propagate=ctx.calibration.propagate)
    mark_pruned(ctx.model, names, cfg.pattern())
    return report
