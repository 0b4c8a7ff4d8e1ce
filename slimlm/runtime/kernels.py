"""Fast matmul kernels for every stored layer format, packed once when the engine is built.

Paths (``Kernel.path``), chosen per layer (or per fused group such as q/k/v) by :func:`build_kernel`:

- ``int4pack`` — 4-bit :class:`QuantLinear` on CPU → ``aten._weight_int4pack_mm_for_cpu`` with bf16
  activations. The kernel computes ``(q − 8)·scale + zero``; slimlm's ``s·(q − z)`` maps exactly with
  ``zero = s·(8 − z)``. Its group G must be one of 32…256 and divide K: a slimlm group that does not fit
  (SmolLM2's K = 576 at g128, or per-channel) is re-expressed exactly as groups of g = the largest
  power of two ≤ 256 dividing both G and K (g128 on K = 576 → g64 groups with each scale repeated
  twice; the partial last group of 64 columns is one g64 group). Scales/zeros are held in bf16 (the
  kernel's dtype): ≤ 2⁻⁹ relative error per scale on top of the fp16-stored ones.
- ``int8pack`` — 8-bit :class:`QuantLinear` (per channel, or ≤ 16 column groups: one call per group,
  e.g. the 8-bit g128 embedding table as a tied head) and :class:`Int8Linear` on CPU →
  ``torch._weight_int8pack_mm`` (bf16 activations). An asymmetric zero point z is folded exactly:
  ``s·(q − z) = s·(q − 128) + s·(128 − z)``, i.e. the int8 product plus ``Σx · s·(128 − z)`` per channel.
  :class:`Int8Linear` (W8A8) runs weight-only here: activations are not quantized (more exact, faster).
- ``dense`` — ``nn.Linear`` weights in the compute dtype (a bf16 copy when the engine runs in bf16).
- ``dequantized`` — every other format (NF4, ternary, 2/3/5/6/7-bit, finely grouped 8-bit, sparse, off-CPU
  int4/int8): the weight is dequantized **once** into the compute dtype and cached, so decoding runs at
  dense speed (never a per-token dequantization), at the memory cost of a dense copy.
Low-rank layers run as two kernels (one per factor), each taking its own path. Any other module (a peft
LoRA wrapper during on-policy distillation) runs its own forward (``module``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from slimlm.layers.embedding import QuantEmbedding
from slimlm.layers.int8 import Int8Linear
from slimlm.layers.lowrank import LowRankLinear
from slimlm.layers.quant import QuantLinear

INT4_GROUPS = (256, 128, 64, 32)


@dataclass
class Kernel:
    """``x (…, K) → (…, N)`` in the compute dtype, plus which path it took (for notices and docs)."""

    fn: Callable[[torch.Tensor], torch.Tensor]
    path: str
    out_features: int

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


def kernel_group(group: int, k: int) -> int | None:
    """Largest int4-kernel group that tiles both slimlm's group and K exactly (None if none does)."""
    return next((g for g in INT4_GROUPS if group % g == 0 and k % g == 0), None)


def _bias(mods: list[nn.Module]) -> torch.Tensor | None:
    biases = [getattr(m, "bias", None) for m in mods]
    if all(b is None for b in biases):
        return None
    return torch.cat([b.detach() if b is not None else torch.zeros(m.out_features) for m, b in zip(mods, biases)])


def _with_bias(fn: Callable[[torch.Tensor], torch.Tensor], bias: torch.Tensor | None, dtype: torch.dtype):
    if bias is None:
        return fn
    b = bias.to(dtype)
    return lambda x: fn(x) + b


def _flat(fn: Callable[[torch.Tensor], torch.Tensor], dtype: torch.dtype, kernel_dtype: torch.dtype, n: int):
    """Adapt a 2-D kernel (M, K) → (M, N) that wants ``kernel_dtype`` input to (…, K) tensors of ``dtype``."""

    def run(x: torch.Tensor) -> torch.Tensor:
        y = fn(x.reshape(-1, x.shape[-1]).to(kernel_dtype))
        return y.to(dtype).reshape(*x.shape[:-1], n)

    return run


