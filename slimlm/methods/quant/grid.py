"""Uniform quantization grids shared by RTN, GPTQ and AWQ.

Asymmetric: ``scale = (max - min) / (2^b - 1)``, integer zero point. Symmetric: ``scale =
absmax / (2^(b-1) - 1)``, zero point fixed at ``2^(b-1)``. Scales are rounded to fp16 *before*
codes are computed, so the stored artifact dequantizes to exactly what the method intended.
"""

from __future__ import annotations

import math

import torch

from slimlm.layers.quant import QuantizedWeight, dequantize


def _pad_groups(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """(out, in) → (out, n_groups, group_size); a partial last group repeats its last column."""
    pad = (-w.shape[1]) % group_size
    if pad:
        w = torch.cat([w, w[:, -1:].expand(-1, pad)], dim=1)
    return w.reshape(w.shape[0], -1, group_size)


def fit_grid(w: torch.Tensor, bits: int, group_size: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group (scale fp16, zero uint8) for ``w`` of shape (out, in)."""
    g = _pad_groups(w.float(), group_size)
    maxq = 2**bits - 1
    if symmetric:
        absmax = g.abs().amax(dim=2).clamp(min=1e-8)
        scale = (absmax / (2 ** (bits - 1) - 1)).to(torch.float16).clamp(min=torch.finfo(torch.float16).tiny)
        zero = torch.full_like(scale, 2 ** (bits - 1), dtype=torch.uint8)
        return scale, zero
    lo = g.amin(dim=2).clamp(max=0)
    hi = g.amax(dim=2).clamp(min=0)
    scale = ((hi - lo).clamp(min=1e-8) / maxq).to(torch.float16).clamp(min=torch.finfo(torch.float16).tiny)
    zero = torch.round(-lo / scale.float()).clamp(0, maxq).to(torch.uint8)
    return scale, zero


def quantize_to_grid(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """Integer codes of ``w`` (out, in) on the given per-group grid."""
    cols = w.shape[1]
    s = scale.float().repeat_interleave(group_size, dim=1)[:, :cols]
    z = zero.float().repeat_interleave(group_size, dim=1)[:, :cols]
    return torch.clamp(torch.round(w.float() / s) + z, 0, 2**bits - 1).to(torch.uint8)


def n_groups(in_features: int, group_size: int) -> int:
    return math.ceil(in_features / group_size)


def round_to_nearest(w: torch.Tensor, bits: int, group_size: int, symmetric: bool) -> QuantizedWeight:
    """RTN: fit each group's grid to its min/max and round every weight to the nearest level."""
    scale, zero = fit_grid(w, bits, group_size, symmetric)
    q = quantize_to_grid(w, scale, zero, bits, group_size)
    return QuantizedWeight(q=q, scale=scale, zero=zero, bits=bits, group_size=group_size)


@torch.no_grad()
def clip_grid(w: torch.Tensor, hessian: torch.Tensor, *, bits: int, group_size: int, symmetric: bool,
              n_grid: int = 20, max_shrink: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-(row, group) grid whose range is shrunk by the ratio minimising that group's output error."""
    w = w.float()
    h = hessian.float()
    cols = w.shape[1]
    bounds = [(a, min(a + group_size, cols)) for a in range(0, cols, group_size)]
    blocks = [h[a:b, a:b] for a, b in bounds]  # the group's own inputs: cross-group terms are ignored
    best_scale, best_zero = fit_grid(w, bits, group_size, symmetric)
    best_err = torch.full((w.shape[0], n_groups(cols, group_size)), math.inf, device=w.device)
    for k in range(max(1, int(max_shrink * n_grid))):
        scale, zero = fit_grid(w * (1 - k / n_grid), bits, group_size, symmetric)
        d = dequantize(quantize_to_grid(w, scale, zero, bits, group_size), scale, zero, group_size, torch.float32) - w
        err = torch.stack([((d[:, a:b] @ hb) * d[:, a:b]).sum(1) for (a, b), hb in zip(bounds, blocks)], dim=1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
        best_zero = torch.where(better, zero, best_zero)
    return best_scale, best_zero
