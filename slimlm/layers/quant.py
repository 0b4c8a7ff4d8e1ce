"""Packed integer weights: b-bit codes (2–8) packed into bytes, fp16 scales, uint8 zero points.

The stored bytes are what the artifact weighs; ``QuantLinear`` dequantizes on the fly on the
layer's device, so the same code path runs on CPU and GPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from slimlm.layers import register_format


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned ``bits``-bit codes (any shape) into a flat uint8 tensor, LSB first."""
    flat = codes.reshape(-1).to(torch.int32)
    if bits == 8:
        return flat.to(torch.uint8)
    shifts = torch.arange(bits, device=flat.device, dtype=torch.int32)
    bitplanes = ((flat[:, None] >> shifts) & 1).reshape(-1)  # (N*bits,)
    pad = (-bitplanes.numel()) % 8
    bitplanes = F.pad(bitplanes, (0, pad)).reshape(-1, 8)
    weights = (1 << torch.arange(8, device=flat.device, dtype=torch.int32))
    return (bitplanes * weights).sum(dim=1).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: a flat int32 tensor of ``numel`` codes."""
    if bits == 8:
        return packed.to(torch.int32)
    if bits == 4:  # fast path: two nibbles per byte
        return torch.stack([packed & 0xF, packed >> 4], dim=1).reshape(-1)[:numel]
    b = packed.to(torch.int32)
    bitplanes = ((b[:, None] >> torch.arange(8, device=b.device, dtype=torch.int32)) & 1).reshape(-1)
    bitplanes = bitplanes[: numel * bits].reshape(numel, bits)
    return (bitplanes << torch.arange(bits, device=b.device, dtype=torch.int32)).sum(dim=1)


@dataclass
class QuantizedWeight:
    """Integer codes on a per-group grid: ``w ≈ (q - zero) * scale``, groups along the input dim."""

    q: torch.Tensor  # (out, in) int codes in [0, 2^bits)
    scale: torch.Tensor  # (out, n_groups) fp16
    zero: torch.Tensor  # (out, n_groups) uint8
    bits: int
    group_size: int  # columns per group; the last group may be partial

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize(self.q, self.scale, self.zero, self.group_size, dtype)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int, dtype: torch.dtype) -> torch.Tensor:
    """(q - zero) * scale with per-group broadcasting; a partial last group is padded then cut."""
    rows, cols = q.shape
    pad = (-cols) % group_size
    qf = q.to(dtype)
    if pad:
        qf = torch.nn.functional.pad(qf, (0, pad))
    qf = qf.view(rows, -1, group_size)
    w = (qf - zero.to(dtype)[..., None]) * scale.to(dtype)[..., None]
    return w.reshape(rows, -1)[:, :cols]


@register_format
class QuantLinear(nn.Module):
    """A linear layer whose weight is stored packed (``bits`` per weight plus group scales)."""

    format = "quant_linear"

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int, bias: bool) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size = bits, group_size
        n_groups = math.ceil(in_features / group_size)
        self.register_buffer("qweight", torch.zeros(math.ceil(in_features * out_features * bits / 8), dtype=torch.uint8))
        self.register_buffer("scales", torch.zeros(out_features, n_groups, dtype=torch.float16))
        self.register_buffer("zeros", torch.zeros(out_features, n_groups, dtype=torch.uint8))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    @classmethod
    def from_quantized(cls, qw: QuantizedWeight, bias: torch.Tensor | None) -> "QuantLinear":
        out_f, in_f = qw.q.shape
        layer = cls(in_f, out_f, qw.bits, qw.group_size, bias is not None)
        layer.qweight = pack_bits(qw.q, qw.bits)
        layer.scales = qw.scale.to(torch.float16)
        layer.zeros = qw.zero.to(torch.uint8)
        if bias is not None:
            layer.bias = nn.Parameter(bias.detach().clone())
        return layer.to(qw.scale.device)

    def spec(self) -> dict[str, Any]:
        return {"in_features": self.in_features, "out_features": self.out_features, "bits": self.bits,
                "group_size": self.group_size, "bias": self.bias is not None}

    @classmethod
    def empty(cls, spec: dict[str, Any]) -> "QuantLinear":
        return cls(**spec)

    def logical_numel(self) -> int:
        return self.in_features * self.out_features + (self.out_features if self.bias is not None else 0)

    def codes(self) -> torch.Tensor:
        q = unpack_bits(self.qweight, self.bits, self.in_features * self.out_features)
        return q.reshape(self.out_features, self.in_features)

    def weight_dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize(self.codes(), self.scales, self.zeros, self.group_size, dtype)

    @property
    def weight(self) -> torch.Tensor:
        """Dequantized weight, so code that reads ``.weight`` (stats, export) keeps working."""
        return self.weight_dequantized()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight_dequantized(x.dtype), self.bias)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, bits={self.bits}, group_size={self.group_size}"