def int4_packed(mods: list[QuantLinear]) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(packed uint8 (N, K/2), scales_and_zeros (K/g, N, 2) bf16, g) for 4-bit layers sharing K and group."""
    k, group = mods[0].in_features, mods[0].group_size
    g = kernel_group(group, k)
    assert g is not None
    q = torch.cat([m.codes() for m in mods]).to(torch.int32)  # (N, K)
    rep = group // g
    n_groups = k // g
    scale = torch.cat([m.scales for m in mods]).float().repeat_interleave(rep, dim=1)[:, :n_groups]  # (N, K/g)
    zero = torch.cat([m.zeros for m in mods]).float().repeat_interleave(rep, dim=1)[:, :n_groups]
    sz = torch.stack([scale, scale * (8 - zero)], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.contiguous(), 1)
    return packed, sz, g


def int8_groups(mod: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, int]:
    """(int8 codes (N, K), scales (N, n_groups), zero corrections (N, n_groups) or None, group) with
    ``w[:, group j] = codes·scale[:, j]`` and the zero point folded into ``Σx_j · corr[:, j]``."""
    if isinstance(mod, Int8Linear):
        return mod.qweight, mod.w_scale.float()[:, None], None, mod.in_features
    codes = mod.codes().to(torch.int16)
    scale, z = mod.scales.float(), mod.zeros.to(torch.int16)
    corr = scale * (128 - z).float()
    return (codes - 128).to(torch.int8), scale, corr if bool((z != 128).any()) else None, mod.group_size


def int8_kernel(mods: list[nn.Module]) -> Callable[[torch.Tensor], torch.Tensor]:
    """bf16 (M, K) → (M, N): one ``_weight_int8pack_mm`` per column group (one for per-channel layers)."""
    parts = [int8_groups(m) for m in mods]
    k, group = mods[0].in_features, parts[0][3]
    codes = torch.cat([p[0] for p in parts])
    scales = torch.cat([p[1] for p in parts])  # (N, n_groups)
    corr = None
    if any(p[2] is not None for p in parts):
        corr = torch.cat([p[2] if p[2] is not None else torch.zeros_like(p[1]) for p in parts]).t().contiguous()
    bounds = [(g0, min(g0 + group, k)) for g0 in range(0, k, group)]
    slices = [(g0, g1, codes[:, g0:g1].contiguous(), scales[:, j].to(torch.bfloat16).contiguous())
              for j, (g0, g1) in enumerate(bounds)]
    mm = torch._weight_int8pack_mm

    def run(x: torch.Tensor) -> torch.Tensor:
        if len(slices) == 1 and corr is None:
            return mm(x, slices[0][2], slices[0][3])
        y = sum(mm(x[:, g0:g1].contiguous(), c, s).float() for g0, g1, c, s in slices)
        if corr is not None:  # Σx per group (M, n_groups) @ corrections (n_groups, N)
            y = y + torch.stack([x[:, g0:g1].float().sum(-1) for g0, g1 in bounds], -1) @ corr
        return y.to(x.dtype)  # type: ignore[union-attr]

    return run


INT8_MAX_GROUPS = 16  # beyond this many column groups the per-group int8 calls cost more than a dense copy


def _packed_int(m: nn.Module) -> bool:
    """Plain packed-integer layers (a packed embedding table counts: a tied head multiplies by it)."""
    return type(m) in (QuantLinear, QuantEmbedding)


def int4_ok(m: nn.Module, device: torch.device) -> bool:
    return device.type == "cpu" and _packed_int(m) and m.bits == 4 and m.out_features % 16 == 0 \
        and kernel_group(m.group_size, m.in_features) is not None


def int8_ok(m: nn.Module, device: torch.device) -> bool:
    if device.type != "cpu":
        return False
    return type(m) is Int8Linear or (_packed_int(m) and m.bits == 8 and m.scales.shape[1] <= INT8_MAX_GROUPS)


def _stored_format(m: nn.Module) -> bool:
    """Layers whose ``.weight`` is the whole truth (plain linears and slimlm's stored formats)."""
    from slimlm.layers import FORMATS

    return type(m) is nn.Linear or type(m) in {FORMATS.get(name) for name in FORMATS.names()}


def dense_weight(m: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """The layer's (N, K) weight in ``dtype``: no copy for a plain linear already in that dtype."""
    w = m.weight.detach()
    return w if w.dtype == dtype else w.to(dtype)


def build_kernel(mods: list[nn.Module], dtype: torch.dtype, device: torch.device) -> Kernel:
    """One kernel computing ``cat([m(x) for m in mods], -1)``; all ``mods`` read the same input."""
    n = sum(m.out_features for m in mods)
    if len(mods) == 1 and isinstance(mods[0], LowRankLinear):
        first, second = build_kernel([mods[0].first], dtype, device), build_kernel([mods[0].second], dtype, device)
        return Kernel(lambda x: second(first(x)), f"lowrank({first.path}+{second.path})", n)
    if any(isinstance(m, LowRankLinear) for m in mods):
        parts = [build_kernel([m], dtype, device) for m in mods]
        return Kernel(lambda x: torch.cat([p(x) for p in parts], -1), "+".join(sorted({p.path for p in parts})), n)
    if any(not _stored_format(m) for m in mods):  # e.g. a LoRA wrapper being trained: its own forward is the truth
        run = mods[0] if len(mods) == 1 else (lambda x: torch.cat([m(x) for m in mods], -1))
        return Kernel(lambda x: run(x), "module", n)
    bias = _bias(mods)
    same = len({(type(m), getattr(m, "bits", 0), getattr(m, "group_size", 0)) for m in mods}) == 1
    if same and all(int4_ok(m, device) for m in mods):
        packed, sz, g = int4_packed(mods)  # type: ignore[arg-type]
        mm = torch.ops.aten._weight_int4pack_mm_for_cpu
        fn = _flat(lambda x: mm(x, packed, g, sz), dtype, torch.bfloat16, n)
        return Kernel(_with_bias(fn, bias, dtype), "int4pack", n)
    if same and all(int8_ok(m, device) for m in mods):
        int8 = int8_kernel(mods)
        return Kernel(_with_bias(_flat(int8, dtype, torch.bfloat16, n), bias, dtype), "int8pack", n)
    plain = all(type(m) is nn.Linear for m in mods)
    w = torch.cat([dense_weight(m, dtype) for m in mods]) if len(mods) > 1 else dense_weight(mods[0], dtype)
    b = None if bias is None else bias.to(dtype)
    return Kernel(lambda x: F.linear(x, w, b), "dense" if plain else "dequantized", n)


def kernel_paths(kernels: list[Kernel]) -> dict[str, int]:
    """How many kernels took each path (for the engine's one-line notice)."""
    out: dict[str, int] = {}
    for k in kernels:
        out[k.path] = out.get(k.path, 0) + 1
    return out


def describe(paths: dict[str, int]) -> str:
    return ", ".join(f"{p}×{n}" for p, n in sorted(paths.items(), key=lambda kv: -kv[1]))
