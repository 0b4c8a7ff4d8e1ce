"""GPTQ: second-order weight quantization with error feedback (Frantar et al. 2022, arXiv:2210.17323).

Columns are quantized one at a time; each column's rounding error is spread over the columns not
yet quantized through the inverse Hessian ``H⁻¹`` of the layer's inputs (``H = Σ xᵀx``), so the
*output* error ``‖X(Ŵ - W)ᵀ‖²`` stays small where plain rounding (RTN) only keeps each weight close.
The driver accumulates ``H`` block by block (``kinds={"hessian"}``); :func:`gptq_quantize` is the
pure solve. It uses the upper Cholesky factor of the damped ``H⁻¹`` and lazy block updates as in
the paper's Algorithm 1. ``act_order`` visits columns by decreasing ``diag(H)``; the group grids are
then fitted up front in natural column order ("static groups"), so the stored codes keep the same
packed layout as RTN and no permutation has to be carried at run time.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from pydantic import Field
from torch import nn

from slimlm.calibrate import LinearStats
from slimlm.errors import SlimlmError
from slimlm.layers.quant import QuantizedWeight, QuantLinear
from slimlm.methods import StepContext, StepReport, register_method
from slimlm.methods.linear import apply_to_linears, require_finite_weights, select_linears
from slimlm.methods.quant.grid import clip_grid, fit_grid, n_groups
from slimlm.methods.quant.rtn import WeightQuantConfig, check_group_sizes, resolve_group_size
from slimlm.models.arch import Arch, input_groups

ZERO_ROW_FRACTION = 0.10  # a row with at least this share of exact zeros is treated as pruned


class GPTQConfig(WeightQuantConfig):
    damp: float = Field(0.01, gt=0, lt=1, description="dampening added to diag(H), relative to its mean")
    block_size: int = Field(128, ge=1, description="columns per lazy-update block")
    act_order: bool = Field(True, description="quantize columns by decreasing diag(H) (implies static groups; no run-time cost)")
    static_groups: bool = Field(False, description="fit every group's grid before any error feedback")
    clip: bool = Field(False, description="shrink each group's range where that lowers its Hessian-weighted rounding "
                       "error (SmolLM2 4-bit: -9 % perplexity; Gemma-3: +2 %)")
    preserve_zeros: bool = Field(True, description="keep exact zeros of pruned rows (≥10% zeros) at zero")


def require_finite_stats(name: str, stats: LinearStats | None, where: str) -> None:
    """NaN/inf activations mean the model already overflowed before this layer."""
    if stats is None:
        return
    for kind in ("hessian", "abs", "sq", "max"):
        t = getattr(stats, kind)
        if t is not None and not torch.isfinite(t).all():
            raise SlimlmError(f"{where}: calibration activations reaching {name} contain NaN or inf",
                              "check the model's weights and norms (run it in float32) or use other calibration text")


def zero_mask(w: torch.Tensor) -> torch.Tensor | None:
    """(out, in) mask of exact zeros in rows that look pruned, or None when there are none."""
    zeros = w == 0
    rows = zeros.float().mean(dim=1) >= ZERO_ROW_FRACTION
    mask = zeros & rows[:, None]
    return mask if bool(mask.any()) else None


def inverse_hessian_factor(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of ``(H + λI)⁻¹`` with ``λ = damp · mean diag(H)``; more damping if needed."""
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    mean_diag = float(torch.diag(h).mean())
    for attempt in range(4):
        lam = damp * (10**attempt) * mean_diag
        lower, info = torch.linalg.cholesky_ex(h + lam * eye)
        if int(info) == 0:
            hinv = torch.cholesky_solve(eye, lower)  # torch.cholesky_inverse is ~50× slower on CPU here
            upper, info = torch.linalg.cholesky_ex(hinv, upper=True)
            if int(info) == 0:
                return upper
    raise SlimlmError("gptq: the calibration Hessian is not positive definite even with 1000× dampening",
                      "use more calibration samples or a larger `damp`")


@contextmanager
def _serial(device: torch.device) -> Iterator[None]:
    """One CPU thread for the column loop: its ops are tiny, and thread fork/join costs more than it saves
    (on a busy machine, far more). The lazy block updates between loops keep every thread."""
    if device.type != "cpu" or torch.get_num_threads() == 1:
        yield
        return
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


