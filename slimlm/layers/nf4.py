"""NF4 runtime layer (QLoRA, Dettmers et al. 2023, https://arxiv.org/abs/2305.14314).

4-bit NormalFloat codes, two per byte, one absmax per block of 64 weights (blocks run over the
flattened weight, as in bitsandbytes). With double quantization the block absmaxes are stored as
int8 around their mean, with one fp32 scale per 256 absmaxes: 4 + 8/64 + 32/(64·256) ≈ 4.127 bits
per weight. The layer dequantizes on the fly on its own device.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from slimlm.layers import register_format
from slimlm.layers.quant import unpack_bits

NF4_OFFSET = 0.9677083  # QLoRA's choice: the outermost quantile, (1 - 1/(2·15) + 1 - 1/(2·16)) / 2


def nf4_codebook(dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The 16 NF4 levels: quantiles of N(0, 1) with an exact zero, normalised to [-1, 1].

    8 positive levels from ``Φ⁻¹(linspace(offset, 0.5, 9))`` and 7 negative ones from
    ``Φ⁻¹(linspace(offset, 0.5, 8))`` — asymmetric so that 0 is representable.
    """
    pos = torch.special.ndtri(torch.linspace(NF4_OFFSET, 0.5, 9, dtype=torch.float64)[:-1])
    neg = -torch.special.ndtri(torch.linspace(NF4_OFFSET, 0.5, 8, dtype=torch.float64)[:-1])
    levels = torch.cat([pos, torch.zeros(1, dtype=torch.float64), neg]).sort().values
    return (levels / levels.abs().max()).to(dtype)  # (16,)


def dequantize_absmax(q: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, block: int) -> torch.Tensor:
    """Second-level dequantization: absmax (n_blocks,) = q · scale[block of ``block``] + offset, ≥ 0."""
    s = scale.float().repeat_interleave(block)[: q.numel()]
    return (q.float() * s + offset.float()).clamp(min=0)


@register_format
class NF4Linear(nn.Module):
    """Linear layer with NF4-packed weights and (optionally double-quantized) block absmaxes."""

    format = "nf4_linear"

    def __init__(self, in_features: int, out_features: int, bias: bool, block_size: int = 64,
                 double_quant: bool = True, dq_block_size: int = 256) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.block_size, self.double_quant, self.dq_block_size = block_size, double_quant, dq_block_size
        n_blocks = math.ceil(in_features * out_features / block_size)
        self.register_buffer("qweight", torch.zeros(n_blocks * block_size // 2, dtype=torch.uint8))
        if double_quant:
            self.register_buffer("absmax_q", torch.zeros(n_blocks, dtype=torch.int8))
            self.register_buffer("absmax_scale", torch.zeros(math.ceil(n_blocks / dq_block_size), dtype=torch.float32))
            self.register_buffer("absmax_offset", torch.zeros(1, dtype=torch.float32))
        else:
            self.register_buffer("absmax", torch.zeros(n_blocks, dtype=torch.float32))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    def spec(self) -> dict[str, Any]:
        return {"in_features": self.in_features, "out_features": self.out_features, "bias": self.bias is not None,
                "block_size": self.block_size, "double_quant": self.double_quant, "dq_block_size": self.dq_block_size}

    @classmethod
    def empty(cls, spec: dict[str, Any]) -> "NF4Linear":
        return cls(**spec)

    def logical_numel(self) -> int:
        return self.in_features * self.out_features + (self.out_features if self.bias is not None else 0)

    def bits_per_weight(self) -> float:
        """Stored bits of codes and scales per weight (bias excluded)."""
        held = [self.qweight] + ([self.absmax_q, self.absmax_scale, self.absmax_offset] if self.double_quant else [self.absmax])
        return 8 * sum(t.numel() * t.element_size() for t in held) / (self.in_features * self.out_features)

    def block_absmax(self) -> torch.Tensor:
        if self.double_quant:
            return dequantize_absmax(self.absmax_q, self.absmax_scale, self.absmax_offset, self.dq_block_size)
        return self.absmax.float()

    def codes(self) -> torch.Tensor:
        return unpack_bits(self.qweight, 4, self.qweight.numel() * 2)  # (n_blocks·block,) int

    def weight_dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        book = nf4_codebook(torch.float32).to(self.qweight.device)
        w = book[self.codes().long()].view(-1, self.block_size) * self.block_absmax()[:, None]
        return w.reshape(-1)[: self.in_features * self.out_features].view(self.out_features, self.in_features).to(dtype)

    @property
    def weight(self) -> torch.Tensor:
        return self.weight_dequantized()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight_dequantized(x.dtype), self.bias)

    def extra_repr(self) -> str:
        dq = f", double_quant(block={self.dq_block_size})" if self.double_quant else ""
        return f"in={self.in_features}, out={self.out_features}, nf4 block={self.block_size}{dq}"