@torch.no_grad()
def gptq_quantize(
    w: torch.Tensor,
    hessian: torch.Tensor,
    *,
    bits: int,
    group_size: int,
    symmetric: bool = False,
    damp: float = 0.01,
    block_size: int = 128,
    act_order: bool = True,
    static_groups: bool = False,
    clip: bool = False,
    preserve_zeros: bool = True,
) -> QuantizedWeight:
    """Quantize ``w`` (out, in) given ``hessian`` = Σ xᵀx (in, in); codes come back in natural column order."""
    W = w.detach().float().clone()  # (out, in), updated in place by the error feedback
    H = hessian.detach().float().clone()  # (in, in)
    rows, cols = W.shape
    maxq = 2**bits - 1
    keep = zero_mask(W) if preserve_zeros else None  # (out, in) exact zeros that must stay zero

    dead = torch.diag(H) == 0  # inputs that never fire: their weights cannot matter
    H[dead, dead] = 1
    W[:, dead] = 0

    def grid(w: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if clip:  # the range shrink (1, 0.95, …, 0.55) with the least tr(ΔW H ΔWᵀ) per group, as AWQ's
            return clip_grid(w, h, bits=bits, group_size=group_size, symmetric=symmetric)
        return fit_grid(w, bits, group_size, symmetric)

    static = static_groups or act_order
    if static:
        scale, zero = grid(W, H)  # (out, n_groups) each
    else:
        scale = torch.empty(rows, n_groups(cols, group_size), dtype=torch.float16, device=W.device)
        zero = torch.empty(rows, scale.shape[1], dtype=torch.uint8, device=W.device)

    perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(cols, device=W.device)
    H = H[perm][:, perm]
    Wt = W[:, perm].T.contiguous()  # (in, out): visited column c is the contiguous row Wt[c]
    keep_t = keep[:, perm].T.contiguous() if keep is not None else None
    group_of = (perm // group_size).tolist()  # natural-order group of each visited column
    hinv = inverse_hessian_factor(H, damp)  # (in, in) upper triangular
    Qt = torch.zeros(cols, rows, dtype=torch.uint8, device=W.device)
    scale_t, zero_t = scale.float().T.contiguous(), zero.float().T.contiguous()  # (n_groups, out)

    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        W1 = Wt[i1:i2]  # (b, out) view, updated in place
        E1 = torch.empty_like(W1)  # scaled errors of this block, for the lazy update
        Hinv1 = hinv[i1:i2, i1:i2]
        with _serial(W.device):
            for i in range(i2 - i1):
                c, g = i1 + i, group_of[i1 + i]
                if not static and c % group_size == 0:  # fit the group's grid on its current (updated) weights
                    s_g, z_g = grid(Wt[c : c + group_size].T, H[c : c + group_size, c : c + group_size])
                    scale[:, g], zero[:, g] = s_g[:, 0], z_g[:, 0]
                    scale_t[g], zero_t[g] = s_g[:, 0].float(), z_g[:, 0].float()
                s, z = scale_t[g], zero_t[g]  # (out,)
                col = W1[i]
                q = torch.round(col / s).add_(z).clamp_(0, maxq)
                if keep_t is not None:
                    q = torch.where(keep_t[c], z, q)  # code == zero point dequantizes to exactly 0
                Qt[c] = q
                err = col.sub((q - z).mul_(s)).div_(Hinv1[i, i])
                W1[i:].addr_(Hinv1[i, i:], err, alpha=-1)
                E1[i] = err
        Wt[i2:].addmm_(hinv[i1:i2, i2:].T, E1, alpha=-1)

    q = Qt.T[:, torch.argsort(perm)].contiguous()
    return QuantizedWeight(q=q, scale=scale, zero=zero, bits=bits, group_size=group_size)


def input_siblings(arch: Arch, targets: dict[str, nn.Module]) -> dict[str, list[str]]:
    """Targets that read the same input (q/k/v; gate/up): one stacked solve serves them all."""
    out: dict[str, list[str]] = {}
    for name in targets:
        for leaves in input_groups(arch):
            leaf = next((leaf for leaf in leaves if name.endswith("." + leaf)), None)
            if leaf is not None:
                prefix = name[: -len(leaf)]
                out[name] = [prefix + other for other in leaves if prefix + other in targets]
    return out


@register_method("gptq", GPTQConfig)
def run_gptq(ctx: StepContext, cfg: GPTQConfig) -> StepReport:
    targets = select_linears(ctx.model, ctx.arch, cfg, "gptq")
    check_group_sizes(targets, cfg.group_size, "gptq")
    ids = ctx.calib_ids()  # raises a clear error when the calibration text is too short
    siblings = input_siblings(ctx.arch, targets)
    done: dict[str, QuantLinear] = {}  # siblings quantized together with an earlier layer

    def transform(name: str, linear: nn.Linear, stats: LinearStats | None) -> nn.Module:
        if name in done:
            return done.pop(name)
        require_finite_stats(name, stats, "gptq")
        assert stats is not None and stats.hessian is not None
        group = siblings.get(name, [name])
        mods = [ctx.model.get_submodule(n) for n in group]  # not yet swapped: their turn comes later
        require_finite_weights(dict(zip(group, mods)), "gptq")
        g = resolve_group_size(cfg.group_size, linear.in_features, name, "gptq")
        qw = gptq_quantize(torch.cat([m.weight for m in mods]), stats.hessian, bits=cfg.bits, group_size=g,
                           symmetric=cfg.symmetric, damp=cfg.damp, block_size=cfg.block_size,
                           act_order=cfg.act_order, static_groups=cfg.static_groups, clip=cfg.clip,
                           preserve_zeros=cfg.preserve_zeros)
        start = 0
        for n, m in zip(group, mods):
            rows = slice(start, start + m.out_features)
            start += m.out_features
            part = QuantizedWeight(qw.q[rows], qw.scale[rows], qw.zero[rows], qw.bits, qw.group_size)
            done[n] = QuantLinear.from_quantized(part, m.bias)
        return done.pop(name)

    return apply_to_linears(ctx.model, ctx.arch, targets, transform, method="gptq", kinds=frozenset({"hessian"}),
                            calib_ids=ids, batch_size=ctx.calibration.batch_size,
                            propagate=ctx.calibration.propagate)
